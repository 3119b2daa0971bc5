"""Checkpoints hold the unfused projection names, whichever layout trained.

A model built with ``model.fused_qkv`` / ``model.fused_w13`` has one ``wqkv`` (``w13``) parameter
where the unfused model has ``wq``, ``wk``, ``wv`` (``w1``, ``w3``). The checkpoint manager passes
every model and optimizer state dict through ``to_unfused`` before saving and ``to_fused`` after
loading, so a checkpoint written by either layout loads into the other (weights, Adam moments and
all), and Hugging Face conversion and torchtitan see the names they know. The row layouts and the
plain-tensor mapping live with the model (``lathe.models.llama``); this module adds what sharded
(DTensor) parameters need: a fused tensor is gathered whole, one at a time, split, and each piece
is sharded again along its rows. Saving a fused run therefore holds, transiently, one whole fused
tensor plus a sharded copy of the fused tensors' pieces per rank.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor

from lathe.models.llama import ModelArgs, _join, _split, fuse_state_dict, unfuse_state_dict


def _is_fused(args: ModelArgs) -> bool:
    return bool(getattr(args, "fused_qkv", False) or getattr(args, "fused_w13", False))


def _split_sharded(fused_name: str, t: torch.Tensor, args: ModelArgs) -> tuple[torch.Tensor, ...]:
    if not isinstance(t, DTensor):
        return tuple(p.clone() for p in _split(fused_name, t, args))
    full = t.full_tensor()
    rows = [Replicate() if p.is_replicate() else Shard(0) for p in t.placements]
    return tuple(distribute_tensor(p.contiguous(), t.device_mesh, rows, src_data_rank=None)
                 for p in _split(fused_name, full, args))


def to_unfused(state: dict[str, Any], args: ModelArgs) -> dict[str, Any]:
    """A model or flattened optimizer state dict under the unfused names (unchanged if unfused)."""
    if not _is_fused(args):
        return state
    return unfuse_state_dict(state, args, split=_split_sharded)


def to_fused(state: dict[str, Any], args: ModelArgs, live: dict[str, Any]) -> dict[str, Any]:
    """The inverse: ``state`` (unfused names, as loaded) for a model with ``args``' layout.
    ``live`` is the model's (or optimizer's) own state dict, whose fused tensors say how the
    joined values must be sharded."""
    if not _is_fused(args):
        return state
    joined = fuse_state_dict(state, args, join=lambda name, pieces, a: _join(
        name, [p.full_tensor() if isinstance(p, DTensor) else p for p in pieces], a))
    for key, value in joined.items():
        target = live.get(key)
        if isinstance(target, DTensor) and not isinstance(value, DTensor):
            joined[key] = distribute_tensor(value.to(target.dtype), target.device_mesh, target.placements,
                                            src_data_rank=None)
    return joined
