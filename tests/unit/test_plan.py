"""lathe plan's cost model and candidates, and the memory model of gradient accumulation.

- the speed model, calibrated on torchtitan's published Llama 3.1 8B runs (docs/planning.md,
  "Calibration"), predicts FSDP 8 x selective AC on H100 within ``BAND`` of them, eager and compiled;
- the micro-batch size changes the predicted speed;
- every candidate names what limits it, and leaves the stated memory margin free;
- context-parallel and float8 candidates are enumerated (float8 only where it can run);
- FSDP CPU offload: the GPU figure counts only what stays on the GPU;
- gradient accumulation: reduce-scatter every micro-batch needs less memory than keeping gradients
  unsharded; ``auto`` picks by the device's memory; lathe estimate (fake tensors) and the analytic
  model agree in both modes.
"""

import dataclasses

import pytest

from lathe import plan as planner
from lathe.config import load_config, validate
from lathe.devices import resolve_device
from lathe.estimate import estimate
from lathe.memory_model import device_need, estimate_rank, layout_from_config, rank_memory, resolve_grad_sync
from lathe.parallel.dims import ParallelDims

VOCAB = 128256
BAND = 0.10  # predicted tokens/s within 10% of torchtitan's measurement
H100 = resolve_device("H100")


def layout(world: int, *overrides: str, flavor: str = "8B", seq: int = 8192):
    cfg, _ = load_config(["--model.flavor", flavor, "--model.vocab_size", str(VOCAB), "--training.seq_len", str(seq),
                          *overrides])
    dims = ParallelDims.from_config(cfg.parallelism, world)
    return cfg, dims, layout_from_config(cfg, dims, VOCAB)


def tokens_per_gpu(lay, global_batch: int, device=H100, compiled=False, float8=False) -> float:
    cost = planner.step_cost(lay, global_batch, 8, device, compiled, float8)
    return global_batch * lay.seq_len / cost["step"] / lay.world_size


@pytest.mark.parametrize("compiled,measured", [(False, 5762), (True, 6667)], ids=["eager", "compiled"])
def test_8b_fsdp8_selective_ac_h100_within_band_of_torchtitan(compiled, measured):
    """torchtitan, benchmarks/llama3_h100_202412_torchtitan.md, table 1: Llama 3.1 8B, 8 H100
    (500 W, 96 GB HBM2e), FSDP, local batch 2 x 8192, selective AC."""
    _, _, lay = layout(8, "--training.batch_size", "2", "--activation_checkpoint.mode", "selective",
                       "--activation_checkpoint.selective_ac_option", "op")
    predicted = tokens_per_gpu(lay, 16, compiled=compiled)
    assert abs(predicted / measured - 1) <= BAND, f"predicted {predicted:,.0f} tok/s/GPU, measured {measured:,}"


def test_micro_batch_size_changes_predicted_speed():
    """70B on 4 x 8 H100, TP 8 x FSDP 4, full AC, 8 sequences per DP rank: one micro-batch of 8 is
    faster than 8 of 1 (small GEMMs, per-micro-batch launches and all-gathers)."""
    _, _, lay = layout(32, "--parallelism.tp", "8", "--activation_checkpoint.mode", "full", flavor="70B")
    one = tokens_per_gpu(dataclasses.replace(lay, batch_size=8, accumulation=1), 32)
    eight = tokens_per_gpu(dataclasses.replace(lay, batch_size=1, accumulation=8), 32)
    assert one > 1.1 * eight


@pytest.fixture(scope="module")
def compiled_8b_plan():
    cfg, _ = load_config(["--model.flavor", "8B", "--model.vocab_size", str(VOCAB), "--training.seq_len", "8192",
                          "--training.compile"])
    return cfg, planner.plan(cfg, 1, 8, H100, 16, VOCAB)


def test_every_candidate_names_its_limit_and_keeps_the_margin(compiled_8b_plan):
    _, cands = compiled_8b_plan
    assert cands
    budget = H100.usable_bytes - planner.HEADROOM * H100.memory_bytes
    limits = set()
    for c in cands:
        assert c.memory == device_need(c.layout) <= budget  # analytic peak +10%, overheads, headroom
        assert c.limit and c.limit.split(" ")[0] in {"compute", *[v.split(" ")[0] for v in planner.LIMITS.values()]}
        limits.add(c.limit.split(" ")[0])
    assert len(limits) > 1  # not one answer for everything
    assert [c.tokens_per_gpu for c in cands] == sorted((c.tokens_per_gpu for c in cands), reverse=True)


def test_context_parallel_and_float8_candidates(compiled_8b_plan):
    cfg, cands = compiled_8b_plan
    cp = [c for c in cands if c.layout.cp > 1]
    fp8 = [c for c in cands if c.float8]
    assert cp and fp8
    for c in (cp[0], fp8[0]):  # their overrides make a valid lathe train config
        run, _ = load_config(["--model.flavor", "8B", "--model.vocab_size", str(VOCAB), "--training.seq_len", "8192",
                              "--training.compile", *c.overrides()])
        validate(run, world_size=8, cuda_available=False)
        assert run.parallelism.cp == c.layout.cp and run.float8.enable_float8_linear == c.float8
    # float8 is faster compiled on H100; an A100 has no float8 tensor cores
    assert fp8[0].tokens_per_gpu > max(c.tokens_per_gpu for c in cands if not c.float8)
    assert not any(c.float8 for c in planner.plan(cfg, 1, 8, resolve_device("A100"), 16, VOCAB))


def test_cpu_offload_memory_counts_only_what_stays_on_the_gpu():
    _, _, lay = layout(8, "--training.batch_size", "1", "--activation_checkpoint.mode", "full")
    offloaded = dataclasses.replace(lay, cpu_offload=True)
    gpu, host = rank_memory(lay), rank_memory(offloaded)
    assert host.params == host.grads == host.optimizer == 0
    assert host.host == gpu.params + gpu.grads + gpu.optimizer
    # the device peak drops by at least the parameters and optimizer states
    assert host.peak <= gpu.peak - gpu.params - gpu.optimizer
    assert device_need(offloaded) < device_need(lay)


def test_reduce_scatter_every_micro_batch_fits_where_unsharded_gradients_do_not():
    """70B, FSDP 32 on 4 x 8 H100, full AC, 1 x 8 accumulation: unsharded float32 gradients of the
    whole model do not fit; sharded ones do, and the planner keeps only that mode."""
    _, _, lay = layout(32, "--training.batch_size", "1", "--training.gradient_accumulation_steps", "8",
                       "--activation_checkpoint.mode", "full", flavor="70B")
    every = dataclasses.replace(lay, grad_sync="every_microbatch")
    last = dataclasses.replace(lay, grad_sync="last_microbatch")
    budget = H100.usable_bytes - planner.HEADROOM * H100.memory_bytes
    assert device_need(every) <= budget < device_need(last)
    assert resolve_grad_sync("auto", lay, H100.usable_bytes) == "every_microbatch"
    # communication: the sharded mode reduce-scatters 8 times instead of once
    assert planner.step_cost(every, 256, 8, H100)["step"] >= planner.step_cost(last, 256, 8, H100)["step"]


def test_auto_grad_sync_keeps_gradients_unsharded_only_where_they_fit():
    _, _, lay = layout(8, "--training.batch_size", "1", "--training.gradient_accumulation_steps", "4",
                       "--activation_checkpoint.mode", "full", seq=2048)
    need = device_need(dataclasses.replace(lay, grad_sync="last_microbatch"))
    assert resolve_grad_sync("auto", lay, need) == "last_microbatch"
    assert resolve_grad_sync("auto", lay, need - 1) == "every_microbatch"
    assert resolve_grad_sync("auto", lay, None) == "every_microbatch"  # memory unknown: the safe choice
    assert resolve_grad_sync("last_microbatch", lay, None) == "last_microbatch"
    assert resolve_grad_sync("auto", dataclasses.replace(lay, accumulation=1), None) == "last_microbatch"


def test_estimate_and_analytic_model_agree_in_both_sync_modes():
    peaks = {}
    for mode in ("every_microbatch", "last_microbatch"):
        cfg, _ = load_config(["--model.flavor", "tiny", "--training.seq_len", "32", "--training.batch_size", "2",
                              "--parallelism.dp_shard", "4", "--training.gradient_accumulation_steps", "2",
                              "--training.gradient_accumulation_sync", mode])
        est = estimate(cfg, 4)
        fake = est.ranks[0].peak
        analytic = estimate_rank(cfg, ParallelDims.from_config(cfg.parallelism, 4), est.vocab_size).peak
        assert abs(analytic / fake - 1) <= 0.05, f"{mode}: analytic {analytic:,} B, fake estimate {fake:,} B"
        peaks[mode] = fake
    assert peaks["every_microbatch"] < 0.9 * peaks["last_microbatch"]


def test_bad_headroom_is_one_line(capsys):
    from lathe import cli

    assert cli.main(["plan", "--nodes", "1", "--gpus-per-node", "8", "--device", "H100", "--headroom", "1.5"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--headroom" in err
