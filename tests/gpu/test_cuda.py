"""CUDA-only checks (skipped without a GPU): NCCL init, bf16, compile with Triton, memory stats.

Run on a GPU machine with: python -m pytest tests/gpu -q
"""

import json
import os
import subprocess
import sys

import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def run_torchrun(tmp_path, nproc, *overrides):
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
           "--rdzv_backend=c10d", "--rdzv_endpoint=localhost:0", "-m", "lathe", "train",
           "--job.dump_folder", str(tmp_path), "--metrics.log_freq", "10", *overrides]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env={**os.environ})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines() if '"loss"' in x]


def test_debug_model_trains_on_one_gpu_with_bf16_and_compile(tmp_path):
    logs = run_torchrun(tmp_path, 1, "--training.steps", "60", "--training.compile",
                        "--training.autocast_dtype", "bfloat16", "--optimizer.lr", "3e-3")
    assert logs[-1]["loss"] < logs[0]["loss"] - 1.0
    assert logs[-1]["memory_gib"] > 0 and 0 < logs[-1]["mfu"] < 100


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
def test_fsdp_bf16_on_nccl(tmp_path):
    logs = run_torchrun(tmp_path, 2, "--training.steps", "30", "--parallelism.dp_shard", "2",
                        "--training.mixed_precision_param", "bfloat16")
    assert logs[-1]["loss"] < logs[0]["loss"]
