"""Batches from tokenized data: the same global stream as `PackedStream`, each rank reading its share.

`TokenWindowStream` yields exactly what `lathe.data.stream.PackedStream` yields for the same
documents -- the same document order (mix choices by a hash of (seed, position), each source in
blocks of ``shuffle_buffer`` permuted with (seed, source, epoch, block), epoch after epoch), the
same packing into windows of ``seq_len + 1`` tokens, the same slice of each global batch per
data-parallel rank, the same document ids -- but from token stores (`lathe.data.store`) instead
of text, and without reading what other ranks train on:

1. *The walk* (`DocumentWalk`) computes the global order on document numbers alone. It needs no
   token, only each document's length, which comes from the index (12 bytes per document in a
   Megatron ``.idx``; nothing of the ``.bin``).
2. The lengths place every document in the global token stream, so the global batch
   ``g`` (tokens ``[g*B*D*W, (g+1)*B*D*W)``) and this rank's slice of it (``B*W`` contiguous
   tokens) are known as offsets into documents.
3. Only those tokens are read from the memory-mapped ``.bin`` files (runs of documents that are
   contiguous on disk are read as one slice).

So each rank reads its share of the token bytes (plus at most a page at each end of each run,
the granularity of memory mapping) and the index entries of the documents in each global batch.

The state (`state_dict`) is a position, like `PackedStream`'s: the global window index, the walk's
position at the document holding the next token (global document count and per source its epoch
and index) and how many of that document's tokens are already used. It does not depend on the
rank, the number of ranks or the batch size, so resuming on any data-parallel degree continues
with the identical token stream. A state saved by a run that tokenized the same data on the fly
(`PackedStream`) can be loaded too, as long as that run skipped no undecodable record: a run can
switch to prepared data and continue exactly.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Sequence

import numpy as np
import torch

from lathe.data.store import TokenStore
from lathe.data.stream import hash_ints
from lathe.errors import ConfigError

logger = logging.getLogger("lathe")

STATE_KIND = "tokens"
_STATE_VERSION = 1
_MIX_TAG = 0x6D6978  # the tag DocumentStream hashes with the position to choose a source
_M1, _M2, _M3 = np.uint64(0x9E3779B97F4A7C15), np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB)


def _mix64(x: np.ndarray) -> np.ndarray:
    """`lathe.data.stream._mix64` on an array of uint64 (wrapping arithmetic)."""
    x = x + _M1
    x = (x ^ (x >> np.uint64(30))) * _M2
    x = (x ^ (x >> np.uint64(27))) * _M3
    return x ^ (x >> np.uint64(31))


class DocumentWalk:
    """The global order of documents over sources of known sizes, as ``(source, document)``.

    The same order as `lathe.data.stream.DocumentStream` over sources holding ``sizes[s]``
    documents each (records that cannot be decoded do not exist in tokenized data). The state is
    ``position`` (documents handed out) and ``taken[s]`` (documents taken from source ``s`` over
    all epochs).
    """

    def __init__(self, sizes: Sequence[int], weights: Sequence[float] | None, seed: int, shuffle_buffer: int,
                 infinite: bool, names: Sequence[str]):
        self.sizes = [int(n) for n in sizes]
        weights = list(weights) if weights is not None else [1.0] * len(self.sizes)
        total = float(sum(weights))
        self.weights = [w / total for w in weights]  # normalized exactly as DocumentStream does
        cum, acc = [], 0.0
        for w in self.weights:
            acc += w
            cum.append(acc)
        self._cum, self._acc = np.array(cum), acc
        self.seed, self.shuffle_buffer, self.infinite = int(seed), int(shuffle_buffer), infinite
        self.names = list(names)
        self.position = 0
        self.taken = [0] * len(self.sizes)
        self._exhausted: set[int] = set()
        self._perms: dict[tuple[int, int, int], np.ndarray] = {}
        self._logged_epoch = [0] * len(self.sizes)
        if infinite:
            for n, name in zip(self.sizes, self.names):
                if n == 0:
                    raise ValueError(f"dataset is empty: {name} has no documents")

    def restore(self, position: int, taken: Sequence[int]) -> None:
        self.position = int(position)
        self.taken = [int(t) for t in taken]
        self._exhausted = {s for s, (t, n) in enumerate(zip(self.taken, self.sizes)) if not self.infinite and t >= n}
        self._logged_epoch = [(t - 1) // n if (n and t) else 0 for t, n in zip(self.taken, self.sizes)]

    # -- order within one source --------------------------------------------------------------

    def _perm(self, s: int, epoch: int, block: int) -> np.ndarray:
        key = (s, epoch, block)
        perm = self._perms.get(key)
        if perm is None:
            K, n = self.shuffle_buffer, self.sizes[s]
            order = list(range(min(K, n - block * K)))
            random.Random(hash_ints(self.seed, s, epoch, block)).shuffle(order)  # as DocumentStream
            perm = np.array(order, dtype=np.int64)
            if len(self._perms) > 64:
                self._perms.clear()
            self._perms[key] = perm
        return perm

    def _documents(self, s: int, ordinals: np.ndarray) -> np.ndarray:
        """Document numbers of the ``ordinals``-th documents taken from source ``s``."""
        n = self.sizes[s]
        epoch, index = np.divmod(ordinals, n)
        K = self.shuffle_buffer
        if K <= 0:
            return index
        block = index // K
        out = np.empty_like(index)
        for e, b in sorted(set(zip(epoch.tolist(), block.tolist()))):
            mask = (epoch == e) & (block == b)
            out[mask] = b * K + self._perm(s, e, b)[index[mask] - b * K]
        return out

    def _log_epochs(self, s: int) -> None:
        """Announce each epoch whose first document was just taken (as DocumentStream does)."""
        n = self.sizes[s]
        epoch = (self.taken[s] - 1) // n if self.taken[s] else 0
        if not self.infinite or epoch <= self._logged_epoch[s]:
            return
        note = "" if self.shuffle_buffer else " (same order: training.shuffle_buffer is 0)"
        for e in range(self._logged_epoch[s] + 1, epoch + 1):
            if len(self.sizes) == 1:
                logger.info("data: starting epoch %d%s", e, note)
            else:
                logger.info("data: source %s starting epoch %d%s", self.names[s], e, note)
        self._logged_epoch[s] = epoch

    # -- the global order ---------------------------------------------------------------------

    def _choices(self, positions: np.ndarray) -> np.ndarray:
        h0 = np.uint64(hash_ints(self.seed, _MIX_TAG))
        with np.errstate(over="ignore"):
            h = _mix64(h0 ^ positions.astype(np.uint64))
        u = h.astype(np.float64) / 2.0**64
        idx = np.searchsorted(self._cum, u * self._acc, side="right")
        return np.minimum(idx, len(self.sizes) - 1)

    def _choose(self, active: list[int], position: int) -> int:
        """DocumentStream._choose, for a finite walk whose active sources change."""
        if len(active) == 1:
            return active[0]
        u = hash_ints(self.seed, _MIX_TAG, position) / 2.0**64
        cum, acc = [], 0.0
        for s in active:
            acc += self.weights[s]
            cum.append(acc)
        return active[min(int(np.searchsorted(cum, u * acc, side="right")), len(active) - 1)]

    def next_chunk(self, n: int) -> tuple[np.ndarray, np.ndarray]:
        """(source, document) of the next ``n`` documents (fewer, or none, at a finite end)."""
        S = len(self.sizes)
        if self.infinite:
            if S == 1:
                src = np.zeros(n, dtype=np.int64)
            else:
                src = self._choices(self.position + np.arange(n, dtype=np.int64))
        else:
            picked, counts, position = [], [0] * S, self.position
            while len(picked) < n:
                active = [s for s in range(S) if s not in self._exhausted]
                if not active:
                    break
                s = self._choose(active, position)
                if self.taken[s] + counts[s] >= self.sizes[s]:
                    self._exhausted.add(s)  # chosen again for the same position among the rest
                    continue
                picked.append(s)
                counts[s] += 1
                position += 1
            src = np.array(picked, dtype=np.int64)
        docs = np.empty(len(src), dtype=np.int64)
        for s in range(S):
            mask = src == s
            m = int(mask.sum())
            if m:
                docs[mask] = self._documents(s, self.taken[s] + np.arange(m, dtype=np.int64))
                self.taken[s] += m
                self._log_epochs(s)
        self.position += len(src)
        return src, docs


class TokenWindowStream:
    """This rank's batches from token stores; the interface of `PackedStream`.

    Args:
        stores: the sources (`TokenStore`), in mix order.
        weights, seed, shuffle_buffer, infinite: as for `DocumentStream`.
        seq_len, batch_size, dp_rank, dp_degree, document_ids: as for `PackedStream`.
        vocab_size: token ids must be below it (a batch with another id raises ConfigError).
        option: the config option named in errors.
    """

    def __init__(self, stores: Sequence[TokenStore], seq_len: int, batch_size: int, dp_rank: int = 0,
                 dp_degree: int = 1, weights: Sequence[float] | None = None, seed: int = 0, shuffle_buffer: int = 0,
                 infinite: bool = True, document_ids: bool = False, vocab_size: int | None = None,
                 option: str = "training.dataset_path"):
        if seq_len < 1 or batch_size < 1:
            raise ValueError("seq_len and batch_size must be positive")
        if not 0 <= dp_rank < dp_degree:
            raise ValueError(f"need 0 <= dp_rank < dp_degree, got dp_rank={dp_rank}, dp_degree={dp_degree}")
        if not stores:
            raise ValueError("a token stream needs at least one store")
        if document_ids and not all(s.has_document_boundaries for s in stores):
            raise ConfigError("training.document_ids", "a flat token file has no document boundaries (document "
                              "ids are needed by training.document_ids and model.attention_mask block_causal)",
                              "use a Megatron .bin/.idx or prepared folder, or leave document_ids off and the "
                              "attention mask causal")
        self.stores = list(stores)
        self.seq_len, self.batch_size = seq_len, batch_size
        self.dp_rank, self.dp_degree = dp_rank, dp_degree
        self.infinite, self.document_ids = infinite, document_ids
        self.vocab_size, self.option = vocab_size, option
        self.walk = DocumentWalk([s.num_documents for s in self.stores], weights, seed, shuffle_buffer, infinite,
                                 [s.name for s in self.stores])
        if infinite and len(self.stores) == 1 and self.stores[0].num_tokens < self.window_len:
            raise ValueError(f"dataset too small for seq_len={seq_len}: one epoch has {self.stores[0].num_tokens} "
                             f"tokens, but one window needs seq_len+1 = {self.window_len}")
        self._avg_len = max(1.0, sum(s.num_tokens for s in self.stores) / max(1, sum(s.num_documents for s in self.stores)))
        self._window_index = 0
        self._reset_buffer(0)

    # -- buffer of placed documents -----------------------------------------------------------

    def _reset_buffer(self, next_start: int) -> None:
        """Empty the buffer; the walk's next document starts at global token ``next_start``."""
        z = np.zeros(0, dtype=np.int64)
        self._src, self._file, self._fstart, self._len, self._gstart = z, z, z, z, z
        self._next_start = next_start
        self._head_position = self.walk.position
        self._head_taken = list(self.walk.taken)

    def _ensure(self, end: int) -> bool:
        """Place documents until the buffer covers global tokens up to ``end``; False at a finite end."""
        while self._next_start < end:
            want = int((end - self._next_start) / self._avg_len * 1.25) + 16
            src, docs = self.walk.next_chunk(min(want, 1 << 16))
            if len(src) == 0:
                return False
            file = np.empty(len(src), np.int64)
            fstart = np.empty(len(src), np.int64)
            length = np.empty(len(src), np.int64)
            for s in np.unique(src):
                mask = src == s
                file[mask], fstart[mask], length[mask] = self.stores[s].locate(docs[mask])
            gstart = self._next_start + np.concatenate(([0], np.cumsum(length)[:-1]))
            self._next_start += int(length.sum())
            self._src = np.concatenate((self._src, src))
            self._file = np.concatenate((self._file, file))
            self._fstart = np.concatenate((self._fstart, fstart))
            self._len = np.concatenate((self._len, length))
            self._gstart = np.concatenate((self._gstart, gstart))
        return True

    def _drop_before(self, token: int) -> None:
        """Forget the documents that end at or before global token ``token``."""
        k = int(np.searchsorted(self._gstart + self._len, token, side="right"))
        if k:
            counts = np.bincount(self._src[:k], minlength=len(self.stores))
            self._head_taken = [t + int(c) for t, c in zip(self._head_taken, counts)]
            self._head_position += k
            for name in ("_src", "_file", "_fstart", "_len", "_gstart"):
                setattr(self, name, getattr(self, name)[k:])

    def _gather(self, lo: int, hi: int) -> np.ndarray:
        """Global tokens ``[lo, hi)`` (all placed in the buffer), read from the stores."""
        out = np.empty(hi - lo, dtype=np.int64)
        j0 = int(np.searchsorted(self._gstart, lo, side="right")) - 1
        j1 = int(np.searchsorted(self._gstart, hi, side="left"))
        run = None  # (source, file, first token in file, last token in file, position in out)
        for j in range(j0, j1):
            g, n = int(self._gstart[j]), int(self._len[j])
            a, b = max(lo, g), min(hi, g + n)
            if b <= a:
                continue
            s, f, start = int(self._src[j]), int(self._file[j]), int(self._fstart[j]) + a - g
            if run is not None and run[:2] == (s, f) and run[3] == start:
                run[3] += b - a  # contiguous on disk: extend the run
                continue
            if run is not None:
                self._copy(out, run)
            run = [s, f, start, start + b - a, a - lo]
        if run is not None:
            self._copy(out, run)
        return out

    def _copy(self, out: np.ndarray, run: list[int]) -> None:
        s, f, start, stop, at = run
        out[at : at + stop - start] = self.stores[s].read(f, start, stop)

    # -- iteration ----------------------------------------------------------------------------

    @property
    def window_len(self) -> int:
        return self.seq_len + 1

    @property
    def window_index(self) -> int:
        return self._window_index

    @property
    def epoch(self) -> int:
        return max(t // n if n else 0 for t, n in zip(self._head_taken, self.walk.sizes))

    @property
    def skipped_records(self) -> int:
        return 0

    @property
    def bytes_read(self) -> int:
        """Token bytes read from the stores' ``.bin`` files so far."""
        return sum(s.bytes_read for s in self.stores)

    def __iter__(self) -> TokenWindowStream:
        return self

    def __next__(self) -> tuple[torch.Tensor, ...]:
        B, W, D = self.batch_size, self.window_len, self.dp_degree
        first = self._window_index * W
        end = first + B * D * W
        if not self._ensure(end):
            if self._window_index == 0:
                have = (self._next_start - first) // W
                raise ValueError(f"dataset too small: it holds {have} windows of seq_len+1 = {W} tokens, fewer "
                                 f"than one global batch of batch_size*dp_degree = {B * D}")
            raise StopIteration
        lo = first + self.dp_rank * B * W
        tokens = self._gather(lo, lo + B * W)
        self._check_ids(tokens)
        extra = self._document_ids(lo, B, W) if self.document_ids else ()
        self._drop_before(end)
        self._window_index += B * D
        windows = torch.from_numpy(tokens).view(B, W)
        return (windows[:, :-1].contiguous(), windows[:, 1:].contiguous(), *extra)

    def _check_ids(self, tokens: np.ndarray) -> None:
        if self.vocab_size is None or not tokens.size:
            return
        lo, hi = int(tokens.min()), int(tokens.max())
        if lo < 0 or hi >= self.vocab_size:
            bad = lo if lo < 0 else hi
            raise ConfigError(self.option, f"token id {bad} in the data is outside the tokenizer's vocabulary "
                              f"(0..{self.vocab_size - 1}): the data was tokenized with another tokenizer",
                              "use the tokenizer the data was made with (model.tokenizer_path)",
                              ", ".join(s.name for s in self.stores))

    def _document_ids(self, lo: int, B: int, W: int) -> tuple[torch.Tensor, torch.Tensor]:
        t = np.arange(lo, lo + B * W, dtype=np.int64)
        j = np.searchsorted(self._gstart, t, side="right") - 1
        pos = (t - self._gstart[j]).reshape(B, W)[:, :-1]
        j = j.reshape(B, W)[:, :-1]
        return torch.from_numpy(np.ascontiguousarray(j - j[:, :1])), torch.from_numpy(np.ascontiguousarray(pos))

    # -- checkpointing ------------------------------------------------------------------------

    def state_dict(self) -> dict:
        """The position (plain data, independent of the rank and of dp_degree/batch_size)."""
        head_offset = self._window_index * self.window_len - (int(self._gstart[0]) if len(self._gstart)
                                                              else self._next_start)
        sources = []
        for store, t, n in zip(self.stores, self._head_taken, self.walk.sizes):
            epoch = t // n if (n and self.infinite) else 0
            sources.append({"name": store.name, "epoch": epoch, "index": t - epoch * n, "documents": n})
        return {
            "version": _STATE_VERSION,
            "kind": STATE_KIND,
            "seq_len": self.seq_len,
            "window_index": self._window_index,
            "position": self._head_position,
            "head_offset": head_offset,
            "sources": sources,
            "seed": self.walk.seed,
            "shuffle_buffer": self.walk.shuffle_buffer,
            "weights": list(self.walk.weights),
        }

    def load_state_dict(self, state: dict) -> None:
        if state.get("kind") != STATE_KIND:
            state = self._from_text_state(state)
        elif state.get("version") != _STATE_VERSION:
            raise ValueError(f"unsupported token stream state version: {state.get('version')!r}")
        if state["seq_len"] != self.seq_len:
            raise ValueError(f"data stream state was saved with seq_len={state['seq_len']}, "
                             f"but this stream has seq_len={self.seq_len}")
        sources = state["sources"]
        if len(sources) != len(self.stores):
            raise ValueError(f"data stream state has {len(sources)} sources, this stream has {len(self.stores)} "
                             "(training.dataset_mix changed?)")
        taken = []
        for saved, n, store in zip(sources, self.walk.sizes, self.stores):
            if saved.get("documents", n) != n:
                raise ValueError(f"cannot resume data stream: {store.name} held {saved['documents']} documents when "
                                 f"the state was saved and holds {n} now (did the dataset change?)")
            if saved["index"] > n:
                raise ValueError(f"cannot resume data stream: the state points at document {saved['index']} of "
                                 f"{store.name}, which has {n} (did the dataset change?)")
            taken.append(int(saved["epoch"]) * n + int(saved["index"]))
        changed = [k for k in ("seed", "shuffle_buffer") if k in state and state[k] != getattr(self.walk, k)]
        if "weights" in state and [round(w, 9) for w in state["weights"]] != [round(w, 9) for w in self.walk.weights]:
            changed.append("mix weights")
        if changed:
            logger.warning("data: %s changed since the state was saved: the document order from here on "
                           "differs from the original run's", ", ".join(changed))
        self._window_index = int(state["window_index"])
        self.walk.restore(int(state["position"]), taken)
        self._reset_buffer(self._window_index * self.window_len - int(state["head_offset"]))

    def _from_text_state(self, state: dict) -> dict:
        """A `PackedStream` state (tokenized on the fly) as a position in this stream."""
        if state.get("version") != 2:
            raise ValueError(f"unsupported data stream state version: {state.get('version')!r}")
        docs = state["documents"]
        if docs.get("skipped", 0):
            raise ValueError(f"cannot continue from this checkpoint on tokenized data: the run it comes from "
                             f"skipped {docs['skipped']} undecodable records, so its record numbers are not "
                             "document numbers; continue it on the original text data")
        taken = [int(x["epoch"]) * n + int(x["index"]) for x, n in zip(docs["sources"], self.walk.sizes)]
        position, head_offset = int(docs["position"]), 0
        if state["buffer"]:
            # Between batches the buffer is the unconsumed end of the last document read: make
            # that document the head again.
            position -= 1
            s = int(self.walk._choices(np.array([position]))[0]) if len(self.stores) > 1 else 0
            taken[s] -= 1
            head_offset = int(state["buffer_doc_pos"])
        sources = [{"name": st.name, "epoch": 0, "index": t, "documents": n}
                   for st, t, n in zip(self.stores, taken, self.walk.sizes)]
        for src in sources:  # express as epoch/index for the checks in load_state_dict
            n = src["documents"]
            src["epoch"], src["index"] = (divmod(src["index"], n) if n else (0, 0))
        return {"version": _STATE_VERSION, "kind": STATE_KIND, "seq_len": state["seq_len"],
                "window_index": state["window_index"], "position": position, "head_offset": head_offset,
                "sources": sources, **{k: docs[k] for k in ("seed", "shuffle_buffer", "weights") if k in docs}}


# ---------------------------------------------------------------------------------------------
# From the config
# ---------------------------------------------------------------------------------------------


def open_token_stores(cfg, tokenizer, split: str) -> tuple[list[TokenStore], list[float]]:
    """The token stores (and mix weights) of ``split``, opened and checked against ``tokenizer``."""
    from lathe.data.sources import train_specs, validation_specs
    from lathe.data.store import check_tokenizer, open_store

    specs, separate = (train_specs(cfg), False) if split == "train" else validation_specs(cfg)
    stores = []
    for spec, _ in specs:
        store = open_store(spec.path, split, spec.option, cfg.training.dataset_token_dtype, separate)
        if split == "train" and store.num_documents == 0:
            raise ConfigError(spec.option, f"empty dataset: {store.name} has no documents",
                              "point it at tokenized data with documents", spec.path)
        check_tokenizer(store, tokenizer, spec.option)
        stores.append(store)
    return stores, [w for _, w in specs]


def build_token_stream(cfg, tokenizer, split: str, dp_rank: int, dp_degree: int,
                       stores: list[TokenStore] | None = None, weights: list[float] | None = None) -> TokenWindowStream:
    """This rank's stream over the tokenized data of ``split`` (training: endless, shuffled as
    configured; validation: one pass in order)."""
    from lathe.data import wants_document_ids  # late import: lathe.data imports this module

    t = cfg.training
    if stores is None:
        stores, weights = open_token_stores(cfg, tokenizer, split)
    option = "training.dataset_mix" if t.dataset_mix else "training.dataset_path"
    ids = wants_document_ids(cfg)
    if split == "train":
        total = float(sum(weights))
        names = ", ".join(f"{s.name} ({w / total:.0%})" for s, w in zip(stores, weights)) if len(stores) > 1 \
            else stores[0].name
        logger.info("data: %s (tokenized: %s documents, %s tokens; each rank reads only its share), seq_len %d, "
                    "batch %d per rank x %d ranks, shuffle buffer %d", names,
                    f"{sum(s.num_documents for s in stores):,}", f"{sum(s.num_tokens for s in stores):,}",
                    t.seq_len, t.batch_size, dp_degree, t.shuffle_buffer)
        try:
            return TokenWindowStream(stores, t.seq_len, t.batch_size, dp_rank, dp_degree, weights, t.seed,
                                     t.shuffle_buffer, True, ids, tokenizer.vocab_size, option)
        except ValueError as e:
            if isinstance(e, ConfigError):
                raise
            raise ConfigError("training.seq_len", str(e), "use a smaller training.seq_len or more data",
                              t.seq_len) from None
    batch = cfg.validation.batch_size or t.batch_size
    return TokenWindowStream(stores, t.seq_len, batch, dp_rank, dp_degree, weights, t.seed, 0, False, ids,
                             tokenizer.vocab_size, "validation.dataset_path" if cfg.validation.dataset_path else option)
