"""Fault injection: what a damaged, crafted or misused file or folder does to a run.

Each case asserts the exit code, the one line the user sees, and what was kept. The catalogue of
faults and lathe's answers is docs/reliability.md. Runs use the tiny Llama (seq 32, batch 2) and a
checkpoint every 2 steps; a reference folder with checkpoints at steps 2 and 4 is trained once per
module and copied for each case.
"""

import json
import os
import pickle
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lathe.checkpoint.integrity import DamagedCheckpoint
from lathe.checkpoint.manager import complete_steps, inspect_checkpoint
from lathe.config import load_config
from lathe.trainer import train

BASE = ["--model.flavor", "tiny", "--training.seq_len", "32", "--training.batch_size", "2",
        "--optimizer.lr", "1e-3", "--lr_scheduler.warmup_steps", "2", "--metrics.log_freq", "1",
        "--checkpoint.enable_checkpoint", "--checkpoint.interval", "2"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def run_cli(*args, timeout=300, **kw):
    return subprocess.run([sys.executable, "-m", "lathe", *args], capture_output=True, text=True,
                          timeout=timeout, env=ENV, **kw)


def train_cli(folder, *extra, steps=4):
    return run_cli("train", *BASE, "--training.steps", str(steps), "--job.dump_folder", str(folder), *extra)


def one_error_line(proc) -> str:
    """The run failed with exit 2 and exactly one line on stderr, no traceback."""
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-3000:]
    lines = [x for x in proc.stderr.splitlines() if x.strip()]
    assert len(lines) == 1 and lines[0].startswith("lathe: error: "), proc.stderr[-3000:]
    assert "Traceback" not in proc.stdout + proc.stderr
    return lines[0]


def losses(folder) -> dict[int, float]:
    """Per-step losses from metrics.jsonl (a line cut short by a kill is ignored)."""
    rows = []
    for line in (Path(folder) / "metrics.jsonl").read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except ValueError:
            pass
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """A finished 4-step run with checkpoints step-2 and step-4, and its per-step losses."""
    folder = tmp_path_factory.mktemp("ref")
    cfg, _ = load_config([*BASE, "--training.steps", "4", "--job.dump_folder", str(folder)])
    result = train(cfg)
    assert complete_steps(folder / "checkpoint") == [2, 4]
    return folder, result.losses


@pytest.fixture
def run_dir(reference, tmp_path):
    folder = tmp_path / "run"
    shutil.copytree(reference[0], folder)
    (folder / "metrics.jsonl").unlink()
    return folder


class Evil:
    """A pickle that, when loaded, creates the marker file."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def plant_pickle(step_dir: Path, marker: Path) -> None:
    (step_dir / ".metadata").write_bytes(pickle.dumps(Evil(marker)))


# --- code execution ------------------------------------------------------------------------------

@pytest.mark.parametrize("verify", ["full", "off"])
def test_crafted_metadata_never_runs_on_resume(run_dir, reference, tmp_path, verify):
    """With checksums the planted file fails verification; without, the restricted unpickler
    refuses it. Either way: no code runs, loud fallback to step-2, and steps 3-4 equal the
    original run's."""
    marker = tmp_path / "PWNED"
    plant_pickle(run_dir / "checkpoint" / "step-4", marker)
    proc = train_cli(run_dir, "--checkpoint.verify", verify, steps=5)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert not marker.exists()
    assert "step-4/.metadata" in proc.stdout and "trying an earlier one" in proc.stdout
    if verify == "off":
        assert "refused to load" in proc.stdout
    resumed = losses(run_dir)
    assert sorted(resumed) == [3, 4, 5]
    for s in (3, 4):
        assert resumed[s] == pytest.approx(reference[1][s], rel=1e-6)


def test_crafted_metadata_never_runs_in_convert_or_initial_load(run_dir, tmp_path):
    marker = tmp_path / "PWNED"
    step = run_dir / "checkpoint" / "step-4"
    plant_pickle(step, marker)
    line = one_error_line(run_cli("convert", "lathe-to-hf", str(step), str(tmp_path / "hf")))
    assert "step-4/.metadata" in line
    (step / "manifest.json").unlink()  # an "old" checkpoint without checksums: the unpickler guards
    sidecar = json.loads((step / "train_state.json").read_text())
    sidecar["format_version"] = 1
    (step / "train_state.json").write_text(json.dumps(sidecar))
    line = one_error_line(train_cli(tmp_path / "other", "--checkpoint.initial_load_path", str(step)))
    assert "refused to load" in line and "checkpoint.initial_load_path" in line
    assert not marker.exists()


# --- silent damage -------------------------------------------------------------------------------

def test_bit_flips_anywhere_are_detected(reference, tmp_path):
    """8 flipped bytes at 12 offsets of the shard, the metadata and the sidecar: every one is
    reported naming the file, with full and with sampled verification (small files are always
    read whole; the tiny model's shard is one chunk, so sampled reads it whole too)."""
    src = reference[0] / "checkpoint" / "step-4"
    rng = random.Random(0)
    for name in ("__0_0.distcp", ".metadata", "train_state.json"):
        size = (src / name).stat().st_size
        for offset in [0, size - 8, *rng.sample(range(size - 8), 2)]:
            step = tmp_path / f"{name}-{offset}"
            shutil.copytree(src, step)
            with open(step / name, "r+b") as f:
                f.seek(offset)
                data = f.read(8)
                f.seek(offset)
                f.write(bytes(b ^ 0xFF for b in data))
            for mode in ("full", "sampled"):
                with pytest.raises(DamagedCheckpoint) as e:
                    inspect_checkpoint(step, mode)
                assert name in str(e.value) or "train_state.json" in str(e.value), (name, offset, str(e.value))
            shutil.rmtree(step)


def test_damaged_latest_falls_back_loudly_and_resumes_exactly(run_dir, reference):
    shard = run_dir / "checkpoint" / "step-4" / "__0_0.distcp"
    with open(shard, "r+b") as f:  # the reproduction: 8 bytes inside a shard
        f.seek(shard.stat().st_size // 2)
        data = f.read(8)
        f.seek(shard.stat().st_size // 2)
        f.write(bytes(b ^ 0x5A for b in data))
    proc = train_cli(run_dir, steps=4)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "checkpoint step-4 is damaged" in proc.stdout and "checksum mismatch" in proc.stdout
    assert "__0_0.distcp" in proc.stdout
    resumed = losses(run_dir)
    assert sorted(resumed) == [3, 4]
    assert all(resumed[s] == pytest.approx(reference[1][s], rel=1e-6) for s in resumed)


@pytest.mark.parametrize("damage", ["delete_metadata", "truncate_shard", "delete_manifest", "drop_sidecar_key"])
def test_missing_or_truncated_files_fall_back(run_dir, damage):
    step = run_dir / "checkpoint" / "step-4"
    if damage == "delete_metadata":
        (step / ".metadata").unlink()
    elif damage == "truncate_shard":
        with open(step / "__0_0.distcp", "r+b") as f:
            f.truncate(1000)
    elif damage == "delete_manifest":
        (step / "manifest.json").unlink()
    else:
        sidecar = json.loads((step / "train_state.json").read_text())
        del sidecar["lr_schedule"]
        (step / "train_state.json").write_text(json.dumps(sidecar))
    cfg, _ = load_config([*BASE, "--training.steps", "4", "--job.dump_folder", str(run_dir)])
    assert sorted(train(cfg).losses) == [3, 4]  # resumed from step-2


def test_on_damaged_error_stops_and_all_damaged_is_an_error(run_dir):
    (run_dir / "checkpoint" / "step-4" / ".metadata").unlink()
    line = one_error_line(train_cli(run_dir, "--checkpoint.on_damaged", "error"))
    assert "checkpoint.on_damaged" in line and "step-4/.metadata: missing" in line
    (run_dir / "checkpoint" / "step-2" / "train_state.json").write_text("{not json")
    line = one_error_line(train_cli(run_dir))
    assert "no usable checkpoint" in line and "all 2 are damaged" in line


# --- one run per folder --------------------------------------------------------------------------

def test_second_run_in_the_same_folder_refuses_and_the_first_is_unharmed(tmp_path):
    """The second run refuses in one line while the first trains with async saves; the first is
    then stopped by SIGTERM (a preemption save) so the test does not race its end."""
    folder = tmp_path / "shared"
    first = subprocess.Popen([sys.executable, "-m", "lathe", "train", *BASE, "--training.steps", "100000",
                              "--checkpoint.interval", "5", "--checkpoint.async_mode", "async",
                              "--job.dump_folder", str(folder)],
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=ENV)
    try:
        deadline = time.time() + 120
        while not (folder / "metrics.jsonl").exists() and time.time() < deadline:
            time.sleep(0.1)
        assert (folder / "lathe.lock").exists()
        line = one_error_line(train_cli(folder, steps=100000))
        assert "another run is using this folder" in line and f"pid {first.pid}" in line
        first.send_signal(signal.SIGTERM)
        out, _ = first.communicate(timeout=300)
    finally:
        if first.poll() is None:
            first.kill()
            first.wait()
    assert first.returncode == 75, out[-3000:]
    saved = complete_steps(folder / "checkpoint")
    logged = sorted(losses(folder))
    assert logged == list(range(1, logged[-1] + 1))  # the metrics hold one run only
    assert saved[-1] == logged[-1] and all(s % 5 == 0 for s in saved[:-1])
    for step in saved:
        inspect_checkpoint(folder / "checkpoint" / f"step-{step}", "full")
    assert not (folder / "lathe.lock").exists()  # released at exit


def test_stale_lock_is_reported_and_taken_over(run_dir):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    partial = run_dir / "checkpoint" / "step-6.partial-deadbeef"
    partial.mkdir()
    (run_dir / "lathe.lock").write_text(json.dumps({"host": socket.gethostname(), "pid": dead.pid,
                                                    "process_start": "1", "started": "yesterday"}))
    proc = train_cli(run_dir, steps=5)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"taking over the stale lock" in proc.stdout and f"process {dead.pid}" in proc.stdout
    assert not partial.exists()  # a dead run's partial save is removed by the lock's new owner


# --- the disk and the folder ---------------------------------------------------------------------

@pytest.fixture
def small_tmpfs(tmp_path):
    """A 12 MiB tmpfs: room for one 9.5 MB checkpoint of the tiny model, not two."""
    mount = tmp_path / "tmpfs"
    mount.mkdir()
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=12m", "tmpfs", str(mount)], capture_output=True)
    if proc.returncode != 0:
        pytest.skip(f"mounting a tmpfs needs root: {proc.stderr.decode().strip()}")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


@pytest.mark.parametrize("mode,steps", [("disabled", 4), ("async", 6)])
def test_disk_full_during_save_names_space_and_keeps_previous(small_tmpfs, reference, tmp_path, mode, steps):
    """12 MiB holds one 9.5 MB checkpoint, not two: the second save (step 4; in async mode a
    background one, reported when the next save waits for it) fails with one line naming the
    folder, the bytes needed and free; step-2 stays intact and verifies; moved to a disk with
    room, the run resumes from it and continues exactly."""
    folder = small_tmpfs / "run"
    proc = train_cli(folder, "--checkpoint.async_mode", mode, steps=steps)
    line = one_error_line(proc)
    assert "disk full while writing checkpoint step-4" in line and "GiB free" in line
    assert "step-2 is intact" in line and str(folder / "checkpoint") in line
    assert complete_steps(folder / "checkpoint") == [2]
    assert not [p for p in (folder / "checkpoint").iterdir() if ".partial-" in p.name]
    inspect_checkpoint(folder / "checkpoint" / "step-2", "full")  # intact
    roomy = tmp_path / "roomy"
    shutil.copytree(folder, roomy)
    (roomy / "metrics.jsonl").unlink()
    rerun = train_cli(roomy, "--checkpoint.async_mode", mode, steps=4)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert losses(roomy) == pytest.approx({s: reference[1][s] for s in (3, 4)}, rel=1e-6)


def test_a_background_save_is_committed_as_soon_as_it_is_written(tmp_path):
    """An async save becomes a complete checkpoint when its files are on disk, not at the next
    save: a kill -9 between the two keeps it."""
    folder = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "lathe", "train", *BASE, "--training.steps", "100000",
                             "--checkpoint.interval", "20", "--checkpoint.async_mode", "async",
                             "--job.dump_folder", str(folder)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=ENV)
    try:
        for line in proc.stdout:
            if "checkpoint step 20: committed" in line:
                break
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    assert max(losses(folder)) < 40  # killed before the next save could have committed anything
    assert complete_steps(folder / "checkpoint") == [20]
    inspect_checkpoint(folder / "checkpoint" / "step-20", "full")


def test_dump_folder_that_is_a_file_or_read_only(tmp_path):
    (tmp_path / "afile").write_text("x")
    line = one_error_line(train_cli(tmp_path / "afile"))
    assert "job.dump_folder" in line and "is a file" in line
    ro = tmp_path / "ro"
    ro.mkdir()
    if subprocess.run(["mount", "--bind", "-o", "ro", str(ro), str(ro)], capture_output=True).returncode == 0:
        try:
            line = one_error_line(train_cli(ro))
            assert "cannot write there: Read-only file system" in line
        finally:
            subprocess.run(["umount", "-l", str(ro)], check=False)
    else:  # without mount rights, an immutable folder (chattr +i) makes the same point
        subprocess.run(["chattr", "+i", str(ro)], check=True)
        try:
            line = one_error_line(train_cli(ro))
            assert "cannot write there" in line
        finally:
            subprocess.run(["chattr", "-i", str(ro)], check=False)


# --- a different model ---------------------------------------------------------------------------

@pytest.mark.parametrize("norm", ["layernorm", "np_layernorm"])
def test_resume_into_a_different_model_is_refused(run_dir, norm):
    line = one_error_line(train_cli(run_dir, "--model.norm_type", norm, steps=6))
    assert "holds a different model" in line and f"norm_type: checkpoint 'rmsnorm' vs config '{norm}'" in line


def test_initial_load_into_a_different_model_needs_the_flag(reference, tmp_path):
    step = str(reference[0] / "checkpoint" / "step-4")
    line = one_error_line(train_cli(tmp_path / "a", "--checkpoint.initial_load_path", step,
                                    "--model.rope_scaling", "llama3.1", steps=1))
    assert "rope_scaling" in line and "initial_load_allow_model_change" in line
    proc = train_cli(tmp_path / "b", "--checkpoint.initial_load_path", step, "--model.rope_scaling", "llama3.1",
                     "--checkpoint.initial_load_allow_model_change", steps=1)
    assert proc.returncode == 0 and "loading" in proc.stdout and "into a different model" in proc.stdout


# --- bad input -----------------------------------------------------------------------------------

def test_steps_below_the_resumed_step_and_a_finished_run(run_dir):
    line = one_error_line(train_cli(run_dir, steps=1))
    assert "training.steps=1" in line and "at step 4" in line
    proc = train_cli(run_dir, steps=4)
    assert proc.returncode == 0 and "nothing to train: the run is complete at step 4" in proc.stdout


def test_absurd_seq_len(tmp_path):
    line = one_error_line(run_cli("train", "--training.seq_len", "1000000000000", "--job.dump_folder",
                                  str(tmp_path)))
    assert "training.seq_len" in line and "GiB" in line


def test_empty_data_folder_is_an_error_and_stays_empty(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    line = one_error_line(train_cli(tmp_path / "run", "--training.dataset_path", str(data)))
    assert "folder holds no data files" in line
    assert list(data.iterdir()) == []


def test_all_empty_documents_are_an_error(tmp_path):
    data = tmp_path / "empty.jsonl"
    data.write_text("".join(json.dumps({"text": ""}) + "\n" for _ in range(50)))
    line = one_error_line(train_cli(tmp_path / "run", "--training.dataset_path", str(data)))
    assert "are all empty" in line


def test_corrupt_parquet_is_one_line(tmp_path):
    bad = tmp_path / "data.parquet"
    bad.write_bytes(b"PAR1" + os.urandom(2000))
    line = one_error_line(train_cli(tmp_path / "run", "--training.dataset_path", str(bad)))
    assert "data.parquet" in line and "not a readable parquet file" in line


def test_truncated_gzip_skips_the_rest_of_the_file_with_a_warning(tmp_path):
    import gzip

    docs = "".join(json.dumps({"text": f"document number {i} " * 20}) + "\n" for i in range(30))
    whole = gzip.compress(docs.encode())
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "a.jsonl.gz").write_bytes(whole[: len(whole) // 2])
    proc = run_cli("train", "--model.flavor", "tiny", "--training.seq_len", "32", "--training.batch_size", "2",
                   "--training.steps", "12", "--training.dataset_path", str(tmp_path / "d"),
                   "--job.dump_folder", str(tmp_path / "run"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "skipping undecodable record a.jsonl.gz" in proc.stdout and "the rest of it is skipped" in proc.stdout


# --- kill -9 at random moments -------------------------------------------------------------------

TRIALS = 10


@pytest.fixture(scope="module")
def straight_12(tmp_path_factory):
    folder = tmp_path_factory.mktemp("straight")
    cfg, _ = load_config([*BASE, "--training.steps", "12", "--job.dump_folder", str(folder)])
    return train(cfg).losses


@pytest.mark.parametrize("trial", range(TRIALS))
def test_kill_9_at_a_random_moment_resumes_bitwise(tmp_path, straight_12, trial):
    """SIGKILL at a random offset into a run saving every 2 steps (sync or async, alternating);
    the rerun resumes from whatever is committed and every step's loss equals the straight run's
    (to 1e-6 relative: bitwise but for MKL's rare last-ulp alignment effect, tests/parallel/
    test_checkpoint.py explains)."""
    rng = random.Random(trial)
    mode = ("disabled", "async")[trial % 2]
    folder = tmp_path / "run"
    cmd = [sys.executable, "-m", "lathe", "train", *BASE, "--training.steps", "12", "--job.dump_folder",
           str(folder), "--checkpoint.async_mode", mode]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=ENV)
    try:  # wait for training to start, then kill after a random number of further steps' time
        deadline = time.time() + 120
        while not (folder / "metrics.jsonl").exists() and time.time() < deadline and proc.poll() is None:
            time.sleep(0.02)
        time.sleep(rng.uniform(0.0, 2.5))
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    # the rerun in this process (a subprocess would start Python and torch again: seconds per trial)
    cfg, _ = load_config([*BASE, "--training.steps", "12", "--job.dump_folder", str(folder),
                          "--checkpoint.async_mode", mode])
    train(cfg)
    got = losses(folder)
    assert max(got) == 12
    for step, loss in got.items():  # the killed run's steps and the resumed ones alike
        assert loss == pytest.approx(straight_12[step], rel=1e-6, abs=0), (step, loss, straight_12[step])
