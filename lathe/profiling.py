"""Optional profiling: torch.profiler traces and CUDA memory snapshots, every N steps.

Both are context managers that wrap the training loop and yield an object whose ``.step()`` the
loop calls once per optimizer step (or None when disabled, so the loop writes
``if prof: prof.step()``)::

    with maybe_profile(cfg.profile, out / "traces", 100, global_step=start) as prof, \\
         maybe_memory_snapshot(cfg.snapshot, out / "snapshots", 100, global_step=start) as mem:
        for step in range(start + 1, steps + 1):
            train_step()
            if prof: prof.step()
            if mem: mem.step()

Output layout: ``{dir}/iteration_{N}/rank{R}_trace.json`` (open in https://ui.perfetto.dev or
chrome://tracing) and ``{dir}/iteration_{N}/rank{R}_memory_snapshot.pickle`` (drag onto
https://pytorch.org/memory_viz). N is the training step the file describes.
"""

from __future__ import annotations

import logging
import pickle
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

logger = logging.getLogger("lathe")


def _rank() -> int:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank()
    return 0


@contextmanager
def maybe_profile(
    enabled: bool, trace_dir: Path | str, profile_freq: int, global_step: int = 0
) -> Iterator[torch.profiler.profile | None]:
    """Profile one step in every ``profile_freq`` and write a Chrome trace for it.

    The schedule per cycle of ``profile_freq`` steps is: wait (do nothing), 1 warm-up step
    (profiler running but results discarded: the first profiled step carries one-off setup costs),
    1 active step (recorded and saved). It repeats for the whole run. With the profiler's step
    counter starting at ``global_step``, the recorded steps are those with
    ``step % profile_freq == 0`` (for ``profile_freq`` >= 2; 1 behaves like 2, since a cycle needs
    a warm-up and an active step), and their traces land in ``iteration_{step}``.
    """
    if not enabled:
        yield None
        return
    if profile_freq < 1:
        raise ValueError(f"profile_freq must be >= 1, got {profile_freq}")

    trace_dir = Path(trace_dir)
    rank = _rank()

    def save_trace(prof: torch.profiler.profile) -> None:
        # Called by the profiler right after prof.step() ended the active step, so step_num has
        # already been advanced to the number of the step that was just recorded.
        out = trace_dir / f"iteration_{prof.step_num}"
        out.mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        prof.export_chrome_trace(str(out / f"rank{rank}_trace.json"))
        logger.info("Profiler trace saved to %s (%.2f s)", out, time.perf_counter() - t0)

    activities = [torch.profiler.ProfilerActivity.CPU]
    if torch.cuda.is_available():
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    # With a repeating schedule torch warns that each cycle's events are dropped after the trace is
    # written. That is exactly what we want (memory stays bounded), so silence that one warning.
    warnings.filterwarnings(
        "ignore", message="Warning: Profiler clears events at the end of each cycle"
    )
    warmup, active = 1, 1
    wait = max(profile_freq - warmup - active, 0)
    logger.info("Profiling every %d steps; traces go to %s", profile_freq, trace_dir)
    with torch.profiler.profile(
        activities=activities,
        schedule=torch.profiler.schedule(
            wait=wait, warmup=warmup, active=active
        ),  # repeat=0: forever
        on_trace_ready=save_trace,
        record_shapes=True,
    ) as prof:
        # The profiler counts steps from 0. On a resumed run, start the count at the step we resume
        # from, so the schedule lines up with real step numbers and traces are named by them.
        prof.step_num = global_step
        yield prof


class _MemorySnapshotter:
    """Dumps ``torch.cuda.memory._snapshot()`` every ``freq`` steps (see maybe_memory_snapshot)."""

    def __init__(self, snapshot_dir: Path, freq: int, global_step: int):
        self.snapshot_dir = snapshot_dir
        self.freq = freq
        self.step_num = global_step  # the last completed step
        self.rank = _rank()

    def step(self) -> None:
        """Call once after each training step."""
        self.step_num += 1
        if self.step_num % self.freq == 0:
            self.dump(f"iteration_{self.step_num}")

    def dump(self, name: str) -> Path:
        out = self.snapshot_dir / name
        out.mkdir(parents=True, exist_ok=True)
        path = out / f"rank{self.rank}_memory_snapshot.pickle"
        t0 = time.perf_counter()
        with open(path, "wb") as f:
            pickle.dump(torch.cuda.memory._snapshot(), f)
        logger.info("Memory snapshot saved to %s (%.2f s)", path, time.perf_counter() - t0)
        return path


_warned_no_cuda = False


@contextmanager
def maybe_memory_snapshot(
    enabled: bool, snapshot_dir: Path | str, profile_freq: int, global_step: int = 0
) -> Iterator[_MemorySnapshotter | None]:
    """Record CUDA allocator history and dump a snapshot every ``profile_freq`` steps.

    If the wrapped code raises ``torch.OutOfMemoryError``, a final snapshot of the moment of the
    OOM is written to ``iteration_{N}_exit`` (N = the step that failed) and the error is re-raised:
    this is a debugging aid, never a way to survive an OOM.

    Memory history only exists for CUDA; elsewhere this warns once and yields None.
    """
    global _warned_no_cuda
    if not enabled:
        yield None
        return
    if not torch.cuda.is_available():
        if not _warned_no_cuda:
            _warned_no_cuda = True
            logger.warning(
                "Memory snapshots need CUDA; no snapshots will be written on this device."
            )
        yield None
        return
    if profile_freq < 1:
        raise ValueError(f"profile_freq must be >= 1, got {profile_freq}")

    snapshotter = _MemorySnapshotter(Path(snapshot_dir), profile_freq, global_step)
    # Keep the last 100k alloc/free events (with Python stack traces): enough for several steps of
    # a large model, bounded so recording can't grow without limit.
    torch.cuda.memory._record_memory_history(max_entries=100_000)
    logger.info("Recording CUDA memory history; snapshots go to %s", snapshot_dir)
    try:
        yield snapshotter
    except torch.OutOfMemoryError:
        # step_num is the last *completed* step, so the failing one is step_num + 1.
        try:
            snapshotter.dump(f"iteration_{snapshotter.step_num + 1}_exit")
        except Exception as e:  # a failed dump must not mask the OOM itself
            logger.warning("Could not write the OOM memory snapshot: %s", e)
        raise
    finally:
        torch.cuda.memory._record_memory_history(enabled=None)  # stop recording


__all__ = ["maybe_memory_snapshot", "maybe_profile"]
