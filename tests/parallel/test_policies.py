"""Non-finite policies on a 2-process FSDP run (gloo): NaN injected on ONE rank at global batch 3
(the LATHE_TEST_NAN hook). Every rank must take the same decision: no rank steps alone, none hangs.

- skip: both ranks drop step 3's update, the run completes, the counter says 1, and the losses after
  the skip equal a run whose data skipped batch 3 (training.skip_batches=3), one step later.
- rollback: both ranks reload step 2 and continue on batch 4: the losses equal that run, step for step.
- resume after a skip: the skip run resumed from its step-2 checkpoint (the bad batch still bad)
  skips the same batch again and ends with the same losses and counters.
"""

import json
import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from worker import load_result  # noqa: E402

HERE = Path(__file__).parent
BASE = ["--model.flavor", "tiny", "--training.seq_len", "32", "--training.batch_size", "2", "--training.steps", "6",
        "--optimizer.lr", "1e-3", "--lr_scheduler.warmup_steps", "2", "--metrics.log_freq", "1",
        "--training.mixed_precision_param", "float32", "--parallelism.dp_shard", "2",
        "--checkpoint.enable_checkpoint", "--checkpoint.interval", "2"]
NAN_ON_RANK_1 = {"LATHE_TEST_NAN": "batch=3,rank=1"}


def torchrun(folder, *extra, env=None):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--rdzv_backend=c10d",
           "--rdzv_endpoint=localhost:0", str(HERE / "worker.py"), *BASE, "--job.dump_folder", str(folder), *extra]
    e = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", **(env or {})}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=e)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return load_result(Path(folder))["losses"], proc.stdout + proc.stderr


def last_record(folder):
    rows = [json.loads(x) for x in (Path(folder) / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if "loss" in r][-1]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    return torchrun(tmp_path_factory.mktemp("reference"), "--training.skip_batches", "3")[0]


def test_skip_on_one_rank_skips_on_both_and_resumes_the_same(tmp_path, reference):
    losses, out = torchrun(tmp_path, "--training.on_nonfinite", "skip", env=NAN_ON_RANK_1)
    # each rank logs its own decision: both skipped step 3
    assert len(re.findall(r"step 3: loss or gradient norm is NaN/inf on 1 rank .*update skipped on every rank", out)) == 2
    assert losses[3] is None  # the logged loss of a skipped step: null
    assert [losses[s] for s in (1, 2)] == [reference[s] for s in (1, 2)]
    assert [losses[s + 1] for s in (3, 4, 5)] == [reference[s] for s in (3, 4, 5)]
    last = last_record(tmp_path)
    assert last["step"] == 6 and last["skipped_steps"] == 1 and last["nonfinite_steps"] == 1
    state = json.loads((tmp_path / "checkpoint" / "step-6" / "train_state.json").read_text())["train_state"]
    assert state["skipped"] == [{"step": 3, "reason": "nonfinite", "loss": state["skipped"][0]["loss"],
                                 "windows": [8, 12]}]  # global batch 3: windows 8-11 (2 ranks x 2)
    assert math.isfinite(state["skipped"][0]["loss"])  # the mean over the ranks whose loss was finite

    # Resume from step 2, before the skip: the same batch is skipped again, the run ends the same.
    for step in (4, 6):
        shutil.rmtree(tmp_path / "checkpoint" / f"step-{step}")
    (tmp_path / "metrics.jsonl").unlink()
    resumed, _ = torchrun(tmp_path, "--training.on_nonfinite", "skip", env=NAN_ON_RANK_1)
    assert sorted(resumed) == [3, 4, 5, 6] and resumed[3] is None
    assert {s: resumed[s] for s in (4, 5, 6)} == {s: losses[s] for s in (4, 5, 6)}
    assert last_record(tmp_path)["skipped_steps"] == 1


def test_rollback_on_one_rank_rolls_back_both(tmp_path, reference):
    losses, out = torchrun(tmp_path, "--training.on_nonfinite", "rollback", env=NAN_ON_RANK_1)
    assert len(re.findall(r"step 3: .* rolling back to the last checkpoint and skipping data windows 8-11", out)) == 2
    assert losses == reference  # every logged step equals the run that never read batch 3
    last = last_record(tmp_path)
    assert last["rollbacks"] == 1 and last["nonfinite_steps"] == 1 and last["skipped_steps"] == 0
