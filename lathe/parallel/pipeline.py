"""Pipeline parallelism (PP): the model's blocks split into stages on different ranks.

A stage is a copy of the model holding a contiguous range of blocks (``layers`` keys keep their
global index) — the first also the embeddings, the last also the final norm and output layer.
Batches are cut into micro-batches that flow through the stages; the *schedule*
(``torch.distributed.pipelining``) orders the forward and backward passes of the micro-batches so
that stages are busy as much as possible (the idle part is the "bubble").

Stages per rank: single-stage schedules (GPipe, 1F1B) put one stage on each rank. Multi-stage
schedules put several: looped ones (Interleaved1F1B, LoopedBFS, InterleavedZeroBubble) stage s on
rank s % pp; V-shaped ones (ZBVZeroBubble, DualPipeV) two stages per rank, r and 2*pp-1-r, so the
first and last stage share rank 0.

A schedule from a CSV file (``parallelism.pp_schedule_csv``, torchtitan's
``experimental.pipeline_parallel_schedule_csv``): row r lists, in order, the computations pipeline
rank r runs, one per cell: ``<stage><F|B|I|W><micro-batch>`` (forward, full backward, backward
for inputs only, backward for weights only), e.g. ``0F0,0F1,2F0,2B0,...``. The file sets the
stages, which rank runs each, and the micro-batches; torch's ``_PipelineScheduleRuntime`` adds the
sends and receives between ranks and runs it.
"""

from __future__ import annotations

import copy
import csv
import functools
import logging
import re
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.pipelining import PipelineStage
from torch.distributed.pipelining.schedules import (
    PipelineScheduleMulti,
    ScheduleDualPipeV,
    ScheduleZBVZeroBubble,
    _Action,
    _PipelineScheduleRuntime,
    get_schedule_class,
)

from lathe.errors import ConfigError

logger = logging.getLogger("lathe")

# torchtitan's names, and snake_case spellings of torch's class names.
ALIASES = {
    "1f1b": "1F1B", "gpipe": "GPipe", "interleaved_1f1b": "Interleaved1F1B",
    "flexible_interleaved_1f1b": "Interleaved1F1B", "looped_bfs": "LoopedBFS",
    "interleaved_zero_bubble": "InterleavedZeroBubble", "zbv_zero_bubble": "ZBVZeroBubble",
    "zbv": "ZBVZeroBubble", "dualpipev": "DualPipeV", "dual_pipe_v": "DualPipeV",
}
SCHEDULES = ("GPipe", "1F1B", "Interleaved1F1B", "LoopedBFS", "InterleavedZeroBubble", "ZBVZeroBubble", "DualPipeV")


def schedule_class(name: str):
    canonical = ALIASES.get(name.lower(), name)
    if canonical.lower() not in {s.lower() for s in SCHEDULES}:
        raise ConfigError("parallelism.pp_schedule", "unknown pipeline schedule",
                          f"choose one of {', '.join(SCHEDULES)} (or torchtitan's 1f1b, gpipe, interleaved_1f1b)", name)
    return get_schedule_class(canonical)


def is_multi_stage(cls) -> bool:
    return issubclass(cls, PipelineScheduleMulti)


def is_v_shaped(cls) -> bool:
    return cls in (ScheduleZBVZeroBubble, ScheduleDualPipeV)


def stages_per_rank(cls, requested: int) -> int:
    if requested:
        return requested
    return 2 if is_multi_stage(cls) else 1


def stage_ids(pp_rank: int, pp: int, num_stages: int, v_shaped: bool) -> list[int]:
    per_rank = num_stages // pp
    if v_shaped:
        return [pp_rank, 2 * pp - 1 - pp_rank]
    return [pp_rank + s * pp for s in range(per_rank)]


@dataclass(frozen=True)
class CsvSchedule:
    """What a schedule CSV file says: its stages, the stages of each pipeline rank, micro-batches."""

    path: str
    num_stages: int
    stages_by_rank: list[list[int]]
    microbatches: int
    schedule_cls: type = _PipelineScheduleRuntime


def read_schedule_csv(path: str, pp: int) -> CsvSchedule:
    """Read and check a compute-only schedule CSV (torch validates the order of the actions again
    when it loads the file)."""
    key = "parallelism.pp_schedule_csv"
    if not Path(path).is_file():
        raise ConfigError(key, "file not found", "point it at a CSV file with one row of actions per pipeline rank",
                          path)
    with open(path, newline="", encoding="utf-8") as f:
        rows = [row for row in csv.reader(f) if any(cell.strip() for cell in row)]
    if len(rows) != pp:
        raise ConfigError(key, f"has {len(rows)} rows of actions, one per pipeline rank is needed (pp={pp})",
                          "write one row per rank", path)
    owner: dict[int, int] = {}
    microbatches = 0
    for rank, row in enumerate(rows):
        for cell in row:
            try:
                action = _Action.from_str(cell)
            except (ValueError, RuntimeError, AssertionError):
                action = False
            if action is False or (action is not None and action.stage_index < 0):
                raise ConfigError(key, f"row {rank + 1}: {cell.strip()!r} is not an action",
                                  "write actions like 0F0 (stage 0, forward, micro-batch 0), 1B0, 2I1, 2W1", path)
            if action is None:
                continue  # an empty cell: the rank idles
            if owner.setdefault(action.stage_index, rank) != rank:
                raise ConfigError(key, f"stage {action.stage_index} appears on rows {owner[action.stage_index] + 1} "
                                  f"and {rank + 1}", "each stage must run on one rank", path)
            if action.microbatch_index is not None:
                microbatches = max(microbatches, action.microbatch_index + 1)
    num_stages = len(owner)
    if sorted(owner) != list(range(num_stages)) or num_stages == 0:
        raise ConfigError(key, f"stages must be numbered 0..N-1 without gaps (found {sorted(owner)})",
                          "renumber them", path)
    stages_by_rank = [sorted(s for s, r in owner.items() if r == rank) for rank in range(pp)]
    if any(not stages for stages in stages_by_rank):
        raise ConfigError(key, "every pipeline rank needs at least one stage", "give each row actions", path)
    return CsvSchedule(path, num_stages, stages_by_rank, microbatches)


# ---------------------------------------------------------------------------------------------
# Splitting


def layer_ranges_from_split_points(points: list[str], n_layers: int, num_stages: int) -> list[tuple[int, int]]:
    if len(points) != num_stages - 1:
        raise ConfigError("parallelism.pp_split_points", f"{len(points)} split points make {len(points) + 1} stages, "
                          f"but {num_stages} are needed", f"give {num_stages - 1} points or none (automatic)", points)
    starts = []
    for p in points:
        m = re.fullmatch(r"layers\.(\d+)", p)
        if not m:
            raise ConfigError("parallelism.pp_split_points", f"{p!r} is not a block name", "use names like layers.4", points)
        starts.append(int(m.group(1)))
    bounds = [0, *starts, n_layers]
    if any(a >= b for a, b in zip(bounds, bounds[1:])):
        raise ConfigError("parallelism.pp_split_points", f"must be increasing, between layers.1 and layers.{n_layers - 1}",
                          "every stage needs at least one block", points)
    return list(zip(bounds, bounds[1:]))


def balanced_layer_ranges(block_cost: float, n_layers: int, num_stages: int, first_extra: float,
                          last_extra: float) -> list[tuple[int, int]]:
    """Contiguous ranges minimizing the most expensive stage (exact dynamic programme).

    Costs are training FLOPs per token: each block ``block_cost``; the first stage also pays
    ``first_extra`` (embedding), the last ``last_extra`` (output projection). Remembered: the
    memory model asks once per pipeline rank (O(stages x blocks^2): 0.1-0.5 s for 405B at pp 8).
    """
    return list(_balanced_layer_ranges(block_cost, n_layers, num_stages, first_extra, last_extra))


@functools.lru_cache(maxsize=256)
def _balanced_layer_ranges(block_cost: float, n_layers: int, num_stages: int, first_extra: float,
                           last_extra: float) -> tuple[tuple[int, int], ...]:
    if num_stages > n_layers:
        raise ConfigError("parallelism.pp", f"{num_stages} pipeline stages for {n_layers} blocks",
                          "use fewer stages (pp x stages per rank) than blocks")
    inf = float("inf")
    # best[s][i]: minimal max-cost of splitting the first i blocks into s stages
    best = [[inf] * (n_layers + 1) for _ in range(num_stages + 1)]
    cut = [[0] * (n_layers + 1) for _ in range(num_stages + 1)]
    best[0][0] = 0.0
    for s in range(1, num_stages + 1):
        for i in range(s, n_layers - (num_stages - s) + 1):
            for j in range(s - 1, i):
                cost = (i - j) * block_cost + (first_extra if s == 1 else 0) + (last_extra if s == num_stages else 0)
                value = max(best[s - 1][j], cost)
                if value < best[s][i]:
                    best[s][i], cut[s][i] = value, j
    ranges, i = [], n_layers
    for s in range(num_stages, 0, -1):
        ranges.append((cut[s][i], i))
        i = cut[s][i]
    return tuple(ranges[::-1])


def build_stage_module(reference: nn.Module, start: int, stop: int, num_stages: int, stage: int) -> nn.Module:
    """A meta-device copy of the model keeping blocks [start, stop) and the ends it owns."""
    part = copy.deepcopy(reference)
    for name in list(part.layers.keys()):
        if not start <= int(name) < stop:
            del part.layers[name]
    if stage != 0:
        part.tok_embeddings = None
    if stage != num_stages - 1:
        part.norm = None
        part.output = None
    return part


# ---------------------------------------------------------------------------------------------
# Running


@dataclass
class PipelinePlan:
    schedule_cls: type
    num_stages: int
    my_stages: list[int]
    ranges: list[tuple[int, int]]
    microbatches: int
    schedule_csv: str | None = None  # the schedule's actions come from this file


class PipelineRunner:
    """Runs one batch through the schedule; the loss is the true batch loss on every rank.

    ``loss_fn(output, target)`` is the plain mean loss of a micro-batch.
    """

    def __init__(self, plan: PipelinePlan, parts: list[nn.Module], device: torch.device, pp_group, loss_fn,
                 accumulation: int = 1, stage_examples: list[dict] | None = None):
        self.plan = plan
        self.group = pp_group
        self.device = device
        self.accumulation = accumulation
        # stage_examples: per stage, PipelineStage's input_args/output_args, for a run that cannot
        # exchange shapes with the other stages (lathe estimate); a training run infers them.
        examples = stage_examples or [{} for _ in parts]
        self.stages = [PipelineStage(part, stage, plan.num_stages, device, group=pp_group, **example)
                       for part, stage, example in zip(parts, plan.my_stages, examples)]
        self.has_first = 0 in plan.my_stages
        self.has_last = plan.num_stages - 1 in plan.my_stages
        schedule_arg = self.stages if is_multi_stage(plan.schedule_cls) else self.stages[0]
        # Each micro-batch loss is divided by micro-batches x accumulation steps, so gradients sum
        # to the mean over the whole optimizer step. scale_grads=False: the schedule would instead
        # divide the whole .grad after each step, wrong when gradients accumulate over steps.
        scale = plan.microbatches * accumulation
        self.schedule = plan.schedule_cls(schedule_arg, n_microbatches=plan.microbatches,
                                          loss_fn=lambda out, target: loss_fn(out, target) / scale,
                                          scale_grads=False)
        if plan.schedule_csv is not None:
            self.schedule._load_csv(plan.schedule_csv)  # torch checks the action order; adds sends/receives

    def step(self, inputs: torch.Tensor, labels: torch.Tensor, **model_kwargs) -> torch.Tensor:
        """Forward and backward of one batch; returns its loss / accumulation steps.

        ``model_kwargs`` (per-token tensors such as positions or document ids) are split into
        micro-batches like the inputs and given to every stage."""
        return self._run(self.schedule.step, inputs, labels, model_kwargs)

    @torch.no_grad()
    def evaluate(self, inputs: torch.Tensor, labels: torch.Tensor, **model_kwargs) -> torch.Tensor:
        """Forward only; returns the batch's mean loss."""
        return self._run(self.schedule.eval, inputs, labels, model_kwargs) * self.accumulation

    def _run(self, fn, inputs: torch.Tensor, labels: torch.Tensor, model_kwargs: dict) -> torch.Tensor:
        losses: list[torch.Tensor] = []
        args = (inputs,) if self.has_first else ()
        kwargs = {"target": labels, "losses": losses} if self.has_last else {}
        fn(*args, **kwargs, **model_kwargs)
        # Only the last stage has the (pre-divided) micro-batch losses: the others contribute 0
        # and the sum over the pipeline group gives every rank the true loss.
        loss = torch.stack([_local(x) for x in losses]).sum() if self.has_last else torch.zeros((), device=self.device)
        loss = loss.detach().clone()
        dist.all_reduce(loss, group=self.group)
        return loss


class StageTimer:
    """Measures how long this rank's stages compute (forward + backward) during pipeline steps.

    The rest of the step is spent waiting for other stages (the bubble) or communicating:
    ``bubble = 1 - compute / step time``. Hooks time each stage module's forward and backward;
    on CUDA they synchronize, which slows training a little, so this is opt-in
    (``parallelism.pp_stage_timing``).
    """

    def __init__(self, parts: list[nn.Module], device: torch.device):
        self.device = device
        self.compute = 0.0
        self._window_start: float | None = None  # set by the first stage computation after a report
        self._start: dict[int, float] = {}
        for i, part in enumerate(parts):
            part.register_forward_pre_hook(lambda m, a, i=i: self._begin(("f", i)))
            part.register_forward_hook(lambda m, a, o, i=i: self._end(("f", i)))
            part.register_full_backward_pre_hook(lambda m, g, i=i: self._begin(("b", i)))
            part.register_full_backward_hook(lambda m, gi, go, i=i: self._end(("b", i)))

    def _now(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()

    def _begin(self, key) -> None:
        self._start[key] = self._now()
        if self._window_start is None:
            self._window_start = self._start[key]

    def _end(self, key) -> None:
        start = self._start.pop(key, None)
        if start is not None:
            self.compute += self._now() - start

    def report(self, pp_rank: int, stages: list[int]) -> str:
        """Share of the time since the last report spent computing; resets the window."""
        elapsed = self._now() - self._window_start if self._window_start is not None else 0.0
        busy = min(self.compute / elapsed, 1.0) if elapsed > 0 else 0.0
        self.compute, self._window_start = 0.0, None
        return (f"pipeline rank {pp_rank} (stages {stages}): computing {busy:.0%} of the time, "
                f"waiting or communicating {1 - busy:.0%} (the bubble)")


def _local(t: torch.Tensor) -> torch.Tensor:
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t
