"""Training from tokenized data: the batches equal tokenizing on the fly (mixed, shuffled, with
document ids, validation), resume is exact on DP 4 -> 2 -> 1 (a hash of every global step), a
run can switch from text to prepared data mid-way, and each rank reads only its share of the
token bytes -- counted by the reader and measured in the page cache by the kernel (mincore)."""

from __future__ import annotations

import ctypes
import hashlib
import json
import mmap
import os
import sys

import numpy as np
import pytest
import torch
from test_data_fixtures import cfg_for, make_docs, windows_of, write_jsonl, write_parquet
from test_data_indexed import write_megatron

from lathe.data import build_train_data, build_validation_data, load_tokenizer
from lathe.data.prepare import prepare
from lathe.data.sources import CallableSource
from lathe.data.stream import DocumentStream
from lathe.data.token_stream import DocumentWalk
from lathe.errors import ConfigError


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer()


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Two text sources and their prepared folders."""
    d = tmp_path_factory.mktemp("tokstream")
    write_jsonl(d / "a" / "part-0.jsonl", make_docs(120, seed=1, prefix="A"))
    write_parquet(d / "a" / "part-1.parquet", make_docs(80, seed=2, prefix="P"))
    write_jsonl(d / "a" / "validation.jsonl", make_docs(30, seed=6, prefix="V"))
    write_jsonl(d / "b.jsonl", make_docs(15, seed=3, prefix="B", max_words=10))
    for name, docs_per_shard in (("a", 23), ("b.jsonl", 4)):
        prepare([str(d / name)], str(d / f"prep-{name}"), workers=0, docs_per_shard=docs_per_shard, progress=False)
    return d


def options(data, prepared: bool, extra=(), batch_size=2, workers=0, document_ids=True):
    a, b = (data / "prep-a", data / "prep-b.jsonl") if prepared else (data / "a", data / "b.jsonl")
    return cfg_for("--training.dataset_mix", f"{a}=0.7,{b}=0.3", "--training.seq_len", "12",
                   "--training.batch_size", str(batch_size), "--training.shuffle_buffer", "16", "--training.seed", "3",
                   "--training.data_workers", str(workers), *(["--training.document_ids"] if document_ids else []),
                   *extra)


def same(a, b) -> bool:
    return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b))


def test_walk_chooses_sources_like_the_document_stream():
    weights = [0.5, 0.3, 0.2]
    stream = DocumentStream([CallableSource(lambda: iter(()), f"s{i}") for i in range(3)], weights, seed=11)
    walk = DocumentWalk([10, 10, 10], weights, 11, 0, True, ["s0", "s1", "s2"])
    positions = np.arange(0, 50_000, 7, dtype=np.int64)
    expected = []
    for p in positions:
        stream.position = int(p)
        expected.append(stream._choose([0, 1, 2]))
    assert walk._choices(positions).tolist() == expected


def test_same_batches_as_tokenizing_on_the_fly(data, tok):
    text = build_train_data(options(data, False), tok, 0, 1)
    prepared = build_train_data(options(data, True, workers=1), tok, 0, 1)
    try:
        for _ in range(300):  # several epochs of the small source, shuffled, with document ids
            assert same(next(text), next(prepared))
        assert prepared.stream.epoch >= 1
    finally:
        prepared.close()
    # validation: the prepared folders' held-out splits, one pass, in order
    for cfg_args in ((), ("--validation.batch_size", "3")):
        fresh_text = build_validation_data(options(data, False, cfg_args), tok, 0, 1)
        fresh_prep = build_validation_data(options(data, True, cfg_args), tok, 0, 1)
        a, b = list(fresh_text()), list(fresh_prep())
        assert len(a) == len(b) > 0 and all(same(x, y) for x, y in zip(a, b))


def global_hash(ranks) -> str:
    h = hashlib.sha256()
    for r in ranks:
        h.update(np.asarray(windows_of(next(r)), dtype=np.int64).tobytes())
    return h.hexdigest()


def test_elastic_resume_dp4_to_dp2_to_dp1(data, tok):
    """Global batch of 8 windows: DP 4 x 2, then DP 2 x 4, then DP 1 x 8; the hash of every global
    step equals an uninterrupted run's (and the text stream's)."""
    steps = 6
    straight = build_train_data(options(data, True, batch_size=8), tok, 0, 1)
    expected = [global_hash([straight]) for _ in range(3 * steps)]
    text = build_train_data(options(data, False, batch_size=8), tok, 0, 1)
    assert [global_hash([text]) for _ in range(3 * steps)] == expected

    got, state = [], None
    for dp, batch in ((4, 2), (2, 4), (1, 8)):
        ranks = [build_train_data(options(data, True, batch_size=batch, workers=1), tok, r, dp) for r in range(dp)]
        try:
            if state is not None:
                for r in ranks:
                    r.load_state_dict(json.loads(json.dumps(state)))  # plain data, as in a checkpoint
            got += [global_hash(ranks) for _ in range(steps)]
            states = [r.state_dict() for r in ranks]
            assert all(s == states[0] for s in states)  # the state does not depend on the rank
            state = states[0]
        finally:
            for r in ranks:
                r.close()
    assert got == expected
    assert len(json.dumps(state)) < 1000


def test_continue_a_text_run_on_prepared_data(data, tok):
    text = build_train_data(options(data, False), tok, 0, 1)
    for _ in range(37):
        next(text)
    state = text.state_dict()
    expected = [next(text) for _ in range(40)]
    prepared = build_train_data(options(data, True), tok, 0, 1)
    prepared.load_state_dict(state)
    assert all(same(e, next(prepared)) for e in expected)


# --- bytes read per rank ---------------------------------------------------------------------

def resident_pages(path) -> int:
    """Pages of ``path`` in the page cache (mincore on a fresh mapping)."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    view = np.frombuffer(mm, dtype=np.uint8)
    pages = -(-size // mmap.PAGESIZE)
    vec = (ctypes.c_ubyte * pages)()
    libc = ctypes.CDLL(None, use_errno=True)
    assert libc.mincore(ctypes.c_void_p(view.ctypes.data), ctypes.c_size_t(size), vec) == 0
    del view
    mm.close()
    return sum(v & 1 for v in vec)


def evict(path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="mincore/posix_fadvise: Linux")
def test_each_rank_reads_only_its_share(tmp_path, tok):
    write_jsonl(tmp_path / "t.jsonl", make_docs(5000, seed=8, max_words=40))
    prepare([str(tmp_path / "t.jsonl")], str(tmp_path / "p"), workers=0, progress=False)
    bins = sorted((tmp_path / "p" / "train").glob("*.bin"))
    assert len(bins) == 1
    D, B, seq, steps = 4, 2, 4095, 5
    window_bytes = (seq + 1) * 2  # uint16: 8 KiB, two pages
    share = steps * B * window_bytes
    assert D * share < bins[0].stat().st_size  # no epoch wraps: one contiguous run per step
    touched = []
    for r in range(D):
        evict(bins[0])
        assert resident_pages(bins[0]) == 0, "the page cache of this filesystem cannot be dropped"
        cfg = cfg_for("--training.dataset_path", str(tmp_path / "p"), "--training.seq_len", str(seq),
                      "--training.batch_size", str(B), "--training.data_workers", "0")
        stream = build_train_data(cfg, tok, r, D)
        for _ in range(steps):
            next(stream)
        assert stream.stream.bytes_read == share  # the reader's own count: exactly its windows
        pages = resident_pages(bins[0])
        touched.append(pages)
        stream.stream.stores[0].close()
        # the kernel's count: its windows' pages, plus at most one partial page at each end of
        # each step's contiguous run (the granularity of a memory mapping)
        assert share <= pages * mmap.PAGESIZE <= share + 2 * mmap.PAGESIZE * steps, (r, pages)
    # together, the ranks read each global batch once
    assert sum(touched) * mmap.PAGESIZE <= D * share + 2 * mmap.PAGESIZE * steps * D


def test_shuffled_mix_reads_exactly_its_windows(data, tok):
    ranks = [build_train_data(options(data, True, batch_size=3), tok, r, 4) for r in range(4)]
    for _ in range(25):
        for r in ranks:
            next(r)
    for r in ranks:
        assert r.stream.bytes_read == 25 * 3 * 13 * 2  # steps x windows x (seq_len + 1) x uint16


# --- bad input -------------------------------------------------------------------------------

def test_token_ids_outside_the_vocabulary(tmp_path, tok):
    write_megatron(tmp_path / "m", [[1, 2, 3] * 20, [5, 9000, 7] * 20], "uint16")
    cfg = cfg_for("--training.dataset_path", str(tmp_path / "m"), "--training.seq_len", "8",
                  "--training.batch_size", "2", "--training.data_workers", "0")
    stream = build_train_data(cfg, tok, 0, 1)
    with pytest.raises(ConfigError, match="token id 9000 in the data is outside the tokenizer's vocabulary"):
        for _ in range(10):
            next(stream)


def test_refusals(tmp_path, data, tok):
    (tmp_path / "flat.bin").write_bytes(np.arange(3000, dtype=np.uint16).tobytes())
    write_megatron(tmp_path / "m", [[1, 2, 3] * 20] * 5, "uint16")
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "prepare.json").write_text("{}")
    cases = [
        (["--training.dataset_path", str(tmp_path / "flat.bin"), "--training.dataset_token_dtype", "uint16",
          "--training.document_ids"], "training.document_ids: a flat token file has no document boundaries"),
        (["--training.dataset_path", str(tmp_path / "half")], "preparation has not finished"),
        (["--training.dataset_mix", f"{data / 'prep-a'}=1,{data / 'b.jsonl'}=1"],
         "mixes tokenized data .* with text sources"),
    ]
    for args, pattern in cases:
        with pytest.raises(ConfigError, match=pattern) as e:
            build_train_data(cfg_for(*args, "--training.seq_len", "8"), tok, 0, 1)
        assert "\n" not in str(e.value)
    cfg = cfg_for("--training.dataset_path", str(tmp_path / "m"), "--validation.enabled")
    with pytest.raises(ConfigError, match="has no held-out split"):
        build_validation_data(cfg, tok, 0, 1)
    # ... but a separate validation dataset is read whole
    cfg = cfg_for("--training.dataset_path", str(tmp_path / "m"), "--validation.enabled",
                  "--validation.dataset_path", str(tmp_path / "m"), "--training.seq_len", "8",
                  "--training.batch_size", "2")
    assert len(list(build_validation_data(cfg, tok, 0, 1)())) == 300 // 18
