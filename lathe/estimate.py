"""``lathe estimate``: the memory each rank of a layout needs, measured on fake tensors, without GPUs.

One process plays one rank of the real job. It joins a fake process group of the job's world size
(collectives return at once, moving no data), builds the real model on the meta device, splits and
parallelizes it exactly as ``lathe train`` does (``trainer.build_model_parts``: TP, activation
checkpointing, FSDP/HSDP, pipeline stages), materializes it as fake tensors (shapes, dtypes and
storage sizes, no data), and runs two real training steps (``trainer.StepRunner``: micro-batches,
the pipeline schedule, gradient clipping, the optimizer) while ``lathe.memtrack.MemoryTracker``
counts every tensor storage. Step 1 creates the optimizer states; step 2 is the steady state.
The ranks of a layout fall into a few *roles* (``roles``): sets of ranks whose measurement is
provably identical (the same pipeline stage, the same local shape of every sharded tensor). One rank
per role is simulated, in turn; a role's answer stands for all its ranks (docs/planning.md, "Roles").
The world size is checked against ``MAX_WORLD_SIZE`` before anything is allocated: torch's process
group keeps a few hundred bytes per rank, so a typo of a world size would otherwise exhaust memory.

Modelled instead of measured (docs/planning.md): DDP's gradient buckets (torch's C++ reducer cannot
run on fake tensors: DDP layouts run the local model and add one flat copy of the gradients), and
what a GPU adds to the tracked tensors: the caching allocator's fragmentation, the CUDA context and
NCCL's buffers (``device_overheads``).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import logging
import time
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import nn

from lathe import config as config_lib
from lathe.config import Config
from lathe.errors import ConfigError
from lathe.memory_model import FRAGMENTATION, device_overheads
from lathe.memtrack import GRADS, MemoryReport, MemoryTracker

logger = logging.getLogger("lathe")

GIB = 2**30
# The vocabulary of each family's released tokenizer: used when the tokenizer file the config
# names is not on this machine (an estimate needs only the number of embedding rows).
RELEASED_VOCAB = {"tiktoken": 128_256, "sentencepiece": 32_000}
# The largest job lathe estimate simulates: above the largest announced training jobs (~100,000
# GPUs). The estimator's own memory grows with the world size (torch's process group keeps per-rank
# bookkeeping); the report states what it used (docs/planning.md, "Bounds").
MAX_WORLD_SIZE = 2**17


@dataclass
class RankEstimate:
    rank: int
    pp_rank: int
    stages: list[int]
    report: MemoryReport
    modelled: dict[str, int] = field(default_factory=dict)  # bytes added to the measured peak
    stands_for: int = 1  # ranks of the layout in this rank's role (identical measurement)
    role: "Role | None" = None  # which ranks those are (Role.members)

    @property
    def peak(self) -> int:
        return self.report.peak + sum(self.modelled.values())


@dataclass
class Estimate:
    """The fake-mode measurement of every distinct rank of a layout (bytes)."""

    world_size: int
    degrees: dict[str, int]
    vocab_size: int
    ranks: list[RankEstimate] = field(default_factory=list)  # one per role
    seconds: float = 0.0
    max_rss: int = 0  # bytes: the estimating process's own peak resident memory

    @property
    def peak(self) -> int:
        """The largest per-rank peak: what the most loaded rank needs."""
        return max(r.peak for r in self.ranks)


class _NoMetrics:
    """The part of MetricsProcessor a StepRunner talks to during a step."""

    def data_loading_time(self, seconds: float) -> None:
        pass


class _SyntheticBatches:
    """Random (inputs, labels) batches; ``position`` counts them, as the real loader does."""

    def __init__(self, batch: int, seq_len: int, vocab: int):
        self.shape, self.vocab, self.position = (batch, seq_len), vocab, 0

    def __iter__(self):
        return self

    def __next__(self):
        self.position += 1
        return torch.randint(0, self.vocab, self.shape), torch.randint(0, self.vocab, self.shape)


def vocab_size_for(cfg: Config) -> tuple[int, str]:
    """The embedding rows of ``cfg``'s model and where the number comes from."""
    from lathe.data import build_tokenizer, resolve_vocab_size
    from lathe.models import MODELS

    if cfg.model.vocab_size:
        return cfg.model.vocab_size, "model.vocab_size"
    path = config_lib.tokenizer_path(cfg)
    if path.exists():
        return resolve_vocab_size(cfg, build_tokenizer(cfg)), f"the tokenizer {path}"
    kind = MODELS[cfg.model.name].tokenizer_kind
    return RELEASED_VOCAB[kind], (f"{cfg.model.name}'s released tokenizer ({path} is not here; "
                                  "model.vocab_size sets another)")


def estimation_config(cfg: Config) -> Config:
    """The config the estimate runs: eager, on CPU (byte counts do not depend on the device),
    without what a run does besides training steps (data, validation, checkpoints, profiling)."""
    cfg = copy.deepcopy(cfg)
    cfg.training.compile = False
    cfg.training.device = "cpu"
    # Block-causal attention needs real document ids (its CPU kernel splits rows at document
    # boundaries); its memory is that of causal attention, which the estimate runs instead.
    cfg.model.attention_mask, cfg.model.document_positions, cfg.training.document_ids = "causal", False, False
    if cfg.training.mixed_precision_param == "auto":  # what auto means on the GPU estimated for
        cfg.training.mixed_precision_param = "bfloat16"
    cfg.optimizer.fused = False  # CUDA only; fused and foreach keep the same states
    cfg.validation.enabled = False
    cfg.checkpoint.enable_checkpoint = False
    cfg.checkpoint.create_seed_checkpoint = False
    cfg.checkpoint.initial_load_path = None
    cfg.profiling.enable_profiling = cfg.profiling.enable_memory_snapshot = False
    cfg.memory_estimation.enabled = False
    cfg.model.tokenizer_path = ""  # the vocabulary is resolved beforehand
    cfg.training.dataset, cfg.training.dataset_path, cfg.training.dataset_mix = "lathe_corpus", None, []
    return cfg


def world_size_for(cfg: Config, world_size: int | None) -> int:
    """``--world-size``, else the product of the degrees when none is -1; checked to be plausible."""
    p = cfg.parallelism
    if world_size is not None:
        if world_size < 1:
            raise ConfigError("--world-size", "must be >= 1", "e.g. --world-size 8", world_size)
        check_plausible(world_size, "--world-size")
        return world_size
    if p.dp_shard == -1:
        raise ConfigError("--world-size", "needed: parallelism.dp_shard is -1 (all remaining ranks)",
                          "give --world-size N (GPUs in the job) or set parallelism.dp_shard", None)
    world_size = p.dp_replicate * p.dp_shard * p.tp * p.pp * p.cp
    check_plausible(world_size, "parallelism")
    return world_size


def check_plausible(world_size: int, option: str = "--world-size") -> None:
    """Refuse a world size above ``MAX_WORLD_SIZE`` before anything is allocated (the estimator's
    memory grows with it; such a number is a typo, not a job)."""
    if world_size > MAX_WORLD_SIZE:
        raise ConfigError(option, f"a world size of {world_size:,} GPUs is not plausible: lathe estimate "
                          f"simulates jobs of at most {MAX_WORLD_SIZE:,} GPUs (the largest training jobs "
                          "run ~100,000)", "give the number of GPUs in the job, e.g. --world-size 512",
                          world_size)


def prepare(cfg: Config, world_size: int) -> tuple[Config, int, str]:
    """Validate ``cfg`` for ``world_size`` ranks and return (estimation config, vocabulary, its
    source). Every ConfigError is raised here, before any process group exists."""
    check_plausible(world_size)
    vocab, source = vocab_size_for(cfg)
    if cfg.training.compile:
        logger.info("estimating the eager run: torch.compile is left out (compiled blocks usually need less)")
    run_cfg = estimation_config(cfg)
    config_lib.validate(run_cfg, world_size=world_size, cuda_available=True)
    return run_cfg, vocab, source


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
        # DTensor caches sharding decisions by mesh, and a later group's meshes compare equal to
        # this one's while naming other process groups: forget them. (Private in torch 2.11-2.13.)
        from torch.distributed.tensor import debug

        clear = getattr(debug, "_clear_sharding_prop_cache", None)
        if clear is not None:
            clear()


def estimate(cfg: Config, world_size: int, steps: int = 2, all_ranks: bool = False) -> Estimate:
    """Measure one rank of every role of ``cfg``'s layout on ``world_size`` ranks (see module doc);
    ``all_ranks`` measures every rank instead (for tests: small layouts only)."""
    from lathe.parallel.dims import ParallelDims

    run_cfg, vocab, _ = prepare(cfg, world_size)
    start = time.perf_counter()
    dims = ParallelDims.from_config(run_cfg.parallelism, world_size)
    result = Estimate(world_size, dims.degrees, vocab)
    chosen = [_single(dims, r) for r in range(world_size)] if all_ranks else roles(run_cfg, dims, vocab)
    with _lazy_fsdp_chunks():
        for i, role in enumerate(chosen):
            began = time.perf_counter()
            measured = _estimate_rank(run_cfg, dims, role.rank, role.pp_rank, vocab, steps)
            measured.stands_for, measured.role = role.ranks, role
            logger.info("estimate: role %d of %d (rank %d, pipeline rank %d, %d ranks) measured in %.1f s",
                        i + 1, len(chosen), role.rank, role.pp_rank, role.ranks, time.perf_counter() - began)
            result.ranks.append(measured)
    result.seconds = time.perf_counter() - start
    result.max_rss = _max_rss()
    return result


def _max_rss() -> int:
    import resource
    import sys

    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss if sys.platform == "darwin" else rss * 1024  # Linux reports KiB


# ---------------------------------------------------------------------------------------------
# Roles: which ranks measure the same (docs/planning.md, "Roles")


@dataclass(frozen=True)
class Role:
    rank: int  # the global rank measured for the role (the lowest of its ranks)
    pp_rank: int
    ranks: int  # how many ranks of the layout the role has
    tp: tuple[int, int] = (0, 1)  # [start, end) of its TP coordinates
    shard: tuple[int, int] = (0, 1)  # [start, end) of its FSDP coordinates (dp_shard x cp + cp)
    replica: tuple[int, int] | None = None  # [start, end) of its dp_replicate coordinates; None: all

    def members(self, dims) -> list[int]:
        """Every rank of the role (for tests: O(ranks))."""
        replicas = range(*self.replica) if self.replica is not None else range(dims.dp_replicate)
        return sorted(_rank_of(dims, self.pp_rank, rep, j // dims.cp, j % dims.cp, t)
                      for rep in replicas for j in range(*self.shard) for t in range(*self.tp))


def _single(dims, rank: int) -> Role:
    """A role of one rank (to measure every rank)."""
    pp, rep, shard, cp, tp = _coords(dims, rank)
    j = shard * dims.cp + cp
    return Role(rank, pp, 1, (tp, tp + 1), (j, j + 1), (rep, rep + 1))


def _chunk(n: int, k: int, i: int) -> int:
    """The size of piece ``i`` when ``torch.chunk`` splits ``n`` into ``k`` (DTensor's Shard and
    FSDP split that way: ceil(n/k) each, the remainder next, then empty pieces)."""
    size = -(-n // k)
    return max(0, min(size, n - i * size))


def _breaks(extents, k: int) -> list[int]:
    """The coordinates in [0, k) where the piece size of some extent changes: the piece sizes of
    every extent are constant between consecutive breaks."""
    points = {0}
    for n in extents:
        if n > 0:
            size = -(-n // k)  # pieces [0, n // size) are full, a partial one follows, then empty ones
            points.update(p for p in (n // size, -(-n // size)) if 0 < p < k)
    return sorted(points)


def _intervals(extents, k: int) -> list[tuple[int, int]]:
    """[start, end) runs of coordinates of a k-way split in which every extent's piece is the same."""
    b = _breaks(extents, k)
    return list(zip(b, [*b[1:], k]))


def _coords(dims, rank: int) -> tuple[int, int, int, int, int]:
    """(pp, dp_replicate, dp_shard, cp, tp) coordinates of ``rank`` (row-major, pp outermost)."""
    out = []
    for size in reversed([dims.pp, dims.dp_replicate, dims.dp_shard, dims.cp, dims.tp]):
        out.append(rank % size)
        rank //= size
    return tuple(reversed(out))


def _rank_of(dims, pp: int, rep: int, shard: int, cp: int, tp: int) -> int:
    rank = 0
    for coord, size in ((pp, dims.pp), (rep, dims.dp_replicate), (shard, dims.dp_shard), (cp, dims.cp),
                        (tp, dims.tp)):
        rank = rank * size + coord
    return rank


def model_extents(cfg: Config, vocab_size: int) -> set[int]:
    """Every parameter extent a split can cut: each dimension of each parameter of the whole model
    (built on the meta device) and the vocabulary. A superset is safe (it can only separate ranks
    that are in fact alike)."""
    from lathe.models import MODELS
    from lathe.trainer import model_args

    with torch.device("meta"):
        model = MODELS[cfg.model.name].build(model_args(cfg, vocab_size))
    return {n for p in model.parameters() for n in p.shape} | {vocab_size}


def roles(cfg: Config, dims, vocab_size: int) -> list[Role]:
    """The roles of the layout, each with its lowest rank and its number of ranks.

    Two ranks measure the same when they run the same program on tensors of the same shapes. The
    program differs only by pipeline stage (each pp coordinate is its own role). Shapes differ only
    where a split is uneven: TP splits parameter dimensions, the sequence and the vocabulary over
    ``tp`` ranks; FSDP splits dim 0 of each TP shard over the ``dp_shard x cp`` ranks (coordinate
    ``shard * cp + cp``); CP splits the sequence into 2 x cp pieces (rank c takes pieces c and
    2cp-1-c); replicas (dp_replicate) hold the same shards. Coordinates whose piece of every extent
    is the same are alike; the pieces change only at a few coordinates per extent (``_breaks``), so
    the roles are found without visiting every rank."""
    extents = model_extents(cfg, vocab_size)
    seq = cfg.training.seq_len
    cp_key = [(_chunk(seq, 2 * dims.cp, c), _chunk(seq, 2 * dims.cp, 2 * dims.cp - 1 - c), _chunk(seq, dims.cp, c))
              for c in range(dims.cp)]
    sequence = {seq} | {n for key in cp_key for n in key}  # TP (sequence parallel) splits these too
    shards = dims.dp_shard * dims.cp
    out = []
    for pp in range(dims.pp):
        for t0, t1 in _intervals(extents | sequence, dims.tp):
            # FSDP splits parameters (their TP shards), never the sequence
            local = extents | {_chunk(n, dims.tp, t) for n in extents for t in range(t0, t1)}
            if len(set(cp_key)) == 1:
                runs = [(j0, j1 - j0) for j0, j1 in _intervals(local, shards)]
            else:  # uneven CP pieces: every FSDP coordinate on its own (only small cp and shards)
                runs = [(j, 1) for j in range(shards)]
            for j, count in runs:
                rank = _rank_of(dims, pp, 0, j // dims.cp, j % dims.cp, t0)
                out.append(Role(rank, pp, count * (t1 - t0) * dims.dp_replicate, (t0, t1), (j, j + count)))
    return out


@contextlib.contextmanager
def _lazy_fsdp_chunks():
    """FSDP splits each parameter into one view per shard rank to keep one of them (torch 2.13's
    ``_chunk_with_empty``): O(dp_shard) views per parameter, minutes at large world sizes. Give it
    a sequence that makes a piece when asked: the same pieces, made in O(1)."""
    from torch.distributed.fsdp._fully_shard import _fsdp_param

    original = getattr(_fsdp_param, "_chunk_with_empty", None)
    if original is None:  # another torch: leave it
        yield
        return
    _fsdp_param._chunk_with_empty = _LazyChunks
    try:
        yield
    finally:
        _fsdp_param._chunk_with_empty = original


class _LazyChunks:
    """``torch.chunk(tensor, num_chunks, dim)`` padded with empty tensors, piece by piece."""

    def __init__(self, tensor: torch.Tensor, num_chunks: int, dim: int):
        self.tensor, self.num_chunks, self.dim = tensor, num_chunks, dim

    def __len__(self) -> int:
        return self.num_chunks

    def __getitem__(self, i: int) -> torch.Tensor:
        if not -self.num_chunks <= i < self.num_chunks:
            raise IndexError(i)
        i %= self.num_chunks
        n = self.tensor.size(self.dim)
        size = _chunk(n, self.num_chunks, i)
        if size == 0:
            return self.tensor.new_empty(0)
        return self.tensor.narrow(self.dim, i * -(-n // self.num_chunks), size)


def _estimate_rank(cfg: Config, dims, rank: int, pp_rank: int, vocab_size: int, steps: int) -> RankEstimate:
    from torch._subclasses.fake_tensor import FakeTensorMode

    from lathe.models import MODELS
    from lathe.optim import LRSchedules, build_optimizers
    from lathe.quant import float8
    from lathe.parallel.context import ContextParallel
    from lathe.parallel.pipeline import PipelineRunner
    from lathe.trainer import StepRunner, build_model_parts, cross_entropy, model_args, pipeline_plan

    t = cfg.training
    device = torch.device("cpu")
    run_dims = dims
    if dims.ddp_only:  # DDP's reducer cannot run on fake tensors: run the local model (see module doc)
        run_dims = dataclasses.replace(dims, dp_replicate=1, world_size=dims.world_size // dims.dp_replicate)
        rank = 0
    with fake_process_group(rank, run_dims.world_size):
        meshes = run_dims.build_meshes("cpu")
        args = model_args(cfg, vocab_size)
        with torch.device("meta"):
            model = MODELS[cfg.model.name].build(args)
        model = float8.convert(model, cfg, tp=dims.tp, fsdp_enabled=dims.fsdp_enabled)  # as the trainer does
        reference = copy.deepcopy(model)
        accum = config_lib.accumulation_steps(cfg, dims.dp)
        with _quiet():
            plan = pipeline_plan(cfg, args, dims, meshes, reference) if dims.pp > 1 else None
            parts = build_model_parts(cfg, model, reference, plan, run_dims, meshes)
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
            optimizers = build_optimizers(parts, cfg.optimizer)
            schedules = LRSchedules(optimizers, t.steps, cfg.lr_scheduler)
            data = _SyntheticBatches(t.batch_size, t.seq_len, vocab_size)
            cp = ContextParallel(meshes.cp, cfg.parallelism.cp_rotate_method, cfg.parallelism.cp_load_balance)
            runner = StepRunner(parts, pipeline, optimizers, schedules, data, _NoMetrics(), device, accum, cfg,
                                dims, cp, pp_group=meshes.pp.get_group() if meshes.pp is not None else None)
            tracker = MemoryTracker(parts, optimizers.torch_optimizers())
            for step in range(1, steps + 1):
                with tracker:
                    runner.run(step)
            report = tracker.report()
        stages = plan.my_stages if plan is not None else [0]
        del runner, optimizers, schedules, parts, pipeline, tracker
    modelled = {"ddp_buckets": report.steady[GRADS]} if dims.ddp_only else {}
    return RankEstimate(rank, pp_rank, stages, report, modelled)


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


# ---------------------------------------------------------------------------------------------
# What the numbers mean on a device


def largest_batch_size(cfg: Config, world_size: int, vocab: int, measured: dict[int, int], budget: int) -> int:
    """The largest ``training.batch_size`` whose peak fits ``budget`` on every pipeline rank: the
    measured peak at the configured batch plus what the analytic model adds per sequence (memory
    grows linearly with the micro-batch). Pipeline layouts step by the number of micro-batches."""
    from lathe.memory_model import layout_from_config, rank_memory, stage_layout
    from lathe.parallel.dims import ParallelDims

    dims = ParallelDims.from_config(cfg.parallelism, world_size)
    lay = layout_from_config(cfg, dims, vocab)
    step = stage_layout(lay)[2] if lay.pp > 1 else 1
    base = {r: rank_memory(lay, r).peak for r in measured}

    def fits(batch: int) -> bool:
        other = dataclasses.replace(lay, batch_size=batch)
        return all(measured[r] + rank_memory(other, r).peak - base[r] <= budget for r in measured)

    if not fits(step):
        return 0
    low, high = step, step
    while fits(high * 2) and high < 1 << 20:
        low, high = high * 2, high * 2
    high *= 2
    while high - low > step:  # invariant: low fits, high does not
        mid = (low + high) // (2 * step) * step
        low, high = (mid, high) if fits(mid) else (low, mid)
    return low


@dataclass
class Verdict:
    device: object  # lathe.devices.Device
    needed: dict[int, int]  # pp rank -> bytes the device needs (tracked peak + overheads)
    largest_batch: int

    @property
    def fits(self) -> bool:
        return max(self.needed.values()) <= self.device.usable_bytes

    @property
    def headroom(self) -> float:
        return 1 - max(self.needed.values()) / self.device.usable_bytes


def judge(cfg: Config, est: Estimate, device) -> Verdict:
    needed, measured = {}, {}
    for r in est.ranks:  # the most loaded role of each pipeline rank
        if r.peak >= measured.get(r.pp_rank, -1):
            needed[r.pp_rank] = r.peak + sum(device_overheads(r.peak, est.degrees).values())
            measured[r.pp_rank] = r.peak
    # the tensor budget: what is left of the device after the fixed overheads, less fragmentation
    fixed = {r: needed[r] - measured[r] - int(FRAGMENTATION * measured[r]) for r in measured}
    budget = min(int((device.usable_bytes - fixed[r]) / (1 + FRAGMENTATION)) for r in measured)
    return Verdict(device, needed, largest_batch_size(cfg, est.world_size, est.vocab_size, measured, budget))


# ---------------------------------------------------------------------------------------------
# Output

_ROWS = [("parameters", "parameters"), ("gradients", "gradients"), ("optimizer states", "optimizer_states"),
         ("unsharded parameters (FSDP)", "unsharded_parameters"), ("activations", "activations"),
         ("temporaries (backward)", "temporaries"), ("optimizer temporaries", "optimizer_temporaries"),
         ("communication buffers", "communication"), ("buffers (RoPE tables)", "buffers")]


def to_json(cfg: Config, est: Estimate, vocab_source: str, analytic: list | None, verdict: Verdict | None) -> dict:
    ranks = []
    for r in est.ranks:
        rep = r.report
        entry = {"rank": r.rank, "pp_rank": r.pp_rank, "stands_for": r.stands_for, "stages": r.stages, "peak": r.peak,
                 "tracked_peak": rep.peak, "peak_by_step": rep.peak_by_step, "steady": rep.steady,
                 "at_peak": rep.at_peak, "activations_by_module": rep.activations_by_module, "modelled": r.modelled}
        if verdict is not None:
            entry["device_overheads"] = device_overheads(r.peak, est.degrees)
            entry["needed"] = r.peak + sum(entry["device_overheads"].values())
        ranks.append(entry)
    out = {"model": f"{cfg.model.name} {cfg.model.flavor}", "world_size": est.world_size, "degrees": est.degrees,
           "vocab_size": est.vocab_size, "vocab_source": vocab_source, "batch_size": cfg.training.batch_size,
           "seq_len": cfg.training.seq_len, "seconds": round(est.seconds, 2), "estimator_max_rss": est.max_rss, "ranks_measured": len(ranks),
           "ranks": ranks, "units": "bytes"}
    if analytic is not None:
        out["analytic"] = [{"pp_rank": m.pp_rank, "peak": m.peak, "phases": m.phases} for m in analytic]
    if verdict is not None:
        d = verdict.device
        out["device"] = {"name": d.name, "memory": d.memory_bytes, "usable": d.usable_bytes}
        out["fits"] = verdict.fits
        out["largest_batch_size"] = verdict.largest_batch
    return out


def format_report(cfg: Config, est: Estimate, vocab_source: str, analytic: list | None,
                  verdict: Verdict | None, top_modules: int = 6) -> str:
    t, ac = cfg.training, cfg.activation_checkpoint
    layout = " x ".join(f"{k} {v}" for k, v in est.degrees.items() if v > 1) or "one process"
    ac_text = ac.mode if ac.mode != "selective" else f"selective {ac.selective_ac_option}"
    lines = [f"lathe estimate: {cfg.model.name} {cfg.model.flavor}, world size {est.world_size} ({layout})",
             f"  batch {t.batch_size} x {t.seq_len} tokens per rank, activation checkpointing {ac_text}, "
             f"FSDP params {t.mixed_precision_param} / reduce {t.mixed_precision_reduce}",
             f"  vocabulary {est.vocab_size:,} from {vocab_source}",
             f"  measured on fake tensors in {est.seconds:.1f} s: 2 training steps of one rank per role, "
             f"{len(est.ranks)} role{'s' if len(est.ranks) != 1 else ''} "
             f"({', '.join(f'rank {r.rank} for {r.stands_for:,}' for r in est.ranks[:8])}"
             f"{', ...' if len(est.ranks) > 8 else ''}); the estimator used {est.max_rss / GIB:.2f} GiB of RAM", ""]
    unit, scale = ("GiB", GIB) if est.peak >= GIB else ("MiB", 2**20)
    lines.append(f"{unit} per rank".ljust(38) + "".join(f"{'rank ' + str(r.rank):>11}" for r in est.ranks))

    def row(label, values):
        lines.append(label.ljust(38) + "".join(f"{v * GIB / scale:>11.2f}" for v in values))

    row("steady: parameters", [r.report.steady.get("parameters", 0) / GIB for r in est.ranks])
    row("        gradients", [r.report.steady.get("gradients", 0) / GIB for r in est.ranks])
    row("        optimizer states", [r.report.steady.get("optimizer_states", 0) / GIB for r in est.ranks])
    lines.append("at the peak:")
    for label, key in _ROWS:
        values = [r.report.at_peak.get(key, 0) / GIB for r in est.ranks]
        if any(values):
            row("  " + label, values)
    for key in sorted({k for r in est.ranks for k in r.modelled}):
        row(f"  + {key} (modelled)", [r.modelled.get(key, 0) / GIB for r in est.ranks])
    row("peak tensor memory", [r.peak / GIB for r in est.ranks])
    row("  (step 1, before optimizer states)", [(r.report.peak_by_step or [0])[0] / GIB for r in est.ranks])
    if analytic is not None:
        row("analytic model", [analytic[r.pp_rank].peak / GIB for r in est.ranks])
    if verdict is not None:
        over = [device_overheads(r.peak, est.degrees) for r in est.ranks]
        row(f"+ allocator fragmentation ({FRAGMENTATION:.0%})", [o["fragmentation"] / GIB for o in over])
        row("+ CUDA context", [o["cuda_context"] / GIB for o in over])
        row("+ NCCL buffers", [o["nccl"] / GIB for o in over])
        row("= device memory needed", [(r.peak + sum(o.values())) / GIB for r, o in zip(est.ranks, over)])
        d = verdict.device
        state = (f"fits, {verdict.headroom:.0%} headroom" if verdict.fits
                 else f"does NOT fit ({-verdict.headroom:.0%} over)")
        lines += ["", f"{d.name} ({d.memory_gib:g} GiB, {d.usable_bytes / GIB:.1f} usable): {state}; "
                      f"largest training.batch_size that fits: {verdict.largest_batch}"]
    lines += ["", f"activations at the peak, largest holders ({unit}; '-' = the loss):"]
    for r in est.ranks:
        mods = sorted(r.report.activations_by_module.items(), key=lambda kv: -kv[1])[:top_modules]
        lines.append(f"  rank {r.rank}: " + ", ".join(f"{k} {v / scale:.2f}" for k, v in mods if v))
    return "\n".join(lines)


def run_analytic(cfg: Config, world_size: int) -> list:
    from lathe.memory_model import estimate_rank
    from lathe.parallel.dims import ParallelDims

    run_cfg, vocab, _ = prepare(cfg, world_size)
    dims = ParallelDims.from_config(run_cfg.parallelism, world_size)
    return [estimate_rank(run_cfg, dims, vocab, r) for r in range(dims.pp)]


def main(argv: list[str]) -> int:
    """``lathe estimate [--config FILE] [--section.key VALUE ...] --world-size N [--device NAME |
    --device-memory GiB] [--analytic] [--json]``."""
    import argparse

    from lathe.devices import resolve_device

    parser = argparse.ArgumentParser(prog="lathe estimate", allow_abbrev=False, description=(
        "Memory per rank of a training config on N GPUs, measured on fake tensors on this machine. "
        "Takes lathe train's --config and --section.key overrides."))
    parser.add_argument("--world-size", type=int, default=None, help="GPUs in the job (default: the product of the degrees)")
    parser.add_argument("--device", default=None, help="GPU kind, for the fit check (e.g. H100, A100 40GB, L40S)")
    parser.add_argument("--device-memory", type=float, default=None, help="GPU memory in GiB (instead of, or overriding, --device)")
    parser.add_argument("--analytic", action="store_true", help="only the analytic model (instant; no fake run)")
    parser.add_argument("--json", action="store_true", help="print a JSON report (bytes per rank)")
    if "-h" in argv or "--help" in argv:
        parser.print_help()
        return 0
    ns, rest = parser.parse_known_args(argv)
    cfg, _ = config_lib.load_config(rest)
    world_size = world_size_for(cfg, ns.world_size)
    device = resolve_device(ns.device, ns.device_memory)
    run_cfg, vocab, source = prepare(cfg, world_size)
    analytic = run_analytic(cfg, world_size)
    if ns.analytic:
        out = {"model": f"{cfg.model.name} {cfg.model.flavor}", "world_size": world_size, "vocab_size": vocab,
               "analytic": [{"pp_rank": m.pp_rank, "peak": m.peak, "phases": m.phases, "parameters": m.params,
                             "gradients": m.grads, "optimizer_states": m.optimizer, "activations": m.activations}
                            for m in analytic], "units": "bytes"}
        if ns.json:
            print(json.dumps(out, indent=1))
        else:
            for m in analytic:
                print(f"pipeline rank {m.pp_rank}: peak {m.peak / GIB:.2f} GiB ({m.peak_phase}); parameters "
                      f"{m.params / GIB:.2f}, gradients {m.grads / GIB:.2f}, optimizer states {m.optimizer / GIB:.2f}, "
                      f"activations {m.activations / GIB:.2f} GiB")
        return 0
    est = estimate(cfg, world_size)
    verdict = judge(run_cfg, est, device) if device is not None else None
    if ns.json:
        print(json.dumps(to_json(cfg, est, source, analytic, verdict), indent=1))
    else:
        print(format_report(cfg, est, source, analytic, verdict))
    return 0 if verdict is None or verdict.fits else 1
