"""Llama 2 and Llama 3/3.1 in one implementation that knows nothing of parallelism.

Choices made so that parallelism can be applied from outside (lathe/parallel/):
- ``layers`` is an ``nn.ModuleDict`` keyed "0".."n-1": when pipeline parallelism deletes the blocks
  a stage does not own, the remaining parameter names (``layers.7.attention.wq.weight``) stay the
  same, so checkpoints are layout-independent.
- ``tok_embeddings``, ``norm`` and ``output`` may be set to None (a pipeline stage without them
  passes its input through).
- Attention reshapes with ``view(bs, seq, -1, head_dim)``: under tensor parallelism the local
  number of heads is inferred, so the same code runs on a shard of the heads.
- RoPE is real-valued (cos/sin), in Meta's interleaved-pair convention. Complex tensors would work
  too, but inductor cannot generate code for them. The tables are non-persistent buffers,
  recomputed by ``init_weights`` (and therefore after ``to_empty`` from the meta device); the
  state dict holds only learned weights.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn


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

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads

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
    """x / rms(x) * weight, computed in float32 and cast back to the input dtype."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        normed = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return normed.type_as(x) * self.weight

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
    """RMSNorm as one fused kernel: the same math (float32, cast back, times the weight) through
    PyTorch's ``rms_norm``, compiled by torch.compile into a single kernel for forward and one for
    backward, instead of the ~6 elementwise and reduction kernels of eager mode.

    ``kernel(x, weight, eps)`` is an attribute so that parallelism can wrap it from outside (tensor
    parallel runs it on each rank's sequence shard)."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__(dim, eps)
        self.kernel = _fused_rms_norm

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.kernel(x, self.weight, self.eps)


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return F.rms_norm(x.float(), (x.shape[-1],), eps=eps).type_as(x) * weight


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

    x: (bs, seq, heads, head_dim); cos/sin: (seq, head_dim/2). Computed in float32.
    """
    seq = x.shape[1]
    cos = cos[:seq].view(1, seq, 1, -1)
    sin = sin[:seq].view(1, seq, 1, -1)
    pairs = x.float().unflatten(-1, (-1, 2))
    real, imag = pairs[..., 0], pairs[..., 1]
    rotated = torch.stack((real * cos - imag * sin, real * sin + imag * cos), dim=-1)
    return rotated.flatten(-2).type_as(x)


# ---------------------------------------------------------------------------------------------
# Blocks


class Attention(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.head_dim = args.head_dim
        self.n_rep = args.n_heads // args.kv_heads  # query heads per key/value head (GQA)
        self.wq = nn.Linear(args.dim, args.n_heads * args.head_dim, bias=False)
        self.wk = nn.Linear(args.dim, args.kv_heads * args.head_dim, bias=False)
        self.wv = nn.Linear(args.dim, args.kv_heads * args.head_dim, bias=False)
        self.wo = nn.Linear(args.n_heads * args.head_dim, args.dim, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        bs, seq, _ = x.shape
        # -1: the number of heads this module holds (all of them, or a tensor-parallel shard)
        q = self.wq(x).view(bs, seq, -1, self.head_dim)
        k = self.wk(x).view(bs, seq, -1, self.head_dim)
        v = self.wv(x).view(bs, seq, -1, self.head_dim)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if self.n_rep > 1:  # share each key/value head among n_rep query heads
            k = k.repeat_interleave(self.n_rep, dim=2)
            v = v.repeat_interleave(self.n_rep, dim=2)
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                             is_causal=True)
        return self.wo(out.transpose(1, 2).reshape(bs, seq, -1))

    def init_weights(self, out_std: float) -> None:
        for lin in (self.wq, self.wk, self.wv):
            nn.init.trunc_normal_(lin.weight, mean=0.0, std=0.02)
        nn.init.trunc_normal_(self.wo.weight, mean=0.0, std=out_std)


class FeedForward(nn.Module):
    """SwiGLU: w2(silu(w1 x) * w3 x)."""

    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden_dim, bias=False)
        self.w2 = nn.Linear(hidden_dim, dim, bias=False)
        self.w3 = nn.Linear(dim, hidden_dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))

    def init_weights(self, out_std: float) -> None:
        nn.init.trunc_normal_(self.w1.weight, mean=0.0, std=0.02)
        nn.init.trunc_normal_(self.w2.weight, mean=0.0, std=out_std)
        nn.init.trunc_normal_(self.w3.weight, mean=0.0, std=out_std)


class TransformerBlock(nn.Module):
    """Pre-norm block: h = x + attn(norm(x)); out = h + ffn(norm(h))."""

    def __init__(self, layer_id: int, args: ModelArgs):
        super().__init__()
        self.attention = Attention(args)
        self.feed_forward = FeedForward(args.dim, args.ffn_hidden_dim)
        self.attention_norm = build_norm(args.norm_type, args.dim, args.norm_eps)
        self.ffn_norm = build_norm(args.norm_type, args.dim, args.norm_eps)
        depth = layer_id + 1 if args.depth_init else args.n_layers
        self.out_init_std = 0.02 / math.sqrt(2 * depth)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        h = x + self.attention(self.attention_norm(x), cos, sin)
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

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens (bs, seq) int64 -> logits (bs, seq, vocab) float32.

        A pipeline stage without embeddings receives hidden states instead of tokens, and one
        without the output layer returns hidden states.
        """
        h = self.tok_embeddings(tokens) if self.tok_embeddings is not None else tokens
        for layer in self.layers.values():
            h = layer(h, self.rope_cos, self.rope_sin)
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
