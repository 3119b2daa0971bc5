"""Runs in metrics.jsonl (issue 23, item 7; issue 24): every record names its run and attempt, a
folder holding several runs is plotted and compared run by run, the starts of one resumed run are
one curve, a preempted-and-resumed run compares equal to an uninterrupted one (per-step values),
`lathe compare` draws a picture only when asked, and a metrics.jsonl that is not UTF-8 is one error
line (exit 2).

The training runs are real (tiny model, 8 steps, in this process); the preemption is the real
SIGTERM path (the trainer's signal handler, a checkpoint at the step, then Preempted).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from lathe import cli
from lathe.checkpoint.preemption import Preempted
from lathe.config import load_config
from lathe.metrics import processor as P
from lathe.metrics.compare import compare_runs, summary
from lathe.metrics.history import read_history, read_runs
from lathe.metrics.plot import plot_runs
from lathe.trainer import train

BASE = ["--model.flavor", "tiny", "--training.seq_len", "32", "--training.batch_size", "2",
        "--lr_scheduler.warmup_steps", "2", "--metrics.log_freq", "3", "--training.steps", "8",
        "--checkpoint.enable_checkpoint", "--checkpoint.interval", "4"]


def rows(folder: Path) -> list[dict]:
    return [json.loads(x) for x in (folder / "metrics.jsonl").read_text().splitlines()]


def run(folder: Path, *extra: str, preempt_at: int | None = None, monkeypatch=None):
    cfg, _ = load_config([*BASE, "--job.dump_folder", str(folder), *extra])
    if preempt_at is None:
        return train(cfg)
    real_step = P.MetricsProcessor.step

    def step(self, n, *a, **kw):  # the scheduler's SIGTERM, as the step finishes
        if n == preempt_at:
            os.kill(os.getpid(), signal.SIGTERM)
        return real_step(self, n, *a, **kw)

    monkeypatch.setattr(P.MetricsProcessor, "step", step)
    with pytest.raises(Preempted):
        train(cfg)
    monkeypatch.setattr(P.MetricsProcessor, "step", real_step)


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    folder = tmp_path_factory.mktemp("straight")
    run(folder)
    return folder


def test_preempted_and_resumed_run_compares_equal_and_a_changed_step_does_not(straight, tmp_path, monkeypatch):
    import shutil

    resumed, changed = tmp_path / "resumed", tmp_path / "changed"
    run(resumed, preempt_at=5, monkeypatch=monkeypatch)
    shutil.copytree(resumed, changed)  # the same preemption, resumed on other data from step 6
    run(resumed)  # resumes from the step-5 checkpoint
    records = [r for r in rows(resumed) if "step" in r]
    assert len({r["run_id"] for r in rows(resumed)}) == 1  # one run ...
    assert len({r["attempt"] for r in rows(resumed)}) == 2  # ... started twice
    starts = [r for r in rows(resumed) if r.get("event") == "start"]
    assert [s["resumed_from"] for s in starts] == [0, 5]
    # The window average after the resume covers step 6 only, the straight run's steps 4 to 6:
    six = [r for r in records if r["step"] == 6][-1]
    assert six["loss_steps"] == 1 and [r for r in rows(straight) if r.get("step") == 6][0]["loss_steps"] == 3

    cmp = compare_runs(str(straight), str(resumed))
    text, code = summary(cmp, assert_equal=True)
    assert code == 0 and cmp.metrics == ["step_loss", "grad_norm"] and cmp.steps == [1, 3, 6], text
    cmp = compare_runs(str(straight), str(resumed), ["loss"])  # the averages: step 6 is not comparable
    text, code = summary(cmp, assert_equal=True)
    assert code == 0 and cmp.uncomparable == {"loss": [6]} and "1 steps not compared" in text, text

    run(changed, "--training.skip_batches", "6")
    cmp = compare_runs(str(straight), str(changed))
    text, code = summary(cmp, assert_equal=True)
    assert code == 1 and cmp.first_bad == {"step_loss": 6, "grad_norm": 6} and "DIFFERENT" in text, text


def test_a_new_run_in_an_old_folder_is_a_separate_curve(straight, tmp_path):
    import shutil

    from PIL import Image
    import numpy as np

    folder = tmp_path / "outputs"
    shutil.copytree(straight, folder)
    shutil.rmtree(folder / "checkpoint")  # no checkpoint: a new run, appended to the same metrics.jsonl
    run(folder, "--optimizer.lr", "1e-3")
    runs = read_runs(folder)
    assert len(runs) == 2 and runs[0].run_id != runs[1].run_id
    assert [r.label for r in runs] == [f"outputs run {i} ({r.run_id[:8]})" for i, r in zip((1, 2), runs)]
    assert all(r.steps("step_loss") == [1, 3, 6] for r in runs)
    assert read_history(folder).run_id == runs[1].run_id  # a folder's latest run
    png = plot_runs([str(folder)], tmp_path / "p.png", ["loss"], smooth=0)
    px = np.asarray(Image.open(png).convert("RGB"), dtype=np.int32)
    for rgb in ((31, 119, 180), (255, 127, 14)):  # two runs: matplotlib's C0 and C1
        assert (np.abs(px - np.array(rgb)).sum(axis=2) < 40).sum() > 300, rgb
    cmp = compare_runs(str(straight), str(folder))
    assert cmp.b.run_id == runs[1].run_id and "B holds 2 runs; comparing its latest" in summary(cmp, False)[0]


def test_files_without_run_ids_still_plot_and_split_at_fresh_starts(tmp_path):
    def rec(step, loss):
        return {"step": step, "loss": loss, "grad_norm": 1.0, "lr": 1e-3}

    start = {"event": "start", "device": "cpu"}
    lines = [start, rec(1, 5.0), rec(2, 4.0), start, rec(3, 3.5), rec(4, 3.0),  # a resume: one run
             start, rec(1, 6.0), rec(2, 5.5)]  # step 1 again: a new run in the folder
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    runs = read_runs(tmp_path)
    assert [r.steps("loss") for r in runs] == [[1, 2, 3, 4], [1, 2]]
    assert [len(r.events) for r in runs] == [2, 1] and runs[1].series["loss"][1] == 6.0
    assert plot_runs([str(tmp_path)], tmp_path / "old.png", ["loss"]).stat().st_size > 10_000


def test_compare_writes_a_picture_only_when_asked(straight, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert cli.main(["compare", str(straight), str(straight), "--assert-equal"]) == 0
    assert "SAME" in capsys.readouterr().out and list(tmp_path.iterdir()) == []
    assert cli.main(["compare", str(straight), str(straight), "--output", "c.svg"]) == 0
    assert (tmp_path / "c.svg").stat().st_size > 10_000


@pytest.mark.parametrize("command", ["plot", "compare"])
def test_a_metrics_file_that_is_not_utf8_is_one_line_exit_2(tmp_path, command):
    (tmp_path / "metrics.jsonl").write_bytes(json.dumps({"step": 1, "loss": 2.0}).encode() + b"\n\xff\xfe\x00garbage\n")
    args = [str(tmp_path)] * (2 if command == "compare" else 1)
    p = subprocess.run([sys.executable, "-m", "lathe", command, *args], capture_output=True, text=True, timeout=120,
                       cwd=tmp_path)
    lines = [x for x in p.stderr.splitlines() if x.strip()]
    assert p.returncode == 2 and len(lines) == 1 and "Traceback" not in p.stderr + p.stdout, p.stderr
    assert "line 2 is not UTF-8" in lines[0] and "metrics.jsonl" in lines[0]
