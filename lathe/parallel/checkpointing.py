"""Activation checkpointing (AC), applied per transformer block from outside the model.

AC trades compute for memory: a wrapped block keeps only its input during forward and recomputes
its activations during backward.
- ``full``: every block.
- ``selective`` with a number N: every Nth block (layers.N-1, layers.2N-1, ...).
- ``selective`` with ``op``: every block, but the outputs of the expensive ops (matmuls,
  attention) are saved instead of recomputed; only every second matmul output is dropped, which
  keeps roughly half of the matmul memory while avoiding most of the recompute cost.

Wrapping replaces ``model.layers[name]`` by a wrapper under the same key. The wrapper adds a
``_checkpoint_wrapped_module`` level to parameter names; ``lathe.parallel.clean_name`` and DCP's
state-dict helpers strip it, so checkpoints keep the plain names.
"""

from __future__ import annotations

import logging
from collections import defaultdict

import torch
from torch import nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts

logger = logging.getLogger("lathe")


def _save_list() -> set:
    ops = {torch.ops.aten.mm.default}
    # Attention kernels differ by device and backend: save whichever one ran.
    for name in ("_scaled_dot_product_efficient_attention", "_scaled_dot_product_flash_attention",
                 "_scaled_dot_product_flash_attention_for_cpu", "_scaled_dot_product_cudnn_attention"):
        if hasattr(torch.ops.aten, name):
            ops.add(getattr(torch.ops.aten, name).default)
    if hasattr(torch.ops.higher_order, "flex_attention"):  # block-causal attention on CUDA
        ops.add(torch.ops.higher_order.flex_attention)
    # Under sequence parallelism the reduce-scatter output is cheap to keep, costly to redo.
    if hasattr(torch.ops, "_c10d_functional"):
        ops.add(torch.ops._c10d_functional.reduce_scatter_tensor.default)
    return ops


def _op_policy_context():
    save = _save_list()
    mm_count: dict[str, int] = defaultdict(int)  # separate counts for forward and recompute

    def policy(ctx, op, *args, **kwargs):
        phase = "recompute" if ctx.is_recompute else "forward"
        if op == torch.ops.aten.mm.default:
            mm_count[phase] += 1
            if mm_count[phase] % 2 == 0:  # recompute every second matmul
                return CheckpointPolicy.PREFER_RECOMPUTE
        return CheckpointPolicy.MUST_SAVE if op in save else CheckpointPolicy.PREFER_RECOMPUTE

    return create_selective_checkpoint_contexts(policy)


def wrap_block(block: nn.Module, mode: str, option: str) -> nn.Module:
    if mode == "full":
        return checkpoint_wrapper(block, preserve_rng_state=False)
    if mode == "selective" and option == "op":
        return checkpoint_wrapper(block, context_fn=_op_policy_context, preserve_rng_state=False)
    raise ValueError(f"unsupported activation checkpointing {mode}/{option}")


def apply_ac(model: nn.Module, mode: str, option: str, first_block_index: int = 0) -> int:
    """Wrap the blocks of ``model.layers`` in place; returns how many were wrapped.

    ``first_block_index`` is the position of this part's first block among all blocks, so that
    "every Nth block" means the same blocks when the model is split into pipeline stages.
    """
    if mode == "none":
        return 0
    wrapped = 0
    every = int(option) if (mode == "selective" and option != "op") else 1
    for position, (name, block) in enumerate(list(model.layers.items()), start=first_block_index):
        if (position + 1) % every != 0:
            continue
        model.layers[name] = wrap_block(block, "full" if every > 1 or mode == "full" else mode, option)
        wrapped += 1
    kind = "op-level selective" if (mode == "selective" and option == "op") else f"{mode} (every {every})"
    logger.info("activation checkpointing: %s, %d of %d blocks wrapped", kind, wrapped, len(model.layers))
    return wrapped

