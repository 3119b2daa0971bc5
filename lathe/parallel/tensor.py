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
from torch.distributed.tensor import Partial, Replicate, Shard
from torch.distributed.tensor.experimental import local_map
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    PrepareModuleInput,
    RowwiseParallel,
    SequenceParallel,
    parallelize_module,
)

from lathe.models.llama import FusedRMSNorm

logger = logging.getLogger("lathe")


def apply_tp(model: nn.Module, mesh: DeviceMesh, loss_parallel: bool, float8_styles: dict | None = None) -> None:
    """``float8_styles``: torchao's float8 variants of the block styles (lathe.quant.float8.tp_styles),
    used for the linears that were converted to float8, or None."""
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
        parallelize_module(block, mesh, _block_plan(block, float8_styles))
    _fused_norms_on_shards(model, mesh)
    logger.info("applied %stensor parallel over %d ranks (sequence parallel, loss parallel %s)",
                "float8 " if float8_styles else "", mesh.size(), "on" if loss_parallel else "off")


def _fused_norms_on_shards(model: nn.Module, mesh: DeviceMesh) -> None:
    """A fused norm (``model.norm_type = fused_rmsnorm``) under sequence parallel: normalizing over
    the hidden dimension needs no communication, so its compiled kernel runs on each rank's plain
    sequence shard (DTensor would otherwise trace its own redistributions into the kernel). The
    weight's gradient from one shard is a partial sum over that shard's tokens."""
    for module in model.modules():
        if isinstance(module, FusedRMSNorm):
            module.kernel = local_map(module.kernel, out_placements=[Shard(1)],
                                      in_placements=([Shard(1)], [Replicate()], None),
                                      in_grad_placements=([Shard(1)], [Partial()], None), device_mesh=mesh)


def _block_plan(block: nn.Module, float8_styles: dict | None) -> dict:
    """The TP plan of one block, for its unfused (wq/wk/wv, w1/w3) or fused (wqkv, w13) projections."""
    def styles(*linears: str) -> tuple:
        """(colwise, rowwise, prepare-input) classes for these linears: the float8 ones only when
        every linear that reads the same input is float8 (it is all-gathered once, in float8)."""
        if float8_styles and all(float8_styles["is_float8"](block.get_submodule(n)) for n in linears):
            return float8_styles["colwise"], float8_styles["rowwise"], float8_styles["prepare_input"]
        return ColwiseParallel, RowwiseParallel, PrepareModuleInput

    qkv = [n for n in ("attention.wqkv", "attention.wq", "attention.wk", "attention.wv") if _has_submodule(block, n)]
    w13 = [n for n in ("feed_forward.w13", "feed_forward.w1", "feed_forward.w3") if _has_submodule(block, n)]
    qkv_col, _, attn_prepare = styles(*qkv)
    _, wo_row, _ = styles("attention.wo")
    w13_col, _, ffn_prepare = styles(*w13)
    _, w2_row, _ = styles("feed_forward.w2")
    return {
        "attention_norm": SequenceParallel(),
        # (hidden, rope_cos, rope_sin, mask): gather the sequence shards; leave the rest alone
        "attention": attn_prepare(input_layouts=(Shard(1), None, None, None),
                                  desired_input_layouts=(Replicate(), None, None, None)),
        **{name: qkv_col() for name in qkv},
        "attention.wo": wo_row(output_layouts=Shard(1)),
        "ffn_norm": SequenceParallel(),
        "feed_forward": ffn_prepare(input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),)),
        **{name: w13_col() for name in w13},
        "feed_forward.w2": w2_row(output_layouts=Shard(1)),
    }


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
