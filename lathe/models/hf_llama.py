"""The mapping between lathe's Llama state dict and Hugging Face ``LlamaForCausalLM``'s.

Two differences besides names:
- RoPE layout. lathe (like Meta's original code) rotates adjacent pairs (x0,x1), (x2,x3), ... of
  each head; Hugging Face rotates the two halves (x_i, x_{i+d/2}). The two are the same function
  once the rows of wq and wk are permuted within each head: HF row j of the first half is lathe
  row 2j, of the second half lathe row 2j+1.
- HF keeps ``rope_theta``, sizes and epsilon in config.json; ``hf_config`` writes them.
"""

from __future__ import annotations

import re

import torch

from lathe.models.llama import ModelArgs

_BLOCK = {
    "attention.wq.weight": "self_attn.q_proj.weight",
    "attention.wk.weight": "self_attn.k_proj.weight",
    "attention.wv.weight": "self_attn.v_proj.weight",
    "attention.wo.weight": "self_attn.o_proj.weight",
    "feed_forward.w1.weight": "mlp.gate_proj.weight",
    "feed_forward.w2.weight": "mlp.down_proj.weight",
    "feed_forward.w3.weight": "mlp.up_proj.weight",
    "attention_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
}
_TOP = {
    "tok_embeddings.weight": "model.embed_tokens.weight",
    "norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_LAYER = re.compile(r"layers\.(\d+)\.(.+)")


def _interleaved_to_halves(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    rows, cols = w.shape
    hd = rows // n_heads
    return w.view(n_heads, hd // 2, 2, cols).transpose(1, 2).reshape(rows, cols)


def _halves_to_interleaved(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    rows, cols = w.shape
    hd = rows // n_heads
    return w.view(n_heads, 2, hd // 2, cols).transpose(1, 2).reshape(rows, cols)


def to_hf(state: dict[str, torch.Tensor], args: ModelArgs) -> dict[str, torch.Tensor]:
    out = {}
    for name, t in state.items():
        if name in _TOP:
            out[_TOP[name]] = t
            continue
        m = _LAYER.fullmatch(name)
        if not m or m.group(2) not in _BLOCK:
            raise KeyError(f"no Hugging Face name for {name!r}")
        i, rest = m.groups()
        if rest == "attention.wq.weight":
            t = _interleaved_to_halves(t, args.n_heads)
        elif rest == "attention.wk.weight":
            t = _interleaved_to_halves(t, args.kv_heads)
        out[f"model.layers.{i}.{_BLOCK[rest]}"] = t
    return out


def from_hf(state: dict[str, torch.Tensor], args: ModelArgs) -> dict[str, torch.Tensor]:
    top = {v: k for k, v in _TOP.items()}
    block = {v: k for k, v in _BLOCK.items()}
    out = {}
    for name, t in state.items():
        if name in top:
            out[top[name]] = t
            continue
        m = re.fullmatch(r"model\.layers\.(\d+)\.(.+)", name)
        if not m or m.group(2) not in block:
            if name.endswith("rotary_emb.inv_freq"):
                continue  # a derived buffer some checkpoints carry
            raise KeyError(f"no lathe name for Hugging Face tensor {name!r}")
        i, rest = m.groups()
        ours = block[rest]
        if ours == "attention.wq.weight":
            t = _halves_to_interleaved(t, args.n_heads)
        elif ours == "attention.wk.weight":
            t = _halves_to_interleaved(t, args.kv_heads)
        out[f"layers.{i}.{ours}"] = t
    return out


def hf_config(args: ModelArgs) -> dict:
    """A config.json for ``LlamaForCausalLM`` describing the same model."""
    cfg = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": args.dim,
        "intermediate_size": args.ffn_hidden_dim,
        "num_hidden_layers": args.n_layers,
        "num_attention_heads": args.n_heads,
        "num_key_value_heads": args.kv_heads,
        "head_dim": args.head_dim,
        "vocab_size": args.vocab_size,
        "rms_norm_eps": args.norm_eps,
        "rope_theta": args.rope_theta,
        "max_position_embeddings": args.max_seq_len,
        "hidden_act": "silu",
        "tie_word_embeddings": False,
        "attention_bias": False,
        "mlp_bias": False,
        "torch_dtype": "float32",
    }
    if args.rope_scaling == "llama3.1":
        cfg["rope_scaling"] = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                               "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    return cfg
