"""CUDA-only checks (skipped without a GPU): NCCL init (also through `lathe launch`), bf16
autocast, compile with inductor/Triton, CUDA memory statistics in the log line, the memory snapshot
file, a profiler trace with CUDA kernels, async checkpoints with pinned memory and their resume,
FlexAttention block-causal masks, context parallel on NCCL, float8 (compute capability >= 8.9) and
async tensor parallel (2 GPUs).

Run on a GPU machine with: python -m pytest tests/gpu -q (bench/gpu_check.py runs it first).
"""

import json
import os
import re
import subprocess
import sys

import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def _losses(tmp_path):
    return [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines() if '"loss"' in x]


def run_torchrun(tmp_path, nproc, *overrides, output=False):
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
           "--rdzv_backend=c10d", "--rdzv_endpoint=localhost:0", "-m", "lathe", "train",
           "--job.dump_folder", str(tmp_path), "--metrics.log_freq", "10", *overrides]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env={**os.environ})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return (_losses(tmp_path), proc.stdout + proc.stderr) if output else _losses(tmp_path)


def test_nccl_world_size_1_through_lathe_launch(tmp_path):
    """`lathe launch` (torchrun's agent in lathe's process) starts one worker that initialises NCCL."""
    cmd = [sys.executable, "-m", "lathe", "launch", "--nproc-per-node", "1", "--rdzv-backend", "c10d",
           "--rdzv-endpoint", "localhost:0", "--", "--job.dump_folder", str(tmp_path), "--training.steps", "5",
           "--metrics.log_freq", "1", "--comm.trace_buf_size", "0"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "TORCH_DISTRIBUTED_DEBUG": "DETAIL", "NCCL_DEBUG": "INFO"})
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-5000:]
    assert "NCCL INFO" in out  # NCCL itself initialised a communicator
    assert len(_losses(tmp_path)) == 5


def test_cuda_memory_stats_in_the_log_line(tmp_path):
    logs, out = run_torchrun(tmp_path, 1, "--training.steps", "4", "--metrics.log_freq", "2", output=True)
    line = next(x for x in out.splitlines() if "step:  4" in x or "step: 4" in x)
    gib, pct = map(float, re.search(r"memory:\s*([\d.]+)GiB\(([\d.]+)%\)", line).groups())
    assert gib > 0 and 0 < pct < 100
    total = torch.cuda.get_device_properties(0).total_memory / 2**30
    assert pct == pytest.approx(100 * gib / total, abs=0.02)  # the share of this GPU, not of the host
    rec = logs[-1]
    assert rec["memory_gib"] == pytest.approx(gib, abs=0.01)
    assert 0 < rec["memory_allocated_gib"] <= rec["memory_gib"]
    assert rec["num_ooms"] == 0


def test_memory_snapshot_and_profiler_trace_files(tmp_path):
    run_torchrun(tmp_path, 1, "--training.steps", "4", "--profiling.enable_profiling",
                 "--profiling.enable_memory_snapshot", "--profiling.profile_freq", "2")
    snapshots = list((tmp_path / "memory_snapshot").rglob("rank0_memory_snapshot.pickle"))
    assert snapshots and all(p.stat().st_size > 1000 for p in snapshots)  # written by torch, never read here
    traces = list((tmp_path / "profile_traces").rglob("rank0_trace.json"))
    assert traces
    events = json.loads(traces[-1].read_text())["traceEvents"]
    assert any(e.get("cat") == "kernel" for e in events)  # CUDA kernels were recorded, not only CPU ops


def test_async_checkpoint_with_pinned_memory_resumes(tmp_path):
    common = ["--checkpoint.enable_checkpoint", "--checkpoint.async_mode", "async_with_pinned_mem",
              "--checkpoint.interval", "3", "--metrics.log_freq", "1", "--training.mixed_precision_param",
              "float32"]
    first = run_torchrun(tmp_path / "run", 1, "--training.steps", "6", *common)
    assert (tmp_path / "run" / "checkpoint" / "step-6").is_dir()
    resumed, out = run_torchrun(tmp_path / "run", 1, "--training.steps", "8", *common, output=True)
    assert resumed[-1]["step"] == 8 and "step-6" in out
    straight = run_torchrun(tmp_path / "straight", 1, "--training.steps", "8", *common)
    # the same run without the stop: equal up to CUDA's non-deterministic reductions
    assert resumed[-1]["loss"] == pytest.approx(straight[-1]["loss"], rel=1e-3)
    assert first[-1]["loss"] == pytest.approx(straight[5]["loss"], rel=1e-3)


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


def test_flex_block_causal_equals_per_document_sdpa_on_cuda():
    """FlexAttention with the document BlockMask (compiled) computes the per-document attention,
    forward and backward."""
    from lathe.models.attention import attention, document_mask, per_document_attention

    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 4, 512, 64, device="cuda", requires_grad=True) for _ in range(3))
    ids = torch.zeros(2, 512, dtype=torch.long, device="cuda")
    ids[0, 100:] += 1
    ids[0, 300:] += 1
    ids[1, 257:] += 1
    mask = document_mask(ids)
    assert not isinstance(mask, torch.Tensor)  # a BlockMask
    out = attention(q, k, v, mask)
    grads = torch.autograd.grad(out.square().sum(), (q, k, v))
    ref = per_document_attention(q, k, v, ids)
    ref_grads = torch.autograd.grad(ref.square().sum(), (q, k, v))
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=1e-3, atol=1e-3)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
def test_context_parallel_on_nccl_matches_one_gpu(tmp_path):
    common = ["--training.steps", "10", "--training.seq_len", "2048", "--training.batch_size", "1",
              "--training.mixed_precision_param", "float32", "--metrics.log_freq", "1"]
    one = run_torchrun(tmp_path / "one", 1, *common)
    cp = run_torchrun(tmp_path / "cp", 2, *common, "--parallelism.cp", "2")
    for a, b in zip(one, cp):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-3)


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
