"""What a bad step does: the non-finite and loss-spike policies, and the data windows a run skips.

A step is *bad* when its loss or gradient norm is NaN or infinite on any rank, or (with
``training.loss_spike_factor`` k > 0) when its loss, averaged over the data-parallel ranks, is above
k times the median of the last ``training.loss_spike_window`` accepted losses (detection starts
once that window is full). What happens is the policy's choice, ``training.on_nonfinite`` and
``training.on_loss_spike``:

* ``stop``: the run ends with a :class:`TrainingError` (exit code 3). For non-finite values this
  is lathe's old behaviour and costs nothing: without a spike detector the check is queued on the
  device and read at log steps (:class:`NonFiniteGuard`), no host-device sync per step.
* ``skip``: the step's update is dropped on every rank: no optimizer step, no LR-schedule step
  (the schedule and Adam's step count stay where they were), the gradients are discarded. The
  decision is all-reduced, so no rank ever steps alone. The step number and the global data
  windows the step trained on are recorded in the train state (``skipped``), and counted.
* ``rollback``: every rank reloads the last complete checkpoint (model, optimizer, schedule, data
  position, RNG) and the bad step's data windows are added to ``skip_windows``: when the data
  stream reaches them again they are read and dropped, so the run continues past the bad batch.

``skip`` and ``rollback`` (and the spike detector) decide before the optimizer step, which takes one
small all-reduce and one host-device sync per step. More than ``training.max_consecutive_skips``
bad steps in a row (not counting steps replayed after a rollback) stop the run: a run that only
skips is not training.

Everything the policies remember is part of the checkpointed train state (``TrainState``: the
``skipped`` records, ``skip_windows``, the counters and the spike detector's recent losses), so a
resumed run drops the same data windows and decides like the run it continues.
``training.skip_batches`` adds windows by hand (e.g. PaLM-style: the batches around a spike).

Data positions are global window indices of the data stream (lathe/data/stream.py): a window is
one sequence of ``seq_len + 1`` tokens, and a step trains on ``batch_size x accumulation x DP``
consecutive windows, so positions mean the same on any number of ranks.
"""

from __future__ import annotations

import logging
import math
import os
import statistics
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.distributed as dist

from lathe.errors import ConfigError

logger = logging.getLogger("lathe")

COUNTERS = ("skipped_steps", "nonfinite_steps", "spike_steps", "rollbacks")

# Test hook: "batch=G,rank=R" makes rank R's loss NaN on the step that trains on global batch G
# (1-based, counted in steps of this run's batch size). Read here and nowhere else.
TEST_NAN_ENV = "LATHE_TEST_NAN"


class TrainingError(RuntimeError):
    """The run cannot continue (for example, the loss became NaN or infinite)."""


@dataclass(frozen=True)
class Verdict:
    """What to do with one step's update."""

    apply: bool = True  # run the optimizer and LR-schedule step
    skipped: bool = False  # the update was dropped (skip policy)
    rollback: bool = False  # reload the last checkpoint (rollback policy)


APPLY = Verdict()


def parse_batch_ranges(items: list) -> list[tuple[int, int]]:
    """``training.skip_batches`` entries (``"1200-1300"``, ``"1500"``) as inclusive (first, last)."""
    ranges = []
    for item in items:
        text = str(item).strip()
        first, sep, last = text.partition("-")
        try:
            a, b = int(first), int(last) if sep else int(first)
        except ValueError:
            raise ConfigError("training.skip_batches", f"{text!r} is not a batch number or range",
                              "use numbers and ranges like 1200-1300,1500", items) from None
        if a < 1 or b < a:
            raise ConfigError("training.skip_batches", f"{text!r} is not a range of batches >= 1",
                              "write first-last with 1 <= first <= last", items)
        ranges.append((a, b))
    return ranges


class NonFiniteGuard:
    """Remembers the first step whose loss or gradient norm was NaN or infinite, without a device
    sync per step.

    ``record`` only queues tensor ops; ``check`` (at log steps and at the end) reads the result
    and raises. On a GPU this keeps the CPU running ahead of the device.
    """

    def __init__(self, device: torch.device):
        self.first_bad = torch.zeros((), dtype=torch.long, device=device)

    def record(self, step: int, loss: torch.Tensor, grad_norm: torch.Tensor) -> None:
        bad = ~(torch.isfinite(loss) & torch.isfinite(grad_norm)) & (self.first_bad == 0)
        self.first_bad = torch.where(bad, step, self.first_bad)

    def check(self) -> None:
        step = int(self.first_bad.item())
        if step:
            raise TrainingError(f"loss or gradient became non-finite (NaN or inf) at step {step}; stopping. "
                                "Lower optimizer.lr, raise lr_scheduler.warmup_steps, keep training.max_norm > 0 "
                                "to clip gradients, or set training.on_nonfinite skip or rollback")


class StepGuard:
    """Judges every step before its update (:meth:`judge`), drops the data windows to skip
    (:meth:`drop_skipped_windows`) and performs rollbacks (:meth:`rollback`).

    Args:
        cfg: the ``training`` config section.
        device: the training device.
        train_state: the checkpointed ``TrainState``; the guard keeps its records there.
        windows_per_step: global data windows one step trains on (batch x accumulation x DP).
        log_event: where skip and rollback events go (``MetricsProcessor.log_event``).
    """

    def __init__(self, cfg, device: torch.device, train_state, windows_per_step: int,
                 log_event: Callable[[dict[str, Any]], None] = lambda record: None):
        self.on_nonfinite, self.on_spike = cfg.on_nonfinite, cfg.on_loss_spike
        self.spike_factor, self.spike_window = cfg.loss_spike_factor, cfg.loss_spike_window
        self.max_consecutive = cfg.max_consecutive_skips
        self.state = train_state
        self.windows_per_step = windows_per_step
        self.log_event = log_event
        self.device = device
        self.consecutive = 0  # bad steps in a row
        self.last_bad_step = 0
        # The cheap path: nothing to decide before the update, so check later without syncing.
        self.deferred = NonFiniteGuard(device) if cfg.on_nonfinite == "stop" and not self.spike_factor else None
        for name in COUNTERS:
            self.state.counters.setdefault(name, 0)
        for first, last in parse_batch_ranges(cfg.skip_batches):
            self._add_window([(first - 1) * windows_per_step, last * windows_per_step])
        self.test_nan = _read_test_hook()

    @property
    def counters(self) -> dict[str, int]:
        return {name: int(self.state.counters.get(name, 0)) for name in COUNTERS}

    # --- data windows ------------------------------------------------------------------------------

    def _add_window(self, window: list[int]) -> None:
        if window not in self.state.skip_windows:
            self.state.skip_windows.append(window)
            self.state.skip_windows.sort()

    def drop_skipped_windows(self, data) -> None:
        """Read and drop batches while the data stream's position is inside a window to skip."""
        dropped, start = 0, data.position
        while any(a <= data.position < b for a, b in self.state.skip_windows):
            next(data)
            dropped += 1
        if dropped:
            logger.info("data: dropped %d batch%s (windows %d-%d) listed in skip_windows", dropped,
                        "" if dropped == 1 else "es", start, data.position - 1)

    # --- the decision ------------------------------------------------------------------------------

    def judge(self, step: int, loss: torch.Tensor, grad_norm: torch.Tensor, windows: tuple[int, int]) -> Verdict:
        """Decide, identically on every rank, whether this step's update is applied. ``loss`` is
        this rank's (detached) loss of the step, ``windows`` the global data windows it trained on."""
        if self.test_nan is not None and self.test_nan == (windows[0] // self.windows_per_step + 1):
            loss.mul_(float("nan"))  # the test hook: a bad batch on this rank
        if self.deferred is not None:
            self.deferred.record(step, loss, grad_norm)
            return APPLY
        finite = torch.isfinite(loss) & torch.isfinite(grad_norm)
        # One all-reduce over every rank: [sum of the finite losses, ranks with a finite loss,
        # ranks that saw a non-finite value]. Ranks of one model-parallel group hold the same loss,
        # so the mean over all ranks is the mean over the data-parallel ranks.
        local = torch.stack([torch.where(finite, loss.float(), 0.0), finite.float(), (~finite).float()])
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(local)
        total, n_finite, n_bad = local.tolist()  # the one host-device sync per step
        mean_loss = total / n_finite if n_finite else float("nan")

        reason = "nonfinite" if n_bad else None
        recent = self.state.recent_losses
        if reason is None and self.spike_factor and len(recent) >= self.spike_window:
            median = statistics.median(recent)
            if mean_loss > self.spike_factor * median:
                reason = "spike"
        if reason is None:
            if step >= self.last_bad_step:
                self.consecutive = 0
            if self.spike_factor:
                recent.append(mean_loss)
                del recent[:-self.spike_window]
            return APPLY
        return self._bad_step(step, reason, mean_loss, int(n_bad), windows)

    def _bad_step(self, step: int, reason: str, mean_loss: float, n_bad: int, windows: tuple[int, int]) -> Verdict:
        c = self.state.counters
        c["nonfinite_steps" if reason == "nonfinite" else "spike_steps"] += 1
        self.consecutive += 1
        self.last_bad_step = max(self.last_bad_step, step)
        policy, option = ((self.on_nonfinite, "training.on_nonfinite") if reason == "nonfinite"
                          else (self.on_spike, "training.on_loss_spike"))
        if reason == "nonfinite":
            what = (f"loss or gradient norm is NaN/inf on {n_bad} rank{'s' if n_bad > 1 else ''}"
                    + (f" (mean loss of the others {mean_loss:.4f})" if math.isfinite(mean_loss) else ""))
        else:
            what = (f"loss spike: {mean_loss:.4f} is above {self.spike_factor:g} x the median "
                    f"{statistics.median(self.state.recent_losses):.4f} of the last {self.spike_window} steps")
        if policy == "stop":
            if reason == "nonfinite":
                raise TrainingError(f"loss or gradient became non-finite (NaN or inf) at step {step}; stopping "
                                    f"({what}). Lower optimizer.lr, raise lr_scheduler.warmup_steps, or set "
                                    f"{option} skip or rollback")
            raise TrainingError(f"step {step}: {what}; stopping ({option}=stop). Set {option} skip or rollback, "
                                "or raise training.loss_spike_factor")
        if self.consecutive > self.max_consecutive:
            raise TrainingError(f"step {step}: {self.consecutive} bad steps in a row ({what}); stopping. The run is "
                                "not recovering: lower optimizer.lr, check the data around these steps, or raise "
                                "training.max_consecutive_skips")
        record = {"step": step, "reason": reason, "loss": mean_loss if math.isfinite(mean_loss) else None,
                  "windows": list(windows)}
        if policy == "skip":
            c["skipped_steps"] += 1
            self.state.skipped.append(record)
            logger.warning("step %d: %s; update skipped on every rank (%s=skip, %d skipped so far)", step, what,
                           option, c["skipped_steps"])
            self.log_event({"event": "skip", **record, **self.counters})
            return Verdict(apply=False, skipped=True)
        c["rollbacks"] += 1
        self._add_window(list(windows))
        logger.warning("step %d: %s; rolling back to the last checkpoint and skipping data windows %d-%d (%s=rollback)",
                       step, what, windows[0], windows[1] - 1, option)
        self.log_event({"event": "rollback", **record, **self.counters})
        return Verdict(apply=False, rollback=True)

    def check(self) -> None:
        """Raise if a non-finite step was recorded on the cheap path (call at log steps, before saves)."""
        if self.deferred is not None:
            self.deferred.check()

    # --- rollback ----------------------------------------------------------------------------------

    def rollback(self, checkpointer, step: int) -> int:
        """Reload the last complete checkpoint, keeping what this run learned about bad data
        (skip records, windows, counters); returns the step it resumes after."""
        s = self.state
        kept = ([dict(r) for r in s.skipped], [list(w) for w in s.skip_windows], dict(s.counters))
        if not checkpointer.load_latest():
            raise TrainingError(f"step {step}: rollback needs a checkpoint, and this run has none yet; stopping. "
                                "Lower checkpoint.interval, or set the policy to skip")
        loaded_windows = s.skip_windows
        s.skipped, s.skip_windows, s.counters = kept
        for window in loaded_windows:
            self._add_window(window)
        logger.info("rolled back from step %d to step %d", step, s.step)
        return s.step


def _read_test_hook() -> int | None:
    """The batch whose loss this rank makes NaN (``LATHE_TEST_NAN=batch=G,rank=R``), or None."""
    spec = os.environ.get(TEST_NAN_ENV)
    if not spec:
        return None
    fields = dict(part.split("=", 1) for part in spec.split(",") if "=" in part)
    rank = dist.get_rank() if dist.is_initialized() else 0
    if int(fields.get("rank", 0)) != rank:
        return None
    return int(fields["batch"])
