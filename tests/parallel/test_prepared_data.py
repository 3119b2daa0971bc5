"""Training from a prepared store (``lathe data prepare``) is training on the same data.

- one process and FSDP x 2: the prepared run trains on the same token windows as the run that
  tokenizes on the fly (the sha256 of every window of every step is compared), so its losses and
  validation loss are the same. Two runs of the same computation can still differ in the last bit
  (MKL's float32 kernels round differently with a different memory alignment; see
  test_checkpoint.py), so losses are compared to 1e-6 relative, and windows exactly.
- elastic resume on a prepared store: 2 steps on DP 4 (FSDP), resumed for 2 steps on DP 2, then 2
  on one process, with the same global batch: the windows of every global step are those of an
  uninterrupted run.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from lathe.config import load_config
from lathe.data.prepare import prepare
from lathe.trainer import train

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))
import token_worker  # noqa: E402
from worker import load_result  # noqa: E402

DATA = HERE.parent / "assets" / "data" / "tiny"
BASE = ["--model.flavor", "tiny", "--training.seq_len", "32", "--optimizer.lr", "1e-3",
        "--lr_scheduler.warmup_steps", "2", "--metrics.log_freq", "1", "--training.mixed_precision_param", "float32",
        "--training.mixed_precision_reduce", "float32", "--training.shuffle_buffer", "8"]
VALIDATE = ["--validation.enabled", "--validation.freq", "1000", "--validation.steps", "2"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    out = tmp_path_factory.mktemp("prepared") / "tiny"
    prepare([str(DATA)], str(out), workers=0, docs_per_shard=50, progress=False)
    return out


def run_local(folder: Path, data: Path, *extra: str, steps: int = 5, batch: int = 4):
    cfg, _ = load_config([*BASE, "--training.dataset_path", str(data), "--training.steps", str(steps),
                          "--training.batch_size", str(batch), "--job.dump_folder", str(folder), *extra])
    original = token_worker.lathe.trainer.build_train_data
    token_worker.lathe.trainer.build_train_data = token_worker.recording_build_train_data
    try:
        result = train(cfg)
    finally:
        token_worker.lathe.trainer.build_train_data = original
    logged = [json.loads(x) for x in (folder / "metrics.jsonl").read_text().splitlines()]
    return result.losses, next((r["val_loss"] for r in logged if "val_loss" in r), None)


def run_torchrun(nproc: int, folder: Path, data: Path, *extra: str, steps: int = 5, batch: int = 2) -> dict:
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--rdzv_backend=c10d",
           "--rdzv_endpoint=localhost:0", str(HERE / "token_worker.py"), *BASE, "--training.dataset_path", str(data),
           "--training.steps", str(steps), "--training.batch_size", str(batch), "--job.dump_folder", str(folder),
           "--parallelism.dp_shard", str(nproc), *extra]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=ENV)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return load_result(folder)


def close(a: float, b: float) -> bool:
    return a == pytest.approx(b, rel=1e-6, abs=0)


def test_single_process_prepared_equals_on_the_fly(tmp_path, prepared):
    fly_losses, fly_val = run_local(tmp_path / "fly", DATA, *VALIDATE)
    prep_losses, prep_val = run_local(tmp_path / "prep", prepared, *VALIDATE)
    assert token_worker.read_windows(tmp_path / "prep", 1) == token_worker.read_windows(tmp_path / "fly", 1)
    assert sorted(prep_losses) == list(range(1, 6))
    assert all(close(prep_losses[s], fly_losses[s]) for s in fly_losses), (prep_losses, fly_losses)
    assert close(prep_val, fly_val)


def test_fsdp2_prepared_equals_on_the_fly(tmp_path, prepared):
    fly = run_torchrun(2, tmp_path / "fly", DATA, *VALIDATE)
    prep = run_torchrun(2, tmp_path / "prep", prepared, *VALIDATE)
    assert token_worker.read_windows(tmp_path / "prep", 2) == token_worker.read_windows(tmp_path / "fly", 2)
    assert sorted(prep["losses"]) == list(range(1, 6))
    assert all(close(prep["losses"][s], fly["losses"][s]) for s in fly["losses"])
    assert close(prep["val_losses"][5], fly["val_losses"][5])


def test_elastic_resume_dp4_dp2_dp1_on_a_prepared_store(tmp_path, prepared):
    straight_losses, _ = run_local(tmp_path / "straight", prepared, "--lr_scheduler.decay_type", "constant", steps=6,
                                   batch=4)
    expected = token_worker.read_windows(tmp_path / "straight", 1)
    run = tmp_path / "run"
    # (a constant learning rate after warmup: each leg ends at its own training.steps)
    ckpt = ["--checkpoint.enable_checkpoint", "--checkpoint.interval", "2", "--lr_scheduler.decay_type", "constant"]
    run_torchrun(4, run, prepared, *ckpt, steps=2, batch=1)
    run_torchrun(2, run, prepared, *ckpt, steps=4, batch=2)
    run_local(run, prepared, *ckpt, steps=6, batch=4)
    legs = [token_worker.read_windows(run, dp) for dp in (4, 2, 1)]
    assert [len(leg) for leg in legs] == [2, 2, 2]  # each leg resumed where the previous one stopped
    assert legs[0] + legs[1] + legs[2] == expected  # the windows of every global step, in order
    logged = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    losses = {r["step"]: r["loss"] for r in logged if "loss" in r}
    assert sorted(losses) == list(range(1, 7))
    assert all(losses[s] == pytest.approx(straight_losses[s], rel=1e-5) for s in losses), (losses, straight_losses)
