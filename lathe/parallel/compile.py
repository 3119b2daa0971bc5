"""torch.compile, one transformer block at a time.

Blocks are identical in structure, so dynamo traces one and reuses the compiled code for the rest:
compiling per block costs about as much as compiling one block, while a whole-model compile grows
with depth. Applied after activation checkpointing and before FSDP (TP -> AC -> compile -> FSDP),
so compiled code sees the checkpoint wrapper and FSDP's hooks stay outside the graphs.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

logger = logging.getLogger("lathe")


def apply_compile(model: nn.Module, backend: str = "inductor") -> None:
    for name, block in list(model.layers.items()):
        model.layers[name] = torch.compile(block, backend=backend, fullgraph=True)
    logger.info("compiling each transformer block with torch.compile (backend %s)", backend)
