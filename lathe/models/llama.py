"""Llama 2 and Llama 3/3.1 in one implementation that knows nothing of parallelism.

Choices made so that parallelism can be applied from outside (lathe/parallel/):
- ``layers`` is an ``nn.ModuleDict`` keyed "0".."n-1": when pipeline parallelism deletes the blocks
  a stage does not own, the remaining parameter names (``layers.7.attention.wq.weight``) stay the
  same, so checkpoints are layout-independent.
- ``tok_embeddings``, ``norm`` and ``output`` may be set to None (a pipeline stage without them
  passes its input through).
- Attention reshapes with ``view(bs, seq, -1, head_dim)``: under tensor parallelism the local
  number of heads is inferred, so the same code runs on a shard of the heads.
- RoPE is in Meta's interleaved-pair convention. The tables are stored as real cos/sin
  (non-persistent buffers, recomputed by ``init_weights`` and therefore after ``to_empty`` from the
  meta device; the state dict holds only learned weights); the rotation itself is one complex
  multiplication (see ``apply_rope``).
- Optional fused projections (``fused_qkv``, ``fused_w13``): one matmul for Q, K and V, one for w1
  and w3. Their rows are grouped so that tensor parallelism's even split of the rows keeps whole
  heads (and matching w1/w3 rows) on each rank. ``unfuse_state_dict``/``fuse_state_dict`` map them
  to and from the unfused names: checkpoints, Hugging Face and torchtitan always see wq/wk/wv,
  w1/w3, whichever layout trained.
- The attention kernel and the causal / block-causal (per-document) masks live in
  ``lathe.models.attention``; ``forward`` takes optional per-token ``positions`` and
  ``document_ids``, which context parallel and document masking pass from outside.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from lathe.models.attention import attention, document_mask


@dataclass(frozen=True)
class ModelArgs:
    dim: int = 4096
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: Optional[int] = None  # None: same as n_heads (no grouped-query attention)
    vocab_size: int = -1  # set from the tokenizer
    multiple_of: int = 256  # the FFN hidden size is rounded up to a multiple of this
    ffn_dim_multiplier: Optional[float] = None
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: str = "none"  # "llama3.1": Llama 3.1's long-context frequency scaling
    max_seq_len: int = 2048
    depth_init: bool = True  # output projections' init std shrinks with the block's depth
    norm_type: str = "rmsnorm"
    fused_qkv: bool = False  # one projection for Q, K and V (same weights and numerics, fewer kernels)
    fused_w13: bool = False  # one projection for the FFN's w1 and w3

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads

    @property
    def n_rep(self) -> int:
        """Query heads per key/value head (grouped-query attention)."""
        return self.n_heads // self.kv_heads

    @property
    def ffn_hidden_dim(self) -> int:
        """SwiGLU hidden size: 2/3 of 4*dim, times the multiplier, rounded up to multiple_of."""
        hidden = int(2 * (4 * self.dim) / 3)
        if self.ffn_dim_multiplier is not None:
            hidden = int(self.ffn_dim_multiplier * hidden)
        return self.multiple_of * ((hidden + self.multiple_of - 1) // self.multiple_of)

    def with_(self, **changes) -> "ModelArgs":
        return replace(self, **changes)


# ---------------------------------------------------------------------------------------------
# Normalization


class RMSNorm(nn.Module):
    """x / rms(x) * weight, via ``F.rms_norm``: PyTorch's fused kernel where it has one (CUDA),
    otherwise its composite (which accumulates bf16/fp16 inputs in float32)."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)


def build_norm(norm_type: str, dim: int, eps: float) -> nn.Module:
    norm_type = norm_type.lower()
    if norm_type == "rmsnorm":
        return RMSNorm(dim, eps)
    if norm_type == "fused_rmsnorm":
        return FusedRMSNorm(dim, eps)
    if norm_type == "layernorm":
        return nn.LayerNorm(dim, eps=eps, bias=False)
    if norm_type == "np_layernorm":  # no learned parameters
        return nn.LayerNorm(dim, eps=eps, elementwise_affine=False, bias=False)
    raise ValueError(f"unknown norm_type {norm_type!r}")


class FusedRMSNorm(RMSNorm):
    """RMSNorm as one fused kernel: the same call (PyTorch's ``rms_norm`` with the weight),
    compiled by torch.compile into a single kernel for forward and one for backward, instead of the
    ~6 elementwise and reduction kernels of the eager composite.

    ``kernel(x, weight, eps)`` is an attribute so that parallelism can wrap it from outside (tensor
    parallel runs it on each rank's sequence shard)."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__(dim, eps)
        self.kernel = _fused_rms_norm

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.kernel(x, self.weight, self.eps)


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return F.rms_norm(x, (x.shape[-1],), weight, eps)


_compiled_rms_norm = None


def _fused_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    global _compiled_rms_norm
    if _compiled_rms_norm is None:  # compiled on first use, so importing the model stays cheap
        _compiled_rms_norm = torch.compile(_rms_norm, fullgraph=True)
    return _compiled_rms_norm(x, weight, eps)


# ---------------------------------------------------------------------------------------------
# Rotary position embedding


def rope_frequencies(head_dim: int, theta: float, scaling: str = "none") -> torch.Tensor:
    """The head_dim/2 rotation frequencies, optionally with Llama 3.1's scaling.

    Llama 3.1 stretches the long wavelengths (low frequencies) by ``factor`` so a model trained at
    8K context extrapolates further, keeps short wavelengths, and interpolates smoothly between.
    """
    freqs = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64)[: head_dim // 2] / head_dim))
    if scaling == "llama3.1":
        factor, low_freq_factor, high_freq_factor, original_context = 8.0, 1.0, 4.0, 8192
        low_freq_wavelen = original_context / low_freq_factor
        high_freq_wavelen = original_context / high_freq_factor
        wavelen = 2 * math.pi / freqs
        smooth = (original_context / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
        interpolated = (1 - smooth) * freqs / factor + smooth * freqs
        freqs = torch.where(wavelen > low_freq_wavelen, freqs / factor,
                            torch.where(wavelen < high_freq_wavelen, freqs, interpolated))
    elif scaling != "none":
        raise ValueError(f"unknown rope scaling {scaling!r}")
    return freqs.float()


def rope_tables(args: ModelArgs, device: torch.device | str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin tables of shape (max_seq_len, head_dim/2)."""
    freqs = rope_frequencies(args.head_dim, args.rope_theta, args.rope_scaling).to(device)
    angles = torch.outer(torch.arange(args.max_seq_len, device=device, dtype=torch.float32), freqs)
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate adjacent pairs (x[2i], x[2i+1]) of each head by position-dependent angles.

    x: (bs, seq, ..., head_dim), any number of head dimensions; cos/sin: the tables
    (max_seq_len, head_dim/2), or the rows of each token's position (bs, seq, head_dim/2).
    Each pair is read as the complex number x[2i] + i x[2i+1] and multiplied by
    cos + i sin: one kernel forward and one backward in float32 (bf16/fp16 inputs are
    upcast first and the result cast back), instead of the ~10 a real-valued rotation takes in
    eager mode. The pairs are viewed in place, so x needs a unit stride in its last dimension.
    """
    seq = x.shape[1]
    if cos.dim() == 2:  # the whole table: positions 0..seq-1
        cos, sin = cos[:seq], sin[:seq]
    # float(): FSDP casts the tables it is handed to its compute dtype; torch.complex takes fp16/32/64 only
    rotation = torch.complex(cos.float(), sin.float())  # (seq or bs x seq, head_dim/2)
    rotation = rotation.reshape(-1, seq, *([1] * (x.dim() - 3)), rotation.shape[-1])
    pairs = torch.view_as_complex(x.float().unflatten(-1, (-1, 2)))
    return torch.view_as_real(pairs * rotation).flatten(-2).type_as(x)


# ---------------------------------------------------------------------------------------------
# Blocks


class Attention(nn.Module):
    """Causal self-attention with RoPE and grouped-query attention (GQA).

    Unfused: ``wq``, ``wk``, ``wv``. Fused (``fused_qkv``): one ``wqkv`` whose rows come in
    groups, one per key/value head: that group's ``n_rep`` query heads, then its key head, then its
    value head. An even split of the rows over tensor-parallel ranks (ColwiseParallel) then hands
    each rank whole groups, i.e. exactly the heads the unfused layout gives it.
    """

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.head_dim = args.head_dim
        self.n_rep = args.n_rep
        self.fused = args.fused_qkv
        if self.fused:
            self.wqkv = nn.Linear(args.dim, (args.n_heads + 2 * args.kv_heads) * args.head_dim, bias=False)
        else:
            self.wq = nn.Linear(args.dim, args.n_heads * args.head_dim, bias=False)
            self.wk = nn.Linear(args.dim, args.kv_heads * args.head_dim, bias=False)
            self.wv = nn.Linear(args.dim, args.kv_heads * args.head_dim, bias=False)
        self.wo = nn.Linear(args.n_heads * args.head_dim, args.dim, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask=None) -> torch.Tensor:
        bs, seq, _ = x.shape
        q, k, v = self.project(x, cos, sin)
        return self.wo(self.attend(q, k, v, mask).reshape(bs, seq, -1))

    def project(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        """q (bs, seq, heads, head_dim) and k, v (bs, seq, kv_heads, head_dim), RoPE applied.

        Head counts are inferred (-1): all of them, or a tensor-parallel shard."""
        bs, seq, _ = x.shape
        if self.fused:
            groups = self.wqkv(x).view(bs, seq, -1, self.n_rep + 2, self.head_dim)
            # one split (its backward is one concatenation), not indexing (a zero-filled
            # full-size gradient per piece)
            q, k, v = groups.split([self.n_rep, 1, 1], dim=3)
            return apply_rope(q, cos, sin).flatten(2, 3), apply_rope(k, cos, sin).squeeze(3), v.squeeze(3)
        q = self.wq(x).view(bs, seq, -1, self.head_dim)
        k = self.wk(x).view(bs, seq, -1, self.head_dim)
        v = self.wv(x).view(bs, seq, -1, self.head_dim)
        return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask=None) -> torch.Tensor:
        """Scaled-dot-product attention, causal or (``mask``) block-causal
        (``lathe.models.attention``): (bs, seq, heads, head_dim) in and out.

        With GQA, each key/value head serves ``n_rep`` consecutive query heads. On CPU the SDPA
        kernel reads the shared heads itself (``enable_gqa``); elsewhere they are repeated first,
        which every backend supports."""
        if self.n_rep > 1 and q.device.type != "cpu":
            k = k.repeat_interleave(self.n_rep, dim=2)
            v = v.repeat_interleave(self.n_rep, dim=2)
        out = attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), mask,
                        enable_gqa=self.n_rep > 1 and q.device.type == "cpu")
        return out.transpose(1, 2)

    @torch.no_grad()
    def init_weights(self, out_std: float) -> None:
        if self.fused:  # the same random draws, in the same order, as the unfused layout
            wq, wk, wv = (nn.init.trunc_normal_(torch.empty_like(w), mean=0.0, std=0.02)
                          for w in split_qkv(self.wqkv.weight, self.n_rep, self.head_dim))
            self.wqkv.weight.copy_(join_qkv(wq, wk, wv, self.n_rep, self.head_dim))
        else:
            for lin in (self.wq, self.wk, self.wv):
                nn.init.trunc_normal_(lin.weight, mean=0.0, std=0.02)
        nn.init.trunc_normal_(self.wo.weight, mean=0.0, std=out_std)


class FeedForward(nn.Module):
    """SwiGLU: w2(silu(w1 x) * w3 x).

    Fused (``fused_w13``): one ``w13`` whose rows alternate blocks of ``W13_BLOCK`` rows of w1 and
    of w3, so an even split of the rows over tensor-parallel ranks keeps each w1 row with its w3
    row (``w13_block`` picks a smaller block when the hidden size needs it).
    """

    def __init__(self, dim: int, hidden_dim: int, fused: bool = False):
        super().__init__()
        self.fused = fused
        self.block = w13_block(hidden_dim)
        if fused:
            self.w13 = nn.Linear(dim, 2 * hidden_dim, bias=False)
        else:
            self.w1 = nn.Linear(dim, hidden_dim, bias=False)
            self.w3 = nn.Linear(dim, hidden_dim, bias=False)
        self.w2 = nn.Linear(hidden_dim, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fused:
            h1, h3 = self.w13(x).unflatten(-1, (-1, 2, self.block)).unbind(-2)  # (..., blocks, w1|w3, block)
            return self.w2((F.silu(h1) * h3).flatten(-2))
        return self.w2(F.silu(self.w1(x)) * self.w3(x))

    @torch.no_grad()
    def init_weights(self, out_std: float) -> None:
        if self.fused:  # the same random draws, in the same order, as the unfused layout
            w1, w3 = (torch.empty_like(w) for w in split_w13(self.w13.weight, self.block))
            nn.init.trunc_normal_(w1, mean=0.0, std=0.02)
            nn.init.trunc_normal_(self.w2.weight, mean=0.0, std=out_std)
            nn.init.trunc_normal_(w3, mean=0.0, std=out_std)
            self.w13.weight.copy_(join_w13(w1, w3, self.block))
            return
        nn.init.trunc_normal_(self.w1.weight, mean=0.0, std=0.02)
        nn.init.trunc_normal_(self.w2.weight, mean=0.0, std=out_std)
        nn.init.trunc_normal_(self.w3.weight, mean=0.0, std=out_std)


class TransformerBlock(nn.Module):
    """Pre-norm block: h = x + attn(norm(x)); out = h + ffn(norm(h))."""

    def __init__(self, layer_id: int, args: ModelArgs):
        super().__init__()
        self.attention = Attention(args)
        self.feed_forward = FeedForward(args.dim, args.ffn_hidden_dim, fused=args.fused_w13)
        self.attention_norm = build_norm(args.norm_type, args.dim, args.norm_eps)
        self.ffn_norm = build_norm(args.norm_type, args.dim, args.norm_eps)
        depth = layer_id + 1 if args.depth_init else args.n_layers
        self.out_init_std = 0.02 / math.sqrt(2 * depth)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask=None) -> torch.Tensor:
        h = x + self.attention(self.attention_norm(x), cos, sin, mask)
        return h + self.feed_forward(self.ffn_norm(h))

    def init_weights(self) -> None:
        for norm in (self.attention_norm, self.ffn_norm):
            norm.reset_parameters()
        self.attention.init_weights(self.out_init_std)
        self.feed_forward.init_weights(self.out_init_std)


class Transformer(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        if args.vocab_size <= 0:
            raise ValueError("ModelArgs.vocab_size must be set (it comes from the tokenizer)")
        self.args = args
        self.tok_embeddings: Optional[nn.Embedding] = nn.Embedding(args.vocab_size, args.dim)
        self.layers = nn.ModuleDict({str(i): TransformerBlock(i, args) for i in range(args.n_layers)})
        self.norm: Optional[nn.Module] = build_norm(args.norm_type, args.dim, args.norm_eps)
        self.output: Optional[nn.Linear] = nn.Linear(args.dim, args.vocab_size, bias=False)
        cos, sin = rope_tables(args)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)

    def forward(self, tokens: torch.Tensor, positions: Optional[torch.Tensor] = None,
                document_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
        """tokens (bs, seq) int64 -> logits (bs, seq, vocab) float32.

        A pipeline stage without embeddings receives hidden states instead of tokens, and one
        without the output layer returns hidden states. ``positions`` (bs, seq): each token's RoPE
        position (default 0..seq-1). ``document_ids`` (bs, seq): attend only within each document
        (block-causal, see ``lathe.models.attention``); default causal over the whole row.
        """
        h = self.tok_embeddings(tokens) if self.tok_embeddings is not None else tokens
        cos, sin = self.rope_cos, self.rope_sin
        if positions is not None:
            cos, sin = cos[positions], sin[positions]
        mask = document_mask(document_ids) if document_ids is not None else None
        for layer in self.layers.values():
            h = layer(h, cos, sin, mask)
        if self.norm is not None:
            h = self.norm(h)
        return self.output(h).float() if self.output is not None else h

    def init_rope(self, device: torch.device | str) -> None:
        """(Re)compute the RoPE tables, e.g. after ``to_empty`` left them uninitialized."""
        self.rope_cos, self.rope_sin = rope_tables(self.args, device)

    @torch.no_grad()
    def init_weights(self, buffer_device: torch.device | str | None = None) -> None:
        """Initialize every parameter this module holds, and recompute the RoPE tables.

        Call after ``to_empty`` (meta-device construction leaves storage uninitialized). Each
        piece is optional so a pipeline stage initializes only what it owns.
        """
        self.init_rope(buffer_device or self.rope_cos.device)
        if self.tok_embeddings is not None:
            nn.init.normal_(self.tok_embeddings.weight)  # std 1
        for layer in self.layers.values():
            layer.init_weights()
        if self.norm is not None and hasattr(self.norm, "reset_parameters"):
            self.norm.reset_parameters()
        if self.output is not None:
            std = self.args.dim ** -0.5
            nn.init.trunc_normal_(self.output.weight, mean=0.0, std=std, a=-3 * std, b=3 * std)


# ---------------------------------------------------------------------------------------------
# Fused projections: their row layout, and the mapping to and from the unfused names

W13_BLOCK = 32  # rows of w1, then of w3, alternating in the fused w13


def w13_block(hidden_dim: int) -> int:
    """The w1/w3 block size of the fused w13: ``W13_BLOCK``, or the largest power of two below it
    that divides the hidden size."""
    return math.gcd(hidden_dim, W13_BLOCK)


def split_qkv(w: torch.Tensor, n_rep: int, head_dim: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Fused wqkv (or any tensor of its shape, e.g. an optimizer moment) -> wq, wk, wv."""
    groups = w.view(-1, n_rep + 2, head_dim, w.shape[-1])
    return (groups[:, :n_rep].reshape(-1, w.shape[-1]), groups[:, n_rep].reshape(-1, w.shape[-1]),
            groups[:, n_rep + 1].reshape(-1, w.shape[-1]))


def join_qkv(wq: torch.Tensor, wk: torch.Tensor, wv: torch.Tensor, n_rep: int, head_dim: int) -> torch.Tensor:
    cols = wq.shape[-1]
    kv = wk.shape[0] // head_dim
    return torch.cat((wq.reshape(kv, n_rep, head_dim, cols), wk.reshape(kv, 1, head_dim, cols),
                      wv.reshape(kv, 1, head_dim, cols)), dim=1).reshape(-1, cols)


def split_w13(w: torch.Tensor, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Fused w13 (or any tensor of its shape) -> w1, w3."""
    blocks = w.view(-1, 2, block, w.shape[-1])
    return blocks[:, 0].reshape(-1, w.shape[-1]), blocks[:, 1].reshape(-1, w.shape[-1])


def join_w13(w1: torch.Tensor, w3: torch.Tensor, block: int) -> torch.Tensor:
    cols = w1.shape[-1]
    return torch.stack((w1.reshape(-1, block, cols), w3.reshape(-1, block, cols)), dim=1).reshape(-1, cols)


# fused name -> its unfused names, as they appear inside a block's state dict keys
FUSED_NAMES = {
    "attention.wqkv.weight": ("attention.wq.weight", "attention.wk.weight", "attention.wv.weight"),
    "feed_forward.w13.weight": ("feed_forward.w1.weight", "feed_forward.w3.weight"),
}


def _split(fused_name: str, t: torch.Tensor, args: ModelArgs) -> tuple[torch.Tensor, ...]:
    if fused_name.startswith("attention"):
        return split_qkv(t, args.n_rep, args.head_dim)
    return split_w13(t, w13_block(args.ffn_hidden_dim))


def _join(fused_name: str, parts: list[torch.Tensor], args: ModelArgs) -> torch.Tensor:
    if fused_name.startswith("attention"):
        return join_qkv(*parts, args.n_rep, args.head_dim)
    return join_w13(*parts, w13_block(args.ffn_hidden_dim))


def unfuse_state_dict(state: dict, args: ModelArgs, split=None) -> dict:
    """The same state with every fused tensor replaced by its unfused pieces, under their names.

    Works on model state dicts and on flattened optimizer state dicts alike: a key such as
    ``state.layers.0.attention.wqkv.weight.exp_avg`` becomes ``...wq.weight.exp_avg`` and so on.
    Values that are not a tensor of the fused shape (a step count, a learning rate) are copied to
    each unfused name. ``split(fused_name, tensor, args)`` replaces the plain-tensor split (the
    checkpoint code passes one that handles DTensors)."""
    split = split or _split
    out = {}
    for key, value in state.items():
        fused = next((f for f in FUSED_NAMES if f".{f}" in f".{key}"), None)
        if fused is None:
            out[key] = value
            continue
        names = FUSED_NAMES[fused]
        if isinstance(value, torch.Tensor) and value.dim() == 2:
            pieces = split(fused, value, args)
        else:
            pieces = [value] * len(names)
        for name, piece in zip(names, pieces):
            out[key.replace(fused, name)] = piece
    return out


def fuse_state_dict(state: dict, args: ModelArgs, join=None) -> dict:
    """The inverse of ``unfuse_state_dict`` for a model built with ``args``' fused flags: the
    unfused pieces of each fused tensor are joined under the fused name. ``join(fused_name,
    pieces, args)`` replaces the plain-tensor join."""
    join = join or _join
    wanted = [f for f in FUSED_NAMES if (args.fused_qkv if f.startswith("attention") else args.fused_w13)]
    out = dict(state)
    for fused in wanted:
        first = FUSED_NAMES[fused][0]
        for key in [k for k in state if f".{first}" in f".{k}"]:
            keys = [key.replace(first, name) for name in FUSED_NAMES[fused]]
            if not all(k in out for k in keys):
                continue
            pieces = [out.pop(k) for k in keys]
            value = join(fused, pieces, args) if isinstance(pieces[0], torch.Tensor) and pieces[0].dim() == 2 \
                else pieces[0]
            out[key.replace(first, fused)] = value
    return out


# ---------------------------------------------------------------------------------------------
# Sizes and FLOPs


def num_params(model: nn.Module, exclude_embedding: bool = False) -> int:
    n = sum(p.numel() for p in model.parameters())
    if exclude_embedding and getattr(model, "tok_embeddings", None) is not None:
        n -= model.tok_embeddings.weight.numel()
    return n


def flops_per_token(args: ModelArgs, num_non_embedding_params: int, seq_len: int) -> int:
    """Training FLOPs per token: 6 * N_non-embedding + 12 * L * H * Dh * S.

    6N: each weight does one multiply-add (2 FLOPs) forward and two backward. The second term is
    attention's QK^T and AV matmuls (not counted in N), 2 forward + 4 backward, 2 FLOPs each. It
    ignores causal masking (half the scores are never needed) and any activation recomputation.
    """
    return 6 * num_non_embedding_params + 12 * args.n_layers * args.n_heads * args.head_dim * seq_len
