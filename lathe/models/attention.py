"""Attention masks for packed sequences: causal or block-causal (per document).

lathe packs documents one after another into fixed windows (see `lathe.data.stream`). With the
plain ``causal`` mask a token attends to every earlier token of its window, including earlier
documents. ``block_causal`` restricts it to earlier tokens of its *own* document, so packed
documents never see each other: the loss of a packed window equals the loss of each document run
on its own.

The model receives the per-token document ids of its input (``document_ids[b, t]``, documents
numbered from 0 within each row, as the data stream emits them) and ``attention`` picks the
kernel:

- CUDA: FlexAttention with a ``BlockMask`` built once per forward (``document_mask``), compiled:
  blocks of the score matrix that cross documents are never computed.
- CPU, eager: scaled-dot-product attention on each document segment separately, with 4-D inputs
  (the CPU flash kernel; 3-D inputs silently fall back to the slow math kernel). Exact, and only
  the work inside documents is done. The segment boundaries are read on the host.
- CPU under ``torch.compile``: one SDPA call with a dense boolean (bs, 1, seq, seq) mask (a graph
  cannot loop over data-dependent segments). The same numbers as the segment path, up to the order
  of float sums.

Nothing here knows about parallelism: tensor parallel runs it on a shard of the heads, pipeline
stages on their micro-batches. Context parallel (``lathe.parallel.context``) supports the causal
mask only.

``document_positions`` gives RoPE positions that restart at 0 where each document starts in the
window. RoPE scores depend only on the distance between two tokens, and under ``block_causal``
tokens only meet tokens of their own document, so restarting positions changes the result only by
float rounding; it makes positions match what the model sees at inference on a single document.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

MASKS = ("causal", "block_causal")


def document_mask(document_ids: torch.Tensor):
    """What ``attention`` needs for a block-causal forward over ``document_ids`` (bs, seq): on CUDA
    a FlexAttention ``BlockMask`` (built once per forward, shared by every block); elsewhere the
    ids themselves."""
    return block_mask(document_ids) if document_ids.device.type == "cuda" else document_ids


def block_mask(document_ids: torch.Tensor, compile: bool = True):
    """The FlexAttention ``BlockMask`` of block-causal attention over ``document_ids`` (bs, seq)."""
    from torch.nn.attention.flex_attention import create_block_mask

    ids = document_ids

    def block_causal(b, h, q_idx, kv_idx):
        return (q_idx >= kv_idx) & (ids[b, q_idx] == ids[b, kv_idx])

    bs, seq = ids.shape
    create = _compiled(create_block_mask) if compile else create_block_mask
    return create(block_causal, bs, None, seq, seq, device=ids.device)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask=None, enable_gqa: bool = False) -> torch.Tensor:
    """Scaled dot-product attention over (bs, heads, seq, head_dim) inputs.

    ``mask``: None for causal attention; for block-causal attention, ``document_mask(ids)``.
    ``enable_gqa``: k and v hold fewer heads than q, each serving consecutive query heads (the
    kernel reads them in place instead of the caller repeating them).
    """
    if mask is None:
        # Looked up on the module at call time: context parallel swaps this function for its ring.
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=enable_gqa)
    if not isinstance(mask, torch.Tensor):  # a BlockMask (CUDA)
        from torch.nn.attention.flex_attention import flex_attention

        return _compiled(flex_attention)(q, k, v, block_mask=mask, enable_gqa=enable_gqa)
    if torch.compiler.is_compiling():
        return F.scaled_dot_product_attention(q, k, v, attn_mask=dense_block_causal(mask), enable_gqa=enable_gqa)
    return per_document_attention(q, k, v, mask, enable_gqa)


def dense_block_causal(document_ids: torch.Tensor) -> torch.Tensor:
    """The block-causal mask as a boolean (bs, 1, seq, seq) tensor (True = may attend)."""
    seq = document_ids.shape[1]
    same = document_ids[:, None, :, None] == document_ids[:, None, None, :]
    return same & torch.ones(seq, seq, dtype=torch.bool, device=document_ids.device).tril()


def document_segments(ids: torch.Tensor) -> list[tuple[int, int]]:
    """[(start, end), ...] of the runs of equal ids in one row (seq,)."""
    cuts = (torch.nonzero(ids[1:] != ids[:-1]).flatten() + 1).tolist()
    return list(zip([0, *cuts], [*cuts, ids.shape[0]]))


def per_document_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                           document_ids: torch.Tensor, enable_gqa: bool = False) -> torch.Tensor:
    """Causal SDPA on each document segment of each row: exact block-causal attention."""
    sdpa = functools.partial(F.scaled_dot_product_attention, is_causal=True, enable_gqa=enable_gqa)
    rows = []
    for b in range(q.shape[0]):
        segments = document_segments(document_ids[b])
        if len(segments) == 1:
            rows.append(sdpa(q[b:b + 1], k[b:b + 1], v[b:b + 1]))
            continue
        rows.append(torch.cat([sdpa(q[b:b + 1, :, s:e], k[b:b + 1, :, s:e], v[b:b + 1, :, s:e])
                               for s, e in segments], dim=2))
    return torch.cat(rows) if len(rows) > 1 else rows[0]


def document_positions(document_ids: torch.Tensor) -> torch.Tensor:
    """Each token's index inside its document's segment of the row (0 where a document starts;
    a row that starts inside a document counts from the row's first token)."""
    bs, seq = document_ids.shape
    index = torch.arange(seq, device=document_ids.device).expand(bs, seq)
    starts = torch.ones_like(document_ids, dtype=torch.bool)
    starts[:, 1:] = document_ids[:, 1:] != document_ids[:, :-1]
    return index - torch.where(starts, index, 0).cummax(dim=1).values


def model_inputs(document_ids: torch.Tensor | None, attention_mask: str, positions: bool) -> dict:
    """The keyword inputs of the model's forward for one batch (``model.attention_mask``,
    ``model.document_positions``); empty for plain causal attention."""
    if attention_mask == "causal":
        return {}
    if document_ids is None:
        raise ValueError("block_causal attention needs the batch's document ids (training.document_ids)")
    inputs = {"document_ids": document_ids}
    if positions:
        inputs["positions"] = document_positions(document_ids)
    return inputs


@functools.cache
def _compiled(fn):
    # FlexAttention is only fast compiled (eager runs an unfused reference implementation).
    return torch.compile(fn, dynamic=False)
