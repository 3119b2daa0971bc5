"""CUDA-only checks (skipped without a GPU): NCCL init, bf16, compile with Triton, memory stats,
float8 (compute capability >= 8.9) and async tensor parallel (2 GPUs).

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


float8_gpu = pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 9),
                                reason="float8 needs CUDA compute capability >= 8.9")


@float8_gpu
def test_float8_compiled_on_one_gpu_tracks_bf16(tmp_path):
    pytest.importorskip("torchao")
    common = ["--training.steps", "30", "--training.compile", "--training.autocast_dtype", "bfloat16",
              "--optimizer.lr", "3e-3", "--training.seq_len", "1024"]
    bf16 = run_torchrun(tmp_path / "bf16", 1, *common)
    fp8 = run_torchrun(tmp_path / "fp8", 1, *common, "--float8.enable_float8_linear")
    assert fp8[-1]["loss"] == pytest.approx(bf16[-1]["loss"], rel=2e-2)


@float8_gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
def test_float8_tp_styles_and_fsdp_float8_all_gather_on_nccl(tmp_path):
    pytest.importorskip("torchao")
    logs = run_torchrun(tmp_path, 2, "--training.steps", "30", "--parallelism.tp", "2", "--parallelism.dp_shard", "1",
                        "--float8.enable_float8_linear", "--training.compile")
    assert logs[-1]["loss"] < logs[0]["loss"]
    logs = run_torchrun(tmp_path / "fsdp", 2, "--training.steps", "30", "--parallelism.dp_shard", "2",
                        "--float8.enable_float8_linear", "--float8.enable_fsdp_float8_all_gather",
                        "--float8.precompute_float8_dynamic_scale_for_fsdp", "--training.compile")
    assert logs[-1]["loss"] < logs[0]["loss"]


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="async TP needs 2 GPUs")
def test_async_tensor_parallel_trains(tmp_path):
    logs = run_torchrun(tmp_path, 2, "--training.steps", "30", "--parallelism.tp", "2", "--parallelism.dp_shard", "1",
                        "--training.compile", "--experimental.enable_async_tensor_parallel")
    assert logs[-1]["loss"] < logs[0]["loss"]
