"""End to end through the command line: the launcher script, `lathe train`, `lathe tokenizer train`
and `lathe config-docs`, each run as a subprocess from a temporary working directory.

The subprocesses find this checkout through PYTHONPATH (as a `pip install -e .` would) and
`torchrun` through the bin folder of the running interpreter. The session-wide private cache
(tests/conftest.py sets LATHE_CACHE_DIR) is inherited, so no run touches the user's cache.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on 3.10 only
    import tomli as tomllib

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
ANSI = re.compile(r"\x1b\[[0-9;]*m")
TIMEOUT = 300  # generous: a shared 2-core machine can be slow; a normal run takes seconds


def env() -> dict[str, str]:
    e = dict(os.environ)
    for var in ("CONFIG_FILE", "NGPU", "LOG_RANK", "RANK", "WORLD_SIZE", "LOCAL_RANK"):
        e.pop(var, None)
    e["PYTHONPATH"] = os.pathsep.join([str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])])
    e["PATH"] = os.pathsep.join([str(BIN), os.environ.get("PATH", "")])
    return e


def lathe_cmd() -> list[str]:
    """The installed `lathe` console script if there is one, else `python -m lathe`."""
    script = shutil.which("lathe", path=str(BIN))
    return [script] if script else [sys.executable, "-m", "lathe"]


def run(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    cwd.mkdir(parents=True, exist_ok=True)
    return subprocess.run(args, cwd=cwd, env=env(), capture_output=True, text=True, timeout=TIMEOUT,
                          check=False)


def lathe(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return run([*lathe_cmd(), *args], cwd)


def show(p: subprocess.CompletedProcess) -> str:
    return f"exit {p.returncode}\n--- stdout ---\n{p.stdout}\n--- stderr ---\n{p.stderr}"


# A tiny version of every training run below.
SMALL = ["--training.seq_len", "64", "--training.batch_size", "2", "--metrics.log_freq", "1"]


@pytest.mark.slow
def test_run_train_sh_trains_debug_model_from_any_cwd(tmp_path):
    out, cwd = tmp_path / "out", tmp_path / "cwd"
    cwd.mkdir()
    e = env()
    e["NGPU"] = "1"
    p = subprocess.run(
        [str(REPO / "scripts" / "run_train.sh"), "--training.steps", "3", *SMALL,
         "--profiling.profile_freq", "2", "--job.dump_folder", str(out)],
        cwd=cwd, env=e, capture_output=True, text=True, timeout=TIMEOUT, check=False)
    assert p.returncode == 0, show(p)
    text = ANSI.sub("", p.stdout + p.stderr)  # debug_model.toml turns on colored console lines
    assert re.search(r"step:\s+1\s+loss:", text), show(p)
    assert "Traceback" not in text, show(p)
    assert list(cwd.iterdir()) == []  # everything went to the dump folder

    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert records[0]["event"] == "start"
    steps = [r for r in records if "step" in r]
    assert [r["step"] for r in steps] == [1, 2, 3]
    for r in steps:
        assert r["loss"] > 0 and r["wps"] > 0 and r["step_time"] > 0, r

    cfg = tomllib.loads((out / "config.toml").read_text())
    assert cfg["model"]["flavor"] == "debugmodel"  # from configs/debug_model.toml ...
    assert (cfg["training"]["steps"], cfg["training"]["seq_len"], cfg["training"]["batch_size"]) == (3, 64, 2)
    assert cfg["metrics"]["enable_tensorboard"] and cfg["profiling"]["enable_profiling"]

    assert list((out / "tb").glob("*/events.out.tfevents.*")), "no TensorBoard event file"
    trace = out / "profile_trace" / "iteration_2" / "rank0_trace.json"
    assert trace.is_file(), sorted(str(x.relative_to(out)) for x in out.rglob("*"))
    assert json.loads(trace.read_text())["traceEvents"]


@pytest.mark.parametrize(
    "args, option",
    [
        (["--training.batch_size", "0"], "training.batch_size"),
        (["--training.bogus", "1"], "training.bogus"),
        (["--model.tokenizer_path", "no/such/tokenizer.json"], "model.tokenizer_path"),
        (["--config", "no/such/config.toml"], "config_file"),
        (["--training.steps", "many"], "training.steps"),
    ],
    ids=["batch_size_0", "unknown_key", "missing_tokenizer", "missing_config_file", "not_an_int"],
)
def test_bad_option_is_one_error_line_and_exit_2(tmp_path, args, option):
    p = lathe("train", *args, "--job.dump_folder", str(tmp_path / "out"), cwd=tmp_path / "cwd")
    assert p.returncode == 2, show(p)
    lines = p.stderr.splitlines()
    assert len(lines) == 1, show(p)
    assert lines[0].startswith("lathe: error: "), show(p)
    assert option in lines[0], show(p)
    assert "Traceback" not in p.stdout + p.stderr
    assert not (tmp_path / "out").exists()  # refused before anything was written


def test_help_lists_options(tmp_path):
    p = lathe("train", "--help", cwd=tmp_path)
    assert p.returncode == 0, show(p)
    assert "--training.steps" in p.stdout
    assert "--optimizer.lr" in p.stdout


def test_print_config_is_toml_with_the_overrides(tmp_path):
    p = lathe("train", "--config", str(REPO / "configs" / "debug_model.toml"), "--print-config",
              "--training.seq_len", "128", "--optimizer.lr", "0.002", "--no-metrics.enable_tensorboard",
              cwd=tmp_path)
    assert p.returncode == 0, show(p)
    cfg = tomllib.loads(p.stdout)
    assert cfg["training"]["seq_len"] == 128
    assert cfg["optimizer"]["lr"] == 0.002
    assert cfg["metrics"]["enable_tensorboard"] is False
    assert cfg["training"]["batch_size"] == 8  # from the file
    assert cfg["model"]["flavor"] == "debugmodel"
    assert list(tmp_path.iterdir()) == []  # printing trains nothing, writes nothing


@pytest.mark.slow
def test_non_finite_loss_exits_3_with_a_clear_message(tmp_path):
    # A huge LR without clipping: the first AdamW step moves every weight by ~1e28, the next
    # forward overflows and the loss is NaN by step 3 (measured; 6 steps leave margin).
    p = lathe("train", "--training.steps", "6", *SMALL, "--optimizer.lr", "1e30",
              "--training.max_norm", "0", "--job.dump_folder", str(tmp_path / "out"), cwd=tmp_path / "cwd")
    assert p.returncode == 3, show(p)
    text = p.stdout + p.stderr
    assert re.search(r"lathe: error: loss or gradient became non-finite \(NaN or inf\) at step \d", p.stderr), show(p)
    assert "Traceback" not in text, show(p)


def test_tokenizer_train_writes_a_loadable_tokenizer(tmp_path):
    from lathe.data.tokenizer import load_tokenizer

    words = ["lathe", "tensor", "gradient", "optimizer", "token", "model", "train", "batch",
             "sequence", "norm", "attention", "layer", "weight", "decay", "warmup", "loss"]
    lines = [" ".join(words[(i * 7 + j * 3) % len(words)] for j in range(10)) for i in range(300)]
    text = tmp_path / "text.txt"
    text.write_text("\n".join(lines) + "\n")
    p = lathe("tokenizer", "train", str(text), "--vocab-size", "300", "--output",
              str(tmp_path / "tok.json"), cwd=tmp_path / "cwd")
    assert p.returncode == 0, show(p)
    tok = load_tokenizer(tmp_path / "tok.json")
    assert tok.vocab_size == 300
    ids = tok.encode("lathe tensor gradient", bos=True, eos=True)
    assert ids[0] == tok.bos_id and ids[-1] == tok.eos_id
    assert tok.decode(ids) == "lathe tensor gradient"


def test_config_docs_matches_committed_file(tmp_path):
    p = lathe("config-docs", cwd=tmp_path)
    assert p.returncode == 0, show(p)
    committed = (REPO / "docs" / "config.md").read_text()
    assert p.stdout == committed, \
        "docs/config.md is stale: regenerate it with `python -m lathe config-docs > docs/config.md`"


def test_trains_on_local_files_with_a_given_tokenizer_and_validation(tmp_path):
    """Issue 3's acceptance command: local files + an explicit tokenizer.json, with validation."""
    data = REPO / "tests" / "assets" / "data" / "tiny"
    tokenizer = REPO / "lathe" / "assets" / "tokenizer.json"
    out = tmp_path / "out"
    p = lathe("train", "--training.steps", "4", *SMALL, "--training.dataset_path", str(data),
              "--model.tokenizer_path", str(tokenizer), "--validation.enabled", "--validation.freq", "2",
              "--validation.steps", "1", "--job.dump_folder", str(out), cwd=tmp_path)
    assert p.returncode == 0, show(p)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "val_loss" in r] == [2, 4]
    assert all(r["val_perplexity"] > 1 for r in records if "val_loss" in r)
    assert "validation step 2: loss" in p.stdout
