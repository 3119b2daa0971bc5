"""The exact, elastic stream: resume after k batches gives the identical next batches (shuffled,
mixed, with document ids, with background workers), also on a different number of DP ranks;
epochs are reshuffled deterministically; document ids/positions are right."""

from __future__ import annotations

import json
import logging

import pytest
import torch
from test_data_fixtures import cfg_for, make_docs, windows_of, write_jsonl

from lathe.data import build_train_data
from lathe.data.sources import CallableSource
from lathe.data.stream import DocumentStream, PackedStream
from lathe.data.tokenizer import load_tokenizer


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer()


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("resume")
    write_jsonl(d / "a" / "part-0.jsonl", make_docs(120, seed=1, prefix="A"))
    write_jsonl(d / "a" / "part-1.jsonl", make_docs(80, seed=2, prefix="A"))
    write_jsonl(d / "b.jsonl", make_docs(15, seed=3, prefix="B", max_words=10))
    return d


def make(data_dir, tok, dp_rank=0, dp_degree=1, batch_size=2, workers=0, document_ids=False):
    cfg = cfg_for("--training.dataset_mix", f"{data_dir / 'a'}=0.7,{data_dir / 'b.jsonl'}=0.3",
                  "--training.seq_len", "12", "--training.batch_size", str(batch_size),
                  "--training.shuffle_buffer", "16", "--training.seed", "3",
                  "--training.data_workers", str(workers), *(["--training.document_ids"] if document_ids else []))
    return build_train_data(cfg, tok, dp_rank, dp_degree)


def same(a, b) -> bool:
    return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b))


@pytest.mark.parametrize("workers", [0, 2])
def test_exact_resume(data_dir, tok, workers):
    ref = make(data_dir, tok, document_ids=True)
    run = make(data_dir, tok, workers=workers, document_ids=True)
    try:
        for k in range(400):  # into the second epoch of the small source, inside a document
            assert same(next(ref), next(run))
            state = json.loads(json.dumps(run.state_dict()))  # plain data, as in a checkpoint
            if state["documents"]["sources"][1]["epoch"] == 1 and state["buffer_doc_pos"] > 0:
                break
        assert [src["epoch"] for src in state["documents"]["sources"]] == [0, 1] and state["buffer"]
        assert len(json.dumps(state)) < 2000  # small: a position, not the data
        expected = [next(ref) for _ in range(25)]
        # The worker has run ahead of the consumer: the state must not depend on that.
        assert state == json.loads(json.dumps(run.state_dict()))
        for resumed_workers in (0, 2):
            fresh = make(data_dir, tok, workers=resumed_workers, document_ids=True)
            fresh.load_state_dict(state)
            try:
                for e in expected:
                    assert same(e, next(fresh))
            finally:
                fresh.close()
        # The interrupted run itself also continues exactly.
        for e in expected:
            assert same(e, next(run))
    finally:
        run.close()


def test_loader_close_rewinds_to_the_last_consumed_batch(data_dir, tok):
    ref = make(data_dir, tok)
    run = make(data_dir, tok, workers=1)
    for _ in range(5):
        next(ref), next(run)
    run.close()  # the worker had produced more batches; they must not be lost
    for _ in range(5):
        assert same(next(ref), next(run))
    run.close()


def global_batch(ranks) -> list[list[int]]:
    return [w for r in ranks for w in windows_of(next(r))]


@pytest.mark.parametrize("workers", [0, 1])
def test_elastic_resume_dp4_to_dp2_and_dp1(data_dir, tok, workers):
    B = 2
    dp4 = [make(data_dir, tok, r, 4, B, workers=workers) for r in range(4)]
    try:
        for _ in range(6):
            global_batch(dp4)
        states = [r.state_dict() for r in dp4]
        assert all(s == states[0] for s in states)  # the state does not depend on the rank
        expected = [global_batch(dp4) for _ in range(4)]  # the uninterrupted DP=4 stream
    finally:
        for r in dp4:
            r.close()

    # DP=2 with twice the batch size (same global batch) and DP=1 with four times.
    for dp, b in ((2, 2 * B), (1, 4 * B)):
        ranks = [make(data_dir, tok, r, dp, b, workers=workers) for r in range(dp)]
        for r in ranks:
            r.load_state_dict(states[0])
        assert [global_batch(ranks) for _ in range(4)] == expected
    # DP=2 with the same per-rank batch: two global batches of DP=2 make one of DP=4.
    ranks = [make(data_dir, tok, r, 2, B) for r in range(2)]
    for r in ranks:
        r.load_state_dict(states[0])
    assert [global_batch(ranks) + global_batch(ranks) for _ in range(4)] == expected


def test_epochs_are_reshuffled_deterministically(caplog):
    docs = [f"d{i}" for i in range(50)]

    def epochs(seed, n_epochs=3):
        s = DocumentStream([CallableSource(lambda: docs)], seed=seed, shuffle_buffer=8)
        return [[s.next() for _ in docs] for _ in range(n_epochs)]

    with caplog.at_level(logging.INFO, logger="lathe"):
        a = epochs(1)
    assert "data: starting epoch 1" in caplog.text and "data: starting epoch 2" in caplog.text
    assert all(sorted(e) == sorted(docs) for e in a)  # each epoch is a permutation
    assert a[0] != docs and a[0] != a[1] != a[2]  # shuffled, differently each epoch
    assert epochs(1) == a and epochs(2) != a  # a function of the seed
    for e in a:  # the shuffle is bounded: a document moves only within its block of 8
        assert all(abs(e.index(d) - i) < 8 for i, d in enumerate(docs))
    # Resuming in the middle of a block of a later epoch gives the same continuation.
    s = DocumentStream([CallableSource(lambda: docs)], seed=1, shuffle_buffer=8)
    for _ in range(50 + 13):
        s.next()
    t = DocumentStream([CallableSource(lambda: docs)], seed=1, shuffle_buffer=8)
    t.load_state_dict(json.loads(json.dumps(s.state_dict())))
    assert [t.next() for _ in range(60)] == (a[1] + a[2])[13:73]


def test_document_ids_and_positions(tok):
    docs = make_docs(40, seed=9, max_words=30)
    encoded = [tok.encode(d, bos=True, eos=True) for d in docs]
    stream = PackedStream(lambda: docs, tok, seq_len=24, batch_size=3, document_ids=True, infinite=False)
    flat_pos = [p for ids in encoded for p in range(len(ids))]
    flat_doc = [i for i, ids in enumerate(encoded) for _ in ids]
    offset = 0
    W = 25
    for inputs, labels, doc_ids, positions in stream:
        assert doc_ids.shape == positions.shape == inputs.shape == (3, 24)
        for row in range(3):
            lo = offset + row * W
            assert positions[row].tolist() == flat_pos[lo : lo + 24]
            expected_doc = [d - flat_doc[lo] for d in flat_doc[lo : lo + 24]]
            assert doc_ids[row].tolist() == expected_doc
            # Every document start is a BOS.
            assert all((inputs[row] == tok.bos_id)[positions[row] == 0])
        offset += 3 * W
    assert offset > 10 * W
    # Without the option, batches are plain (inputs, labels).
    assert len(next(iter(PackedStream(lambda: docs, tok, seq_len=24, batch_size=3)))) == 2


def test_state_names_a_changed_dataset(tok, caplog):
    docs = make_docs(30)
    a = PackedStream(lambda: docs, tok, seq_len=8, batch_size=2)
    for _ in range(40):
        next(a)
    state = a.state_dict()
    shorter = PackedStream(lambda: docs[:3], tok, seq_len=8, batch_size=2)
    shorter.load_state_dict(state)
    assert state["documents"]["sources"][0]["index"] > 3
    with pytest.raises(ValueError, match="did the dataset change"):
        for _ in range(100):
            next(shorter)
    reseeded = DocumentStream([CallableSource(lambda: docs)], seed=99)
    with caplog.at_level(logging.WARNING, logger="lathe"):
        PackedStream(reseeded, tok, seq_len=8, batch_size=2).load_state_dict(state)
    assert "seed changed since the state was saved" in caplog.text


def test_old_format_state_still_loads(tok):
    docs = make_docs(30)
    a = PackedStream(lambda: docs, tok, seq_len=8, batch_size=2)
    for _ in range(7):
        next(a)
    s = a.state_dict()
    v1 = {"version": 1, "seq_len": 8, "epoch": s["documents"]["sources"][0]["epoch"],
          "doc_index": s["documents"]["sources"][0]["index"], "buffer": s["buffer"],
          "window_index": s["window_index"]}
    b = PackedStream(lambda: docs, tok, seq_len=8, batch_size=2)
    b.load_state_dict(v1)
    for _ in range(10):
        assert windows_of(next(a)) == windows_of(next(b))
