"""``lathe estimate``: the memory each rank of a layout needs, measured on fake tensors, without GPUs.

One process plays one rank of the real job. It joins a fake process group of the job's world size
(collectives return at once, moving no data), builds the real model on the meta device, splits and
parallelizes it exactly as ``lathe train`` does (``trainer.build_model_parts``: TP, activation
checkpointing, FSDP/HSDP/DDP, pipeline stages), materializes it as fake tensors (shapes, dtypes and
storage sizes, no data), and runs two real training steps (``trainer.StepRunner``: micro-batches,
the pipeline schedule, gradient clipping, the optimizer) while ``lathe.memtrack.MemoryTracker``
counts every tensor storage. Step 1 creates the optimizer states; step 2 is the steady state.
Pipeline ranks hold different stages, so each pipeline rank is simulated in turn; ranks of one
pipeline rank differ at most by the last shard of an uneven split (rank 0 holds the larger one).

What the tracker cannot see is modelled (``lathe.memory_model.device_overheads``): the CUDA caching
allocator's fragmentation, the CUDA context and NCCL's communication buffers. See docs/planning.md.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import time
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import nn

from lathe import config as config_lib
from lathe.config import Config
from lathe.errors import ConfigError
from lathe.memtrack import MemoryReport, MemoryTracker

logger = logging.getLogger("lathe")


@dataclass
class RankEstimate:
    rank: int
    pp_rank: int
    stages: list[int]
    report: MemoryReport


@dataclass
class Estimate:
    """The fake-mode measurement of every distinct rank of a layout (bytes)."""

    world_size: int
    degrees: dict[str, int]
    vocab_size: int
    ranks: list[RankEstimate] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def peak(self) -> int:
        """The largest per-rank peak: what the most loaded rank needs."""
        return max(r.report.peak for r in self.ranks)


class _NoMetrics:
    """The part of MetricsProcessor a StepRunner talks to during a step."""

    def data_loading_time(self, seconds: float) -> None:
        pass


def _synthetic_batches(batch: int, seq_len: int, vocab: int):
    while True:
        yield torch.randint(0, vocab, (batch, seq_len)), torch.randint(0, vocab, (batch, seq_len))


def estimation_config(cfg: Config) -> Config:
    """The config the estimate runs: eager, on CPU (byte counts do not depend on the device),
    without the side activities of a run (validation, checkpoints, profiling)."""
    cfg = copy.deepcopy(cfg)
    if cfg.training.compile:
        logger.info("estimating the eager run: torch.compile is left out (compiled blocks usually need less)")
    cfg.training.compile = False
    cfg.training.device = "cpu"
    cfg.optimizer.fused = False  # CUDA only; fused and foreach keep the same states
    cfg.validation.enabled = False
    cfg.checkpoint.enable_checkpoint = False
    cfg.memory_estimation.enabled = False
    return cfg


@contextlib.contextmanager
def fake_process_group(rank: int, world_size: int):
    """A process group of ``world_size`` ranks in which this process is ``rank`` and collectives
    move nothing (torch's "fake" backend)."""
    if dist.is_initialized():
        raise RuntimeError("lathe estimate needs a process without a process group")
    if "fake" not in dist.Backend.backend_list:  # torch < 2.13 registers it from its test utilities
        import torch.testing._internal.distributed.fake_pg  # noqa: F401
    dist.init_process_group("fake", rank=rank, world_size=world_size, store=dist.HashStore())
    try:
        yield
    finally:
        dist.destroy_process_group()


def estimate(cfg: Config, world_size: int, vocab_size: int | None = None, steps: int = 2) -> Estimate:
    """Measure every distinct rank of ``cfg``'s layout on ``world_size`` ranks (see module doc)."""
    from lathe.data import build_tokenizer, resolve_vocab_size
    from lathe.parallel.dims import ParallelDims

    config_lib.validate(cfg, world_size=world_size, cuda_available=True)
    cfg = estimation_config(cfg)
    if vocab_size is None:
        vocab_size = cfg.model.vocab_size or resolve_vocab_size(cfg, build_tokenizer(cfg))
    start = time.perf_counter()
    dims = ParallelDims.from_config(cfg.parallelism, world_size)
    result = Estimate(world_size, dims.degrees, vocab_size)
    per_pp_rank = world_size // dims.pp
    for pp_rank in range(dims.pp):
        rank = pp_rank * per_pp_rank  # the pipeline dimension is outermost in the mesh
        stages, report = _estimate_rank(cfg, dims, rank, vocab_size, steps)
        result.ranks.append(RankEstimate(rank, pp_rank, stages, report))
    result.seconds = time.perf_counter() - start
    return result


def _estimate_rank(cfg: Config, dims, rank: int, vocab_size: int, steps: int) -> tuple[list[int], MemoryReport]:
    from torch._subclasses.fake_tensor import FakeTensorMode

    from lathe.models import MODELS
    from lathe.optim import LRSchedules, Optimizers
    from lathe.parallel.pipeline import PipelineRunner
    from lathe.trainer import StepRunner, build_model_parts, cross_entropy, model_args, pipeline_plan

    t = cfg.training
    device = torch.device("cpu")
    with fake_process_group(rank, dims.world_size):
        meshes = dims.build_meshes("cpu")
        args = model_args(cfg, vocab_size)
        with torch.device("meta"):
            model = MODELS[cfg.model.name].build(args)
        reference = copy.deepcopy(model)
        accum = config_lib.accumulation_steps(cfg, dims.dp)
        with _quiet():
            plan = pipeline_plan(cfg, args, dims, meshes, reference) if dims.pp > 1 else None
            parts = build_model_parts(cfg, model, reference, plan, dims, meshes)
        del model, reference
        # Parallelizing happens on the meta device, outside fake mode (DeviceMesh and TP need real
        # index tensors); materializing creates fake storages of the parallel shapes.
        fake = not cfg.memory_estimation.disable_fake_mode
        with FakeTensorMode(allow_non_fake_inputs=True) if fake else contextlib.nullcontext():
            for part in parts:
                part.to_empty(device=device)
                part.init_rope(device)
                if not fake:  # real tensors: real values, so that the run computes something sane
                    with torch.no_grad():
                        for p in part.parameters():
                            p.normal_(0, 0.02)
            pipeline = None
            if plan is not None:
                pipeline = PipelineRunner(plan, parts, device, meshes.pp.get_group(), loss_fn=cross_entropy,
                                          accumulation=accum,
                                          stage_examples=stage_examples(plan, parts, cfg, args, dims, device))
                _skip_shape_exchange(pipeline.schedule)
            optimizers = Optimizers(parts, cfg.optimizer)
            schedules = LRSchedules(optimizers, t.steps, cfg.lr_scheduler)
            data = _synthetic_batches(t.batch_size, t.seq_len, vocab_size)
            runner = StepRunner(parts, pipeline, optimizers, schedules, data, _NoMetrics(), device, accum, cfg,
                                dims, pp_group=meshes.pp.get_group() if meshes.pp is not None else None)
            tracker = MemoryTracker(parts, optimizers.optimizers)
            for step in range(1, steps + 1):
                with tracker:
                    runner.run(step)
            report = tracker.report()
        stages = plan.my_stages if plan is not None else [0]
        del runner, optimizers, schedules, parts, pipeline, tracker
    return stages, report


@contextlib.contextmanager
def _quiet():
    """Parallelizing logs a line per technique; the estimate prints its own summary."""
    level = logger.level
    logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        logger.setLevel(level)


def stage_examples(plan, parts: list[nn.Module], cfg: Config, args, dims, device) -> list[dict]:
    """Each local stage's example input and output (PipelineStage's static shapes), since a fake
    process group cannot carry the shape exchange between stages. Between stages flows the hidden
    state (micro-batch, sequence or its TP shard under sequence parallelism, dim), in FSDP's
    parameter dtype when FSDP casts it, else float32; the first stage takes token ids."""
    from lathe.trainer import DTYPES

    micro = cfg.training.batch_size // plan.microbatches
    seq = cfg.training.seq_len // dims.tp
    hidden_dtype = DTYPES[cfg.training.mixed_precision_param] if dims.fsdp_enabled else torch.float32
    out = []
    for stage in plan.my_stages:
        first, last = stage == 0, stage == plan.num_stages - 1
        inputs = (torch.zeros(micro, cfg.training.seq_len, dtype=torch.long, device=device) if first
                  else torch.zeros(micro, seq, args.dim, dtype=hidden_dtype, device=device, requires_grad=True))
        # The last stage's output is consumed by the loss on this rank, never sent: its example
        # only has to exist.
        outputs = (torch.zeros(micro, cfg.training.seq_len, 1, device=device) if last
                   else torch.zeros(micro, seq, args.dim, dtype=hidden_dtype, device=device, requires_grad=True))
        out.append({"input_args": inputs, "output_args": outputs})
    return out


def _skip_shape_exchange(schedule) -> None:
    """Torch's schedules open with a vote between stages (over P2P) on whether shapes are static;
    with a fake process group nothing arrives. Every local stage was given static shapes, so the
    outcome is known: set it. (Private API of torch.distributed.pipelining, 2.13.)"""
    from torch.distributed.pipelining.stage import InferenceMode

    def warmup(stages, has_backward, p2p_done):
        for stage in stages:
            stage._inference_mode = InferenceMode.STATIC

    schedule._warmup_p2p = warmup
