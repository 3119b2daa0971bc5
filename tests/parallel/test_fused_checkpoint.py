"""Fused projections under FSDP and TP: checkpoints hold the unfused names (weights and optimizer
state, gathered from and scattered back into sharded parameters), so a run may switch between the
fused and unfused layouts, and between parallel layouts, on resume.

Same global batch (4 sequences) in every layout; steps 4-6 after resuming from step 3 match the
uninterrupted run within 1e-5 relative (other reduction order, other matmul shapes)."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from test_checkpoint import drop_latest, run_local, run_torchrun  # noqa: E402

FUSED = ["--model.fused_qkv", "--model.fused_w13"]


def close(resumed, straight):
    """Steps 4-6 of the resumed run (metrics.jsonl also holds the first run's steps)."""
    for step in (4, 5, 6):
        assert resumed[step] == pytest.approx(straight[step], rel=1e-5), step


def test_fused_tp2_checkpoint_resumes_unfused_on_fsdp2(tmp_path):
    straight = run_torchrun(2, tmp_path, "--parallelism.tp", "2", "--parallelism.dp_shard", "1", *FUSED, batch=4)
    drop_latest(tmp_path)
    resumed = run_torchrun(2, tmp_path, "--parallelism.dp_shard", "2", batch=2)
    close(resumed, straight)


def test_unfused_checkpoint_resumes_fused_on_fsdp2_x_tp2(tmp_path):
    straight = run_local(tmp_path, batch=4)
    drop_latest(tmp_path)
    resumed = run_torchrun(4, tmp_path, "--parallelism.dp_shard", "2", "--parallelism.tp", "2", *FUSED, batch=2)
    close(resumed, straight)
