"""Parallelism and memory techniques, applied to a model from outside, one module per technique.

Order of application (each step wraps what the previous one produced):
tensor parallel -> activation checkpointing -> torch.compile -> FSDP / HSDP / DDP.
Context parallel (``context.py``) does not wrap the model: it shards each batch along the sequence
and runs attention as a ring while a step's forward and backward run.
"""

from __future__ import annotations

# Wrappers add these levels to parameter names; stripping them gives the model's own names.
_WRAPPER_PREFIXES = ("_checkpoint_wrapped_module.", "_orig_mod.", "_fsdp_wrapped_module.")


def clean_name(name: str) -> str:
    for prefix in _WRAPPER_PREFIXES:
        name = name.replace(prefix, "")
    return name
