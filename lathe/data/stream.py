"""A packed, data-parallel-sharded, resumable stream of training batches.

How text becomes batches (the *global stream*)::

    documents:  [BOS d0 EOS] [BOS d1 EOS] [BOS d2 EOS] ...      (epoch after epoch if infinite)
    one stream: BOS d0 EOS BOS d1 EOS BOS d2 EOS ...
    windows:    |--- W tokens ---|--- W tokens ---|--- W ...    W = seq_len + 1, no overlap
    one window: inputs = w[:-1], labels = w[1:]                 (next-token prediction)

Documents are packed back to back with no padding, so every position of every batch trains the
model; a window may start in the middle of one document and end in another (BOS/EOS tell the
model where documents begin and end).

Sharding over data-parallel (DP) ranks. With B = batch_size and D = dp_degree, global batch ``g``
is windows ``[g*B*D, (g+1)*B*D)`` and rank ``r`` takes windows ``g*B*D + r*B + i`` for
``i < B``. The stream of windows never depends on D, which makes resuming *elastic*: a run
checkpointed on 8 ranks can continue on 4 (with twice the batch size) and train on exactly the
same data in the same order.

The price of this simplicity: every rank reads and tokenizes *every* document and throws away
the (D-1)/D of the windows that belong to other ranks. Tokenizing is fast compared with a
training step, so this is fine for moderate D; a very wide job would pre-tokenize instead.

Resuming: `state_dict()` records where the stream is (epoch, documents consumed, the not yet
emitted tokens of the current document, global window index). `load_state_dict()` on a fresh
stream continues with exactly the batches an uninterrupted stream would have produced, and it
skips the already consumed documents without tokenizing them.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable, Iterable, Iterator

import torch

from lathe.data.tokenizer import Tokenizer

logger = logging.getLogger("lathe")

_STATE_VERSION = 1


class PackedStream:
    """Yields ``(inputs, labels)``: two LongTensors of shape ``(batch_size, seq_len)``.

    Args:
        documents: a function returning a *fresh* iterable over the documents, in the same order
            every time it is called (it is called once per epoch, and again on resume).
        tokenizer: turns each document into ids (with BOS and EOS).
        seq_len: tokens per training sequence.
        batch_size: sequences per batch *on this rank*.
        dp_rank, dp_degree: this rank's index and the number of data-parallel ranks.
        infinite: start a new epoch when the documents run out; otherwise stop (the last,
            incomplete global batch is dropped, on every rank alike).
        encode_batch_size: documents tokenized per `Tokenizer.encode_batch` call.
    """

    def __init__(
        self,
        documents: Callable[[], Iterable[str]],
        tokenizer: Tokenizer,
        seq_len: int,
        batch_size: int,
        dp_rank: int = 0,
        dp_degree: int = 1,
        infinite: bool = True,
        encode_batch_size: int = 64,
    ):
        if seq_len < 1 or batch_size < 1 or encode_batch_size < 1:
            raise ValueError("seq_len, batch_size and encode_batch_size must be positive")
        if not 0 <= dp_rank < dp_degree:
            raise ValueError(f"need 0 <= dp_rank < dp_degree, got dp_rank={dp_rank}, dp_degree={dp_degree}")
        self.documents = documents
        self.tokenizer = tokenizer
        self.seq_len = seq_len
        self.batch_size = batch_size
        self.dp_rank = dp_rank
        self.dp_degree = dp_degree
        self.infinite = infinite
        self.encode_batch_size = encode_batch_size

        # --- The resumable state (exactly what state_dict() saves). ---
        self._epoch = 0
        # Documents of the current epoch whose tokens have been appended to the buffer.
        self._doc_index = 0
        # Tokens appended but not yet cut into windows. Windows are cut as soon as a global
        # batch is complete, so this is always a suffix of the last appended document.
        self._buffer: list[int] = []
        # Global index (counted over all ranks and epochs) of the next window to cut.
        self._window_index = 0

        # --- Transient state, rebuilt on demand after a resume. ---
        self._doc_iter: Iterator[str] | None = None  # current epoch, positioned after _doc_index
        # Documents already tokenized (in one encode_batch call) but not yet in the buffer. Not
        # part of the saved state: after a resume they are simply tokenized again.
        self._pending: deque[list[int]] = deque()
        # Tokens seen in the current epoch, to detect a dataset too small to fill one window.
        # Only meaningful if this process saw the epoch from its first document.
        self._epoch_tokens = 0
        self._saw_epoch_start = True

    # ----------------------------------------------------------------------------------------
    # Iteration
    # ----------------------------------------------------------------------------------------

    @property
    def window_len(self) -> int:
        return self.seq_len + 1  # the last token is only a label, and is not reused

    @property
    def epoch(self) -> int:
        return self._epoch

    @property
    def window_index(self) -> int:
        return self._window_index

    def __iter__(self) -> PackedStream:
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        B, W = self.batch_size, self.window_len
        global_tokens = B * self.dp_degree * W
        if not self._fill(global_tokens):
            raise StopIteration
        # The global batch is B*D consecutive windows, i.e. global_tokens consecutive tokens, and
        # this rank's B windows are one contiguous slice of them.
        start = self.dp_rank * B * W
        mine = self._buffer[start : start + B * W]
        del self._buffer[:global_tokens]  # every rank drops the whole global batch
        self._window_index += B * self.dp_degree

        windows = torch.tensor(mine, dtype=torch.long).view(B, W)
        # contiguous() so callers can .view() the result (e.g. flatten labels for the loss).
        return windows[:, :-1].contiguous(), windows[:, 1:].contiguous()

    def _fill(self, n: int) -> bool:
        """Append documents to the buffer until it holds at least ``n`` tokens.

        Returns False if the documents ran out and the stream is not infinite.
        """
        while len(self._buffer) < n:
            ids = self._next_document()
            if ids is None:  # end of epoch
                self._check_epoch_size()
                if not self.infinite:
                    if self._window_index == 0 and self._epoch == 0:
                        raise ValueError(
                            f"dataset too small: it holds {len(self._buffer) // self.window_len} windows "
                            f"of seq_len+1 = {self.window_len} tokens, fewer than one global batch of "
                            f"batch_size*dp_degree = {self.batch_size * self.dp_degree}"
                        )
                    return False
                self._start_epoch(self._epoch + 1)
                continue
            self._buffer.extend(ids)
            self._doc_index += 1
            self._epoch_tokens += len(ids)
        return True

    def _check_epoch_size(self) -> None:
        # Without this check an infinite stream over a tiny dataset would loop forever (empty
        # dataset) or silently repeat each document many times within one batch.
        if self._saw_epoch_start and self._epoch_tokens < self.window_len:
            raise ValueError(
                f"dataset too small for seq_len={self.seq_len}: one epoch has {self._epoch_tokens} "
                f"tokens, but one window needs seq_len+1 = {self.window_len}"
            )

    def _start_epoch(self, epoch: int) -> None:
        self._epoch = epoch
        self._doc_index = 0
        self._doc_iter = None
        self._pending.clear()
        self._epoch_tokens = 0
        self._saw_epoch_start = True
        logger.info("data: starting epoch %d", epoch)

    def _next_document(self) -> list[int] | None:
        """Token ids of the next document of this epoch, or None when the epoch is over."""
        if not self._pending:
            if self._doc_iter is None:
                self._doc_iter = self._open_epoch()
            # Tokenize a chunk of documents in one call: encode_batch is much faster than one
            # encode() per document (it is parallel and crosses the Python/Rust boundary once).
            texts = []
            for text in self._doc_iter:
                texts.append(text)
                if len(texts) >= self.encode_batch_size:
                    break
            if not texts:
                return None
            self._pending.extend(self.tokenizer.encode_batch(texts, bos=True, eos=True))
        return self._pending.popleft()

    def _open_epoch(self) -> Iterator[str]:
        """A fresh iterator over this epoch's documents, positioned after _doc_index."""
        it = iter(self.documents())
        # Skipping reads the documents but does not tokenize them: this is what makes resuming
        # cheap even deep into an epoch.
        for skipped in range(self._doc_index):
            if next(it, None) is None:
                raise ValueError(
                    f"cannot resume data stream: the state points at document {self._doc_index} "
                    f"of epoch {self._epoch}, but the dataset has only {skipped} documents "
                    "(did the dataset change?)"
                )
        return it

    # ----------------------------------------------------------------------------------------
    # Checkpointing
    # ----------------------------------------------------------------------------------------

    def state_dict(self) -> dict:
        """The position of the stream, as plain ints and a list (JSON- and torch.save-able).

        Call it between batches. It does not depend on this rank or on dp_degree/batch_size, so
        it can be loaded by a job with a different number of ranks; only seq_len must match.
        """
        return {
            "version": _STATE_VERSION,
            "seq_len": self.seq_len,
            "epoch": self._epoch,
            "doc_index": self._doc_index,
            "buffer": list(self._buffer),
            "window_index": self._window_index,
        }

    def load_state_dict(self, state: dict) -> None:
        """Continue from a `state_dict()`; the next batch is the one that would have followed."""
        if state.get("version") != _STATE_VERSION:
            raise ValueError(f"unsupported data stream state version: {state.get('version')!r}")
        if state["seq_len"] != self.seq_len:
            # Window boundaries are multiples of seq_len+1 in the global stream; with a different
            # seq_len the saved window index no longer means the same position.
            raise ValueError(
                f"data stream state was saved with seq_len={state['seq_len']}, "
                f"but this stream has seq_len={self.seq_len}"
            )
        self._epoch = int(state["epoch"])
        self._doc_index = int(state["doc_index"])
        self._buffer = [int(t) for t in state["buffer"]]
        self._window_index = int(state["window_index"])
        self._doc_iter = None
        self._pending.clear()
        self._epoch_tokens = 0
        self._saw_epoch_start = self._doc_index == 0
