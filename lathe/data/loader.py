"""Run a batch stream ahead of the trainer in a background thread, without losing exactness.

The worker thread calls ``next(stream)`` and ``stream.state_dict()`` back to back and queues the
pair ``(batch, state after that batch)``. The trainer takes batches from the queue; `state_dict()`
returns the state paired with the last batch the trainer actually took, never the position of
the worker (which is a few batches ahead). Resuming from it therefore continues exactly after the
last consumed batch, however far the worker had run.

``lockstep``: when the stream's work involves collectives (`lathe.data.split_tokenizer`), every
process must run its stream through the same calls. All of them consume batches alike, so their
workers all end up waiting on a full queue after the same batch; `close` therefore lets the
worker reach that point before stopping it, instead of stopping it in the middle of a batch whose
collective the other processes' workers would wait for.

A thread (not a process) is enough: the heavy part, tokenization, runs in the tokenizer's native
code (``tokenizers``, tiktoken, sentencepiece), which releases the GIL and, for batches, is itself
multi-threaded; the rest (JSON parsing, list slicing) is small next to a training step.
"""

from __future__ import annotations

import copy
import logging
import queue
import threading
import time
from typing import Any

logger = logging.getLogger("lathe")

_STOP = object()


class _Error:
    def __init__(self, exc: BaseException):
        self.exc = exc


class DataLoader:
    """An iterator over ``stream`` with ``state_dict``/``load_state_dict``/``close``.

    Args:
        stream: an iterator with ``state_dict()``/``load_state_dict()`` (a `PackedStream`).
        workers: 0 = produce batches inline, in the caller's thread; >= 1 = one background
            thread producing ahead (tokenizer threads are configured on the tokenizer).
        prefetch: batches the thread may run ahead (default: 2 + 2 * workers).
        lockstep: the stream runs collectives: stop the worker only where it waits on a full queue.
    """

    def __init__(self, stream: Any, workers: int = 1, prefetch: int | None = None, lockstep: bool = False):
        self.stream = stream
        self.workers = int(workers)
        self.lockstep = lockstep
        self._waiting = threading.Event()  # the worker waits on a full queue, or has ended
        self.prefetch = prefetch if prefetch is not None else 2 + 2 * max(self.workers, 1)
        self._thread: threading.Thread | None = None
        self._queue: queue.Queue | None = None
        self._stop = threading.Event()
        self._state = stream.state_dict()  # the state after the last batch handed out
        self._done = False

    # Passed through for logging and tests.
    def __getattr__(self, name: str) -> Any:
        if name in ("epoch", "window_index", "skipped_records", "seq_len", "batch_size", "dp_rank",
                    "dp_degree", "tokenizer", "docs"):
            return getattr(self.stream, name)
        raise AttributeError(name)

    @property
    def position(self) -> int:
        """Global index of the next window this loader hands out: windows consumed so far, counted
        over all ranks (the worker thread may be ahead; this is where the trainer is)."""
        return int(self._state["window_index"]) if self._state is not None else self.stream.window_index

    def __iter__(self) -> DataLoader:
        return self

    def __next__(self):
        if self._done:
            raise StopIteration
        if self.workers <= 0:
            try:
                batch = next(self.stream)
            except StopIteration:
                self._done = True
                raise
            self._state = None  # read lazily from the stream: it is exactly in sync
            return batch
        if self._thread is None:
            self._start()
        item = self._queue.get()
        if item is _STOP:
            self._done = True
            self._join()
            raise StopIteration
        if isinstance(item, _Error):
            self._done = True
            self._join()
            raise item.exc
        batch, self._state = item
        return batch

    def _start(self) -> None:
        self._stop.clear()
        self._waiting.clear()
        self._queue = queue.Queue(maxsize=self.prefetch)
        self._thread = threading.Thread(target=self._produce, args=(self._queue, self._stop),
                                        name="lathe-data", daemon=True)
        self._thread.start()

    def _produce(self, q: queue.Queue, stop: threading.Event) -> None:
        try:
            self._produce_batches(q, stop)
        finally:
            self._waiting.set()

    def _produce_batches(self, q: queue.Queue, stop: threading.Event) -> None:
        try:
            while not stop.is_set():
                try:
                    batch = next(self.stream)
                except StopIteration:
                    self._put(q, stop, _STOP)
                    return
                self._put(q, stop, (batch, self.stream.state_dict()))
        except BaseException as e:  # handed to the consumer, raised there
            self._put(q, stop, _Error(e))

    def _put(self, q: queue.Queue, stop: threading.Event, item: Any) -> None:
        while not stop.is_set():
            try:
                q.put(item, timeout=0.1)
                self._waiting.clear()
                return
            except queue.Full:
                self._waiting.set()
                continue

    def _join(self, timeout: float | None = None) -> None:
        if self._thread is None:
            return
        self._stop.set()
        q = self._queue
        while True:  # unblock a worker waiting on a full queue
            try:
                q.get_nowait()
            except queue.Empty:
                break
        self._thread.join(timeout=timeout)
        if self._thread.is_alive():
            logger.warning("data: the background data worker did not stop within %.0f s", timeout)
        self._thread = None
        self._queue = None

    def _wait_until_blocked(self, thread: threading.Thread, timeout: float) -> None:
        """Wait until the worker holds a batch it cannot queue (the queue is full): then it has
        produced exactly ``prefetch + 1`` batches beyond the consumer, like every other process's
        worker, and is not inside a collective. (The consumer, calling this, is not consuming.)"""
        deadline = time.monotonic() + timeout
        while thread.is_alive() and not (self._waiting.is_set() and self._queue is not None and self._queue.full()):
            if time.monotonic() > deadline:
                logger.warning("data: the background data worker did not reach a stopping point within %.0f s", timeout)
                return
            time.sleep(0.01)

    def state_dict(self) -> dict:
        """The stream's state right after the last batch this loader handed out."""
        if self._state is None:
            return self.stream.state_dict()
        return copy.deepcopy(self._state)

    def load_state_dict(self, state: dict) -> None:
        """Continue after the batch ``state`` was saved at (stops and later restarts the worker)."""
        self._join()
        self.stream.load_state_dict(state)
        self._state = self.stream.state_dict()
        self._done = False

    def close(self) -> None:
        """Stop the worker thread (idempotent). Iterating again restarts it where it left off."""
        if self._thread is not None:
            # The worker may have advanced the stream past the last consumed batch: rewind.
            state = self.state_dict()
            thread = self._thread
            if self.lockstep:
                self._wait_until_blocked(thread, timeout=300)
            self._join(timeout=30)
            if not thread.is_alive():  # (else the stream is abandoned to the stuck thread)
                self.stream.load_state_dict(state)

    def __del__(self):  # pragma: no cover - best effort
        try:
            self._join(timeout=1)
        except Exception:
            pass
