"""Issue 6's acceptance command through torchrun on CPU, with the bubble report."""

import os
import re
import subprocess
import sys


def test_interleaved_1f1b_through_torchrun_reports_the_bubble(tmp_path):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--rdzv_backend=c10d",
           "--rdzv_endpoint=localhost:0", "--tee=3", "-m", "lathe", "train", "--parallelism.pp", "2",
           "--parallelism.pp_schedule", "interleaved_1f1b", "--parallelism.pp_stage_timing",
           "--training.steps", "3", "--training.seq_len", "64", "--training.batch_size", "4",
           "--metrics.log_freq", "1", "--job.dump_folder", str(tmp_path)]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=600,
                       env={**os.environ, "OMP_NUM_THREADS": "1", "LOG_RANK": "0,1"}, cwd=tmp_path)
    out = p.stdout + p.stderr
    assert p.returncode == 0, out[-5000:]
    assert "pipeline: ScheduleInterleaved1F1B, 4 stages" in out
    assert re.search(r"step:\s+3\s+loss:", out)
    # each rank holds two looped stages and reports its compute share
    assert re.search(r"pipeline rank 0 \(stages \[0, 2\]\): computing \d+% of the time", out)
    assert re.search(r"pipeline rank 1 \(stages \[1, 3\]\): computing \d+% of the time", out)
