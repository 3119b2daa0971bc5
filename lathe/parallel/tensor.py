"""Tensor parallelism (TP) with sequence parallelism (SP) and loss parallelism for Llama.

TP splits each matmul's weight across the tp ranks: attention heads and FFN hidden units are
divided, so each rank holds 1/tp of every block. Column-wise linears (wq, wk, wv, w1, w3) split
output features; the row-wise ones after them (wo, w2) split input features and produce partial
sums that must be reduced. The fused projections (wqkv, w13) are column-wise too: their rows are
laid out in groups (lathe/models/llama.py) so that the even split keeps whole heads, and each
w1 row with its w3 row, on one rank.

SP: between those regions, activations are sharded along the sequence (dim 1) instead of being
replicated: the norms run on a sequence shard, the row-wise outputs are reduce-scattered instead
of all-reduced, and each block input is all-gathered back. Same communication volume, 1/tp of the
norm activations' memory.

Loss parallel: the output projection keeps its logits sharded over the vocabulary and the
cross-entropy runs on the shards (``loss_parallel()``), never gathering (batch, seq, vocab).
"""

from __future__ import annotations

import logging

from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import Replicate, Shard
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    PrepareModuleInput,
    RowwiseParallel,
    SequenceParallel,
    parallelize_module,
)

logger = logging.getLogger("lathe")


def apply_tp(model: nn.Module, mesh: DeviceMesh, loss_parallel: bool) -> None:
    top_plan = {}
    if model.tok_embeddings is not None:
        # Vocabulary-sharded table; output reduce-scattered straight into sequence shards.
        top_plan["tok_embeddings"] = RowwiseParallel(input_layouts=Replicate(), output_layouts=Shard(1))
    if model.norm is not None:
        top_plan["norm"] = SequenceParallel()
    if model.output is not None:
        top_plan["output"] = ColwiseParallel(
            input_layouts=Shard(1),
            output_layouts=Shard(-1) if loss_parallel else Replicate(),
            use_local_output=not loss_parallel,  # loss parallel needs the DTensor
        )
    parallelize_module(model, mesh, top_plan)

    for block in model.layers.values():
        block_plan = {
            "attention_norm": SequenceParallel(),
            # (hidden, rope_cos, rope_sin, mask): gather the sequence shards; leave the rest alone
            "attention": PrepareModuleInput(input_layouts=(Shard(1), None, None, None),
                                            desired_input_layouts=(Replicate(), None, None, None)),
            "attention.wo": RowwiseParallel(output_layouts=Shard(1)),
            "ffn_norm": SequenceParallel(),
            "feed_forward": PrepareModuleInput(input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),)),
            "feed_forward.w2": RowwiseParallel(output_layouts=Shard(1)),
        }
        in_projections = [name for name in ("attention.wqkv", "attention.wq", "attention.wk", "attention.wv",
                                            "feed_forward.w13", "feed_forward.w1", "feed_forward.w3")
                          if _has_submodule(block, name)]
        block_plan.update({name: ColwiseParallel() for name in in_projections})
        parallelize_module(block, mesh, block_plan)
    logger.info("applied tensor parallel over %d ranks (sequence parallel, loss parallel %s)",
                mesh.size(), "on" if loss_parallel else "off")


def _has_submodule(module: nn.Module, name: str) -> bool:
    try:
        module.get_submodule(name)
        return True
    except AttributeError:
        return False


def check_tp_divisibility(n_heads: int, n_kv_heads: int, seq_len: int, tp: int) -> str | None:
    """A reason TP cannot split this model, or None."""
    if n_heads % tp:
        return f"model has {n_heads} attention heads, not divisible by tp {tp}"
    if n_kv_heads % tp:
        return f"model has {n_kv_heads} key/value heads, not divisible by tp {tp}"
    if seq_len % tp:
        return f"training.seq_len {seq_len} is not divisible by tp {tp} (sequence parallel shards it)"
    return None
