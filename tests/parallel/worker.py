"""torchrun entry point for parity tests: train with the given overrides, then write the global
per-step losses and the full final parameters (gathered to rank 0) to {dump_folder}/result.pt."""

import json
import sys
from pathlib import Path

import torch
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

from lathe.config import load_config
from lathe.parallel import distributed
from lathe.trainer import train


def main() -> None:
    cfg, _ = load_config(sys.argv[1:])
    result = train(cfg)
    # Gather every shard to rank 0 (a collective: all ranks call it).
    params = get_model_state_dict(result.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if distributed.rank() == 0:
        folder = Path(cfg.job.dump_folder)
        logged = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
        losses = {r["step"]: r["loss"] for r in logged if "loss" in r}  # averaged over DP ranks
        torch.save({"losses": losses, "params": params}, folder / "result.pt")
    del result, params
    distributed.finish(0)


if __name__ == "__main__":
    main()
