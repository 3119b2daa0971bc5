"""`scripts/run_memory_estimation.sh` (torchtitan's variables) and `lathe train
--memory_estimation.enabled`, as a user runs them: both print lathe estimate's report."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from test_cli import REPO, TIMEOUT, env  # noqa: E402

TINY = ["--model.flavor", "tiny", "--training.seq_len", "32", "--training.batch_size", "2"]


def test_run_memory_estimation_script(tmp_path):
    proc = subprocess.run([str(REPO / "scripts" / "run_memory_estimation.sh"), *TINY, "--device", "L40S"],
                          capture_output=True, text=True, timeout=TIMEOUT, cwd=tmp_path,
                          env={**env(), "NGPU": "2", "NNODES": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "world size 2 (dp_shard 2)" in proc.stdout
    assert "peak tensor memory" in proc.stdout and "L40S (48 GiB" in proc.stdout and "fits" in proc.stdout


def test_train_with_memory_estimation_enabled_estimates_instead(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "lathe", "train", *TINY, "--memory_estimation.enabled",
                           "--job.dump_folder", str(tmp_path / "out")],
                          capture_output=True, text=True, timeout=TIMEOUT, cwd=tmp_path, env={**env(), "WORLD_SIZE": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "lathe estimate: llama3 tiny, world size 1 (one process)" in proc.stdout
    assert not (tmp_path / "out").exists()  # nothing trained, nothing written
