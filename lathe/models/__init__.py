"""Model registry: each family's flavors and how to build one.

A ``ModelSpec`` bundles what the trainer needs to know about a family; parallelism plans, pipeline
split units and Hugging Face name mappings attach here as they are built.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

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
