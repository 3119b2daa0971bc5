"""torchtitan's 2024 options on one process: fused RMSNorm, async TP's CPU refusal, compiled
autograd, optimizer step in backward, print_args, c4_test, the schedule-CSV checks, and the
restrictions each technique has. For each: a test that it changes what it should, and one that
the numbers match the reference where they must. Multi-process cases:
tests/parallel/test_torchtitan_options_parallel.py."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lathe.config import load_config, validate
from lathe.errors import ConfigError
from lathe.models.llama import FusedRMSNorm, RMSNorm
from lathe.optim import OptimizersInBackward, build_optimizers
from lathe.trainer import train

BASE = ["--model.flavor", "tiny", "--training.seq_len", "32", "--training.batch_size", "2",
        "--metrics.log_freq", "100", "--lr_scheduler.warmup_steps", "2"]


def cfg_for(tmp_path, *argv):
    return load_config([*BASE, "--job.dump_folder", str(tmp_path), *argv])[0]


# ---------------------------------------------------------------------------------------------
# Fused RMSNorm


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2 ** -7)])
def test_fused_rmsnorm_equals_rmsnorm_forward_and_backward(dtype, tol):
    """float32: equal to rounding. bf16: the output is rounded to bf16 after the float32 math in
    both, so they may differ by one bf16 step (2^-7 relative) where the float32 values straddle a
    rounding boundary."""
    torch.manual_seed(0)
    plain, fused = RMSNorm(64, 1e-5), FusedRMSNorm(64, 1e-5)
    with torch.no_grad():
        plain.weight.copy_(torch.randn(64))
        fused.weight.copy_(plain.weight)
    x = torch.randn(3, 16, 64, dtype=dtype)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    ya, yb = plain(xa), fused(xb)
    grad = torch.randn_like(ya)
    ya.backward(grad)
    yb.backward(grad)
    torch.testing.assert_close(yb, ya, rtol=tol, atol=tol)
    torch.testing.assert_close(xb.grad, xa.grad, rtol=tol, atol=tol)
    torch.testing.assert_close(fused.weight.grad, plain.weight.grad, rtol=tol, atol=tol * 10)


def test_fused_rmsnorm_trains_like_rmsnorm(tmp_path):
    plain = train(cfg_for(tmp_path / "plain", "--training.steps", "2"))
    fused = train(cfg_for(tmp_path / "fused", "--training.steps", "2", "--model.norm_type", "fused_rmsnorm"))
    assert sum(isinstance(m, FusedRMSNorm) for m in fused.model.modules()) == 9
    assert not any(isinstance(m, FusedRMSNorm) for m in plain.model.modules())
    for step in plain.losses:
        assert fused.losses[step] == pytest.approx(plain.losses[step], rel=1e-5)


# ---------------------------------------------------------------------------------------------
# Async tensor parallel


def test_async_tp_on_cpu_is_one_line_before_any_process_group(tmp_path):
    argv = [*BASE, "--job.dump_folder", str(tmp_path), "--experimental.enable_async_tensor_parallel",
            "--training.compile"]
    with pytest.raises(ConfigError, match="needs CUDA GPUs"):
        validate(load_config([*argv, "--parallelism.tp", "2"])[0], world_size=2, cuda_available=False)
    assert not torch.distributed.is_initialized()
    proc = subprocess.run([sys.executable, "-m", "lathe", "train", *argv], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    lines = [x for x in proc.stderr.splitlines() if x.strip()]
    assert len(lines) == 1 and "experimental.enable_async_tensor_parallel=True: needs CUDA GPUs" in lines[0], proc.stderr
    assert not (tmp_path / "config.toml").exists()  # nothing started


def test_async_tp_needs_compile_on_gpus():
    cfg = load_config(["--experimental.enable_async_tensor_parallel", "--training.device", "cuda"])[0]
    from lathe.parallel import async_tp

    with pytest.raises(ConfigError, match="needs training.compile"):
        async_tp.check_config(cfg, cuda_available=True)


def test_async_tp_switches_on_inductors_micro_pipeline_pass():
    import torch._inductor.config as inductor_config

    from lathe.parallel import async_tp

    before = inductor_config._micro_pipeline_tp
    try:
        async_tp.enable()
        assert inductor_config._micro_pipeline_tp is True
    finally:
        inductor_config._micro_pipeline_tp = before


# ---------------------------------------------------------------------------------------------
# Compiled autograd


def test_compiled_autograd_matches_eager(tmp_path):
    from torch._dynamo.utils import counters

    eager = train(cfg_for(tmp_path / "eager", "--training.steps", "3"))
    counters.clear()
    compiled = train(cfg_for(tmp_path / "ca", "--training.steps", "3", "--experimental.enable_compiled_autograd",
                             "--training.compile_backend", "aot_eager"))
    assert counters["compiled_autograd"]["captures"] >= 1  # the backward was captured as a graph
    for step in eager.losses:
        assert compiled.losses[step] == pytest.approx(eager.losses[step], rel=1e-6)


def test_compiled_autograd_refuses_parallel_runs():
    cfg = load_config(["--experimental.enable_compiled_autograd", "--parallelism.dp_shard", "2"])[0]
    with pytest.raises(ConfigError, match="works on one process only"):
        validate(cfg, world_size=2)


# ---------------------------------------------------------------------------------------------
# Optimizer step in backward


def _tiny_model():
    from lathe.models import MODELS

    torch.manual_seed(0)
    model = MODELS["llama3"].build(MODELS["llama3"].flavors["tiny"].with_(vocab_size=128, max_seq_len=16))
    model.init_weights()
    return model


def test_optimizer_steps_inside_backward_and_frees_gradients():
    cfg = load_config(["--optimizer.early_step_in_backward"])[0]
    model = _tiny_model()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizers = build_optimizers([model], cfg.optimizer)
    assert isinstance(optimizers, OptimizersInBackward)
    tokens = torch.randint(0, 128, (2, 16))
    loss = torch.nn.functional.cross_entropy(model(tokens).flatten(0, 1), tokens.flatten())
    loss.backward()  # no optimizer.step() call: backward itself updated every parameter
    assert all(p.grad is None for p in model.parameters())
    assert all(not torch.equal(p, before[n]) for n, p in model.named_parameters())
    # the norm of the gradients it stepped with equals the plain backward's
    reference = _tiny_model()
    loss = torch.nn.functional.cross_entropy(reference(tokens).flatten(0, 1), tokens.flatten())
    loss.backward()
    expected = torch.nn.utils.get_total_norm([p.grad for p in reference.parameters()])
    assert optimizers.take_grad_norm().item() == pytest.approx(expected.item(), rel=1e-5)


def test_optimizer_in_backward_trains_like_a_step_after_backward(tmp_path, caplog):
    common = ["--training.steps", "4", "--training.max_norm", "0"]
    plain = train(cfg_for(tmp_path / "plain", *common))
    in_bwd = train(cfg_for(tmp_path / "in_bwd", *common, "--optimizer.early_step_in_backward"))
    for step in plain.losses:
        assert in_bwd.losses[step] == pytest.approx(plain.losses[step], rel=1e-6)
    for (name, a), b in zip(plain.model.named_parameters(), in_bwd.model.parameters()):
        torch.testing.assert_close(b, a, atol=1e-5, rtol=0, msg=name)
    logged = [json.loads(x) for x in (tmp_path / "in_bwd" / "metrics.jsonl").read_text().splitlines()]
    assert all(r["grad_norm"] > 0 for r in logged if "grad_norm" in r)  # still measured
    with caplog.at_level(logging.WARNING, logger="lathe"):
        validate(cfg_for(tmp_path, "--optimizer.early_step_in_backward"))  # default max_norm 1.0
    assert "gradients are not clipped (training.max_norm=1 is ignored)" in caplog.text


@pytest.mark.parametrize("argv,world,message", [
    (["--parallelism.pp", "2"], 2, "does not work with pipeline parallel"),
    (["--training.gradient_accumulation_steps", "2"], 1, "does not work with gradient accumulation"),
    (["--parallelism.dp_replicate", "2", "--parallelism.dp_shard", "1"], 2, "does not work with DDP"),
    (["--training.on_nonfinite", "skip"], 1, "cannot be combined with training.on_nonfinite skip"),
    (["--training.loss_spike_factor", "3"], 1, "cannot be combined with training.on_loss_spike skip"),
])
def test_optimizer_in_backward_restrictions(argv, world, message):
    cfg = load_config(["--optimizer.early_step_in_backward", "--training.max_norm", "0", *argv])[0]
    with pytest.raises(ConfigError, match=message):
        validate(cfg, world_size=world)


# ---------------------------------------------------------------------------------------------
# FSDP CPU offload (the parity run under FSDP x 2 is in tests/parallel)


def test_cpu_offload_needs_fsdp():
    with pytest.raises(ConfigError, match="training.enable_cpu_offload=True: needs FSDP"):
        validate(load_config(["--training.enable_cpu_offload"])[0], world_size=1)
    validate(load_config(["--training.enable_cpu_offload", "--parallelism.dp_shard", "2"])[0], world_size=2)


def test_cpu_offload_policy_keeps_shards_on_cpu_without_pinned_memory():
    from torch.distributed.fsdp import CPUOffloadPolicy

    from lathe.parallel import fsdp

    captured = {}
    real = fsdp.fully_shard
    try:
        fsdp.fully_shard = lambda module, **kw: captured.setdefault(id(module), kw)
        fsdp.apply_fsdp(_tiny_model(), mesh=type("M", (), {"ndim": 1, "size": lambda self: 2})(),
                        param_dtype=torch.float32, reduce_dtype=torch.float32, cpu_offload=True)
    finally:
        fsdp.fully_shard = real
    policies = [kw["offload_policy"] for kw in captured.values()]
    assert len(policies) == 5 and all(isinstance(p, CPUOffloadPolicy) for p in policies)
    assert all(p.pin_memory is torch.cuda.is_available() for p in policies)  # pinned only with CUDA


# ---------------------------------------------------------------------------------------------
# job.print_args, c4_test, the schedule CSV


def test_print_args_logs_the_resolved_config(tmp_path, caplog):
    with caplog.at_level(logging.INFO, logger="lathe"):
        train(cfg_for(tmp_path / "a", "--training.steps", "1", "--job.print_args"))
    assert "resolved config:" in caplog.text and "[training]" in caplog.text and "seq_len = 32" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="lathe"):
        train(cfg_for(tmp_path / "b", "--training.steps", "1"))
    assert "resolved config:" not in caplog.text


def test_c4_test_is_a_local_c4_format_sample(tmp_path):
    from lathe.data.sources import resolve_spec

    spec = resolve_spec("c4_test", None, None, "training.dataset")
    assert spec.kind == "local" and spec.label == "c4_test"
    files = sorted(Path(spec.path).glob("*.jsonl"))
    records = [json.loads(x) for x in files[0].read_text().splitlines()]
    assert len(records) == 2000 and set(records[0]) == {"text", "timestamp", "url"}
    assert all(len(r["text"]) > 0 for r in records)
    result = train(cfg_for(tmp_path, "--training.steps", "2", "--training.dataset", "c4_test"))
    assert sorted(result.losses) == [1, 2]


@pytest.mark.parametrize("text,message", [
    ("0F0,0B0\n", "has 1 rows of actions, one per pipeline rank is needed"),
    ("0F0,0X0\n1F0,1B0\n", "row 1: '0X0' is not an action"),
    ("0F0,1F0\n1F0,1B0\n", "stage 1 appears on rows 1 and 2"),
    ("0F0,0B0\n2F0,2B0\n", "stages must be numbered 0..N-1"),
])
def test_schedule_csv_errors_name_the_file_and_the_problem(tmp_path, text, message):
    path = tmp_path / "s.csv"
    path.write_text(text)
    cfg = load_config(["--parallelism.pp", "2", "--experimental.pipeline_parallel_schedule_csv", str(path)])[0]
    with pytest.raises(ConfigError, match=message):
        validate(cfg, world_size=2)


def test_schedule_csv_sets_stages_ranks_and_microbatches(tmp_path):
    from lathe.parallel.pipeline import read_schedule_csv

    path = tmp_path / "s.csv"
    path.write_text("0F0,0F1,2F0,2F1,2B0,2B1,0B0,0B1\n1F0,1F1,3F0,3F1,3B0,3B1,1B0,1B1\n")
    schedule = read_schedule_csv(str(path), 2)
    assert (schedule.num_stages, schedule.stages_by_rank, schedule.microbatches) == (4, [[0, 2], [1, 3]], 2)
    with pytest.raises(ConfigError, match="needs pipeline parallel"):
        validate(load_config(["--experimental.pipeline_parallel_schedule_csv", str(path)])[0])
