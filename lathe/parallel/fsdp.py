"""Data parallelism: FSDP2 (``fully_shard``), HSDP on a 2-D mesh, and DDP.

FSDP shards every parameter on dim 0 across the dp_shard ranks. Each transformer block is its
own unit: its parameters are all-gathered just before it runs and freed after (forward and
backward), so only one block is ever whole in memory. The root unit holds the embeddings, final
norm and output layer. HSDP is the same call on a 2-D mesh: shard within a group of ranks,
replicate across groups (gradients are reduce-scattered in the group, all-reduced across).

CPU offload (``training.enable_cpu_offload``): the sharded parameters, their gradients and the
optimizer step live in CPU memory; FSDP copies each unit's shard to the device just before its
all-gather and the gradient shards back after the reduce-scatter. Pinned (page-locked) host memory
makes those copies asynchronous, and needs CUDA: without it the buffers are ordinary memory.

DDP (replicate only) keeps whole parameters on every rank and all-reduces gradients.
"""

from __future__ import annotations

import logging

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard

logger = logging.getLogger("lathe")


def apply_fsdp(model: nn.Module, mesh: DeviceMesh, param_dtype: torch.dtype, reduce_dtype: torch.dtype,
               pipeline_parallel: bool = False, cpu_offload: bool = False) -> None:
    mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype)
    offload = CPUOffloadPolicy(pin_memory=torch.cuda.is_available()) if cpu_offload else OffloadPolicy()
    blocks = list(model.layers.values())
    for i, block in enumerate(blocks):
        # Resharding after forward frees the gathered weights until backward needs them again.
        # Not for the last block (backward starts with it: FSDP would re-gather at once), and not
        # under pipeline parallelism, where each micro-batch would re-gather every block.
        reshard = not pipeline_parallel and i < len(blocks) - 1
        fully_shard(block, mesh=mesh, mp_policy=mp, reshard_after_forward=reshard, offload_policy=offload)
    fully_shard(model, mesh=mesh, mp_policy=mp, reshard_after_forward=not pipeline_parallel, offload_policy=offload)
    kind = "HSDP" if mesh.ndim == 2 else "FSDP"
    logger.info("applied %s over %s ranks (params %s, reduce %s%s)", kind, mesh.size(), param_dtype, reduce_dtype,
                ", parameters offloaded to CPU" if cpu_offload else "")


def apply_ddp(model: nn.Module, mesh: DeviceMesh) -> None:
    from torch.distributed._composable.replicate import replicate  # composable DDP

    replicate(model, device_mesh=mesh, bucket_cap_mb=100)
    logger.info("applied DDP over %d ranks", mesh.size())


def set_gradient_sync(model: nn.Module, enabled: bool, all_reduce: bool | None = None) -> None:
    """Whether this micro-batch's backward reduces gradients (FSDP reduce-scatters them into the
    sharded gradients; off = they accumulate unsharded until a backward with it on). ``all_reduce``
    (HSDP): whether the reduce-scattered shard is also all-reduced across replicas; off = FSDP keeps
    the partial sum and all-reduces it with the next backward that has it on."""
    if hasattr(model, "set_requires_gradient_sync"):
        model.set_requires_gradient_sync(enabled)
    if all_reduce is not None and hasattr(model, "set_requires_all_reduce"):
        model.set_requires_all_reduce(all_reduce)
