"""lathe estimate (fake tensors), the analytic memory model and lathe plan, in one process.

- the tracker counts allocations, frees and FSDP-style storage resizes;
- parameter, gradient and optimizer-state bytes of llama3 8B/70B/405B under FSDP at several world
  sizes: what the tracker finds on the real parallelized model equals the closed form exactly;
- the analytic model agrees with the fake-mode estimate within ``ANALYTIC_TOLERANCE`` for the debug
  model's layouts and for 8B at world size 8 and 64 (the tiny model's parity layouts are checked
  against real runs in tests/parallel/test_estimate_accuracy.py);
- lathe plan returns only layouts that lathe estimate says fit;
- one rank per role: measuring every rank of a small uneven layout gives, for each role, the same
  measurement on every rank of the role; the roles of large layouts (405B at 512) are few;
- bad input is one line naming the option, exit code 2 (an absurd world size too, at once).
"""

import json

import pytest
import torch

from lathe import cli
from lathe.config import load_config
from lathe.devices import resolve_device
from lathe.estimate import MAX_WORLD_SIZE, estimate, estimation_config, fake_process_group, judge, roles
from lathe.memory_model import estimate_rank, layout_from_config, param_bytes, stage_layout
from lathe.memtrack import GRADS, OPTIM, PARAMS, MemoryTracker
from lathe.parallel.dims import ParallelDims

ANALYTIC_TOLERANCE = 0.05
LLAMA3_VOCAB = ["--model.vocab_size", "128256"]


def test_tracker_counts_allocations_frees_and_resizes():
    tracker = MemoryTracker([])
    with tracker:
        a = torch.empty(1000)  # 4000 B
        b = torch.empty(500)  # 2000 B
        del a
        c = torch.empty(250)
        b.untyped_storage().resize_(0)  # FSDP frees unsharded parameters this way
        b.untyped_storage().resize_(4000)
    assert tracker.peak == 6000
    assert tracker.total == 1000 + 4000
    del b, c
    assert tracker.total == 0


# (8B at world size 8 is checked on a full fake run in test_analytic_model_matches_fake_estimate_8b)
@pytest.mark.parametrize("flavor,world_size", [("8B", 64), ("70B", 16), ("70B", 128), ("405B", 512)])
def test_state_bytes_equal_the_closed_form(flavor, world_size):
    """Build the real FSDP model for rank 0, materialize it as fake tensors, take an optimizer step
    on zero gradients; the tracker's parameter, gradient and optimizer-state bytes are exactly
    ``memory_model.param_bytes``. (FSDP's own gradients, from a full step, are compared in
    test_analytic_model_matches_fake_estimate_8b.)"""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from lathe.models import MODELS
    from lathe.optim import Optimizers
    from lathe.trainer import build_model_parts, model_args

    cfg, _ = load_config(["--model.flavor", flavor, *LLAMA3_VOCAB, "--no-optimizer.foreach"])
    cfg = estimation_config(cfg)
    dims = ParallelDims.from_config(cfg.parallelism, world_size)
    with fake_process_group(0, world_size):
        meshes = dims.build_meshes("cpu")
        with torch.device("meta"):
            model = MODELS["llama3"].build(model_args(cfg, 128256))
        parts = build_model_parts(cfg, model, None, None, dims, meshes)
        with FakeTensorMode(allow_non_fake_inputs=True):
            for part in parts:
                part.to_empty(device="cpu")
            optimizers = Optimizers(parts, cfg.optimizer)
            tracker = MemoryTracker(parts, optimizers.optimizers)
            with tracker:
                for p in parts[0].parameters():
                    p.grad = torch.zeros_like(p)
                optimizers.step()
            steady = tracker.report().steady
        del parts, optimizers, tracker
    lay = layout_from_config(cfg, dims, 128256)
    params, grads, optim, _ = param_bytes(lay, stage_layout(lay)[1][0])
    assert (steady[PARAMS], steady[GRADS], steady[OPTIM]) == (params, grads, optim)


DEBUG = ["--training.seq_len", "256", "--training.batch_size", "8"]
DEBUG_LAYOUTS = [
    ("single", 1, []),
    ("single_ac_op", 1, ["--activation_checkpoint.mode", "selective", "--activation_checkpoint.selective_ac_option", "op"]),
    ("fsdp4_ac_full", 4, ["--parallelism.dp_shard", "4", "--activation_checkpoint.mode", "full"]),
    ("fsdp2xtp2", 4, ["--parallelism.dp_shard", "2", "--parallelism.tp", "2"]),
    ("pp2_interleaved", 2, ["--parallelism.pp", "2", "--parallelism.dp_shard", "1",
                            "--parallelism.pp_schedule", "Interleaved1F1B", "--parallelism.pp_microbatches", "4"]),
    # context parallel: FSDP shards over dp_shard x cp, each rank holds seq_len / cp tokens
    ("cp2xfsdp2", 4, ["--parallelism.cp", "2", "--parallelism.dp_shard", "2"]),
    ("cp4_ac_full", 4, ["--parallelism.cp", "4", "--parallelism.dp_shard", "1", "--activation_checkpoint.mode", "full"]),
]


def _assert_close(cfg, est, world_size):
    dims = ParallelDims.from_config(cfg.parallelism, world_size)
    for r in est.ranks:
        model = estimate_rank(cfg, dims, est.vocab_size, r.pp_rank)
        assert abs(model.peak / r.peak - 1) <= ANALYTIC_TOLERANCE, (
            f"pp rank {r.pp_rank}: analytic {model.peak:,} B ({model.peak_phase}), fake {r.peak:,} B")


@pytest.mark.parametrize("name,world_size,overrides", DEBUG_LAYOUTS, ids=[x[0] for x in DEBUG_LAYOUTS])
def test_analytic_model_matches_fake_estimate_debug(name, world_size, overrides):
    cfg, _ = load_config([*DEBUG, *overrides])
    _assert_close(cfg, estimate(cfg, world_size), world_size)


@pytest.mark.parametrize("world_size,overrides", [
    (8, ["--training.seq_len", "2048", "--training.batch_size", "1"]),
    (64, ["--training.seq_len", "8192", "--training.batch_size", "1", "--parallelism.tp", "8",
          "--activation_checkpoint.mode", "full"]),
], ids=["ws8_fsdp", "ws64_fsdp8_tp8_ac_full"])
def test_analytic_model_matches_fake_estimate_8b(world_size, overrides):
    cfg, _ = load_config(["--model.flavor", "8B", *LLAMA3_VOCAB, *overrides])
    est = estimate(cfg, world_size)
    _assert_close(cfg, est, world_size)
    # FSDP's real gradients (reduce-scatter outputs) and the optimizer's states, exactly
    dims = ParallelDims.from_config(cfg.parallelism, world_size)
    lay = layout_from_config(cfg, dims, 128256)
    params, grads, optim, _ = param_bytes(lay, stage_layout(lay)[1][0])
    steady = est.ranks[0].report.steady
    assert (steady[PARAMS], steady[GRADS], steady[OPTIM]) == (params, grads, optim)


def test_plan_returns_only_layouts_that_estimate_says_fit(capsys):
    """A 4-GPU node whose memory fits some layouts of the debug model and not others."""
    argv = [*DEBUG, "--nodes", "1", "--gpus-per-node", "4", "--device", "H100", "--device-memory", "1.2",
            "--global-batch", "8", "--json"]
    assert cli.main(["plan", *argv]) == 0
    layouts = json.loads(capsys.readouterr().out)["layouts"]
    assert layouts
    assert cli.main(["plan", *argv[:-1], "--device-memory", "100", "--json"]) == 0
    assert len(json.loads(capsys.readouterr().out)["layouts"]) > len(layouts)  # memory dropped some
    device = resolve_device("H100", memory_gib=1.2)
    # the fastest, and the one closest to the limit
    for chosen in {id(x): x for x in (layouts[0], max(layouts, key=lambda x: x["memory"]))}.values():
        cfg, _ = load_config([*DEBUG, *chosen["overrides"]])
        est = estimate(cfg, 4)
        verdict = judge(estimation_config(cfg), est, device)
        assert verdict.fits, f"{chosen['layout']}: needs {max(verdict.needed.values()):,} B"


def test_estimate_cli_json(capsys):
    code = cli.main(["estimate", "--model.flavor", "tiny", "--training.seq_len", "32", "--training.batch_size", "2",
                     "--parallelism.dp_shard", "2", "--world-size", "2", "--device", "L40S", "--json"])
    out = json.loads(capsys.readouterr().out)
    assert code == 0 and out["fits"] is True and out["world_size"] == 2
    rank = out["ranks"][0]
    assert out["ranks_measured"] == 1 and rank["stands_for"] == 2  # the two FSDP ranks: one role
    assert 0 < out["estimator_max_rss"] < 8 * 2**30  # this whole test process, stated in the report
    assert rank["peak"] == rank["tracked_peak"] > rank["steady"]["parameters"] > 0
    assert rank["needed"] == rank["peak"] + sum(rank["device_overheads"].values())
    assert out["largest_batch_size"] >= 2


def _same(a, b):
    return (a.report.peak, a.report.peak_by_step, a.report.steady, a.report.at_peak) == (
        b.report.peak, b.report.peak_by_step, b.report.steady, b.report.at_peak)


def test_one_rank_per_role_equals_every_rank():
    """PP 2 x FSDP 3 of the tiny model (2 blocks) with an odd vocabulary: FSDP's last shard of every matrix is
    smaller (dim 64 -> 22, 22, 20 rows), so each pipeline rank has two roles. Every rank measured:
    each rank equals the rank its role measures, and the per-role estimate is that answer."""
    cfg, _ = load_config(["--model.flavor", "tiny", "--model.n_layers", "2", "--model.vocab_size", "1001", "--training.seq_len", "32",
                          "--training.batch_size", "2", "--parallelism.pp", "2", "--parallelism.dp_shard", "3"])
    dims = ParallelDims.from_config(cfg.parallelism, 6)
    every = {r.rank: r for r in estimate(cfg, 6, all_ranks=True).ranks}
    assert sorted(every) == list(range(6)) and all(r.role.members(dims) == [r.rank] for r in every.values())
    layout_roles = roles(cfg, dims, 1001)
    assert [(r.rank, r.ranks) for r in layout_roles] == [(0, 2), (2, 1), (3, 2), (5, 1)]
    assert sorted(m for r in layout_roles for m in r.members(dims)) == list(range(6))
    for role in layout_roles:
        for member in role.members(dims):
            assert _same(every[member], every[role.rank]), f"rank {member} differs from rank {role.rank}"
    # the uneven shard is real: the last FSDP rank holds less than the first
    assert every[2].report.steady[OPTIM] < every[0].report.steady[OPTIM]
    # estimate() measures exactly the roles' ranks with this same function (test_estimate_cli_json
    # checks how many it measures), so its answer is every[role.rank] for each role
    assert max(every[r.rank].peak for r in layout_roles) == max(r.peak for r in every.values())


@pytest.mark.parametrize("argv,world_size,expected", [
    (["--config", "configs/llama3_405b.toml", "--parallelism.pp", "8", "--training.batch_size", "8"], 512, 8),
    # FSDP 64 x TP 8: the TP shard of the vocabulary, 16,032 rows, splits 63 x 251 + 219
    (["--config", "configs/llama3_405b.toml"], 512, 2),
    (["--model.flavor", "8B", "--parallelism.tp", "8"], 16384, 8),  # 2,048 shards: many hold nothing
    (["--config", "configs/llama3_405b.toml"], MAX_WORLD_SIZE, 7),
])
def test_large_layouts_have_few_roles(argv, world_size, expected):
    cfg, _ = load_config([*LLAMA3_VOCAB, *argv])
    dims = ParallelDims.from_config(cfg.parallelism, world_size)
    found = roles(cfg, dims, 128256)
    assert len(found) == expected and sum(r.ranks for r in found) == world_size


def test_absurd_world_size_is_one_line_at_once(capsys):
    """A typo of a world size is refused before the process group, whose bookkeeping grows with it
    (--world-size 1000000000 used to grow to 21 GB and be killed by the OOM killer)."""
    import time
    import tracemalloc

    tracemalloc.start()
    start = time.perf_counter()
    try:
        code = cli.main(["estimate", "--world-size", "1000000000"])
        took = time.perf_counter() - start
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "--world-size" in err and f"{MAX_WORLD_SIZE:,}" in err, err
    assert peak < 64 * 2**20 and took < 10, (peak, took)  # nothing per rank was allocated


@pytest.mark.parametrize("argv,option", [
    (["estimate", "--world-size", str(MAX_WORLD_SIZE + 1)], "--world-size"),
    (["estimate", "--parallelism.dp_shard", "1048576", "--parallelism.tp", "8"], "parallelism"),
    (["estimate", "--parallelism.tp", "3", "--world-size", "8"], "parallelism"),
    (["estimate", "--world-size", "8", "--device", "H900"], "--device"),
    (["estimate", "--world-size", "0"], "--world-size"),
    (["estimate", "--parallelism.dp_shard", "-1"], "--world-size"),
    (["plan", "--nodes", "1", "--gpus-per-node", "4", "--device", "B300"], "--device"),
    (["plan", "--nodes", "0", "--device", "H100"], "--nodes"),
    (["plan", "--nodes", "1"], "--device"),
])
def test_bad_input_is_one_line(argv, option, capsys):
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("lathe: error:") and option in err
