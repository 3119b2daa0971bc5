"""``lathe data prepare``: the documents training would read, tokenized as training does, in
Megatron shards; the same bytes whatever the number of workers or tasks and across a kill and a
rerun; bad input refused in one line."""

from __future__ import annotations

import base64
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from test_data_fixtures import cfg_for, make_docs, write_jsonl, write_parquet, write_tiktoken_file
from test_data_indexed import read_megatron

from lathe.data import build_train_data, load_tokenizer
from lathe.data.prepare import prepare
from lathe.data.sources import BadRecord, open_source, resolve_spec
from lathe.errors import ConfigError

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("prep-src")
    write_jsonl(d / "a" / "part-0.jsonl", make_docs(70, seed=1, prefix="A"))
    write_parquet(d / "a" / "part-1.parquet", make_docs(40, seed=2, prefix="P"))
    # an undecodable record, a record without the text field and an empty document
    with open(d / "b.jsonl", "w", encoding="utf-8") as f:
        f.write(json.dumps({"text": "first"}) + "\n{not json\n" + json.dumps({"body": "x"}) + "\n")
        f.write(json.dumps({"text": ""}) + "\n" + "".join(json.dumps({"text": t}) + "\n" for t in make_docs(30, 3)))
    write_jsonl(d / "validation.jsonl", make_docs(12, seed=4, prefix="V"))  # the held-out split
    return d


def files_of(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def shard_documents(out: Path, split: str) -> list[list[int]]:
    manifest = json.loads((out / "manifest.json").read_text())
    docs = []
    for shard in manifest["splits"][split]["shards"]:
        dtype, seqs, doc_index = read_megatron(out / shard["prefix"])  # the independent reader
        assert doc_index == list(range(len(seqs) + 1)) and dtype == manifest["dtype"]
        docs += seqs
    return docs


def expected_documents(path: Path, split: str, tok) -> list[list[int]]:
    """What training reads: the split's records in order, bad ones skipped, with BOS/EOS."""
    src = open_source(resolve_spec("local", str(path), None, "training.dataset"), split, cfg_for())
    return [tok.encode(r, bos=True, eos=True) for r in src.records(0) if not isinstance(r, BadRecord)]


@pytest.fixture(scope="module")
def reference(data_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("prep-ref") / "out"
    summary = prepare([str(data_dir)], str(out), workers=0, docs_per_shard=17, progress=False)
    assert summary["complete"]
    return out


def test_prepared_documents_are_what_training_reads(data_dir, reference):
    tok = load_tokenizer()
    for split in ("train", "validation"):
        assert shard_documents(reference, split) == expected_documents(data_dir, split, tok)
    m = json.loads((reference / "manifest.json").read_text())
    train = m["splits"]["train"]
    assert train["skipped_records"] == 2 and train["records"] == train["documents"] + 2
    assert len(train["shards"]) == -(-train["records"] // 17) and train["shards"][0]["documents"] == 17
    assert m["tokenizer"]["vocab_size"] == 4096 and m["dtype"] == "uint16"
    assert m["splits"]["validation"]["documents"] == 12
    assert {s["source"] for s in m["sources"]} == {str(data_dir)}


def test_output_does_not_depend_on_workers_or_tasks(data_dir, reference, tmp_path):
    expected = files_of(reference)
    prepare([str(data_dir)], str(tmp_path / "w2"), workers=2, docs_per_shard=17, progress=False)
    assert files_of(tmp_path / "w2") == expected
    # Two tasks of --shard i/n into one folder: the first leaves the manifest to the last.
    first = prepare([str(data_dir)], str(tmp_path / "t"), workers=1, docs_per_shard=17, shard="1/2", progress=False)
    assert not first["complete"] and first["missing_shards"] > 0 and not (tmp_path / "t" / "manifest.json").exists()
    second = prepare([str(data_dir)], str(tmp_path / "t"), workers=0, docs_per_shard=17, shard="0/2", progress=False)
    assert second["complete"]
    assert files_of(tmp_path / "t") == expected
    again = prepare([str(data_dir)], str(tmp_path / "t"), workers=0, docs_per_shard=17, progress=False)
    assert again["complete"] and not again["splits"]  # nothing left to do, nothing rewritten


def test_tiktoken_and_int32(tmp_path, data_dir):
    """A tiktoken (Llama 3 format) tokenizer; a vocabulary beyond uint16 is written as int32."""
    texts = make_docs(30, seed=9)
    small = write_tiktoken_file(tmp_path / "small.model", texts)
    prepare([str(data_dir / "b.jsonl")], str(tmp_path / "s"), tokenizer=str(small), workers=1, progress=False)
    tok = load_tokenizer(small)
    assert shard_documents(tmp_path / "s", "train") == expected_documents(data_dir / "b.jsonl", "train", tok)
    big = big_tiktoken_file(tmp_path / "big.model")
    with pytest.raises(ConfigError) as e:
        prepare([str(data_dir / "b.jsonl")], str(tmp_path / "u"), tokenizer=str(big), dtype="uint16", progress=False)
    assert str(e.value).startswith("--dtype='uint16': uint16 cannot hold the tokenizer's 65,956 ids")
    prepare([str(data_dir / "b.jsonl")], str(tmp_path / "i"), tokenizer=str(big), workers=0, progress=False)
    m = json.loads((tmp_path / "i" / "manifest.json").read_text())
    assert m["dtype"] == "int32" and m["megatron_dtype_code"] == 4
    assert shard_documents(tmp_path / "i", "train") == expected_documents(data_dir / "b.jsonl", "train",
                                                                          load_tokenizer(big))


def big_tiktoken_file(path: Path) -> Path:
    """A tiktoken BPE file with 65,700 ranks (+256 specials: more ids than uint16 holds)."""
    ranks = [bytes([i]) for i in range(256)]
    ranks += [bytes([a, b]) for a in range(97, 123) for b in range(256)]
    ranks += [bytes([a, b, c]) for a in range(97, 123) for b in range(97, 123) for c in range(256)][: 65700 - len(ranks)]
    path.write_text("".join(f"{base64.b64encode(t).decode()} {r}\n" for r, t in enumerate(ranks)))
    return path


def test_kill_and_rerun_gives_identical_bytes(tmp_path):
    data = write_jsonl(tmp_path / "big.jsonl", make_docs(3000, seed=5, max_words=120))
    cmd = [sys.executable, "-m", "lathe", "data", "prepare", str(data), "--workers", "1", "--docs-per-shard", "100",
           "--no-progress"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    prepare([str(data)], str(tmp_path / "straight"), workers=0, docs_per_shard=100, progress=False)
    out = tmp_path / "killed"
    proc = subprocess.Popen([*cmd, "--output", str(out)], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        while not list((out / "train").glob("shard-*.json")) and time.monotonic() < deadline:
            assert proc.poll() is None, "prepare ended before it could be killed"
            time.sleep(0.01)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    done = len(list((out / "train").glob("shard-*.json")))
    assert not (out / "manifest.json").exists() and 1 <= done < 30  # stopped mid-way
    # the worker processes went with it (they get SIGTERM when the main process dies)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            os.killpg(proc.pid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.1)
    else:
        os.killpg(proc.pid, signal.SIGKILL)
        pytest.fail("worker processes outlived the killed prepare")
    finished = {p: p.stat().st_mtime_ns for marker in (out / "train").glob("shard-*.json")
                for p in (marker, marker.with_suffix(".bin"), marker.with_suffix(".idx"))}
    rerun = subprocess.run([*cmd, "--output", str(out)], env=env, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr
    assert f"train: wrote {30 - done} shard(s)" in rerun.stdout  # continued, did not start over
    assert files_of(out) == files_of(tmp_path / "straight")
    assert {p: p.stat().st_mtime_ns for p in finished} == finished  # finished shards were not written again


def test_bad_input_is_one_line(tmp_path, data_dir, reference):
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "notes.txt").write_text("mine")
    cases = [
        (lambda: prepare([str(data_dir)], str(tmp_path / "foreign"), workers=0), "--output=.*is not a lathe data prepare"),
        (lambda: prepare([str(data_dir)], str(reference), workers=0, docs_per_shard=5),
         "--output=.*different settings \\(docs_per_shard\\)"),
        (lambda: prepare([str(tmp_path / "missing")], str(tmp_path / "x"), workers=0), "no such file or folder"),
        (lambda: prepare([str(data_dir)], str(tmp_path / "y"), shard="2/2"), "--shard='2/2': needs 0 <= i < n"),
        (lambda: prepare([str(data_dir)], str(tmp_path / "z"), tokenizer=str(tmp_path / "nope.json")), "--tokenizer="),
    ]
    for call, pattern in cases:
        with pytest.raises(ConfigError, match=pattern) as e:
            call()
        assert "\n" not in str(e.value)


def test_training_refuses_a_different_tokenizer(tmp_path, reference):
    other = write_tiktoken_file(tmp_path / "other.model", make_docs(20))
    cfg = cfg_for("--training.dataset_path", str(reference), "--model.tokenizer_path", str(other))
    with pytest.raises(ConfigError) as e:
        build_train_data(cfg, load_tokenizer(other), 0, 1)
    msg = str(e.value)
    assert msg.startswith("model.tokenizer_path=") and "was prepared with the tokenizer tokenizer.json" in msg
    assert "\n" not in msg


def test_uint16_tokens_with_a_larger_vocabulary_are_refused(tmp_path):
    (tmp_path / "t.bin").write_bytes(np.arange(5000, dtype=np.uint16).tobytes())
    big = big_tiktoken_file(tmp_path / "big.model")
    cfg = cfg_for("--training.dataset_path", str(tmp_path / "t.bin"), "--training.dataset_token_dtype", "uint16",
                  "--model.tokenizer_path", str(big))
    with pytest.raises(ConfigError) as e:
        build_train_data(cfg, load_tokenizer(big), 0, 1)
    assert str(e.value).startswith("training.dataset_token_dtype='uint16': t.bin holds uint16 token ids, which cannot "
                                   "represent this tokenizer's 65,956 ids")


def test_cli_prepare_and_info(tmp_path, data_dir, capsys):
    from lathe.cli import main

    assert main(["data", "prepare", str(data_dir / "b.jsonl"), "--output", str(tmp_path / "o"), "--workers", "0"]) == 0
    out, err = capsys.readouterr()
    assert "train with: --training.dataset_path" in out and "documents/s" in out
    assert "prepare train:" in err  # the progress line
    assert main(["data", "info", str(tmp_path / "o")]) == 0
    assert "Megatron: --data-path" in capsys.readouterr().out
    assert main(["data", "prepare", str(data_dir), "--output", str(tmp_path / "o"), "--workers", "0"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("lathe: error: --output=")


def test_hugging_face_source(tmp_path, monkeypatch):
    """A Hugging Face source (the real streaming datasets path, offline on a local folder) is read
    in the main process and tokenized by the workers like local files."""
    datasets = pytest.importorskip("datasets")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True, raising=False)
    from lathe.data.prepare import Progress, _init_worker, prepare_split

    docs = make_docs(30, seed=12)
    write_jsonl(tmp_path / "ds" / "train.jsonl", docs)
    write_jsonl(tmp_path / "ds" / "validation.jsonl", ["held out"])
    spec = resolve_spec("huggingface", str(tmp_path / "ds"), None, "training.dataset_path")
    src = open_source(spec, "train", cfg_for())
    _init_worker("", "auto", "text", "uint16", 2)  # (1 would set this process up as a worker)
    run = {"docs_per_shard": 8, "shard": (0, 1), "dtype": "uint16", "workers": 0}
    result = prepare_split([src], tmp_path / "out" / "train", run, None, Progress(enabled=False))
    assert (result.records, result.shards, result.documents) == (30, 4, 30)
    tok = load_tokenizer()
    got = [s for k in range(4) for s in read_megatron(tmp_path / "out" / "train" / f"shard-{k:05d}")[1]]
    assert got == [tok.encode(d, bos=True, eos=True) for d in docs]
