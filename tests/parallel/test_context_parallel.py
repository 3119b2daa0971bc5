"""Context parallel (and document masking) layouts compute what the single process computes.

Same protocol and tolerances as test_parity.py (the real trainer under torchrun + gloo, the tiny
Llama, fp32, 5 steps, the selected runs of this module in one torchrun job; per-step losses, final
parameters and the validation loss against the in-process single-process run on the same global
batch). CP ranks share one batch, so the reference batch is batch x data-parallel degree, as for
any layout. seq_len 32 is split into 2 x cp chunks by the load balancer (4 tokens per chunk at
cp 4).

On CPU these runs go through lathe's mapping of the CPU attention kernel onto torch's ring
attention (lathe/parallel/context.py), so every layout here exercises torch's real ring algorithm
and both of its key/value rotation methods.
"""

import functools
import json
import shutil
import sys
from pathlib import Path

import pytest
import torch

from lathe.config import load_config
from lathe.parallel import clean_name
from lathe.trainer import train

sys.path.insert(0, str(Path(__file__).parent))
from multi_worker import Batch, needed  # noqa: E402
from test_parity import COMMON, LOCAL_BATCH, STEPS, layout_args, reference  # noqa: E402
from worker import load_result  # noqa: E402

CP2 = ["--parallelism.cp", "2"]

# (id, processes, data-parallel degree, overrides). Each layout costs 20-90 s on 2 cores, so
# options are spread over the layouts: both rotate methods, load balancing on and off, AC full and
# op, compile (aot_eager). Plain CP x 2 is in the resume test below.
LAYOUTS = [
    ("cp4_alltoall_ac_full", 4, 1, ["--parallelism.cp", "4", "--parallelism.dp_shard", "1",
                                    "--parallelism.cp_rotate_method", "alltoall",
                                    "--activation_checkpoint.mode", "full"]),
    ("cp2xfsdp2_ac_op", 4, 2, [*CP2, "--parallelism.dp_shard", "2", "--activation_checkpoint.mode", "selective",
                               "--activation_checkpoint.selective_ac_option", "op"]),
    ("cp2xtp2_no_balance_compile", 4, 1, [*CP2, "--parallelism.tp", "2", "--parallelism.dp_shard", "1",
                                          "--no-parallelism.cp_load_balance",
                                          "--training.compile", "--training.compile_backend", "aot_eager"]),
    ("cp2xpp2", 4, 1, [*CP2, "--parallelism.pp", "2", "--parallelism.dp_shard", "1",
                       "--parallelism.pp_microbatches", "2"]),
]


def assert_matches(got, ref_losses, ref_params, ref_val):
    assert sorted(got["losses"]) == list(range(1, STEPS + 1))
    for step, loss in got["losses"].items():
        assert loss == pytest.approx(ref_losses[step], rel=1e-5), f"step {step}"
    assert got["val_losses"][STEPS] == pytest.approx(ref_val, rel=1e-5)
    assert got["params"].keys() == ref_params.keys()
    for key, value in got["params"].items():
        torch.testing.assert_close(value, ref_params[key], atol=1e-4, rtol=0, msg=lambda m: f"{key}: {m}")


# --- document masking through the layouts that touch the attention inputs --------------------

BLOCK_CAUSAL = ["--model.attention_mask", "block_causal", "--model.document_positions"]
BLOCK_CAUSAL_PP2XTP2 = [*BLOCK_CAUSAL, "--parallelism.pp", "2", "--parallelism.tp", "2", "--parallelism.dp_shard", "1",
                        "--parallelism.pp_microbatches", "2"]
CHECKPOINT_AT_3 = ["--checkpoint.enable_checkpoint", "--checkpoint.interval", "3"]

# every launch of this module: (name, processes, overrides)
RUNS = [*[(name, nproc, overrides) for name, nproc, _, overrides in LAYOUTS],
        ("bc_pp2xtp2", 4, BLOCK_CAUSAL_PP2XTP2),
        ("cp2", 2, [*CP2, "--parallelism.dp_shard", "1", *CHECKPOINT_AT_3])]
NEEDS = {"test_block_causal_pp2xtp2_matches_single_process": ["bc_pp2xtp2"],
         "test_cp2_matches_single_process_and_resumes_in_one_process": ["cp2"]}


@pytest.fixture(scope="module")
def runs(request, tmp_path_factory):
    """The selected runs in one torchrun job (multi_worker.py)."""
    selected = needed(request, lambda test, params: [params["name"]] if "name" in params else NEEDS.get(test, []))
    batch = Batch(tmp_path_factory.mktemp("cp"), [(name, nproc, "worker", layout_args(overrides))
                                                  for name, nproc, overrides in RUNS if name in selected])
    yield batch
    batch.close()


@pytest.mark.parametrize("name,nproc,dp,overrides", LAYOUTS, ids=[x[0] for x in LAYOUTS])
def test_cp_layout_matches_single_process(name, nproc, dp, overrides, tmp_path_factory, runs):
    ref = reference(LOCAL_BATCH * dp, LOCAL_BATCH * dp, str(tmp_path_factory.getbasetemp()))
    got = load_result(runs.folder(name))
    if "--training.compile" in overrides:  # compiled afresh in the batched job, not fallen back to eager
        assert min(runs.compiled_graphs(name)) > 0
    assert_matches(got, *ref)


@functools.lru_cache(maxsize=None)
def block_causal_reference(tmp_root: str):
    cfg, _ = load_config([*COMMON, *BLOCK_CAUSAL, "--training.batch_size", str(LOCAL_BATCH),
                          "--validation.batch_size", str(LOCAL_BATCH), "--job.dump_folder", f"{tmp_root}/ref_bc"])
    result = train(cfg)
    params = {clean_name(n): p.detach().clone() for n, p in result.model.named_parameters()}
    logged = [json.loads(x) for x in Path(cfg.job.dump_folder, "metrics.jsonl").read_text().splitlines()]
    return result.losses, params, next(r["val_loss"] for r in logged if "val_loss" in r)


def test_block_causal_pp2xtp2_matches_single_process(tmp_path_factory, runs):
    """The document ids and positions reach every pipeline stage (split into micro-batches) and
    the attention of a tensor-parallel shard of the heads."""
    ref = block_causal_reference(str(tmp_path_factory.getbasetemp()))
    assert ref[0] != reference(LOCAL_BATCH, LOCAL_BATCH, str(tmp_path_factory.getbasetemp()))[0]  # masking matters
    got = load_result(runs.folder("bc_pp2xtp2"))
    assert_matches(got, *ref)


# --- CP x 2, and resume across a change of CP degree -------------------------------------------

def test_cp2_matches_single_process_and_resumes_in_one_process(tmp_path_factory, runs):
    """CP x 2 (all-gather rotation, load balanced) matches the single process; its step-3
    checkpoint loads into one process (no CP), which reproduces steps 4-5. The data stream's
    position does not count CP ranks as data-parallel, and DCP reshards the weights and optimizer
    state that FSDP had sharded over the two CP ranks."""
    ref = reference(LOCAL_BATCH, LOCAL_BATCH, str(tmp_path_factory.getbasetemp()))
    ck = CHECKPOINT_AT_3
    folder = runs.folder("cp2")
    got = load_result(folder)
    assert_matches(got, *ref)
    shutil.rmtree(folder / "checkpoint" / f"step-{STEPS}")
    cfg, _ = load_config([*COMMON, *ck, "--no-validation.enabled", "--training.batch_size", str(LOCAL_BATCH),
                          "--job.dump_folder", str(folder)])
    resumed = train(cfg).losses
    assert sorted(resumed) == [4, 5]  # it really started from step 3
    for step, loss in resumed.items():
        assert loss == pytest.approx(got["losses"][step], rel=1e-5), (step, resumed, got["losses"])


def test_hsdp_with_cp_meshes():
    """dp_replicate x dp_shard x cp: FSDP shards over dp_shard x cp within each replica (HSDP), the
    data stream sees dp_replicate x dp_shard ranks, the loss is averaged over all of them x cp.
    (A fake process group of 8 ranks in this process: meshes only, no training.)"""
    import torch.distributed as dist
    from torch.testing._internal.distributed.fake_pg import FakeStore

    from lathe.config import Parallelism
    from lathe.parallel.dims import ParallelDims

    dist.init_process_group("fake", store=FakeStore(), rank=5, world_size=8)
    try:
        dims = ParallelDims.from_config(Parallelism(dp_replicate=2, dp_shard=2, cp=2), 8)
        assert dims.fsdp_enabled and not dims.ddp_only and dims.dp == 4
        m = dims.build_meshes("cpu")
        assert m.data_parallel.mesh_dim_names == ("dp_replicate", "dp_shard_cp")
        assert m.data_parallel.mesh.tolist() == [[0, 1, 2, 3], [4, 5, 6, 7]]
        assert (m.dp.size(), m.dp.get_local_rank(), m.cp.size(), m.cp.get_local_rank()) == (4, 2, 2, 1)
        assert m.dp_cp.size() == 8
        # replicas without a shard dimension: the CP ranks still make it HSDP, not DDP
        only_replicas = ParallelDims.from_config(Parallelism(dp_replicate=2, dp_shard=1, cp=2), 4)
        assert only_replicas.fsdp_enabled and not only_replicas.ddp_only
    finally:
        dist.destroy_process_group()
