"""Preemption: finish the current step, save, exit with a distinct code.

Slurm sends SIGUSR1 (``sbatch --signal=USR1@120``: 120 s before the time limit) or SIGTERM (on
preemption or scancel); torchrun forwards SIGTERM to its workers. The handler only sets a flag;
the trainer checks it after each step, all ranks agree (any rank signalled = all save), and the run
ends with ``EXIT_PREEMPTED`` so a job script can requeue (``scontrol requeue $SLURM_JOB_ID``).
"""

from __future__ import annotations

import logging
import signal

logger = logging.getLogger("lathe")

EXIT_PREEMPTED = 75  # EX_TEMPFAIL: "try again later"
SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class Preempted(Exception):
    def __init__(self, step: int):
        super().__init__(f"preempted: saved a checkpoint at step {step} and stopped")
        self.step = step


class PreemptionWatcher:
    def __init__(self):
        self.requested = False
        self._previous = {}

    def __enter__(self) -> "PreemptionWatcher":
        for sig in SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        if not self.requested:
            logger.warning("received %s: saving a checkpoint after this step, then exiting",
                           signal.Signals(signum).name)
        self.requested = True

    def __exit__(self, *exc) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
