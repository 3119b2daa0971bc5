"""Token files on disk: Megatron-Core's indexed dataset (``.bin`` + ``.idx``) and flat token files.

Megatron's indexed format is the most widely read on-disk format for tokenized corpora (Megatron,
NeMo, nanotron and MaxText read it), so it is what `lathe data prepare` writes. One dataset is a
pair of files sharing a *prefix*:

``PREFIX.bin``
    every sequence's token ids back to back, no header, in the dtype the index names.
``PREFIX.idx`` (little-endian)
    ======================  =============================================================
    9 bytes                 magic ``MMIDIDX\\x00\\x00``
    uint64                  version (1)
    uint8                   dtype code (see `DTYPE_CODES`)
    uint64                  S, the number of sequences
    uint64                  D, the number of document-index entries
    int32[S]                sequence lengths, in tokens
    int64[S]                sequence pointers: byte offset of each sequence in ``.bin``
    int64[D]                document indices: 0, then one past the last sequence of each document
    int8[S] (optional)      sequence modes (multimodal datasets only; ignored here)
    ======================  =============================================================

lathe writes one sequence per document (``D = S + 1``, document indices ``0 .. S``); a
document written by another tool may span several sequences, which lathe reads as one document
(its sequences are contiguous in ``.bin``). Tokens are ``uint16`` when the vocabulary fits
(<= 65,536 ids) and ``int32`` otherwise, as Megatron's writers do.

Flat token files (`FlatTokenFile`) are nanoGPT's ``train.bin`` (a bare ``uint16`` array) and
llm.c's (a 1,024-byte header of 256 int32 -- magic, version, token count -- then the tokens:
magic 20240520 version 1 for ``uint16`` GPT-2 tokens, magic 20240801 version 7 for ``uint32``
Llama 3 tokens). They carry no document boundaries: lathe reads
such a file as one long document.

Reading is memory-mapped and lazy: opening a file reads its header and checks that the sizes of
``.idx`` and ``.bin`` agree (a cheap check, not a scan); lengths and tokens are read when asked
for, so a reader touches only the pages of the documents it uses. `TokenFile.read` records how many
token bytes it copied (``bytes_read``). The mapping of ``.bin`` is advised ``MADV_RANDOM`` (no
speculative read-ahead past what is asked for; a data-parallel rank's neighbour owns those
bytes) and each read first advises ``MADV_WILLNEED`` on exactly its pages, so a read is one
read-ahead of its own range rather than a page fault per page.
"""

from __future__ import annotations

import mmap
import os
import struct
from pathlib import Path

import numpy as np

MAGIC = b"MMIDIDX\x00\x00"
VERSION = 1
HEADER = struct.Struct("<9sQBQQ")  # magic, version, dtype code, S, D: 34 bytes
assert HEADER.size == 34

# Megatron's dtype codes.
DTYPE_CODES: dict[int, np.dtype] = {
    1: np.dtype(np.uint8), 2: np.dtype(np.int8), 3: np.dtype(np.int16), 4: np.dtype(np.int32),
    5: np.dtype(np.int64), 6: np.dtype(np.float64), 7: np.dtype(np.float32), 8: np.dtype(np.uint16),
}
CODE_OF = {dt: code for code, dt in DTYPE_CODES.items()}
TOKEN_DTYPES = ("uint16", "int32")  # what lathe writes

LLMC_HEADER_BYTES = 256 * 4
# llm.c's token files: (magic, version) -> token dtype.
LLMC_FORMATS = {(20240520, 1): np.dtype(np.uint16), (20240801, 7): np.dtype(np.uint32)}
_LLMC_MAGICS = {magic for magic, _ in LLMC_FORMATS}

_PAGE = mmap.PAGESIZE
_CHECK_BLOCK = 1 << 22  # index entries checked per numpy operation (bounded temporary memory)


class TokenFileError(ValueError):
    """A token file that cannot be read as what it claims to be (the message names the file)."""


def token_dtype_for(vocab_size: int) -> np.dtype:
    """The smallest dtype Megatron's writers use for ``vocab_size`` ids: uint16 or int32."""
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.int32)


def prefix_of(path: str | Path) -> Path:
    """``data/x.bin``, ``data/x.idx`` or ``data/x`` -> ``data/x``."""
    p = Path(path)
    return p.with_suffix("") if p.suffix in (".bin", ".idx") else p


def is_indexed_prefix(path: str | Path) -> bool:
    prefix = prefix_of(path)
    return Path(f"{prefix}.idx").is_file() and Path(f"{prefix}.bin").is_file()


# ---------------------------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------------------------


class IndexedWriter:
    """Writes one Megatron indexed dataset, one sequence per document.

    ``add`` appends documents; ``finish`` writes the ``.idx`` and closes. The files are written
    where they are named (callers that need atomicity write to temporary names and rename).
    """

    def __init__(self, bin_path: str | Path, idx_path: str | Path, dtype: str | np.dtype):
        self.dtype = np.dtype(dtype)
        if self.dtype not in CODE_OF or self.dtype.kind not in "iu":
            raise ValueError(f"not an integer token dtype of the format: {self.dtype}")
        self.bin_path, self.idx_path = Path(bin_path), Path(idx_path)
        self._bin = open(self.bin_path, "wb")
        self._lengths: list[np.ndarray] = []
        self.num_tokens = 0

    def add(self, tokens: np.ndarray, lengths: np.ndarray) -> None:
        """Append documents given as one flat token array and the length of each document."""
        tokens = np.asarray(tokens)
        lengths = np.asarray(lengths, dtype=np.int64)
        if int(lengths.sum()) != tokens.size:
            raise ValueError("lengths do not add up to the number of tokens")
        if tokens.size:
            info = np.iinfo(self.dtype)
            lo, hi = int(tokens.min()), int(tokens.max())
            if lo < info.min or hi > info.max:
                raise ValueError(f"token id {hi if hi > info.max else lo} does not fit in {self.dtype}")
        self._bin.write(tokens.astype(self.dtype, copy=False).tobytes())
        self._lengths.append(lengths)
        self.num_tokens += tokens.size

    def add_document(self, tokens) -> None:
        tokens = np.asarray(tokens)
        self.add(tokens, np.array([tokens.size]))

    def finish(self) -> int:
        """Write the index; returns the number of documents."""
        self._bin.close()
        lengths = np.concatenate(self._lengths) if self._lengths else np.zeros(0, np.int64)
        write_index(self.idx_path, self.dtype, lengths)
        return len(lengths)


def write_index(path: str | Path, dtype: np.dtype, lengths: np.ndarray,
                document_indices: np.ndarray | None = None) -> None:
    """Write a ``.idx`` for sequences of ``lengths`` tokens (one per document by default)."""
    lengths = np.asarray(lengths, dtype=np.int64)
    if lengths.size and (lengths.min() < 0 or lengths.max() > np.iinfo(np.int32).max):
        raise ValueError("sequence lengths must fit in int32")
    pointers = np.zeros(len(lengths), dtype=np.int64)
    if len(lengths) > 1:
        np.cumsum(lengths[:-1] * np.dtype(dtype).itemsize, out=pointers[1:])
    if document_indices is None:
        document_indices = np.arange(len(lengths) + 1, dtype=np.int64)
    document_indices = np.asarray(document_indices, dtype=np.int64)
    with open(path, "wb") as f:
        f.write(HEADER.pack(MAGIC, VERSION, CODE_OF[np.dtype(dtype)], len(lengths), len(document_indices)))
        f.write(lengths.astype("<i4").tobytes())
        f.write(pointers.astype("<i8").tobytes())
        f.write(document_indices.astype("<i8").tobytes())


# ---------------------------------------------------------------------------------------------
# Reading
# ---------------------------------------------------------------------------------------------


def _map(path: Path, random_access: bool = False) -> mmap.mmap | None:
    """A read-only mapping of ``path`` (None for an empty file, which cannot be mapped)."""
    with open(path, "rb") as f:
        if os.fstat(f.fileno()).st_size == 0:
            return None
        mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    if random_access and hasattr(mm, "madvise") and hasattr(mmap, "MADV_RANDOM"):
        mm.madvise(mmap.MADV_RANDOM)
    return mm


class TokenFile:
    """A sequence of documents stored as tokens in one file (the interface of both formats).

    Attributes: ``path`` (for messages), ``dtype``, ``num_documents``, ``num_tokens``, and
    ``bytes_read`` (token bytes copied out by `read` so far).
    """

    path: Path
    dtype: np.dtype
    num_documents: int
    num_tokens: int
    has_document_boundaries = True

    def __init__(self) -> None:
        self.bytes_read = 0
        self._bin_map: mmap.mmap | None = None
        self._tokens = np.zeros(0, dtype=np.int64)

    def _open_tokens(self, bin_path: Path, offset: int, count: int) -> None:
        self._bin_map = _map(bin_path, random_access=True)
        if self._bin_map is not None:
            self._tokens = np.frombuffer(self._bin_map, dtype=self.dtype, count=count, offset=offset)
        self._bin_offset = offset

    def document_starts(self, docs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(first token, token count) of each document in ``docs`` (an int64 array)."""
        raise NotImplementedError

    def read(self, start: int, stop: int) -> np.ndarray:
        """Tokens ``[start, stop)`` of the file's token array (a view; copy before keeping)."""
        if not 0 <= start <= stop <= self.num_tokens:
            raise IndexError(f"{self.path}: tokens [{start}, {stop}) outside [0, {self.num_tokens})")
        if stop > start and self._bin_map is not None and hasattr(mmap, "MADV_WILLNEED"):
            isz = self.dtype.itemsize
            first = (self._bin_offset + start * isz) // _PAGE * _PAGE
            last = self._bin_offset + stop * isz
            self._bin_map.madvise(mmap.MADV_WILLNEED, first, last - first)
        self.bytes_read += (stop - start) * self.dtype.itemsize
        return self._tokens[start:stop]

    def all_tokens(self) -> np.ndarray:
        """Every token of the file (a memory-mapped view)."""
        return self._tokens

    def close(self) -> None:
        self._tokens = np.zeros(0, dtype=np.int64)
        for name in ("_bin_map", "_idx_map"):
            mm = getattr(self, name, None)
            if mm is not None:
                try:
                    mm.close()
                except BufferError:  # a view is still alive somewhere; the GC closes it later
                    pass
                setattr(self, name, None)


class IndexedFile(TokenFile):
    """One Megatron indexed dataset (``PREFIX.bin`` + ``PREFIX.idx``), memory-mapped.

    Raises `TokenFileError` when the index is not Megatron's, names a non-integer dtype, or does
    not match the size of ``.bin``.
    """

    def __init__(self, prefix: str | Path):
        super().__init__()
        self.prefix = prefix_of(prefix)
        self.path = Path(f"{self.prefix}.idx")
        bin_path = Path(f"{self.prefix}.bin")
        for p in (self.path, bin_path):
            if not p.is_file():
                raise TokenFileError(f"{p}: no such file (a Megatron dataset is a PREFIX.bin + PREFIX.idx pair)")
        idx_size = self.path.stat().st_size
        with open(self.path, "rb") as f:
            head = f.read(HEADER.size)
        if len(head) < HEADER.size or head[:9] != MAGIC:
            raise TokenFileError(f"{self.path}: not a Megatron index (no MMIDIDX header)")
        _, version, code, S, D = HEADER.unpack(head)
        if version != VERSION:
            raise TokenFileError(f"{self.path}: index version {version}, only version {VERSION} exists")
        if code not in DTYPE_CODES:
            raise TokenFileError(f"{self.path}: unknown dtype code {code}")
        self.dtype = DTYPE_CODES[code]
        if self.dtype.kind not in "iu":
            raise TokenFileError(f"{self.path}: dtype {self.dtype} is not an integer token type")
        body = HEADER.size + S * 4 + S * 8 + D * 8
        if idx_size not in (body, body + S):  # + S: the optional int8 sequence modes
            raise TokenFileError(f"{self.path}: {idx_size} bytes, but its header (S={S} sequences, D={D} "
                                 f"document indices) needs {body}: the index is truncated or damaged")
        self.num_sequences = S
        self._idx_map = _map(self.path)
        buf = self._idx_map
        self.lengths = np.frombuffer(buf, "<i4", S, HEADER.size)
        self.pointers = np.frombuffer(buf, "<i8", S, HEADER.size + 4 * S)
        self.doc_index = np.frombuffer(buf, "<i8", D, HEADER.size + 12 * S)
        isz = self.dtype.itemsize
        bin_size = bin_path.stat().st_size
        expected = int(self.pointers[-1]) + int(self.lengths[-1]) * isz if S else 0
        if bin_size != expected or (S and int(self.pointers[0]) != 0):
            raise TokenFileError(f"{bin_path} does not match {self.path.name}: the index describes {expected:,} bytes "
                                 f"of {self.dtype} tokens, the file has {bin_size:,} (a .bin and .idx from different "
                                 "runs, or an interrupted copy)")
        if D < 1 or int(self.doc_index[0]) != 0 or int(self.doc_index[-1]) != S:
            raise TokenFileError(f"{self.path}: document indices must run from 0 to the sequence count {S}")
        self._check_index(isz)
        self.num_documents = D - 1
        self.num_tokens = bin_size // isz
        self._open_tokens(bin_path, 0, self.num_tokens)

    def _check_index(self, isz: int) -> None:
        """Every entry of the index, in blocks of numpy operations (bounded memory; about a second
        for 100M sequences): lengths not negative, each pointer where the previous sequence ends
        (sequences back to back in ``.bin``: no overlap, no gap, never backwards), document indices
        within the sequence count and never decreasing. Raises `TokenFileError` at the first bad entry."""
        S, D = len(self.lengths), len(self.doc_index)
        for lo in range(0, S, _CHECK_BLOCK):
            hi = min(S, lo + _CHECK_BLOCK)
            lengths = self.lengths[lo:hi]
            bad = np.flatnonzero(lengths < 0)
            if bad.size:
                i = lo + int(bad[0])
                raise TokenFileError(f"{self.path}: sequence {i} has a negative length ({int(self.lengths[i])}): "
                                     "the index is damaged")
            # pointer[i+1] must equal pointer[i] + length[i] * itemsize, for i in [lo, hi) (and i+1 < S)
            stop = min(hi, S - 1)
            ends = self.pointers[lo:stop] + lengths[:stop - lo].astype(np.int64) * isz
            nxt = self.pointers[lo + 1:stop + 1]
            bad = np.flatnonzero(nxt != ends)
            if bad.size:
                i = lo + int(bad[0])
                p, q, end = int(self.pointers[i]), int(self.pointers[i + 1]), int(ends[bad[0]])
                what = ("runs backwards" if q < p else "overlaps the sequence before it" if q < end
                        else "leaves a gap after the sequence before it")
                raise TokenFileError(f"{self.path}: sequence {i + 1} starts at byte {q:,}, where sequence {i} "
                                     f"(byte {p:,}, {int(self.lengths[i]):,} tokens) ends at byte {end:,}: the "
                                     f"pointer {what}; the index is damaged or not written as Megatron writes it")
        for lo in range(0, D, _CHECK_BLOCK):
            block = self.doc_index[lo:min(D, lo + _CHECK_BLOCK + 1)]  # one entry of overlap
            bad = np.flatnonzero((block < 0) | (block > S))
            if bad.size:
                i = lo + int(bad[0])
                raise TokenFileError(f"{self.path}: document index entry {i} is {int(self.doc_index[i]):,}, outside "
                                     f"the sequence count {S:,}: the index is damaged")
            bad = np.flatnonzero(np.diff(block) < 0)
            if bad.size:
                i = lo + int(bad[0]) + 1
                raise TokenFileError(f"{self.path}: document index entry {i} ({int(self.doc_index[i]):,}) is below "
                                     f"the one before it ({int(self.doc_index[i - 1]):,}): document indices must "
                                     "never decrease; the index is damaged")

    def document_starts(self, docs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        docs = np.asarray(docs, dtype=np.int64)
        first = self.doc_index[docs]
        end = self.doc_index[docs + 1]
        isz = self.dtype.itemsize
        start = self._sequence_start(first) // isz
        stop = self._sequence_start(end) // isz
        return start, stop - start

    def _sequence_start(self, seq: np.ndarray) -> np.ndarray:
        """Byte offset of each sequence in ``seq``; sequence S (one past the last) is the end."""
        out = np.empty(len(seq), dtype=np.int64)
        inside = seq < self.num_sequences
        out[inside] = self.pointers[seq[inside]]
        out[~inside] = self.num_tokens * self.dtype.itemsize
        return out

    def __repr__(self) -> str:
        return f"IndexedFile({str(self.prefix)!r}, {self.num_documents} documents, {self.dtype})"


class FlatTokenFile(TokenFile):
    """A flat token file: nanoGPT's bare array (``dtype`` must be stated) or llm.c's (header).

    One document: the whole file (such files have no document boundaries; nanoGPT separates
    documents with an end-of-text token inside the stream).
    """

    has_document_boundaries = False

    def __init__(self, path: str | Path, dtype: str | None = None):
        super().__init__()
        self.path = Path(path)
        if not self.path.is_file():
            raise TokenFileError(f"{self.path}: no such file")
        size = self.path.stat().st_size
        with open(self.path, "rb") as f:
            head = f.read(LLMC_HEADER_BYTES)
        offset = 0
        header = np.frombuffer(head, "<i4") if len(head) == LLMC_HEADER_BYTES else None
        if header is not None and int(header[0]) in _LLMC_MAGICS:
            magic, version, count = int(header[0]), int(header[1]), int(header[2])
            if (magic, version) not in LLMC_FORMATS:
                raise TokenFileError(f"{self.path}: llm.c token file magic {magic} with unknown version {version}")
            found = LLMC_FORMATS[(magic, version)]
            if dtype not in (None, "auto") and np.dtype(dtype) != found:
                raise TokenFileError(f"{self.path}: its llm.c header says {found} tokens, not {dtype}")
            self.dtype, offset = found, LLMC_HEADER_BYTES
            if size != offset + count * found.itemsize:
                raise TokenFileError(f"{self.path}: its llm.c header announces {count:,} tokens "
                                     f"({offset + count * found.itemsize:,} bytes), the file has {size:,} bytes")
        else:
            if dtype in (None, "auto"):
                raise TokenFileError(f"{self.path}: a flat token file without an llm.c header: its token dtype "
                                     "must be stated")
            self.dtype = np.dtype(dtype)
            if size % self.dtype.itemsize:
                raise TokenFileError(f"{self.path}: {size} bytes is not a whole number of {self.dtype} tokens")
        self.num_tokens = (size - offset) // self.dtype.itemsize
        self.num_documents = 1 if self.num_tokens else 0
        self._open_tokens(self.path, offset, self.num_tokens)

    def document_starts(self, docs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        docs = np.asarray(docs, dtype=np.int64)
        return np.zeros(len(docs), np.int64), np.full(len(docs), self.num_tokens, np.int64)

    def __repr__(self) -> str:
        return f"FlatTokenFile({str(self.path)!r}, {self.num_tokens} tokens, {self.dtype})"
