"""Process-group lifetime: init for torchrun, timeouts, teardown.

Backend by device: NCCL for CUDA tensors (with gloo alongside for CPU tensors, which DCP and
object collectives use), gloo on CPU-only machines.
"""

from __future__ import annotations

import os
import socket
import sys
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", 1))


def rank() -> int:
    return int(os.environ.get("RANK", 0))


def init(device: torch.device, init_timeout_s: int, single_process_group: bool = False) -> bool:
    """Join the process group torchrun describes. A single process gets none, unless
    ``single_process_group`` (DCP's process-based async writer needs one): then a 1-rank gloo
    group is created and True returned, so the caller can destroy it when done."""
    if dist.is_initialized():
        return False
    if world_size() == 1:
        if not single_process_group:
            return False
        with socket.socket() as s:  # a free local port for the 1-rank store
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1,
                                timeout=timedelta(seconds=init_timeout_s))
        return True
    backend = "cpu:gloo,cuda:nccl" if device.type == "cuda" else "gloo"
    kwargs = {"device_id": device} if device.type == "cuda" else {}
    dist.init_process_group(backend=backend, timeout=timedelta(seconds=init_timeout_s), **kwargs)
    return False


def set_nccl_defaults(trace_buffer_size: int, dump_folder) -> None:
    """NCCL error handling and the flight recorder, unless the environment already says otherwise:
    a failed or timed-out collective tears the process down (instead of hanging), and each rank
    keeps its last ``trace_buffer_size`` collectives, dumped to ``{dump_folder}/comm_traces/rank_R``
    when a collective times out (read them with ``python -m torch.distributed.flight_recorder``,
    docs/clusters.md). Call only on CUDA: gloo (CPU) reads none of these."""
    os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "3")
    if trace_buffer_size > 0:
        traces = Path(dump_folder) / "comm_traces"
        traces.mkdir(parents=True, exist_ok=True)
        os.environ.setdefault("TORCH_FR_BUFFER_SIZE", str(trace_buffer_size))
        os.environ.setdefault("TORCH_NCCL_DUMP_ON_TIMEOUT", "1")
        os.environ.setdefault("TORCH_FR_DUMP_TEMP_FILE", f"{traces}/rank_")


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
