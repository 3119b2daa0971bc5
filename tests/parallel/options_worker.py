"""torchrun entry point for tests of techniques applied from outside the model (float8, CPU
offload, optimizer in backward, fused norm): train like worker.py (same result files, read with
``worker.load_result``), and also write {dump_folder}/facts_rank{R}.json, what this rank's
trained model looks like (converted modules, where parameters live, gradients left). ``run`` is
the body, also run per layout by multi_worker.py inside a process group it made."""

import json
import sys
from pathlib import Path

import torch
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

from lathe.config import load_config
from lathe.parallel import distributed
from lathe.trainer import train


def facts(parts) -> dict:
    from torch.distributed.tensor import DTensor

    out = {"float8_linears": 0, "float8_all_gather_weights": 0, "precomputed_scales": 0, "fused_norms": 0,
           "param_devices": set(), "grads_left": 0, "offload_policy": None}
    for part in parts:
        for module in part.modules():
            name = type(module).__name__
            out["float8_linears"] += name == "Float8Linear"
            out["fused_norms"] += name == "FusedRMSNorm"
            state = getattr(module, "_get_fsdp_state", None)
            if state is not None and out["offload_policy"] is None:
                group = state()._fsdp_param_group
                out["offload_policy"] = type(group.offload_policy).__name__ if group is not None else None
        for name, p in part.named_parameters():
            local = p._local_tensor if isinstance(p, DTensor) else p  # the stored shard itself, not a view
            out["param_devices"].add(local.device.type)
            out["grads_left"] += p.grad is not None
            if type(local).__name__ == "WeightWithDynamicFloat8CastTensor":
                out["float8_all_gather_weights"] += 1
                out["precomputed_scales"] += getattr(local, "_precomputed_scale", None) is not None
            elif name.endswith("weight") and type(part.get_submodule(name.rsplit(".", 1)[0])).__name__ == "Float8Linear":
                out.setdefault("float8_linears_without_float8_all_gather", []).append(name)
    out["param_devices"] = sorted(out["param_devices"])
    return out


def run(argv: list[str]) -> None:
    cfg, _ = load_config(argv)
    result = train(cfg)
    folder = Path(cfg.job.dump_folder)
    rank = distributed.rank()
    (folder / f"facts_rank{rank}.json").write_text(json.dumps({**facts(result.model_parts), "steps": result.steps}))
    params = {}
    for part in result.model_parts:
        params.update(get_model_state_dict(part, options=StateDictOptions(full_state_dict=True)))
    torch.save({k: v.detach().float().cpu() for k, v in params.items()}, folder / f"params_rank{rank}.pt")
    if rank == 0:
        logged = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
        torch.save({"losses": {r["step"]: r["loss"] for r in logged if "loss" in r},
                    "val_losses": {r["step"]: r["val_loss"] for r in logged if "val_loss" in r}},
                   folder / "result.pt")
    del result, params


def main() -> None:
    run(sys.argv[1:])
    distributed.finish(0)


if __name__ == "__main__":
    main()
