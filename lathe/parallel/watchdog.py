"""Hang watchdog: a rank that stops making progress ends the job within a set time, and every
rank says which rank(s) stopped and the last step each reached.

Each rank runs a daemon thread that writes a heartbeat (a counter, the last finished step, host and
PID) to the job's c10d store every few seconds: the TCPStore that torchrun's agent hosts, so it
answers even when a worker is frozen. The training thread reports each finished step. When a rank
has seen no step finish for ``timeout`` seconds (outside the suspended sections: checkpoint saves,
validation), it reads every rank's heartbeat twice, an interval apart: ranks whose counter did not
move are frozen or dead (``kill -STOP``, a hung driver); ranks whose last step is the lowest are
behind. It logs one line naming them and leaves with ``EXIT_HUNG`` (the launcher and torchrun then
end the rest). Wall clocks are never compared across hosts, only counters.

Collective timeouts (``comm.train_timeout_seconds``) remain the backstop; on NCCL, the flight
recorder (``TORCH_NCCL_TRACE_BUFFER_SIZE``, ``TORCH_NCCL_DUMP_ON_TIMEOUT``; set by ``lathe launch``)
dumps what each rank was doing when a collective timed out.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import sys
import threading
import time

import torch.distributed as dist

logger = logging.getLogger("lathe")

EXIT_HUNG = 76
PREFIX = "lathe/watchdog/"


class Watchdog:
    def __init__(self, timeout_s: float, store=None, rank: int = 0, world_size: int = 1):
        self.timeout = float(timeout_s)
        self.interval = max(0.5, min(5.0, self.timeout / 6))
        self.rank, self.world_size = rank, world_size
        self.store = store
        self.step = 0
        self.beats = 0
        self.last_progress = time.monotonic()
        self.suspended = 0
        self._stop = threading.Event()
        self.where = f"{socket.gethostname()}:{os.getpid()}"
        self._beat()
        self.thread = threading.Thread(target=self._run, name="lathe-watchdog", daemon=True)
        self.thread.start()

    @classmethod
    def maybe_start(cls, timeout_s: float) -> "Watchdog | None":
        """A watchdog for this rank, if distributed and enabled; else None."""
        if timeout_s <= 0 or not dist.is_initialized() or dist.get_world_size() == 1:
            return None
        from torch.distributed.distributed_c10d import _get_default_store  # private in 2.11-2.13

        return cls(timeout_s, _get_default_store(), dist.get_rank(), dist.get_world_size())

    # --- training thread -------------------------------------------------------------------

    def progress(self, step: int) -> None:
        self.step = step
        self.last_progress = time.monotonic()

    @contextlib.contextmanager
    def suspend(self):
        """A section that may legitimately take longer than the timeout (a checkpoint save,
        validation): the clock restarts when it ends."""
        self.suspended += 1
        try:
            yield
        finally:
            self.suspended -= 1
            self.last_progress = time.monotonic()

    def close(self) -> None:
        self._stop.set()

    # --- watchdog thread -------------------------------------------------------------------

    def _beat(self) -> None:
        self.beats += 1
        self.store.set(f"{PREFIX}{self.rank}", f"{self.beats} {self.step} {self.where}")

    def _read_all(self) -> dict[int, tuple[int, int, str]]:
        keys = [f"{PREFIX}{r}" for r in range(self.world_size)]
        present = [k for k in keys if self.store.check([k])]
        values = self.store.multi_get(present) if hasattr(self.store, "multi_get") else [self.store.get(k) for k in present]
        out = {}
        for key, raw in zip(present, values):
            beats, step, where = raw.decode().split(" ", 2)
            out[int(key[len(PREFIX):])] = (int(beats), int(step), where)
        return out

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self._beat()
                if self.suspended or time.monotonic() - self.last_progress < self.timeout:
                    continue
                self._report_and_exit()
            except Exception as e:  # the store itself is gone: the job is ending anyway
                if not self._stop.is_set():
                    logger.warning("watchdog: cannot reach the job's store (%s: %s)", type(e).__name__, e)
                return

    def _report_and_exit(self) -> None:
        first = self._read_all()
        time.sleep(2 * self.interval)
        self._beat()
        second = self._read_all()
        frozen = sorted(r for r in range(self.world_size)
                        if r != self.rank and (r not in second or second[r][0] == first.get(r, (None,))[0]))
        steps = {r: v[1] for r, v in second.items()}
        lowest = min(steps.values()) if steps else self.step
        behind = sorted(r for r, s in steps.items() if s == lowest and r not in frozen)
        parts = []
        if frozen:
            parts.append("stopped answering: " + ", ".join(
                f"rank {r} ({second[r][2] if r in second else 'never reported'}, last step {steps.get(r, '?')})"
                for r in frozen))
        if lowest < max(steps.values(), default=lowest):
            parts.append(f"behind at step {lowest}: ranks {', '.join(map(str, behind))}")
        detail = "; ".join(parts) or "every rank still answers: a collective or the data loader is stuck"
        message = (f"lathe watchdog: rank {self.rank} made no progress for {self.timeout:.0f}s after step "
                   f"{self.step}; {detail}. Exiting (exit code {EXIT_HUNG}); raise comm.watchdog_timeout_seconds "
                   "if steps really take this long")
        logger.error(message)
        print(message, file=sys.stderr, flush=True)
        sys.stdout.flush()
        from lathe.launch import worker_hung

        worker_hung()  # under `lathe launch`: the launcher ends this node's other workers at once
        os._exit(EXIT_HUNG)
