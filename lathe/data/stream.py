"""The global document stream and the packed, data-parallel-sharded, resumable batch stream.

Documents (`DocumentStream`)
----------------------------
Each source (`lathe.data.sources`) is a fixed-order sequence of records. With
``shuffle_buffer = K > 0`` a source's epoch ``e`` is cut into consecutive blocks of K records
and each block is permuted by a generator seeded with (seed, source number, e, block number): a
shuffle inside a bounded window that costs K documents of memory, differs every epoch, and is a
pure function of the position, so resuming only needs the position. With several sources, the
source of the global stream's document number ``p`` is drawn from the mix weights by a hash of
(seed, p); each source keeps its own cursor and epoch count. So the n-th document of the global
stream depends on (seed, n) and the data only, never on the number of ranks or on when the run
was interrupted. A record that cannot be decoded is skipped, counted and logged as a warning.

Batches (`PackedStream`)
------------------------
How documents become batches (the *global stream*)::

    documents:  [BOS d0 EOS] [BOS d1 EOS] [BOS d2 EOS] ...      (epoch after epoch if infinite)
    one stream: BOS d0 EOS BOS d1 EOS BOS d2 EOS ...
    windows:    |--- W tokens ---|--- W tokens ---|--- W ...    W = seq_len + 1, no overlap
    one window: inputs = w[:-1], labels = w[1:]                 (next-token prediction)

Documents are packed back to back with no padding, so every position of every batch trains the
model; a window may start in the middle of one document and end in another (BOS/EOS tell the
model where documents begin and end; with ``document_ids`` the stream also says it per token).

Sharding over data-parallel (DP) ranks. With B = batch_size and D = dp_degree, global batch ``g``
is windows ``[g*B*D, (g+1)*B*D)`` and rank ``r`` takes windows ``g*B*D + r*B + i`` for
``i < B``. The stream of windows never depends on D, which makes resuming *elastic*: a run
checkpointed on 8 ranks can continue on 4 (with twice the batch size, or with the same batch
size and so twice the steps) and train on exactly the same data in the same order.

The price of this simplicity: every rank reads *every* document and throws away the (D-1)/D of
the windows that belong to other ranks. The tokenizing, the expensive part, is shared: in a
multi-process job the processes split each batch of documents between them
(`lathe.data.split_tokenizer`, on by default), so each tokenizes 1/N. Reading and parsing stay
N times; a wide job prepares its data once (`lathe data prepare`) and trains from the store,
where each rank reads only its own windows (`lathe.data.token_stream`).

Resuming: `PackedStream.state_dict()` is a small record: the global window index, the not yet
emitted tokens of the current document (at most one document), the position of those tokens in
their document, and the document stream's position (global document count, and per source its
epoch and record index). `load_state_dict()` on a fresh stream -- with any dp_degree and
batch_size -- continues with exactly the windows an uninterrupted stream would have produced, and
skips the already consumed records without decoding or tokenizing them.
"""

from __future__ import annotations

import bisect
import logging
import random
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from itertools import islice

import torch

from lathe.data.sources import BadRecord, CallableSource, Source
from lathe.data.tokenizer import Tokenizer
from lathe.errors import ConfigError

logger = logging.getLogger("lathe")

_STATE_VERSION = 2
_MASK64 = (1 << 64) - 1
# Undecodable records: the first few are logged one by one, then one line every this many.
_WARN_FIRST = 10
_WARN_EVERY = 1000


def _mix64(x: int) -> int:
    """splitmix64's finalizer: a fast, well-mixed, platform-independent 64-bit hash."""
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def hash_ints(*values: int) -> int:
    h = 0
    for v in values:
        h = _mix64(h ^ (v & _MASK64))
    return h


_END = object()


class DocumentStream:
    """The global sequence of documents over one or more sources (see the module docstring).

    Args:
        sources: the sources, each a fixed-order sequence of records.
        weights: mix weights (any positive numbers; normalized); default equal.
        seed: seeds the mix choices and the block shuffle.
        shuffle_buffer: K > 0 shuffles each source within blocks of K records; 0 = file order.
        infinite: sources wrap into new epochs; otherwise a source that runs out leaves the mix
            and the stream ends when all have run out.
    """

    def __init__(self, sources: Sequence[Source], weights: Sequence[float] | None = None, seed: int = 0,
                 shuffle_buffer: int = 0, infinite: bool = True):
        if not sources:
            raise ValueError("a document stream needs at least one source")
        weights = list(weights) if weights is not None else [1.0] * len(sources)
        if len(weights) != len(sources) or any(not w > 0 for w in weights):
            raise ValueError("need one positive weight per source")
        if shuffle_buffer < 0:
            raise ValueError("shuffle_buffer must be >= 0")
        self.sources = list(sources)
        total = float(sum(weights))
        self.weights = [w / total for w in weights]
        self.seed = int(seed)
        self.shuffle_buffer = int(shuffle_buffer)
        self.infinite = infinite
        n = len(self.sources)
        # Position: state that state_dict() saves.
        self.position = 0  # documents handed out so far (records skipped as bad do not count)
        self.epochs = [0] * n
        self.indices = [0] * n  # records of the current epoch consumed, per source
        self.skipped = 0
        # Transient.
        self._iters: list[Iterator | None] = [None] * n
        self._opened_at = [0] * n
        self._yielded = [0] * n  # records yielded since the iterator was opened
        self._good_in_epoch = [0] * n
        self._saw_epoch_start = [True] * n
        self._exhausted: set[int] = set()

    # ------------------------------------------------------------------------------------------

    def _choose(self, active: list[int]) -> int:
        if len(active) == 1:
            return active[0]
        u = hash_ints(self.seed, 0x6D6978, self.position) / 2.0**64
        cum, acc = [], 0.0
        for s in active:
            acc += self.weights[s]
            cum.append(acc)
        return active[min(bisect.bisect_right(cum, u * acc), len(active) - 1)]

    def _open(self, s: int) -> Iterator:
        start = self.indices[s]
        self._opened_at[s] = start
        self._yielded[s] = 0
        K = self.shuffle_buffer
        if K <= 0:
            return iter(self.sources[s].records(start))
        return self._shuffled(s, self.epochs[s], start)

    def _shuffled(self, s: int, epoch: int, start: int) -> Iterator:
        K = self.shuffle_buffer
        block = start // K
        raw = iter(self.sources[s].records(block * K))
        skip = start - block * K
        while True:
            items = list(islice(raw, K))
            if not items:
                return
            order = list(range(len(items)))
            random.Random(hash_ints(self.seed, s, epoch, block)).shuffle(order)
            for j in order[skip:]:
                yield items[j]
            skip = 0
            block += 1

    def _pull(self, s: int):
        if self._iters[s] is None:
            self._iters[s] = self._open(s)
        rec = next(self._iters[s], _END)
        if rec is _END:
            if self._opened_at[s] > 0 and self._yielded[s] == 0:
                raise ValueError(
                    f"cannot resume data stream: the state points at record {self._opened_at[s]} of epoch "
                    f"{self.epochs[s]} of {self.sources[s].name}, but it has no more records "
                    "(did the dataset change?)")
            return _END
        self._yielded[s] += 1
        self.indices[s] += 1
        return rec

    def _end_of_epoch(self, s: int) -> None:
        name = self.sources[s].name
        if self._saw_epoch_start[s] and self._good_in_epoch[s] == 0:
            if self.indices[s] == 0:
                if getattr(self.sources[s], "heldout", None) == "exclude":
                    raise ValueError(f"dataset is empty: {name} has no documents outside the ~1% of records held "
                                     "out for validation")
                raise ValueError(f"dataset is empty: {name} has no documents")
            raise ValueError(f"no usable documents in {name}: all {self.indices[s]} records were skipped "
                             "as undecodable (see the warnings above)")
        self.epochs[s] += 1
        self.indices[s] = 0
        self._iters[s] = None
        self._good_in_epoch[s] = 0
        self._saw_epoch_start[s] = True
        note = "" if self.shuffle_buffer else " (same order: training.shuffle_buffer is 0)"
        if len(self.sources) == 1:
            logger.info("data: starting epoch %d%s", self.epochs[s], note)
        else:
            logger.info("data: source %s starting epoch %d%s", name, self.epochs[s], note)

    def _warn_bad(self, rec: BadRecord) -> None:
        self.skipped += 1
        if self.skipped <= _WARN_FIRST:
            logger.warning("data: skipping undecodable record %s: %s (%d skipped so far)",
                           rec.where, rec.reason, self.skipped)
        elif self.skipped % _WARN_EVERY == 0:
            logger.warning("data: %d undecodable records skipped so far (latest: %s: %s)",
                           self.skipped, rec.where, rec.reason)

    def next(self) -> str | None:
        """The next document's text, or None when a finite stream has ended."""
        while True:
            active = [s for s in range(len(self.sources)) if s not in self._exhausted]
            if not active:
                return None
            s = self._choose(active)
            rec = self._pull(s)
            if rec is _END:
                if self.infinite:
                    self._end_of_epoch(s)
                else:
                    self._exhausted.add(s)
                continue
            if isinstance(rec, BadRecord):
                self._warn_bad(rec)
                continue
            self._good_in_epoch[s] += 1
            self.position += 1
            return rec

    # ------------------------------------------------------------------------------------------

    def snapshot(self) -> tuple:
        """The position, cheaply (a tuple); `state_from_snapshot` makes it a state dict."""
        return (self.position, tuple(self.epochs), tuple(self.indices), self.skipped)

    def state_from_snapshot(self, snap: tuple) -> dict:
        position, epochs, indices, skipped = snap
        return {
            "position": position,
            "sources": [{"name": src.name, "epoch": e, "index": i}
                        for src, e, i in zip(self.sources, epochs, indices)],
            "skipped": skipped,
            "seed": self.seed,
            "shuffle_buffer": self.shuffle_buffer,
            "weights": list(self.weights),
        }

    def state_dict(self) -> dict:
        return self.state_from_snapshot(self.snapshot())

    def load_state_dict(self, state: dict) -> None:
        sources = state["sources"]
        if len(sources) != len(self.sources):
            raise ValueError(f"data stream state has {len(sources)} sources, this stream has "
                             f"{len(self.sources)} (training.dataset_mix changed?)")
        for saved, src in zip(sources, self.sources):
            if saved.get("name") not in (None, src.name):
                logger.warning("data: resuming source %s from a state saved for %s", src.name, saved["name"])
        changed = [k for k in ("seed", "shuffle_buffer") if k in state and state[k] != getattr(self, k)]
        if "weights" in state and [round(w, 9) for w in state["weights"]] != [round(w, 9) for w in self.weights]:
            changed.append("mix weights")
        if changed:
            logger.warning("data: %s changed since the state was saved: the document order from here on "
                           "differs from the original run's", ", ".join(changed))
        self.position = int(state["position"])
        self.epochs = [int(x["epoch"]) for x in sources]
        self.indices = [int(x["index"]) for x in sources]
        self.skipped = int(state.get("skipped", 0))
        n = len(self.sources)
        self._iters = [None] * n
        self._good_in_epoch = [0] * n
        self._saw_epoch_start = [i == 0 for i in self.indices]
        self._exhausted = set()


class PackedStream:
    """Yields ``(inputs, labels)``: two LongTensors of shape ``(batch_size, seq_len)``; with
    ``document_ids`` also ``(document_ids, positions)`` of the same shape (see `__next__`).

    Args:
        documents: a `DocumentStream`, or (simple use) a function returning a *fresh* iterable
            over the documents, in the same order every time it is called.
        tokenizer: turns each document into ids (with BOS and EOS).
        seq_len: tokens per training sequence.
        batch_size: sequences per batch *on this rank*.
        dp_rank, dp_degree: this rank's index and the number of data-parallel ranks.
        infinite: for a function ``documents``: start a new epoch when the documents run out;
            otherwise stop (the last, incomplete global batch is dropped, on every rank alike).
            A `DocumentStream` brings its own setting.
        encode_batch_size: documents tokenized per `Tokenizer.encode_batch` call.
        document_ids: also emit per-token document ids and positions.
    """

    def __init__(
        self,
        documents: DocumentStream | Callable[[], Iterable[str]],
        tokenizer: Tokenizer,
        seq_len: int,
        batch_size: int,
        dp_rank: int = 0,
        dp_degree: int = 1,
        infinite: bool = True,
        encode_batch_size: int = 64,
        document_ids: bool = False,
    ):
        if seq_len < 1 or batch_size < 1 or encode_batch_size < 1:
            raise ValueError("seq_len, batch_size and encode_batch_size must be positive")
        if not 0 <= dp_rank < dp_degree:
            raise ValueError(f"need 0 <= dp_rank < dp_degree, got dp_rank={dp_rank}, dp_degree={dp_degree}")
        if not isinstance(documents, DocumentStream):
            documents = DocumentStream([CallableSource(documents)], infinite=infinite)
        self.docs = documents
        self.tokenizer = tokenizer
        self.seq_len = seq_len
        self.batch_size = batch_size
        self.dp_rank = dp_rank
        self.dp_degree = dp_degree
        self.infinite = documents.infinite
        self.encode_batch_size = encode_batch_size
        self.document_ids = document_ids
        # The option that names the data in messages: set, the data's problems (too small, empty)
        # are ConfigErrors (one line for the user) rather than ValueErrors.
        self.option: str | None = None

        # --- The resumable state (what state_dict() saves). ---
        # Tokens appended but not yet cut into windows. Windows are cut as soon as a global
        # batch is complete, so between batches this is a suffix of the last appended document.
        self._buffer: list[int] = []
        self._pos0 = 0  # position of _buffer[0] inside its document
        self._starts: list[int] = []  # offsets in _buffer where documents begin
        # Global index (counted over all ranks and epochs) of the next window to cut.
        self._window_index = 0
        # The document stream's position after the last document appended to the buffer.
        self._doc_snap = documents.snapshot()

        # --- Transient state, rebuilt on demand after a resume. ---
        # Documents already tokenized (in one encode_batch call) but not yet in the buffer, with
        # the document stream's position after each. After a resume they are tokenized again.
        self._pending: deque[tuple[list[int], tuple]] = deque()
        # Tokens seen in the current epoch (single source), to detect a dataset too small to
        # fill one window. Only meaningful if this process saw the epoch from its first document.
        self._epoch_tokens = 0
        self._saw_epoch_start = self._doc_snap[2][0] == 0
        self._tracked_epoch = self._doc_snap[1][0]

    # ----------------------------------------------------------------------------------------
    # Iteration
    # ----------------------------------------------------------------------------------------

    @property
    def window_len(self) -> int:
        return self.seq_len + 1  # the last token is only a label, and is not reused

    @property
    def epoch(self) -> int:
        """The epoch of the last document used (the largest over the sources of a mix)."""
        return max(self._doc_snap[1])

    @property
    def window_index(self) -> int:
        return self._window_index

    @property
    def skipped_records(self) -> int:
        return self._doc_snap[3]

    def __iter__(self) -> PackedStream:
        return self

    def __next__(self) -> tuple[torch.Tensor, ...]:
        """This rank's next batch: ``(inputs, labels)``, and with ``document_ids`` also
        ``(document_ids, positions)`` for the input tokens: ``document_ids[b, t]`` numbers the
        documents within row ``b`` from 0 (the document the row starts in), ``positions[b, t]`` is
        the token's index inside its document (0 at its BOS)."""
        B, W = self.batch_size, self.window_len
        global_tokens = B * self.dp_degree * W
        try:
            filled = self._fill(global_tokens)
        except ValueError as e:
            if self.option is None or isinstance(e, ConfigError):
                raise
            small = "too small" in str(e)
            raise ConfigError(self.option, str(e), "use a smaller training.seq_len or training.batch_size, or more "
                              "documents" if small else "point it at data with documents") from None
        if not filled:
            raise StopIteration
        # The global batch is B*D consecutive windows, i.e. global_tokens consecutive tokens, and
        # this rank's B windows are one contiguous slice of them.
        start = self.dp_rank * B * W
        mine = self._buffer[start : start + B * W]
        extra = self._doc_ids(start, B, W) if self.document_ids else ()
        self._cut(global_tokens)  # every rank drops the whole global batch
        self._window_index += B * self.dp_degree

        windows = torch.tensor(mine, dtype=torch.long).view(B, W)
        # contiguous() so callers can .view() the result (e.g. flatten labels for the loss).
        return (windows[:, :-1].contiguous(), windows[:, 1:].contiguous(), *extra)

    def _doc_ids(self, start: int, B: int, W: int) -> tuple[torch.Tensor, torch.Tensor]:
        idx = torch.arange(start, start + B * W, dtype=torch.long)
        starts = torch.tensor([-self._pos0, *self._starts], dtype=torch.long)
        k = torch.searchsorted(starts, idx, right=True) - 1
        pos = (idx - starts[k]).view(B, W)[:, :-1]
        k = k.view(B, W)[:, :-1]
        return (k - k[:, :1]).contiguous(), pos.contiguous()

    def _cut(self, n: int) -> None:
        starts = [s for s in self._starts if s <= n]
        last = starts[-1] if starts else -self._pos0
        self._pos0 = n - last
        self._starts = [s - n for s in self._starts if s > n]
        del self._buffer[:n]

    def _fill(self, n: int) -> bool:
        """Append documents to the buffer until it holds at least ``n`` tokens.

        Returns False if the documents ran out and the stream is not infinite.
        """
        while len(self._buffer) < n:
            item = self._next_document()
            if item is None:  # end of a finite stream
                if self._window_index == 0:
                    raise ValueError(
                        f"dataset too small: it holds {len(self._buffer) // self.window_len} windows "
                        f"of seq_len+1 = {self.window_len} tokens, fewer than one global batch of "
                        f"batch_size*dp_degree = {self.batch_size * self.dp_degree}"
                    )
                return False
            ids, snap = item
            self._track_epoch(snap, len(ids))
            if self._buffer:
                self._starts.append(len(self._buffer))
            else:
                self._pos0, self._starts = 0, []
            self._buffer.extend(ids)
            self._doc_snap = snap
        return True

    def _track_epoch(self, snap: tuple, n_tokens: int) -> None:
        # Without this check an infinite stream over a tiny dataset would silently repeat each
        # document many times within one batch. (Single source only: in a mix, a small source is
        # legitimate.)
        if len(snap[1]) != 1:
            return
        epoch = snap[1][0]
        if epoch != self._tracked_epoch:
            if self._saw_epoch_start and self._epoch_tokens < self.window_len:
                raise ValueError(
                    f"dataset too small for seq_len={self.seq_len}: one epoch has {self._epoch_tokens} "
                    f"tokens, but one window needs seq_len+1 = {self.window_len}"
                )
            self._tracked_epoch = epoch
            self._epoch_tokens = 0
            self._saw_epoch_start = True
        self._epoch_tokens += n_tokens

    def _next_document(self) -> tuple[list[int], tuple] | None:
        """Token ids of the next document and the stream position after it, or None at the end."""
        if not self._pending:
            # Tokenize a chunk of documents in one call: encode_batch is much faster than one
            # encode() per document (it is parallel and crosses the Python/Rust boundary once).
            texts, snaps = [], []
            while len(texts) < self.encode_batch_size:
                text = self.docs.next()
                if text is None:
                    break
                texts.append(text)
                snaps.append(self.docs.snapshot())
            if not texts:
                return None
            self._pending.extend(zip(self.tokenizer.encode_batch(texts, bos=True, eos=True), snaps))
        return self._pending.popleft()

    # ----------------------------------------------------------------------------------------
    # Checkpointing
    # ----------------------------------------------------------------------------------------

    def state_dict(self) -> dict:
        """The position of the stream, as plain ints and lists (JSON- and torch.save-able).

        Call it between batches. It does not depend on this rank or on dp_degree/batch_size, so
        it can be loaded by a job with a different number of ranks; only seq_len must match.
        """
        return {
            "version": _STATE_VERSION,
            "seq_len": self.seq_len,
            "window_index": self._window_index,
            "buffer": list(self._buffer),
            "buffer_doc_pos": self._pos0,
            "buffer_doc_starts": list(self._starts),
            "documents": self.docs.state_from_snapshot(self._doc_snap),
        }

    def load_state_dict(self, state: dict) -> None:
        """Continue from a `state_dict()`; the next batch is the one that would have followed."""
        version = state.get("version")
        if version == 1:  # lathe's first format: one source, no mixing
            state = {
                "version": 2, "seq_len": state["seq_len"], "window_index": state["window_index"],
                "buffer": state["buffer"], "buffer_doc_pos": 0, "buffer_doc_starts": [],
                "documents": {"position": state["doc_index"], "skipped": 0,
                              "sources": [{"epoch": state["epoch"], "index": state["doc_index"]}]},
            }
        elif version != _STATE_VERSION:
            raise ValueError(f"unsupported data stream state version: {version!r}")
        if state["seq_len"] != self.seq_len:
            # Window boundaries are multiples of seq_len+1 in the global stream; with a different
            # seq_len the saved window index no longer means the same position.
            raise ValueError(
                f"data stream state was saved with seq_len={state['seq_len']}, "
                f"but this stream has seq_len={self.seq_len}"
            )
        self.docs.load_state_dict(state["documents"])
        self._buffer = [int(t) for t in state["buffer"]]
        self._pos0 = int(state.get("buffer_doc_pos", 0))
        self._starts = [int(s) for s in state.get("buffer_doc_starts", [])]
        self._window_index = int(state["window_index"])
        self._doc_snap = self.docs.snapshot()
        self._pending.clear()
        self._epoch_tokens = 0
        self._tracked_epoch = self._doc_snap[1][0]
        self._saw_epoch_start = self._doc_snap[2][0] == 0
