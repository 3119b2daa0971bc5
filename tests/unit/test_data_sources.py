"""Document sources: local jsonl/json/parquet/txt files, held-out splits, Hugging Face datasets
(real loading code, exercised on a local dataset folder and a stand-in for the Hub), weighted
mixing, and one clear message per kind of bad input."""

from __future__ import annotations

import gzip
import json
import logging
from collections import Counter

import pytest
from test_data_fixtures import (
    cfg_for,
    make_docs,
    windows_of,
    write_jsonl,
    write_parquet,
)

from lathe.config import validate
from lathe.data import build_tokenizer, build_train_data
from lathe.data.sources import (
    BadRecord,
    CallableSource,
    HFSource,
    LocalSource,
    is_heldout,
    list_local_files,
    open_source,
    resolve_spec,
)
from lathe.data.stream import DocumentStream, PackedStream
from lathe.data.tokenizer import load_tokenizer
from lathe.errors import ConfigError


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer()


def texts(source, start=0):
    return list(source.records(start))


# ---------------------------------------------------------------------------------------------
# Local files
# ---------------------------------------------------------------------------------------------


def test_local_formats_are_read_in_path_order(tmp_path):
    pytest.importorskip("pyarrow")
    a, b, c, d = make_docs(5, prefix="a"), make_docs(9, prefix="b"), make_docs(4, prefix="c"), make_docs(3, prefix="d")
    root = tmp_path / "data"
    write_jsonl(root / "1-a.jsonl", a, field="content", extra={"meta": 1})
    write_parquet(root / "2-b.parquet", b, field="content")
    (root / "3-c.json").write_text(json.dumps([{"content": x} for x in c]))  # a JSON array
    (root / "sub").mkdir()
    with gzip.open(root / "sub" / "4-d.jsonl.gz", "wt", encoding="utf-8") as f:
        f.writelines(json.dumps({"content": x}) + "\n" for x in d)
    (root / "5-e.txt").write_text("one whole text file\nis one document\n")
    (root / "README.md").write_text("not data")  # ignored: not a data file
    (root / ".hidden.jsonl").write_text('{"content": "hidden"}\n')

    files = list_local_files(str(root), "training.dataset_path")
    assert [k for _, k in files] == ["1-a.jsonl", "2-b.parquet", "3-c.json", "5-e.txt", "sub/4-d.jsonl.gz"]
    src = LocalSource(files, "content")
    assert texts(src) == a + b + c + ["one whole text file\nis one document\n"] + d
    assert texts(src, 7) == (a + b)[7:] + c + ["one whole text file\nis one document\n"] + d  # resume skip
    # A glob selects files the same way; a single file works too.
    assert [k for _, k in list_local_files(str(root / "*.jsonl"), "x")] == ["1-a.jsonl"]
    assert [k for _, k in list_local_files(str(root / "**" / "*.jsonl*"), "x")] == ["1-a.jsonl", "sub/4-d.jsonl.gz"]
    assert texts(LocalSource(list_local_files(str(root / "2-b.parquet"), "x"), "content")) == b


def test_local_training_batches_match_the_documents(tmp_path, tok):
    docs = make_docs(300, seed=4)
    write_jsonl(tmp_path / "data" / "train.jsonl", docs)
    cfg = cfg_for("--training.dataset_path", str(tmp_path / "data"), "--training.seq_len", "16",
                  "--training.batch_size", "2", "--training.data_workers", "0")
    validate(cfg)
    data = build_train_data(cfg, tok, 0, 1)
    kept = [d for i, d in enumerate(docs) if not is_heldout("train.jsonl", i)]
    assert 0 < len(docs) - len(kept) < 10  # ~1% held out
    reference = PackedStream(lambda: kept, tok, seq_len=16, batch_size=2)
    for _ in range(30):
        assert windows_of(next(data)) == windows_of(next(reference))


def test_heldout_split_of_local_files(tmp_path):
    cfg = cfg_for()
    docs = make_docs(3000, max_words=3)
    write_jsonl(tmp_path / "one" / "data.jsonl", docs)
    spec = resolve_spec("local", str(tmp_path / "one"), None, "training.dataset")
    train, val = texts(open_source(spec, "train", cfg)), texts(open_source(spec, "validation", cfg))
    assert sorted(train + val) == sorted(docs) and not set(train) & set(val)
    assert 0.005 < len(val) / len(docs) < 0.02
    # A dataset that has validation files uses them, and trains on the others.
    write_jsonl(tmp_path / "two" / "c4-train.00000.json", docs[:50])
    write_jsonl(tmp_path / "two" / "c4-validation.00000.json", docs[50:60])
    spec = resolve_spec("local", str(tmp_path / "two"), None, "training.dataset")
    assert texts(open_source(spec, "train", cfg)) == docs[:50]
    assert texts(open_source(spec, "validation", cfg)) == docs[50:60]


def test_dataset_path_alone_means_local_files_and_corpus_cache_still_works(tmp_path):
    write_jsonl(tmp_path / "mine" / "a.jsonl", ["x"])
    assert resolve_spec("lathe_corpus", str(tmp_path / "mine"), None, "training.dataset").kind == "local"
    (tmp_path / "cache").mkdir()  # an empty folder is the user's (empty) data, never a cache to fill
    assert resolve_spec("lathe_corpus", str(tmp_path / "cache"), None, "training.dataset").kind == "local"
    (tmp_path / "cache" / "manifest.json").write_text('{"format_version": 1}')
    assert resolve_spec("lathe_corpus", str(tmp_path / "cache"), None, "training.dataset").kind == "corpus"
    assert resolve_spec("lathe_corpus", None, None, "training.dataset").kind == "corpus"
    assert resolve_spec(str(tmp_path / "mine" / "a.jsonl"), None, None, "training.dataset").kind == "local"


# ---------------------------------------------------------------------------------------------
# Hugging Face
# ---------------------------------------------------------------------------------------------


class FakeStreamingDataset:
    """Stands in for datasets.IterableDataset (the part lathe uses: iteration and skip)."""

    def __init__(self, rows):
        self.rows = rows

    def skip(self, n):
        return FakeStreamingDataset(self.rows[n:])

    def __iter__(self):
        return iter(self.rows)


def test_hf_presets_call_load_dataset_streaming(monkeypatch):
    datasets = pytest.importorskip("datasets")
    calls = []

    def fake_load(path, name=None, split=None, streaming=False):
        calls.append((path, name, split, streaming))
        return FakeStreamingDataset([{"text": f"{path} {split} {i}", "url": "u"} for i in range(500)])

    monkeypatch.setattr(datasets, "load_dataset", fake_load)
    cfg = cfg_for()
    c4 = resolve_spec("c4", None, None, "training.dataset")
    assert texts(open_source(c4, "train", cfg), 498) == ["allenai/c4 train 498", "allenai/c4 train 499"]
    assert texts(open_source(c4, "validation", cfg))[0] == "allenai/c4 validation 0"
    assert calls[:2] == [("allenai/c4", "en", "train", True), ("allenai/c4", "en", "validation", True)]
    # FineWeb has no validation split: 1% of train is held out, and training skips it.
    fw = resolve_spec("fineweb_edu", None, "sample-10BT", "training.dataset")
    train, val = texts(open_source(fw, "train", cfg)), texts(open_source(fw, "validation", cfg))
    assert calls[-1] == ("HuggingFaceFW/fineweb-edu", "sample-10BT", "train", True)
    assert len(train) + len(val) == 500 and 0 < len(val) < 20 and not set(train) & set(val)
    assert texts(open_source(fw, "train", cfg), 300) == train[300:]  # resume skips by record number
    assert texts(open_source(fw, "validation", cfg), 1) == val[1:]
    assert resolve_spec("fineweb", None, None, "x").path == "HuggingFaceFW/fineweb"
    assert resolve_spec("someone/dataset", None, None, "x").kind == "hf"


def test_hf_unreachable_hub_is_a_config_error(monkeypatch, tok):
    datasets = pytest.importorskip("datasets")

    def offline(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'allenai/c4' on the Hub (OfflineModeIsEnabled)")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    cfg = cfg_for("--training.dataset", "c4")
    validate(cfg)  # nothing to check without the network
    with pytest.raises(ConfigError) as info:
        build_train_data(cfg, tok, 0, 1)
    msg = str(info.value)
    assert "cannot load Hugging Face dataset 'allenai/c4' (config en) split 'train'" in msg
    assert "needs internet access" in msg and "--training.dataset_path" in msg


def test_hf_source_on_a_local_dataset_folder(tmp_path, monkeypatch):
    """The real datasets.load_dataset(..., streaming=True) path, offline, on a local folder."""
    datasets = pytest.importorskip("datasets")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True, raising=False)
    docs = make_docs(40)
    write_jsonl(tmp_path / "ds" / "train.jsonl", docs)
    write_jsonl(tmp_path / "ds" / "validation.jsonl", ["held out 1", "held out 2"])
    cfg = cfg_for("--training.dataset", "huggingface", "--training.dataset_path", str(tmp_path / "ds"))
    spec = resolve_spec("huggingface", str(tmp_path / "ds"), None, "training.dataset_path")
    train = open_source(spec, "train", cfg)
    assert isinstance(train, HFSource) and train.heldout is None  # the folder has a validation split
    assert texts(train, 35) == docs[35:]
    assert texts(open_source(spec, "validation", cfg)) == ["held out 1", "held out 2"]
    train.probe("training.dataset_path")


# ---------------------------------------------------------------------------------------------
# Mixing
# ---------------------------------------------------------------------------------------------


def test_mixing_weights_are_honoured():
    sizes = {"a": 37, "b": 50, "c": 11}  # small sources wrap into many epochs
    sources = [CallableSource(lambda n=n: (f"{n}{i}" for i in range(sizes[n])), name=n) for n in "abc"]
    stream = DocumentStream(sources, [6, 3, 1], seed=5)
    draws = [stream.next()[0] for _ in range(20_000)]
    counts = Counter(draws)
    for name, share in zip("abc", (0.6, 0.3, 0.1)):
        assert abs(counts[name] / len(draws) - share) < 0.015, counts
    # The choice of source is a function of (seed, position): the same seed gives the same mix,
    # another seed a different one.
    again = DocumentStream(sources, [6, 3, 1], seed=5)
    assert [again.next()[0] for _ in range(2000)] == draws[:2000]
    other = DocumentStream(sources, [6, 3, 1], seed=6)
    assert [other.next()[0] for _ in range(2000)] != draws[:2000]


def test_mix_from_config(tmp_path, tok):
    write_jsonl(tmp_path / "x.jsonl", make_docs(400, prefix="X"))
    write_jsonl(tmp_path / "y.jsonl", make_docs(400, prefix="Y"))
    cfg = cfg_for("--training.dataset_mix", f"{tmp_path / 'x.jsonl'}=3,{tmp_path / 'y.jsonl'}=1",
                  "--training.seq_len", "32", "--training.batch_size", "2")
    validate(cfg)
    data = build_train_data(cfg, tok, 0, 1)
    try:
        text = "".join(tok.decode(w) for _ in range(40) for w in windows_of(next(data)))
    finally:
        data.close()
    x, y = text.count("X "), text.count("Y ")
    assert x > 1.8 * y > 0, (x, y)


# ---------------------------------------------------------------------------------------------
# Bad input: one clear message each, before training
# ---------------------------------------------------------------------------------------------


def _error(tmp_path, tok, *argv) -> str:
    cfg = cfg_for(*argv)
    with pytest.raises(ConfigError) as info:
        validate(cfg)
        build_train_data(cfg, tok, 0, 1)
    return str(info.value)


def test_bad_inputs_give_one_clear_message(tmp_path, tok):
    missing = tmp_path / "nope"
    assert _error(tmp_path, tok, "--training.dataset_path", str(missing)) == (
        f"training.dataset_path='{missing}': no such file or folder (check the path (globs like data/*.jsonl work too))")

    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "a.jsonl").write_text("")
    (tmp_path / "empty" / "b.jsonl").write_text("\n\n")
    assert "empty dataset: no records in a.jsonl, b.jsonl" in _error(
        tmp_path, tok, "--training.dataset", "local", "--training.dataset_path", str(tmp_path / "empty"))

    (tmp_path / "nodata").mkdir()
    (tmp_path / "nodata" / "notes.md").write_text("hi")
    assert "folder holds no data files" in _error(tmp_path, tok, "--training.dataset_path", str(tmp_path / "nodata"))

    write_jsonl(tmp_path / "field" / "a.jsonl", ["x", "y"], field="content")
    msg = _error(tmp_path, tok, "--training.dataset_path", str(tmp_path / "field"))
    assert msg == ("training.dataset_text_field='text': a.jsonl:1: no field 'text' (fields: content) "
                   "(set --training.dataset_text_field to the field that holds the text)")

    pytest.importorskip("pyarrow")
    write_parquet(tmp_path / "pq" / "a.parquet", ["x"], field="body")
    assert "no column 'text' (columns: body, id)" in _error(tmp_path, tok, "--training.dataset_path",
                                                           str(tmp_path / "pq"))

    (tmp_path / "latin1").mkdir()
    (tmp_path / "latin1" / "a.jsonl").write_bytes(
        "".join(json.dumps({"text": f"café {i}"}, ensure_ascii=False) + "\n" for i in range(5)).encode("latin-1"))
    msg = _error(tmp_path, tok, "--training.dataset_path", str(tmp_path / "latin1"))
    assert "a.jsonl:1: not valid UTF-8 (byte 13 of the line)" in msg and "iconv" in msg
    (tmp_path / "latin1.txt").write_bytes("naïve".encode("latin-1"))
    assert "not valid UTF-8" in _error(tmp_path, tok, "--training.dataset_path", str(tmp_path / "latin1.txt"))

    (tmp_path / "data.csv").write_text("text\nx\n")
    assert "unsupported file type '.csv'" in _error(tmp_path, tok, "--training.dataset_path", str(tmp_path / "data.csv"))
    assert "unknown dataset (did you mean 'fineweb'?)" in _error(tmp_path, tok, "--training.dataset", "finewb")
    assert "is not source=weight" in _error(tmp_path, tok, "--training.dataset_mix", "c4")
    assert "must be a positive number" in _error(tmp_path, tok, "--training.dataset_mix", "c4=-1")
    assert "cannot be combined with training.dataset_mix" in _error(
        tmp_path, tok, "--training.dataset_mix", "c4=1", "--training.dataset_path", str(tmp_path))
    assert "training.shuffle_buffer=-1: must be >= 0" in _error(tmp_path, tok, "--training.shuffle_buffer", "-1")
    assert "validation.steps=0" in _error(tmp_path, tok, "--validation.enabled", "--validation.steps", "0")


def test_undecodable_records_mid_stream_are_counted_and_skipped(tmp_path, tok, caplog):
    lines = [json.dumps({"text": d}) for d in make_docs(60)]
    lines[20] = '{"text": "truncated'
    lines[30] = json.dumps({"other": 1})
    raw = ("\n".join(lines) + "\n").encode()
    raw = raw.replace(b"doc 40:", b"doc 40\xff:")  # invalid UTF-8 in one record
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "a.jsonl").write_bytes(raw)
    src = LocalSource(list_local_files(str(tmp_path / "d"), "x"), "text")
    recs = texts(src)
    bad = [r for r in recs if isinstance(r, BadRecord)]
    assert [b.where for b in bad] == ["a.jsonl:21", "a.jsonl:31", "a.jsonl:41"]

    stream = DocumentStream([src], infinite=False)
    with caplog.at_level(logging.WARNING, logger="lathe"):
        got = []
        while (t := stream.next()) is not None:
            got.append(t)
    assert len(got) == 57 and stream.skipped == 3
    assert "skipping undecodable record a.jsonl:21: invalid JSON" in caplog.text
    assert "a.jsonl:41: not valid UTF-8" in caplog.text and "(3 skipped so far)" in caplog.text
    assert stream.state_dict()["skipped"] == 3

    # Through the builder: the first records are fine, so training starts and skips the bad ones.
    cfg = cfg_for("--training.dataset_path", str(tmp_path / "d"), "--training.seq_len", "16",
                  "--training.batch_size", "2", "--training.data_workers", "0")
    data = build_train_data(cfg, tok, 0, 1)
    for _ in range(1000):
        next(data)
        if data.epoch == 1:
            break
    assert data.epoch == 1 and data.skipped_records == 3


def test_build_tokenizer_and_data_end_to_end_on_local_files(tmp_path):
    """`--training.dataset_path files --model.tokenizer_path tokenizer.json`, as the issue asks."""
    write_jsonl(tmp_path / "files" / "part-0.jsonl", make_docs(50))
    cfg = cfg_for("--training.dataset_path", str(tmp_path / "files"), "--model.tokenizer_path",
                  str(load_tokenizer().path), "--training.seq_len", "16", "--training.batch_size", "2")
    validate(cfg)
    tok = build_tokenizer(cfg)
    data = build_train_data(cfg, tok, 0, 1)
    try:
        inputs, labels = next(data)
    finally:
        data.close()
    assert inputs.shape == labels.shape == (2, 16)


def test_committed_tiny_dataset_splits_by_file_name():
    from pathlib import Path

    root = Path(__file__).resolve().parents[1] / "assets" / "data" / "tiny"
    spec = resolve_spec("lathe_corpus", str(root), None, "training.dataset")  # dataset_path alone
    train, val = texts(open_source(spec, "train", cfg_for())), texts(open_source(spec, "validation", cfg_for()))
    assert (len(train), len(val)) == (120, 30)
    assert all(t.startswith("doc ") for t in train) and all(t.startswith("val ") for t in val)
