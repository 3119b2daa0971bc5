"""Megatron's indexed format (``.bin`` + ``.idx``) against an independent implementation.

``write_megatron`` and ``read_megatron`` below are written from the published description of the
format (Megatron-Core's ``indexed_dataset.py``: a 34-byte header ``MMIDIDX\\x00\\x00``, version,
dtype code, sequence count, document-index count; then int32 lengths, int64 byte pointers, int64
document indices), with ``struct`` only -- not with lathe's code -- so lathe's reader and writer
are checked against something that can disagree with them. Also: flat nanoGPT / llm.c token
files, and the one-line errors for files that do not match.
"""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import pytest

from lathe.data.indexed import FlatTokenFile, IndexedFile, IndexedWriter, TokenFileError
from lathe.data.store import open_store
from lathe.errors import ConfigError

# Megatron's dtype codes, from the format description.
CODES = {"uint8": 1, "int8": 2, "int16": 3, "int32": 4, "int64": 5, "float64": 6, "float32": 7, "uint16": 8}
FORMATS = {"uint8": "B", "int8": "b", "int16": "h", "int32": "i", "int64": "q", "uint16": "H"}


def write_megatron(prefix: Path, sequences: list[list[int]], dtype: str, doc_index: list[int] | None = None) -> None:
    """An independent writer: every sequence back to back in .bin; the index as documented."""
    fmt = FORMATS[dtype]
    size = struct.calcsize(fmt)
    with open(f"{prefix}.bin", "wb") as f:
        for seq in sequences:
            f.write(struct.pack(f"<{len(seq)}{fmt}", *seq))
    if doc_index is None:
        doc_index = list(range(len(sequences) + 1))
    pointers, offset = [], 0
    for seq in sequences:
        pointers.append(offset)
        offset += len(seq) * size
    with open(f"{prefix}.idx", "wb") as f:
        f.write(b"MMIDIDX\x00\x00")
        f.write(struct.pack("<Q", 1))
        f.write(struct.pack("<B", CODES[dtype]))
        f.write(struct.pack("<Q", len(sequences)))
        f.write(struct.pack("<Q", len(doc_index)))
        f.write(struct.pack(f"<{len(sequences)}i", *[len(s) for s in sequences]))
        f.write(struct.pack(f"<{len(sequences)}q", *pointers))
        f.write(struct.pack(f"<{len(doc_index)}q", *doc_index))


def read_megatron(prefix: Path) -> tuple[str, list[list[int]], list[int]]:
    """An independent reader: (dtype name, sequences, document indices)."""
    data = Path(f"{prefix}.idx").read_bytes()
    assert data[:9] == b"MMIDIDX\x00\x00"
    (version,) = struct.unpack_from("<Q", data, 9)
    assert version == 1
    (code,) = struct.unpack_from("<B", data, 17)
    n_seq, n_doc = struct.unpack_from("<QQ", data, 18)
    at = 34
    lengths = struct.unpack_from(f"<{n_seq}i", data, at)
    at += 4 * n_seq
    pointers = struct.unpack_from(f"<{n_seq}q", data, at)
    at += 8 * n_seq
    doc_index = list(struct.unpack_from(f"<{n_doc}q", data, at))
    assert at + 8 * n_doc == len(data)
    dtype = {v: k for k, v in CODES.items()}[code]
    fmt = FORMATS[dtype]
    blob = Path(f"{prefix}.bin").read_bytes()
    seqs = [list(struct.unpack_from(f"<{n}{fmt}", blob, p)) for n, p in zip(lengths, pointers)]
    return dtype, seqs, doc_index


def sequences(n: int, high: int, seed: int = 0) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, high, size=int(rng.integers(0, 40))).tolist() for _ in range(n)]


def lathe_documents(f) -> list[list[int]]:
    start, length = f.document_starts(np.arange(f.num_documents))
    return [f.read(int(s), int(s + n)).tolist() for s, n in zip(start, length)]


@pytest.mark.parametrize("dtype,high", [("uint16", 65536), ("int32", 128256)])
def test_lathe_reads_an_independently_written_dataset(tmp_path, dtype, high):
    seqs = sequences(50, high)
    write_megatron(tmp_path / "d", seqs, dtype)
    f = IndexedFile(tmp_path / "d")
    assert f.dtype == np.dtype(dtype) and f.num_documents == 50
    assert lathe_documents(f) == seqs
    assert f.num_tokens == sum(map(len, seqs))
    # Either file name, or the prefix, names the dataset.
    assert IndexedFile(tmp_path / "d.bin").num_documents == IndexedFile(tmp_path / "d.idx").num_documents == 50


def test_documents_of_several_sequences_are_read_as_one(tmp_path):
    seqs = sequences(7, 1000, seed=1)
    write_megatron(tmp_path / "d", seqs, "uint16", doc_index=[0, 2, 3, 7])  # 3 documents
    f = IndexedFile(tmp_path / "d")
    assert f.num_documents == 3
    assert lathe_documents(f) == [seqs[0] + seqs[1], seqs[2], sum(seqs[3:], [])]


@pytest.mark.parametrize("dtype,high", [("uint16", 65536), ("int32", 128256)])
def test_lathes_writer_is_read_by_the_independent_reader(tmp_path, dtype, high):
    seqs = sequences(30, high, seed=2)
    w = IndexedWriter(tmp_path / "d.bin", tmp_path / "d.idx", dtype)
    w.add_document(seqs[0])
    flat = [t for s in seqs[1:] for t in s]
    w.add(np.array(flat, dtype=np.int64), np.array([len(s) for s in seqs[1:]]))
    assert w.finish() == 30
    got_dtype, got, doc_index = read_megatron(tmp_path / "d")
    assert got_dtype == dtype and got == seqs and doc_index == list(range(31))


def test_writer_refuses_ids_that_do_not_fit(tmp_path):
    w = IndexedWriter(tmp_path / "d.bin", tmp_path / "d.idx", "uint16")
    with pytest.raises(ValueError, match="does not fit in uint16"):
        w.add_document([5, 70000])


def test_index_that_does_not_match_its_bin_is_one_clear_line(tmp_path):
    write_megatron(tmp_path / "a", sequences(10, 100, seed=3), "uint16")
    write_megatron(tmp_path / "b", sequences(12, 100, seed=4), "uint16")
    (tmp_path / "a.bin").write_bytes((tmp_path / "b.bin").read_bytes())  # a .bin from another run
    with pytest.raises(TokenFileError, match=r"a\.bin does not match a\.idx"):
        IndexedFile(tmp_path / "a")
    with pytest.raises(ConfigError) as e:
        open_store(str(tmp_path / "a"), "train", "training.dataset_path")
    assert "\n" not in str(e.value) and "a.bin does not match a.idx" in str(e.value)
    assert str(e.value).startswith("training.dataset_path=")


def test_damaged_indexes(tmp_path):
    write_megatron(tmp_path / "d", sequences(10, 100), "uint16")
    idx = (tmp_path / "d.idx").read_bytes()
    (tmp_path / "d.idx").write_bytes(idx[:-5])
    with pytest.raises(TokenFileError, match="truncated or damaged"):
        IndexedFile(tmp_path / "d")
    (tmp_path / "d.idx").write_bytes(b"NOTMEGA" + idx[7:])
    with pytest.raises(TokenFileError, match="not a Megatron index"):
        IndexedFile(tmp_path / "d")
    write_megatron(tmp_path / "f", [[1, 2]], "uint16")
    raw = bytearray((tmp_path / "f.idx").read_bytes())
    raw[17] = CODES["float32"]  # a float dataset is not tokens
    (tmp_path / "f.idx").write_bytes(bytes(raw))
    with pytest.raises(TokenFileError, match="not an integer token type"):
        IndexedFile(tmp_path / "f")


def test_flat_token_files(tmp_path):
    toks = np.arange(1000, dtype=np.uint16)
    (tmp_path / "nanogpt.bin").write_bytes(toks.tobytes())
    f = FlatTokenFile(tmp_path / "nanogpt.bin", "uint16")
    assert f.num_documents == 1 and f.read(10, 20).tolist() == list(range(10, 20))
    with pytest.raises(ConfigError, match="training.dataset_token_dtype.*flat token file without a header"):
        open_store(str(tmp_path / "nanogpt.bin"), "train", "training.dataset_path")
    # llm.c: 256 int32 header (magic, version, count), then the tokens; the header names the dtype.
    for magic, version, dtype in ((20240520, 1, np.uint16), (20240801, 7, np.uint32)):
        header = np.zeros(256, dtype=np.int32)
        header[:3] = (magic, version, 500)
        path = tmp_path / f"llmc{version}.bin"
        path.write_bytes(header.tobytes() + np.arange(500, dtype=dtype).tobytes())
        f = FlatTokenFile(path)
        assert f.dtype == np.dtype(dtype) and f.num_tokens == 500 and f.read(498, 500).tolist() == [498, 499]
        path.write_bytes(header.tobytes() + np.arange(499, dtype=dtype).tobytes())
        with pytest.raises(TokenFileError, match="announces 500 tokens"):
            FlatTokenFile(path)
