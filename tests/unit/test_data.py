"""Tests for lathe.data: the embedded corpus, the tokenizer and the packed token stream."""

from __future__ import annotations

import json
import logging
import random

import pytest
import torch

from lathe.data.corpus import build_corpus, iter_documents
from lathe.data.stream import PackedStream
from lathe.data.tokenizer import (
    BOS_TOKEN,
    DEFAULT_TOKENIZER_PATH,
    EOS_TOKEN,
    HFTokenizer,
    Tokenizer,
    load_tokenizer,
    train_tokenizer,
)


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return load_tokenizer()  # the committed default tokenizer


def make_docs(n: int, seed: int = 0, max_words: int = 60) -> list[str]:
    """Synthetic documents of varied length (some shorter, many longer than a small window)."""
    rng = random.Random(seed)
    words = ["the", "model", "learns", "to", "predict", "next", "token", "über", "数据", "🙂", "\n", "x=1;"]
    return [f"doc {i}: " + " ".join(rng.choice(words) for _ in range(rng.randint(0, max_words))) for i in range(n)]


def encoded_stream(tok: Tokenizer, docs: list[str]) -> list[int]:
    """The global token stream of one epoch, built the slow and obvious way."""
    out: list[int] = []
    for d in docs:
        out += tok.encode(d, bos=True, eos=True)
    return out


def windows_of(batch: tuple[torch.Tensor, torch.Tensor]) -> list[list[int]]:
    """Rebuild each full window (seq_len + 1 tokens) from an (inputs, labels) batch."""
    inputs, labels = batch
    assert torch.equal(inputs[:, 1:], labels[:, :-1])  # labels are inputs shifted by one
    return torch.cat([inputs, labels[:, -1:]], dim=1).tolist()


class CountingTokenizer(Tokenizer):
    """Delegates to a real tokenizer and records every text it was asked to encode."""

    def __init__(self, inner: Tokenizer):
        self.inner = inner
        self.encoded: list[str] = []

    def encode(self, text, bos, eos):
        self.encoded.append(text)
        return self.inner.encode(text, bos=bos, eos=eos)

    def decode(self, ids):
        return self.inner.decode(ids)

    vocab_size = property(lambda self: self.inner.vocab_size)
    bos_id = property(lambda self: self.inner.bos_id)
    eos_id = property(lambda self: self.inner.eos_id)
    pad_id = property(lambda self: self.inner.pad_id)


# ---------------------------------------------------------------------------------------------
# Corpus
# ---------------------------------------------------------------------------------------------


def test_corpus_build_is_deterministic(tmp_path):
    a = build_corpus(tmp_path / "a", max_files=50)
    b = build_corpus(tmp_path / "b", max_files=50)
    for name in ("train.jsonl", "validation.jsonl", "manifest.json"):
        assert (a.root / name).read_bytes() == (b.root / name).read_bytes(), name

    manifest = json.loads(a.manifest.read_text())
    train, val = list(iter_documents(a.train)), list(iter_documents(a.validation))
    assert manifest["num_documents"] == {"train": len(train), "validation": len(val)}
    assert len(val) == 20 and len(train) >= 20
    assert all(d.startswith("Module ") for d in train + val)
    assert not list(a.root.glob(".build-*"))  # the temporary build directory is gone


def test_corpus_is_reused_and_incomplete_corpus_is_rebuilt(tmp_path):
    paths = build_corpus(tmp_path, max_files=8)
    mtime = paths.train.stat().st_mtime_ns
    assert build_corpus(tmp_path, max_files=8).train.stat().st_mtime_ns == mtime  # reused

    # Simulate a crash that left data but no manifest: it must be rebuilt, not trusted.
    good = paths.train.read_bytes()
    paths.manifest.unlink()
    paths.train.write_text("garbage\n")
    build_corpus(tmp_path, max_files=8)
    assert paths.train.read_bytes() == good

    # A different subset size does not reuse the cache.
    other = build_corpus(tmp_path, max_files=10)
    assert json.loads(other.manifest.read_text())["max_files"] == 10


def test_corpus_default_dir_respects_env(tmp_path, monkeypatch):
    from lathe.data.corpus import default_cache_dir

    monkeypatch.setenv("LATHE_CACHE_DIR", str(tmp_path / "lc"))
    assert default_cache_dir().is_relative_to(tmp_path / "lc")
    monkeypatch.delenv("LATHE_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_cache_dir().is_relative_to(tmp_path / "xdg" / "lathe")


# ---------------------------------------------------------------------------------------------
# Tokenizer
# ---------------------------------------------------------------------------------------------

ODD_TEXTS = [
    "",
    "Hello, world!",
    "  leading spaces and trailing  ",
    "über naïve café — “quotes” 数据 🤖👍🏽 e\u0301",
    "\x00\x01\x7f\x80 \t\r\n\r\n\x0c\u2028\ufeff\ufffd",
    "def f(x):\n\treturn x ** 2  # comment\n",
    f"text that mentions {EOS_TOKEN} and {BOS_TOKEN} literally",
]


def test_default_tokenizer_basics(tok):
    assert isinstance(tok, HFTokenizer)
    assert tok.vocab_size == 4096
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (0, 1, 2)
    assert DEFAULT_TOKENIZER_PATH.is_file()


@pytest.mark.parametrize("text", ODD_TEXTS)
def test_tokenizer_round_trip(tok, text):
    ids = tok.encode(text, bos=False, eos=False)
    assert all(0 <= i < tok.vocab_size for i in ids)
    assert tok.decode(ids) == text
    # Special-token strings inside the text are plain text, never the special ids.
    assert tok.bos_id not in ids and tok.eos_id not in ids


def test_tokenizer_bos_eos_placement(tok):
    plain = tok.encode("hello there", bos=False, eos=False)
    assert tok.encode("hello there", bos=True, eos=False) == [tok.bos_id] + plain
    assert tok.encode("hello there", bos=False, eos=True) == plain + [tok.eos_id]
    assert tok.encode("hello there", bos=True, eos=True) == [tok.bos_id] + plain + [tok.eos_id]
    assert tok.encode("", bos=True, eos=True) == [tok.bos_id, tok.eos_id]
    assert tok.decode(tok.encode("hello there", bos=True, eos=True)) == "hello there"


def test_encode_batch_matches_encode(tok):
    assert tok.encode_batch(ODD_TEXTS, bos=True, eos=True) == [tok.encode(t, bos=True, eos=True) for t in ODD_TEXTS]
    # The base-class loop implementation gives the same answer.
    loop = Tokenizer.encode_batch(tok, ODD_TEXTS, bos=True, eos=False)
    assert loop == tok.encode_batch(ODD_TEXTS, bos=True, eos=False)


def test_load_tokenizer_errors_and_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match="tokenizer file not found"):
        load_tokenizer(tmp_path / "nope.json")
    bad = tmp_path / "bad.json"
    bad.write_text('{"not": "a tokenizer"}')
    with pytest.raises(ValueError, match="unrecognised"):
        load_tokenizer(bad)
    assert load_tokenizer(DEFAULT_TOKENIZER_PATH.parent).vocab_size == 4096  # a directory works
    assert load_tokenizer("").path == DEFAULT_TOKENIZER_PATH  # empty config value: the default


def test_train_tokenizer_is_deterministic_and_byte_complete(tmp_path):
    corpus = tmp_path / "tiny.jsonl"
    docs = make_docs(200, seed=1)
    corpus.write_text("".join(json.dumps({"text": d}, ensure_ascii=False) + "\n" for d in docs), encoding="utf-8")
    a = train_tokenizer([corpus], vocab_size=400, out_path=tmp_path / "a" / "tokenizer.json")
    b = train_tokenizer([corpus], vocab_size=400, out_path=tmp_path / "b" / "tokenizer.json")
    assert a.read_bytes() == b.read_bytes()

    t = load_tokenizer(a)
    assert (t.bos_id, t.eos_id, t.pad_id) == (0, 1, 2)
    assert 259 < t.vocab_size <= 400  # 256 bytes + 3 specials + some merges
    # Merges were learned from the documents, not from JSON syntax.
    assert len(t.encode(docs[0], bos=False, eos=False)) < len(docs[0].encode("utf-8"))
    for text in ODD_TEXTS:  # bytes never seen in training still round-trip
        assert t.decode(t.encode(text, bos=True, eos=True)) == text


# ---------------------------------------------------------------------------------------------
# PackedStream
# ---------------------------------------------------------------------------------------------


def test_packing_is_exact(tok):
    docs = make_docs(40)
    seq_len, B = 16, 3
    stream = PackedStream(lambda: docs, tok, seq_len=seq_len, batch_size=B, infinite=False)
    windows: list[list[int]] = []
    for inputs, labels in stream:
        assert inputs.shape == labels.shape == (B, seq_len)
        assert inputs.dtype == labels.dtype == torch.long
        windows += windows_of((inputs, labels))

    expected = encoded_stream(tok, docs)
    W = seq_len + 1
    flat = [t for w in windows for t in w]
    # Consecutive, non-overlapping windows: their concatenation is a prefix of the stream...
    assert flat == expected[: len(flat)]
    # ...and only an incomplete final batch was dropped.
    assert len(expected) - len(flat) < B * W
    assert stream.window_index == len(windows)


def test_sharding_matches_single_rank_stream(tok):
    docs = make_docs(60)
    seq_len, B, D = 8, 2, 3
    single = PackedStream(lambda: docs, tok, seq_len=seq_len, batch_size=B * D, infinite=False)
    ranks = [
        PackedStream(lambda: docs, tok, seq_len=seq_len, batch_size=B, dp_rank=r, dp_degree=D, infinite=False)
        for r in range(D)
    ]
    n = 0
    for global_batch, *rank_batches in zip(single, *ranks):
        # Rank r holds windows r*B .. r*B+B-1 of the global batch.
        assert windows_of(global_batch) == [w for b in rank_batches for w in windows_of(b)]
        n += 1
    assert n > 3
    for r in ranks:  # every rank stops after the same number of batches
        with pytest.raises(StopIteration):
            next(r)


def test_state_round_trip_mid_document(tok):
    docs = make_docs(80, max_words=120)
    encoded = [tok.encode(d, bos=True, eos=True) for d in docs]
    mk = lambda t=tok: PackedStream(lambda: docs, t, seq_len=16, batch_size=2, encode_batch_size=8)

    a = mk()
    for _ in range(50):  # advance until the position falls inside a document
        next(a)
        state = a.state_dict()
        if state["buffer"]:
            break
    # The saved buffer is the unconsumed tail of the last document that was started.
    doc_index = state["documents"]["sources"][0]["index"]
    last = encoded[doc_index - 1]
    assert 0 < len(state["buffer"]) < len(last)
    assert state["buffer"] == last[-len(state["buffer"]) :]
    assert state["buffer_doc_pos"] == len(last) - len(state["buffer"])

    state = json.loads(json.dumps(state))  # plain data: survives JSON (and torch.save)
    counting = CountingTokenizer(tok)
    b = mk(counting)
    b.load_state_dict(state)
    for _ in range(20):
        xa, ya = next(a)
        xb, yb = next(b)
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    # Resuming skipped the consumed documents instead of re-tokenizing them.
    assert counting.encoded[0] == docs[doc_index]


def test_state_is_elastic_across_dp_degree(tok):
    docs = make_docs(50)
    single = PackedStream(lambda: docs, tok, seq_len=8, batch_size=4)
    for _ in range(5):
        next(single)
    state = single.state_dict()
    # Continue the same global stream on 2 ranks with half the per-rank batch size.
    ranks = [PackedStream(lambda: docs, tok, seq_len=8, batch_size=2, dp_rank=r, dp_degree=2) for r in range(2)]
    for r in ranks:
        r.load_state_dict(state)
    for _ in range(10):
        expected = windows_of(next(single))
        assert expected == windows_of(next(ranks[0])) + windows_of(next(ranks[1]))


def test_state_rejects_different_seq_len(tok):
    docs = make_docs(20)
    state = PackedStream(lambda: docs, tok, seq_len=8, batch_size=1).state_dict()
    with pytest.raises(ValueError, match="seq_len"):
        PackedStream(lambda: docs, tok, seq_len=16, batch_size=1).load_state_dict(state)


def test_infinite_stream_wraps_into_new_epochs(tok, caplog):
    docs = make_docs(5, max_words=10)
    one_epoch = encoded_stream(tok, docs)
    seq_len, B = 7, 2
    stream = PackedStream(lambda: docs, tok, seq_len=seq_len, batch_size=B, infinite=True)
    n_batches = 3 * len(one_epoch) // (B * (seq_len + 1)) + 1  # about three epochs' worth
    with caplog.at_level(logging.INFO, logger="lathe"):
        windows = [w for _ in range(n_batches) for w in windows_of(next(stream))]
    assert stream.epoch == 3
    assert "data: starting epoch 1" in caplog.text and "data: starting epoch 3" in caplog.text
    # Epochs are simply concatenated into the one global stream.
    flat = [t for w in windows for t in w]
    assert flat == (one_epoch * 4)[: len(flat)]

    # A state saved after wrapping resumes in the right epoch.
    resumed = PackedStream(lambda: docs, tok, seq_len=seq_len, batch_size=B)
    resumed.load_state_dict(stream.state_dict())
    for _ in range(5):
        assert windows_of(next(stream)) == windows_of(next(resumed))


def test_finite_stream_stops(tok):
    docs = make_docs(5, max_words=10)
    stream = PackedStream(lambda: docs, tok, seq_len=7, batch_size=2, infinite=False)
    batches = list(stream)
    assert len(batches) == len(encoded_stream(tok, docs)) // (2 * 8)
    with pytest.raises(StopIteration):  # and stays stopped
        next(stream)


@pytest.mark.parametrize("infinite", [True, False])
def test_too_small_dataset_raises(tok, infinite):
    docs = ["tiny", "docs"]
    stream = PackedStream(lambda: docs, tok, seq_len=64, batch_size=1, infinite=infinite)
    with pytest.raises(ValueError, match="too small"):
        next(stream)
    empty = PackedStream(list, tok, seq_len=4, batch_size=1, infinite=infinite)
    with pytest.raises(ValueError, match="too small|empty"):
        next(empty)


def test_finite_stream_smaller_than_one_global_batch_raises(tok):
    docs = make_docs(3, max_words=5)  # enough for a window or two, not for 64 windows
    stream = PackedStream(lambda: docs, tok, seq_len=4, batch_size=64, infinite=False)
    with pytest.raises(ValueError, match="fewer than one global batch"):
        next(stream)
