"""Parallel degrees -> one DeviceMesh.

Mesh dimensions, outermost first: pp, dp_replicate, dp_shard, cp, tp. Only degrees > 1 become
dimensions. TP is innermost so that its frequent, latency-bound collectives stay among
neighbouring ranks (inside a node on GPU clusters); PP, which only sends activations between
stages, is outermost (across nodes).

When data parallelism is on, ``Meshes.dp`` is all data-parallel ranks as one dimension (the one DP
dimension, or dp_replicate x dp_shard flattened for HSDP): the data stream uses it.

Context parallel (CP) ranks share one batch (each holds a part of every sequence), so they are not
data-parallel for the data stream. But each computes the gradient of a different part of the
loss, so for FSDP they join the sharding dimension (``dp_shard_cp`` = dp_shard x cp flattened):
parameters are sharded over dp_shard x cp ranks and gradients are averaged over them, which
gives the gradient of the mean loss over all tokens. The loss average uses ``dp_cp`` (every rank
that holds different tokens).
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass

from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from lathe.config import Parallelism

logger = logging.getLogger("lathe")

MESH_ORDER = ("pp", "dp_replicate", "dp_shard", "cp", "tp")


@dataclass(frozen=True)
class ParallelDims:
    dp_replicate: int
    dp_shard: int
    cp: int
    tp: int
    pp: int
    world_size: int
    loss_parallel_requested: bool = True

    @classmethod
    def from_config(cls, p: Parallelism, world_size: int) -> "ParallelDims":
        """Resolve dp_shard = -1 to the ranks left over (the config validated the product)."""
        others = p.dp_replicate * p.cp * p.tp * p.pp
        dp_shard = p.dp_shard if p.dp_shard != -1 else world_size // others
        return cls(p.dp_replicate, dp_shard, p.cp, p.tp, p.pp, world_size, p.loss_parallel)

    @property
    def degrees(self) -> dict[str, int]:
        return {name: getattr(self, name) for name in MESH_ORDER}

    @property
    def dp(self) -> int:
        return self.dp_replicate * self.dp_shard

    @property
    def dp_enabled(self) -> bool:
        return self.dp > 1

    @property
    def cp_enabled(self) -> bool:
        return self.cp > 1

    @property
    def fsdp_enabled(self) -> bool:
        """FSDP (or HSDP) shards over dp_shard x cp ranks: CP ranks join the sharding group."""
        return self.dp_shard * self.cp > 1

    @property
    def ddp_only(self) -> bool:
        return self.dp_replicate > 1 and self.dp_shard * self.cp == 1

    @property
    def tp_enabled(self) -> bool:
        return self.tp > 1

    @property
    def loss_parallel(self) -> bool:
        return self.tp > 1 and self.loss_parallel_requested

    @property
    def model_parallel_size(self) -> int:
        """Ranks that share one data-parallel copy of the batch (they see the same tokens)."""
        return self.tp * self.pp * self.cp

    def build_meshes(self, device_type: str) -> "Meshes":
        dims = [(name, size) for name, size in self.degrees.items() if size > 1]
        if not dims:
            return Meshes(None, None, None, None, None)
        names, sizes = zip(*dims)
        logger.info("building a %d-D device mesh: %s", len(dims), " x ".join(f"{n} {s}" for n, s in dims))
        world = init_device_mesh(device_type, sizes, mesh_dim_names=names)
        dp_names = tuple(n for n in ("dp_replicate", "dp_shard") if n in names)
        # The flattened mesh is kept here, not sliced from the world mesh again (torch deprecates
        # slicing flattened dims). _flatten is private in torch 2.11-2.13; there is no public API.
        dp = world[dp_names]._flatten(mesh_dim_name="dp") if dp_names else None
        data_parallel = world[dp_names] if dp_names else None
        cp = dp_cp = None
        if "cp" in names:
            cp = world["cp"]
            shard_cp = world[tuple(n for n in ("dp_shard", "cp") if n in names)]._flatten(mesh_dim_name="dp_shard_cp")
            data_parallel = _concatenate(world, "dp_replicate", shard_cp) if "dp_replicate" in names else shard_cp
            dp_cp = world[(*dp_names, "cp")]._flatten(mesh_dim_name="dp_cp") if dp_names else cp
        return Meshes(world=world, dp=dp, data_parallel=data_parallel,
                      tp=world["tp"] if "tp" in names else None, pp=world["pp"] if "pp" in names else None,
                      cp=cp, dp_cp=dp_cp if cp is not None else dp)


def _concatenate(world: DeviceMesh, outer: str, inner: DeviceMesh) -> DeviceMesh:
    """The 2-D (outer, inner) mesh, where ``inner`` is a flattened mesh (HSDP x CP)."""
    if hasattr(DeviceMesh, "_concatenate"):  # torch 2.13 has it: no slicing of a flattened dim
        return DeviceMesh._concatenate([world[outer], inner])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return world[(outer, inner.mesh_dim_names[0])]


@dataclass(frozen=True)
class Meshes:
    """The world mesh and the sub-meshes each technique uses (None when that degree is 1)."""

    world: DeviceMesh | None
    dp: DeviceMesh | None  # all data-parallel ranks as one dimension: data sharding
    # for FSDP/DDP: 1-D, or 2-D (dp_replicate, dp_shard) = HSDP; with CP, dp_shard x cp flattened
    data_parallel: DeviceMesh | None
    tp: DeviceMesh | None
    pp: DeviceMesh | None
    cp: DeviceMesh | None = None
    dp_cp: DeviceMesh | None = None  # every rank holding different tokens: the loss average
