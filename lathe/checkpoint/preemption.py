"""Preemption: finish the current step, save, exit with a distinct code. No signal is ever lost.

Slurm sends SIGUSR1 (``sbatch --signal=USR1@120``: 120 s before the time limit) or SIGTERM (on
preemption or scancel); ``lathe launch`` forwards them to its workers. ``install`` puts a handler
in place as the first thing ``lathe train`` does (before torch is imported); the handler only
records the signal. The trainer asks all ranks at a few points whether any was signalled
(``agree``: a tiny all-reduce, so every rank decides alike): before the checkpoint load, after it,
and after every step. Signalled before training starts: stop with nothing new to save (the
requeued job resumes from the existing checkpoint, or from the start). Signalled in the loop: save
the current step, stop. Either way the run ends with ``EXIT_PREEMPTED`` so a job script can
requeue (``scontrol requeue $SLURM_JOB_ID``); a signal after the last step still exits 75 (the
requeued job finds nothing to train).

Under ``lathe launch`` a worker that installed its handler writes ``ready.PID`` into
``$LATHE_LAUNCH_DIR``; the launcher signals only ready workers and also writes a ``preempt``
marker there, which a worker reads right after installing its handler. So a signal that reaches
the launcher while workers are still starting is neither lost nor kills a worker.

``LATHE_TEST_PAUSE_AT=STAGE`` (tests only, with ``LATHE_TEST_PAUSE_DIR``): at that stage the
process writes ``STAGE.rankR`` there and waits (up to 120 s) for a preemption signal, so a test can
signal at each stage deterministically. Stages: ``launcher-start``, ``before-handlers``, ``start``,
``build``, ``load``, ``step``, ``save``, ``end``.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

EXIT_PREEMPTED = 75  # EX_TEMPFAIL: "try again later"
SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
PREEMPT_MARKER = "preempt"  # in $LATHE_LAUNCH_DIR: the launcher received a preemption signal

_requested: int | None = None
_previous: dict | None = None
_paused: set[str] = set()


class Preempted(Exception):
    def __init__(self, step: int, saved: bool = True):
        if saved:
            message = f"preempted: saved a checkpoint at step {step} and stopped"
        else:
            message = (f"preempted at step {step}: stopped without writing a checkpoint (nothing new to save, or "
                       "checkpointing is off); a rerun resumes from the latest complete checkpoint, or from the start")
        super().__init__(message)
        self.step, self.saved = step, saved


def _handle(signum, frame) -> None:
    global _requested
    first = _requested is None
    if first:
        _requested = signum
        # os.write, not logging/print: this may interrupt a write of the main thread to the same stream
        _write_stderr(f"lathe: received {signal.Signals(signum).name}: stopping at the next step boundary "
                      f"(saving a checkpoint if checkpointing is on); the run exits with code {EXIT_PREEMPTED}\n")


def _write_stderr(text: str) -> None:
    try:
        os.write(2, text.encode())
    except OSError:
        pass


def _launcher_marker() -> int | None:
    folder = os.environ.get("LATHE_LAUNCH_DIR")
    if not folder:
        return None
    try:
        text = Path(folder, PREEMPT_MARKER).read_text().strip()
    except OSError:
        return None
    try:
        return int(text)
    except ValueError:
        return int(signal.SIGTERM)


def install() -> bool:
    """Record SIGTERM/SIGUSR1 from now on (once per process, main thread only). True if this call
    installed the handler (the caller then calls ``uninstall``)."""
    global _previous, _requested
    if _previous is not None or threading.current_thread() is not threading.main_thread():
        return False
    _previous = {sig: signal.signal(sig, _handle) for sig in SIGNALS}
    folder = os.environ.get("LATHE_LAUNCH_DIR")
    if folder:  # tell the launcher it may signal us now; then read what it received before
        try:
            Path(folder, f"ready.{os.getpid()}").write_text("")
        except OSError:
            pass
        marked = _launcher_marker()
        if marked is not None and _requested is None:
            _requested = marked
            _write_stderr(f"lathe: lathe launch received {signal.Signals(marked).name} before this worker started: "
                          f"stopping at the next step boundary; the run exits with code {EXIT_PREEMPTED}\n")
    return True


def uninstall() -> None:
    """Restore the previous handlers and forget the request (the next run in this process starts clean)."""
    global _previous, _requested
    if _previous is None:
        return
    for sig, prev in _previous.items():
        signal.signal(sig, prev)
    _previous, _requested = None, None
    _paused.clear()


def requested() -> int | None:
    """The preemption signal this process received (None if none)."""
    return _requested


def agree(flag: bool, group=None, device=None) -> bool:
    """True on every rank if ``flag`` is true on any rank: an all-reduce over ``group`` (default:
    the whole world, a tensor on ``device``). Without a process group, ``flag``."""
    import torch
    import torch.distributed as dist

    if not dist.is_initialized() or dist.get_world_size(group) == 1:
        return flag
    t = torch.tensor([int(flag)], device=device if group is None else None)
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
    return bool(t.item())


def pause_point(stage: str, signalled=None) -> None:
    """Tests only: see the module docstring. Waits for a preemption signal (or, before the handler
    exists, for the launcher's marker; or until ``signalled()``) at ``stage``, once per process."""
    if os.environ.get("LATHE_TEST_PAUSE_AT") != stage or stage in _paused:
        return
    rank = os.environ.get("RANK", "0")
    if os.environ.get("LATHE_TEST_PAUSE_RANK", rank) != rank:
        return
    _paused.add(stage)
    Path(os.environ["LATHE_TEST_PAUSE_DIR"], f"{stage}.rank{rank}").write_text(str(os.getpid()))
    deadline = time.monotonic() + 120
    if signalled is None:
        def signalled():
            return _requested is not None or _launcher_marker() is not None
    while not signalled() and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(0.2)  # let a forwarded signal land (and a launcher's second look happen) before going on
