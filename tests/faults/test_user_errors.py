"""Mistakes a user makes with input files and options, and W&B's environment variables.

Each mistake ends in exit 2 and one line on stderr naming the file or option and the fix (the
catalogue is docs/reliability.md). W&B runs use the real wandb package, offline, with HOME,
WANDB_DIR and the W&B server address pointing at temporary folders and a closed local port, so no
test can reach the network or read a real login.
"""

import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from lathe.data.indexed import HEADER, IndexedFile, IndexedWriter, TokenFileError
from lathe.data.sources import is_heldout

sys.path.insert(0, str(Path(__file__).parents[1] / "e2e"))
from test_observability import wandb_records  # noqa: E402

TINY = ["--model.flavor", "tiny", "--training.seq_len", "32", "--training.batch_size", "2",
        "--lr_scheduler.warmup_steps", "1", "--metrics.log_freq", "1"]
CLEAN_ENV = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_") and k != "NETRC"}


def run_cli(*args, env=None, timeout=300, **kw):
    env = {**CLEAN_ENV, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", **(env or {})}
    return subprocess.run([sys.executable, "-m", "lathe", *args], capture_output=True, text=True, timeout=timeout,
                          env=env, stdin=subprocess.DEVNULL, **kw)


def cli(capsys, *args) -> tuple[int, str, str]:
    """``lathe ARGS`` in this process (for commands that start nothing): exit code, stdout, stderr."""
    from lathe.cli import main

    code = main(list(args))
    out = capsys.readouterr()
    return code, out.out, out.err


def one_line(result) -> str:
    """An in-process ``cli`` result: exit 2 and exactly one line on stderr."""
    code, out, err = result
    assert code == 2, out[-2000:] + err[-2000:]
    lines = [x for x in err.splitlines() if x.strip()]
    assert len(lines) == 1 and lines[0].startswith("lathe: error: "), err[-2000:]
    return lines[0]


def one_error_line(proc) -> str:
    """The command failed with exit 2 and exactly one line on stderr, no traceback."""
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-3000:]
    lines = [x for x in proc.stderr.splitlines() if x.strip()]
    assert len(lines) == 1 and lines[0].startswith("lathe: error: "), proc.stderr[-3000:]
    assert "Traceback" not in proc.stdout + proc.stderr
    return lines[0]


def write_jsonl(path: Path, texts) -> Path:
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    return path


# --- config files and command-line options ----------------------------------------------------


def test_config_file_that_is_not_utf8(tmp_path):
    bad = tmp_path / "latin1.toml"
    bad.write_bytes('[job]\ndescription = "caf\xe9"\n'.encode("latin-1"))
    line = one_error_line(run_cli("train", "--config", str(bad)))
    assert "job.config_file" in line and "latin1.toml" in line and "not UTF-8" in line and "iconv" in line


@pytest.mark.parametrize("value", ["abc", "0"])
def test_launch_with_a_bad_process_count(tmp_path, capsys, value):
    line = one_line(cli(capsys, "launch", "--nproc-per-node", value, "--", *TINY, "--job.dump_folder",
                        str(tmp_path / "run")))
    assert f"--nproc-per-node={value!r}" in line and "auto, cpu or gpu" in line
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("content", ['{"config": 5}', "[]"])
def test_replay_of_a_run_json_that_is_not_a_manifest(tmp_path, capsys, content):
    run = tmp_path / "run"
    run.mkdir()
    (run / "run.json").write_text(content)
    line = one_line(cli(capsys, "replay", str(run)))
    assert "run.json is not a lathe run manifest" in line
    assert ("'config' is a number" if "config" in content else "holds a list") in line
    assert not (tmp_path / "run-replay").exists()


# --- data ------------------------------------------------------------------------------------


def test_jsonl_too_small_for_one_window(tmp_path):
    """1 short document: one epoch is fewer tokens than one sequence (was a traceback)."""
    data = write_jsonl(tmp_path / "tiny.jsonl", ["hello world"])
    line = one_error_line(run_cli("train", *TINY, "--training.steps", "1", "--training.dataset_path", str(data),
                                  "--job.dump_folder", str(tmp_path / "run")))
    assert line.startswith("lathe: error: training.dataset_path: dataset too small for seq_len=32")
    assert "smaller training.seq_len" in line


def test_three_short_documents_are_a_config_error_of_the_training_data(tmp_path):
    """The same with 3 documents, where training reads them (the loader's thread): a ConfigError
    naming the option, which the CLI prints as one line (above)."""
    from lathe.config import load_config
    from lathe.data import build_tokenizer, build_train_data
    from lathe.errors import ConfigError

    data = write_jsonl(tmp_path / "three.jsonl", ["hello world"] * 3)
    cfg, _ = load_config([*TINY, "--training.dataset_path", str(data)])
    loader = build_train_data(cfg, build_tokenizer(cfg), 0, 1)
    try:
        with pytest.raises(ConfigError) as e:
            next(iter(loader))
    finally:
        loader.close()
    assert e.value.option == "training.dataset_path"
    assert "one epoch has 24 tokens, but one window needs seq_len+1 = 33" in str(e.value)


def test_jsonl_whose_only_document_is_held_out(tmp_path):
    """The ~1% validation hold-out can take a 1-document file's only record: said as such (it
    was a traceback saying the dataset is empty)."""
    name = next(f"d{i}.jsonl" for i in range(10_000) if is_heldout(f"d{i}.jsonl", 0))
    data = write_jsonl(tmp_path / name, ["a long enough document " * 50])
    line = one_error_line(run_cli("train", *TINY, "--training.steps", "1", "--training.dataset_path", str(data),
                                  "--job.dump_folder", str(tmp_path / "run")))
    assert name in line and "held out for validation" in line and "add documents" in line


def test_data_prepare_output_that_is_a_file(tmp_path, capsys):
    data = write_jsonl(tmp_path / "d.jsonl", ["some text"] * 3)
    out = tmp_path / "out.bin"
    out.write_bytes(b"keep me")
    line = one_line(cli(capsys, "data", "prepare", str(data), "--output", str(out)))
    assert "--output=" in line and "is a file, not a folder" in line
    assert out.read_bytes() == b"keep me"


def test_tokenizer_train_on_files_without_text(tmp_path, capsys):
    empty, blank = tmp_path / "empty.txt", write_jsonl(tmp_path / "blank.jsonl", ["", "  "])
    empty.write_text("")
    out = tmp_path / "tok.json"
    line = one_line(cli(capsys, "tokenizer", "train", str(empty), str(blank), "--output", str(out)))
    assert "no text to train on" in line and "empty.txt" in line and "blank.jsonl" in line
    assert not out.exists()


def test_tokenizer_train_warns_about_an_empty_file_among_others(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    text = tmp_path / "text.txt"
    text.write_text("the quick brown fox jumps over the lazy dog\n" * 50)
    p = run_cli("tokenizer", "train", str(empty), str(text), "--vocab-size", "300", "--output", str(tmp_path / "t.json"))
    assert p.returncode == 0, p.stderr[-2000:]
    assert "1 of 2 files hold no text" in p.stdout and "empty.txt" in p.stdout


def _megatron(tmp_path: Path, lengths=(5, 7, 3, 9)) -> Path:
    w = IndexedWriter(tmp_path / "m.bin", tmp_path / "m.idx", "uint16")
    for n in lengths:
        w.add_document(np.arange(n))
    w.finish()
    return tmp_path / "m"


def _damage(prefix: Path, pointers=None, doc_index=None, lengths=None) -> None:
    """Overwrite entries of ``prefix.idx`` (4 sequences): {position: value}."""
    idx = Path(f"{prefix}.idx")
    b = bytearray(idx.read_bytes())
    S = 4
    for table, offset, fmt, size in ((lengths, HEADER.size, "<i", 4), (pointers, HEADER.size + 4 * S, "<q", 8),
                                     (doc_index, HEADER.size + 12 * S, "<q", 8)):
        for i, v in (table or {}).items():
            struct.pack_into(fmt, b, offset + size * i, v)
    idx.write_bytes(bytes(b))


@pytest.mark.parametrize("damage, words", [
    ({"pointers": {2: 22}}, "sequence 2 starts at byte 22, where sequence 1 (byte 10, 7 tokens) ends at byte 24: "
                            "the pointer overlaps"),
    ({"pointers": {1: 0}}, "sequence 1 starts at byte 0, where sequence 0 (byte 0, 5 tokens) ends at byte 10: "
                           "the pointer overlaps"),
    ({"pointers": {2: 8}}, "sequence 2 starts at byte 8, where sequence 1 (byte 10, 7 tokens) ends at byte 24: "
                           "the pointer runs backwards"),
    ({"pointers": {2: 26}}, "the pointer leaves a gap"),
    ({"lengths": {1: -1}}, "sequence 1 has a negative length (-1)"),
    ({"doc_index": {2: 9}}, "document index entry 2 is 9, outside the sequence count 4"),
    ({"doc_index": {1: 3, 2: 1}}, "document index entry 2 (1) is below the one before it (3)"),
])
def test_megatron_index_with_bad_pointers_or_document_indices(tmp_path, damage, words):
    prefix = _megatron(tmp_path)
    IndexedFile(prefix).close()  # the undamaged file opens
    _damage(prefix, **damage)
    with pytest.raises(TokenFileError) as e:
        IndexedFile(prefix)
    assert str(e.value).startswith(f"{prefix}.idx: ") and words in str(e.value)


def test_megatron_index_damage_is_one_line(tmp_path, capsys):
    """Through the data store that training and `lathe data info` open (it names the option)."""
    from lathe.data.store import open_store
    from lathe.errors import ConfigError

    prefix = _megatron(tmp_path, lengths=(40, 50, 60, 70))
    _damage(prefix, pointers={2: 100})
    line = one_line(cli(capsys, "data", "info", f"{prefix}.idx"))
    assert "m.idx: sequence 2 starts at byte 100" in line and "overlaps" in line
    with pytest.raises(ConfigError) as e:
        open_store(f"{prefix}.idx", "train", "training.dataset_path", "auto")
    assert e.value.option == "training.dataset_path" and "sequence 2 starts at byte 100" in str(e.value)


# --- W&B by its own conventions ----------------------------------------------------------------


def _no_network_env(tmp_path: Path, **extra) -> dict:
    home = tmp_path / "home"
    home.mkdir(exist_ok=True)
    # No login anywhere (a fresh HOME, no WANDB_API_KEY, no netrc) and a server on a closed port.
    return {"HOME": str(home), "WANDB_BASE_URL": "http://127.0.0.1:9", "WANDB_CONFIG_DIR": str(home / "wandb"),
            "WANDB_CACHE_DIR": str(home / "cache"), "WANDB_DATA_DIR": str(home / "data"), **extra}


def test_wandb_environment_variables_are_honoured_offline(tmp_path):
    """`WANDB_MODE=offline lathe train --metrics.enable_wandb` with no API key: the run trains and
    W&B writes it under $WANDB_DIR with $WANDB_PROJECT, $WANDB_NAME and $WANDB_RUN_GROUP."""
    wandb_dir = tmp_path / "wandb-dir"
    env = _no_network_env(tmp_path, WANDB_MODE="offline", WANDB_DIR=str(wandb_dir), WANDB_PROJECT="env-project",
                          WANDB_NAME="env-name", WANDB_RUN_GROUP="env-group")
    run = tmp_path / "run"
    p = run_cli("train", *TINY, "--training.steps", "2", "--metrics.enable_wandb", "--job.dump_folder", str(run),
                env=env)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    offline = list((wandb_dir / "wandb").glob("offline-run-*"))
    assert len(offline) == 1 and not (run / "wandb").exists()
    runs = [r.run for r in wandb_records(next(offline[0].glob("run-*.wandb"))) if r.WhichOneof("record_type") == "run"]
    assert runs and runs[0].project == "env-project" and runs[0].display_name == "env-name"
    assert runs[0].run_group == "env-group"
    losses = [json.loads(i.value_json) for r in wandb_records(next(offline[0].glob("run-*.wandb")))
              if r.WhichOneof("record_type") == "history" for i in r.history.item
              if (i.key or "/".join(i.nested_key)) == "loss"]
    ours = [json.loads(x)["loss"] for x in (run / "metrics.jsonl").read_text().splitlines() if '"loss"' in x]
    assert len(losses) == 2 and losses == pytest.approx(ours, rel=1e-12)


@pytest.mark.parametrize("how", ["env", "config"])
def test_wandb_online_without_an_api_key_is_one_line(tmp_path, how):
    """Online (by WANDB_MODE, or by the config, which wins over WANDB_MODE=offline) with no key:
    one line naming both fixes, before anything is written, and no wait on the network."""
    extra = ["--metrics.wandb_mode", "online"] if how == "config" else []
    env = _no_network_env(tmp_path, WANDB_MODE="online" if how == "env" else "offline")
    run = tmp_path / "run"
    p = run_cli("train", *TINY, "--training.steps", "1", "--metrics.enable_wandb", *extra, "--job.dump_folder",
                str(run), env=env, timeout=120)
    line = one_error_line(p)
    assert "W&B has no API key configured" in line and "wandb login" in line and "WANDB_MODE=offline" in line
    assert ("metrics.wandb_mode=online" if how == "config" else "WANDB_MODE=online") in line
    assert not run.exists()
