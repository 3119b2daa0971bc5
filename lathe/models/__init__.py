"""Model registry: each family's flavors and how to build one.

A ``ModelSpec`` bundles what the trainer needs to know about a family; parallelism plans, pipeline
split units and Hugging Face name mappings attach here as they are built.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, Callable

from torch import nn

from lathe.models.llama import ModelArgs, Transformer

# Shapes of every flavor. The vocabulary is not here: it comes from the tokenizer.
LLAMA2_FLAVORS: dict[str, ModelArgs] = {
    "debugmodel": ModelArgs(dim=256, n_layers=8, n_heads=16, rope_theta=10000),
    "271M": ModelArgs(dim=1024, n_layers=16, n_heads=8, rope_theta=10000),
    "1B": ModelArgs(dim=2048, n_layers=18, n_heads=16, rope_theta=10000),
    "7B": ModelArgs(dim=4096, n_layers=32, n_heads=32, rope_theta=10000),
    "13B": ModelArgs(dim=5120, n_layers=40, n_heads=40, rope_theta=10000),
    "26B": ModelArgs(dim=5120, n_layers=80, n_heads=40, rope_theta=10000),
    "70B": ModelArgs(dim=8192, n_layers=80, n_heads=64, n_kv_heads=8, multiple_of=4096,
                     ffn_dim_multiplier=1.3, rope_theta=10000),
}

LLAMA3_FLAVORS: dict[str, ModelArgs] = {
    # lathe's own: a model small enough for multi-process tests on a laptop CPU (with GQA)
    "tiny": ModelArgs(dim=64, n_layers=4, n_heads=4, n_kv_heads=2, multiple_of=64, rope_theta=500000),
    "debugmodel": ModelArgs(dim=256, n_layers=8, n_heads=16, rope_theta=500000),
    "8B": ModelArgs(dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, multiple_of=1024,
                    ffn_dim_multiplier=1.3, rope_theta=500000),
    "70B": ModelArgs(dim=8192, n_layers=80, n_heads=64, n_kv_heads=8, multiple_of=4096,
                     ffn_dim_multiplier=1.3, rope_theta=500000),
    "405B": ModelArgs(dim=16384, n_layers=126, n_heads=128, n_kv_heads=8, multiple_of=4096,
                      ffn_dim_multiplier=1.2, rope_theta=500000),
}


@dataclass(frozen=True)
class ModelSpec:
    name: str
    flavors: dict[str, ModelArgs]
    build: Callable[[ModelArgs], nn.Module]
    tokenizer_kind: str  # the tokenizer family its released weights use


MODELS: dict[str, ModelSpec] = {
    "llama2": ModelSpec("llama2", LLAMA2_FLAVORS, Transformer, "sentencepiece"),
    "llama3": ModelSpec("llama3", LLAMA3_FLAVORS, Transformer, "tiktoken"),
}


# model.* options that override the flavor's value unless 0 (their ModelArgs field has the same name)
SHAPE_OPTIONS = ("dim", "n_layers", "n_heads", "n_kv_heads", "ffn_dim_multiplier", "multiple_of", "norm_eps",
                 "rope_theta")
# model.* options that are ModelArgs fields, taken as they are
PASSED_OPTIONS = ("norm_type", "rope_scaling", "depth_init", "fused_qkv", "fused_w13")
# ModelArgs fields that come from elsewhere: the tokenizer (data.resolve_vocab_size) and training.seq_len
DERIVED_FIELDS = ("vocab_size", "max_seq_len")


def model_args_from_config(cfg: Any, vocab_size: int = -1) -> ModelArgs:
    """The flavor's ModelArgs with every ``model.*`` shape option applied, checked.

    Every ModelArgs field is settable: the shape options override the flavor's value unless 0, the
    others (norm, RoPE scaling, init, fused projections) are taken as they are, the vocabulary size
    comes from the tokenizer and max_seq_len from ``training.seq_len``. Raises ConfigError naming
    the option for a shape that cannot be built."""
    from lathe.errors import ConfigError  # noqa: PLC0415

    m = cfg.model
    args = MODELS[m.name].flavors[m.flavor]
    changes: dict[str, Any] = {name: getattr(m, name) for name in PASSED_OPTIONS}
    changes.update({name: getattr(m, name) for name in SHAPE_OPTIONS if getattr(m, name)})
    args = args.with_(vocab_size=vocab_size, max_seq_len=cfg.training.seq_len, **changes)
    explicit = {name for name in SHAPE_OPTIONS if getattr(m, name)}

    def check(ok: bool, name: str, problem: str, fix: str) -> None:
        if not ok:
            # name the option the user set; if both sides come from the flavor, the first one named
            key = next((n for n in name.split("/") if n in explicit), name.split("/")[0])
            raise ConfigError(f"model.{key}", problem, fix, getattr(args, key))

    for name in ("dim", "n_layers", "n_heads", "multiple_of"):
        check(getattr(args, name) >= 1, name, "must be >= 1", "use a positive whole number, or 0 for the flavor's")
    check(args.kv_heads >= 1, "n_kv_heads", "must be >= 1", "use a positive whole number, or 0 for the flavor's")
    for name in ("ffn_dim_multiplier", "norm_eps", "rope_theta"):
        value = getattr(args, name)
        check(value is None or value > 0, name, "must be positive", "or 0 for the flavor's")
    check(args.dim % args.n_heads == 0, "n_heads/dim", f"dim {args.dim} is not a multiple of n_heads {args.n_heads}",
          "pick n_heads dividing dim (head size = dim / n_heads)")
    check(args.head_dim % 2 == 0, "n_heads/dim", f"the head size dim / n_heads = {args.head_dim} is odd",
          "RoPE rotates pairs: pick dim and n_heads with an even head size")
    check(args.n_heads % args.kv_heads == 0, "n_kv_heads/n_heads",
          f"n_heads {args.n_heads} is not a multiple of n_kv_heads {args.kv_heads}",
          "pick n_kv_heads dividing n_heads")
    return args


def model_overrides(args: ModelArgs, cfg: Any) -> str:
    """The shape options a run changed from its flavor, e.g. "dim 512, n_layers 6" ("" if none)."""
    flavor = MODELS[cfg.model.name].flavors[cfg.model.flavor]
    names = [f.name for f in fields(ModelArgs) if f.name not in DERIVED_FIELDS]
    return ", ".join(f"{n} {getattr(args, n)}" for n in names if getattr(args, n) != getattr(flavor, n))
