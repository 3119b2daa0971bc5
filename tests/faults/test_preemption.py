"""Fault injection: a preemption signal (SIGTERM, SIGUSR1) at any moment is never lost.

Whenever it comes — start-up, model build, checkpoint load, the first (compiling) step, a save,
after the last step; in the launcher before any worker exists, or while a worker has no handler
yet — the run ends with exit code 75 and run.json says so, and what was saved is complete (a
checkpoint at the current step, or none new when the signal came before training). Each case
asserts the exit code, the one line, and what was kept.

Stages are hit deterministically with ``LATHE_TEST_PAUSE_AT`` (lathe/checkpoint/preemption.py):
the process waits at the stage until it is signalled. The single-process cases run ``lathe
train`` in this process (the test signals itself from a thread); one runs as a real subprocess,
and ``lathe launch`` runs with 2 workers, once paused and once with real timing.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest

from lathe import cli
from lathe.checkpoint.manager import complete_steps, inspect_checkpoint

REPO = Path(__file__).resolve().parents[2]
BASE = ["--model.flavor", "tiny", "--training.seq_len", "32", "--training.batch_size", "2",
        "--optimizer.lr", "1e-3", "--lr_scheduler.warmup_steps", "2", "--metrics.log_freq", "1",
        "--checkpoint.enable_checkpoint", "--checkpoint.interval", "2"]
ENV = {**{k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LATHE_LAUNCH_DIR")},
       "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1",
       "PYTHONPATH": os.pathsep.join([str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])])}


def logged_steps(folder: Path) -> list[int]:
    path = folder / "metrics.jsonl"
    rows = [json.loads(x) for x in path.read_text().splitlines()] if path.exists() else []
    return [r["step"] for r in rows if "loss" in r]


def run_json(folder: Path) -> dict:
    return json.loads((folder / "run.json").read_text())


def wait_for(path: Path, timeout=180, proc=None) -> None:
    deadline = time.time() + timeout
    while not path.exists():
        assert time.time() < deadline, f"{path} never appeared"
        assert proc is None or proc.poll() is None, f"exited {proc.returncode} before {path.name}"
        time.sleep(0.02)


def train_signalled_at(stage: str, folder: Path, tmp_path: Path, monkeypatch, *extra, steps=4,
                       sig=signal.SIGTERM) -> int:
    """``lathe train`` in this process, paused at ``stage`` until a thread sends ``sig``."""
    pause = tmp_path / f"pause-{stage}"
    pause.mkdir()
    monkeypatch.setenv("LATHE_TEST_PAUSE_AT", stage)
    monkeypatch.setenv("LATHE_TEST_PAUSE_DIR", str(pause))
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LATHE_LAUNCH_DIR"):
        monkeypatch.delenv(name, raising=False)

    def signal_when_paused():
        wait_for(pause / f"{stage}.rank0", timeout=300)
        os.kill(os.getpid(), sig)

    thread = threading.Thread(target=signal_when_paused, daemon=True)
    thread.start()
    code = cli.main(["train", *BASE, "--training.steps", str(steps), "--job.dump_folder", str(folder), *extra])
    thread.join(timeout=5)
    assert (pause / f"{stage}.rank0").exists()
    monkeypatch.delenv("LATHE_TEST_PAUSE_AT")
    return code


# stage -> the checkpoints there are after it (3 steps, a checkpoint every 2 steps)
BEFORE_TRAINING = {"start": [], "build": []}
IN_TRAINING = {"step": [1], "save": [2, 3], "end": [2, 3]}


@pytest.mark.parametrize("stage", [*BEFORE_TRAINING, *IN_TRAINING])
def test_a_signal_at_any_stage_of_a_single_process_exits_75(tmp_path, monkeypatch, capfd, stage):
    """start/build: nothing trained, nothing saved, still 75 (a requeue starts from the start);
    step: the first step (compiling) is finished and saved; save: the signal during the step-2
    save is answered at step 3 (the last: saved once); end: after the last step the run is
    complete, and still 75."""
    folder = tmp_path / "run"
    code = train_signalled_at(stage, folder, tmp_path, monkeypatch, steps=3)
    out, err = capfd.readouterr()
    assert code == 75, out[-3000:] + err[-3000:]
    assert "lathe: received SIGTERM: stopping at the next step boundary" in err
    expected = {**BEFORE_TRAINING, **IN_TRAINING}[stage]
    assert complete_steps(folder / "checkpoint") == expected
    for step in expected:
        inspect_checkpoint(folder / "checkpoint" / f"step-{step}", "full")
    record = run_json(folder)
    assert record["exit_code"] == 75 and record["end_time"]
    if stage == "end":
        assert record["status"] == "completed" and logged_steps(folder) == [1, 2, 3]
        assert "received a preemption signal after the last step: the run is complete; exiting with code 75" in out
    else:
        assert record["status"] == "preempted"
        trained = expected[-1] if expected else 0
        assert logged_steps(folder) == list(range(1, trained + 1))
        saved = "saved a checkpoint at step" if expected else "stopped without writing a checkpoint"
        assert f"preempted{'' if expected else ' at step 0'}" in out and saved in out and "exiting with code 75" in out
    assert not (folder / "lathe.lock").exists()
    if stage == "step":  # nothing lost: the rerun trains exactly the missing steps
        assert cli.main(["train", *BASE, "--training.steps", "3", "--job.dump_folder", str(folder)]) == 0
        assert logged_steps(folder) == [1, 2, 3] and complete_steps(folder / "checkpoint") == [1, 2, 3]
        assert run_json(folder)["previous_runs"][-1]["status"] == "preempted"


def test_a_signal_during_the_checkpoint_load_of_a_resume(tmp_path, monkeypatch, capfd):
    """SIGUSR1 while resuming from step 2: the load finishes, nothing new is saved, 75; the
    next rerun resumes from step 2 again."""
    folder = tmp_path / "run"
    assert cli.main(["train", *BASE, "--training.steps", "2", "--job.dump_folder", str(folder)]) == 0
    code = train_signalled_at("load", folder, tmp_path, monkeypatch, steps=4, sig=signal.SIGUSR1)
    out, err = capfd.readouterr()
    assert code == 75, out[-3000:] + err[-3000:]
    assert "preempted at step 2: stopped without writing a checkpoint" in out
    assert complete_steps(folder / "checkpoint") == [2] and logged_steps(folder) == [1, 2]
    assert run_json(folder)["status"] == "preempted" and run_json(folder)["exit_code"] == 75


def test_checkpointing_off_a_signal_still_exits_75(tmp_path, monkeypatch, capfd):
    folder = tmp_path / "run"
    code = train_signalled_at("step", folder, tmp_path, monkeypatch, "--no-checkpoint.enable_checkpoint")
    out, err = capfd.readouterr()
    assert code == 75, out[-3000:] + err[-3000:]
    assert "preempted at step 1: stopped without writing a checkpoint" in out
    assert not (folder / "checkpoint").exists() and logged_steps(folder) == [1]
    assert run_json(folder)["status"] == "preempted"


def test_sigterm_to_lathe_train_before_the_loop_exits_75_not_143(tmp_path):
    """A real process (the handler is installed before torch is imported), signalled while it
    builds the model: exit 75 (it was 143: the handler only existed during the loop)."""
    folder, pause = tmp_path / "run", tmp_path / "pause"
    pause.mkdir()
    proc = subprocess.Popen([sys.executable, "-m", "lathe", "train", *BASE, "--training.steps", "4",
                             "--job.dump_folder", str(folder)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env={**ENV, "LATHE_TEST_PAUSE_AT": "build", "LATHE_TEST_PAUSE_DIR": str(pause)})
    try:
        wait_for(pause / "build.rank0", proc=proc)
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 75, out[-3000:] + err[-3000:]
    assert "Traceback" not in out + err
    assert run_json(folder)["status"] == "preempted" and not (folder / "lathe.lock").exists()


# --- lathe launch, 2 workers ----------------------------------------------------------------------

LAUNCH = [sys.executable, "-m", "lathe", "launch", "--nproc-per-node", "2", "--rdzv-backend", "c10d",
          "--rdzv-endpoint", "localhost:0"]


def launch(folder: Path, pause_env: dict, steps=100000) -> subprocess.Popen:
    return subprocess.Popen([*LAUNCH, "--", *BASE, "--training.steps", str(steps), "--job.dump_folder", str(folder)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**ENV, **pause_env},
                            start_new_session=True)


def finish(proc: subprocess.Popen, timeout=180) -> tuple[str, str]:
    try:
        return proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def test_launcher_signalled_before_any_worker_exists(tmp_path):
    pause = tmp_path / "pause"
    pause.mkdir()
    proc = launch(tmp_path / "run", {"LATHE_TEST_PAUSE_AT": "launcher-start", "LATHE_TEST_PAUSE_DIR": str(pause)})
    try:
        wait_for(pause / "launcher-start.rank0", proc=proc)
        proc.send_signal(signal.SIGTERM)
    finally:
        out, err = finish(proc)
    assert proc.returncode == 75, out[-3000:] + err[-3000:]
    assert "received SIGTERM before any worker started: nothing to save; exit code 75" in err
    assert not (tmp_path / "run").exists()


def test_launcher_signalled_while_a_worker_has_no_handler_yet(tmp_path):
    """Rank 1 waits before installing its handler; SIGTERM to the launcher then. The launcher
    signals only rank 0 (rank 1 would have died of it) and leaves the marker rank 1 reads: both
    stop alike before training, the launcher exits 75 (it exited 0, the workers training on)."""
    pause, folder = tmp_path / "pause", tmp_path / "run"
    pause.mkdir()
    proc = launch(folder, {"LATHE_TEST_PAUSE_AT": "before-handlers", "LATHE_TEST_PAUSE_RANK": "1",
                           "LATHE_TEST_PAUSE_DIR": str(pause)})
    try:
        wait_for(pause / "before-handlers.rank1", proc=proc)
        proc.send_signal(signal.SIGTERM)
    finally:
        out, err = finish(proc)
    assert proc.returncode == 75, out[-3000:] + err[-3000:]
    text = out + err
    assert "lathe launch: received SIGTERM: telling the workers to save and stop" in err
    assert "lathe launch received SIGTERM before this worker started" in text
    assert "lathe launch: preempted (received SIGTERM): every rank stopped at step 0 with nothing new to save; " \
           "exit code 75" in err, err[-3000:]
    assert "exiting with code 0 to lathe launch, which exits 75 (preempted)" in text
    assert "Traceback" not in text and "exit code 0)" not in text
    assert logged_steps(folder) == [] and complete_steps(folder / "checkpoint") == []
    assert run_json(folder)["status"] == "preempted" and run_json(folder)["exit_code"] == 75


def test_launcher_signalled_at_a_real_moment_of_start_up(tmp_path):
    """As reported: SIGTERM to `lathe launch` while its workers are starting (both worker
    processes exist, half a second later: importing torch, or a little further on a quiet machine),
    real timing, no pause: 75, and whatever was saved is complete and at the last logged step."""
    folder = tmp_path / "run"
    proc = launch(folder, {})
    try:
        deadline = time.time() + 120
        while len(psutil.Process(proc.pid).children()) < 2:
            assert time.time() < deadline and proc.poll() is None, "the workers never started"
            time.sleep(0.01)
        time.sleep(0.5)
        proc.send_signal(signal.SIGTERM)
    finally:
        out, err = finish(proc)
    assert proc.returncode == 75, out[-3000:] + err[-3000:]
    assert "lathe launch: preempted (received SIGTERM)" in err and "Traceback" not in out + err, err[-3000:]
    saved, logged = complete_steps(folder / "checkpoint"), logged_steps(folder)
    assert saved == logged[-1:], (saved, logged)  # nothing trained and unsaved
    assert run_json(folder)["status"] == "preempted" and run_json(folder)["exit_code"] == 75
    assert not [p for p in psutil.process_iter(["cmdline"]) if str(folder) in " ".join(p.info["cmdline"] or [])]
