"""Process-group lifetime: init for torchrun, timeouts, teardown.

Backend by device: NCCL for CUDA tensors (with gloo alongside for CPU tensors, which DCP and
object collectives use), gloo on CPU-only machines.
"""

from __future__ import annotations

import os
import sys
from datetime import timedelta

import torch
import torch.distributed as dist


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", 1))


def rank() -> int:
    return int(os.environ.get("RANK", 0))


def init(device: torch.device, init_timeout_s: int) -> None:
    """Join the process group torchrun describes (no-op for a single process)."""
    if world_size() == 1 or dist.is_initialized():
        return
    backend = "cpu:gloo,cuda:nccl" if device.type == "cuda" else "gloo"
    kwargs = {"device_id": device} if device.type == "cuda" else {}
    dist.init_process_group(backend=backend, timeout=timedelta(seconds=init_timeout_s), **kwargs)


def set_train_timeout(seconds: int) -> None:
    """After step 1 (compilation, lazy init done) a hang should surface sooner than at init."""
    if not dist.is_initialized():
        return
    from torch.distributed.distributed_c10d import _set_pg_timeout  # private in 2.11-2.13

    dist.barrier()  # a fast rank must not time out waiting for a slow one's first step
    _set_pg_timeout(timedelta(seconds=seconds), None)


def finish(code: int = 0) -> None:
    """End a distributed worker process cleanly.

    Tear the group down while everything is alive, flush output, and leave with ``os._exit``:
    with torch 2.13 + gloo, objects owning gloo work (meshes, DTensors, FSDP modules) that survive
    into interpreter shutdown can abort the process with SIGABRT (see docs/parallelism.md).
    """
    if dist.is_initialized():
        try:
            dist.barrier()
        finally:
            dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
