"""torchrun entry point for parity and checkpoint tests: train with the given overrides, then write
the global per-step losses to {dump_folder}/result.pt and each rank's full parameters to
{dump_folder}/params_rank{R}.pt (see ``load_result``). ``run`` is the body, also run per layout
by multi_worker.py inside a process group it made."""

import json
import sys
from pathlib import Path

import torch
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

from lathe.config import load_config
from lathe.parallel import distributed
from lathe.trainer import train


def run(argv: list[str]) -> None:
    cfg, _ = load_config(argv)
    result = train(cfg)
    # Every rank gathers the full parameters of the parts it holds (a collective within each
    # part's mesh); pipeline ranks hold different parts, so each rank writes its own file.
    params = {}
    for part in result.model_parts:
        params.update(get_model_state_dict(part, options=StateDictOptions(full_state_dict=True)))
    folder = Path(cfg.job.dump_folder)
    torch.save({k: v.detach().cpu() for k, v in params.items()}, folder / f"params_rank{distributed.rank()}.pt")
    if distributed.rank() == 0:
        logged = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
        losses = {r["step"]: r["loss"] for r in logged if "loss" in r}  # averaged over DP ranks
        val_losses = {r["step"]: r["val_loss"] for r in logged if "val_loss" in r}
        torch.save({"losses": losses, "val_losses": val_losses}, folder / "result.pt")
    del result, params


def main() -> None:
    run(sys.argv[1:])
    distributed.finish(0)


if __name__ == "__main__":
    main()


def load_result(folder: Path) -> dict:
    """Losses, and the parameters merged over ranks (replicas hold identical copies)."""
    result = torch.load(folder / "result.pt", weights_only=True)
    result["params"] = {}
    for f in sorted(folder.glob("params_rank*.pt")):
        result["params"].update(torch.load(f, weights_only=True))
    return result
