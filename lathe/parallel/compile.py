"""torch.compile, one transformer block at a time.

Blocks are identical in structure, so dynamo traces one and reuses the compiled code for the rest:
compiling per block costs about as much as compiling one block, while a whole-model compile grows
with depth. Applied after activation checkpointing and before FSDP (TP -> AC -> compile -> FSDP),
so compiled code sees the checkpoint wrapper and FSDP's hooks stay outside the graphs.

Compiled autograd (``experimental.enable_compiled_autograd``): torch.compile above captures each
block's forward and the backward that AOTAutograd derives from it, one block at a time. Compiled
autograd instead captures the *whole* backward pass at run time, as the autograd engine walks it
(including hooks and the parts between blocks), and compiles it as one graph. Forward and backward
of every micro-batch run inside ``compiled_autograd(backend)``.
"""

from __future__ import annotations

import contextlib
import logging

import torch
from torch import nn

logger = logging.getLogger("lathe")


def apply_compile(model: nn.Module, backend: str = "inductor") -> None:
    for name, block in list(model.layers.items()):
        model.layers[name] = torch.compile(block, backend=backend, fullgraph=True)
    logger.info("compiling each transformer block with torch.compile (backend %s)", backend)


def compiled_autograd(enabled: bool, backend: str = "inductor"):
    """A context in which backward passes are captured and compiled with ``backend``."""
    if not enabled:
        return contextlib.nullcontext()
    from torch._dynamo import compiled_autograd as ca  # torch's mechanism (private module in 2.11-2.13)

    # Static shapes: every training step has the same shapes, and tracing the backward with
    # symbolic sizes costs minutes of symbolic reasoning on a small model.
    def compiler(graph):
        return torch.compile(graph, backend=backend, dynamic=False)

    return ca._enable(compiler, dynamic=False)
