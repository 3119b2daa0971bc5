"""Layout-independent weight initialization.

Every layout (1 process, FSDP x N, TP, HSDP, pipeline stages, ...) must start from exactly the
weights a single process would have. Random init on sharded parameters cannot promise that (a
rank sees only its shard, and CPU generators have no notion of "the offset of my shard"), so
lathe initializes one *unit* at a time at full size and then hands it to the parallel model:

- the units are the root (embeddings, final norm, output) and each transformer block;
- each unit is materialized from the meta model on the device, seeded from (seed, unit name),
  and initialized with the model's own ``init_weights``;
- ``set_model_state_dict(full_state_dict=True)`` scatters the full tensors into whatever sharding
  the part's parameters have (FSDP, TP, HSDP, plain), locally, without communication.

Seeding per unit name makes a block's weights independent of which other blocks a rank holds, so
a pipeline stage owning layers 4-7 initializes them as the single process does, with no seed
checkpoint. Peak extra memory: one full unit (the root's embedding + output for large models).
"""

from __future__ import annotations

import copy
import zlib

import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict


def unit_seed(seed: int, unit: str) -> int:
    return (seed * 1_000_003 + zlib.crc32(unit.encode())) % (2**63)


def _init_unit(module: nn.Module, init, device: torch.device, seed: int, unit: str) -> dict[str, torch.Tensor]:
    module.to_empty(device=device)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(unit_seed(seed, unit))
        init(module)
    return module.state_dict()


def init_model_parts(model_parts: list[nn.Module], reference: nn.Module, device: torch.device, seed: int) -> None:
    """Initialize ``model_parts`` (parallelized, materialized with ``to_empty``) from ``reference``,
    the unparallelized model on the meta device."""
    options = StateDictOptions(full_state_dict=True, strict=False)
    for part in model_parts:
        if any(getattr(part, name, None) is not None for name in ("tok_embeddings", "norm", "output")):
            root = copy.deepcopy(reference)
            root.layers = nn.ModuleDict()  # the root unit alone
            full = _init_unit(root, lambda m: m.init_weights(buffer_device=device), device, seed, "root")
            set_model_state_dict(part, _only_present(full, part), options=options)
        for name in part.layers.keys():
            block = copy.deepcopy(reference.layers[name])
            full = _init_unit(block, lambda m: m.init_weights(), device, seed, f"layers.{name}")
            set_model_state_dict(part, {f"layers.{name}.{k}": v for k, v in full.items()}, options=options)
        part.init_rope(device)
        part.train()


def _only_present(state: dict[str, torch.Tensor], part: nn.Module) -> dict[str, torch.Tensor]:
    """Keep the root tensors this part owns (a pipeline stage may lack embeddings or output)."""
    return {k: v for k, v in state.items() if getattr(part, k.split(".")[0], None) is not None}
