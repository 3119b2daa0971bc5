"""Every parallel layout computes what the single process computes.

Each case runs the real trainer under torchrun with gloo on CPU (fp32, the tiny Llama with
grouped-query attention, 5 steps; the selected layouts one after the other in one torchrun job,
see multi_worker.py) and compares, with the in-process single-process run on the same global
batch and seed:
- the loss of every step (averaged over data-parallel ranks): relative difference <= 1e-5;
- every final parameter, gathered from its shards: |diff| <= 1e-4;
- the validation loss of the trained model (held-out batches split over the DP ranks; under PP
  through the schedule's forward-only pass): relative difference <= 1e-5. Gradients agree to ~1e-6,
  but after 5 AdamW steps a last-bit difference in a near-zero gradient is divided by
  sqrt(v) ~ |g| and can move a weight by a fraction of the learning rate (1e-3).
The sums inside a layout run in a different order than in one process, so bitwise equality is
not expected; a layout that misses these tolerances is a bug, not a reason to widen them.
"""

import functools
import json
import sys
from pathlib import Path

import pytest
import torch

from lathe.config import load_config
from lathe.models import MODELS
from lathe.models.llama import unfuse_state_dict
from lathe.parallel import clean_name
from lathe.trainer import train

sys.path.insert(0, str(Path(__file__).parent))
from multi_worker import Batch, needed  # noqa: E402
from worker import load_result  # noqa: E402

STEPS = 5
LOCAL_BATCH = 2  # per data-parallel rank; DualPipeV needs 4 (4 micro-batches for 4 stages)
COMMON = ["--model.flavor", "tiny", "--training.seq_len", "32", "--training.steps", str(STEPS),
          "--optimizer.lr", "1e-3", "--lr_scheduler.warmup_steps", "2", "--metrics.log_freq", "1",
          "--training.mixed_precision_param", "float32", "--training.mixed_precision_reduce", "float32",
          "--validation.enabled", "--validation.freq", "1000", "--validation.steps", "2"]  # validate at the end


@functools.lru_cache(maxsize=None)
def reference(global_batch: int, val_batch: int, tmp_root: str):
    cfg, _ = load_config([*COMMON, "--training.batch_size", str(global_batch), "--validation.batch_size",
                          str(val_batch), "--job.dump_folder", f"{tmp_root}/ref{global_batch}_{val_batch}"])
    result = train(cfg)
    params = {clean_name(n): p.detach().clone() for n, p in result.model.named_parameters()}
    logged = [json.loads(x) for x in Path(cfg.job.dump_folder, "metrics.jsonl").read_text().splitlines()]
    val_loss = next(r["val_loss"] for r in logged if "val_loss" in r)
    return result.losses, params, val_loss


def local_batch(name: str) -> int:
    return 4 if "DualPipeV" in name else LOCAL_BATCH


def layout_args(overrides: list[str], batch: int = LOCAL_BATCH) -> list[str]:
    """The worker's arguments for a layout (without its dump folder)."""
    return [*COMMON, "--training.batch_size", str(batch), "--validation.batch_size", str(batch), *overrides]


FUSED = ["--model.fused_qkv", "--model.fused_w13"]

# (id, processes, data-parallel degree, overrides). AC and compile variants are spread over the
# matrix; compile uses aot_eager except one inductor case (inductor compiles cost ~10 s each).
LAYOUTS = [
    ("fsdp2", 2, 2, ["--parallelism.dp_shard", "2"]),
    ("fsdp4_ac_full", 4, 4, ["--parallelism.dp_shard", "4", "--activation_checkpoint.mode", "full"]),
    ("hsdp2x2_ac_op", 4, 4, ["--parallelism.dp_replicate", "2", "--parallelism.dp_shard", "2",
                             "--activation_checkpoint.mode", "selective",
                             "--activation_checkpoint.selective_ac_option", "op"]),
    ("ddp2", 2, 2, ["--parallelism.dp_replicate", "2", "--parallelism.dp_shard", "1"]),
    ("tp2_ac_layer", 2, 1, ["--parallelism.tp", "2", "--parallelism.dp_shard", "1",
                            "--activation_checkpoint.mode", "selective",
                            "--activation_checkpoint.selective_ac_option", "2"]),
    ("tp2_no_loss_parallel", 2, 1, ["--parallelism.tp", "2", "--parallelism.dp_shard", "1",
                                    "--no-parallelism.loss_parallel"]),
    ("fsdp2xtp2", 4, 2, ["--parallelism.dp_shard", "2", "--parallelism.tp", "2"]),
    ("hsdp2x2xtp2_ac_full", 8, 4, ["--parallelism.dp_replicate", "2", "--parallelism.dp_shard", "2",
                                   "--parallelism.tp", "2", "--activation_checkpoint.mode", "full"]),
    ("fsdp2_compile_inductor", 2, 2, ["--parallelism.dp_shard", "2", "--training.compile"]),
    ("fsdp2xtp2_compile_ac_op", 4, 2, ["--parallelism.dp_shard", "2", "--parallelism.tp", "2",
                                       "--training.compile", "--training.compile_backend", "aot_eager",
                                       "--activation_checkpoint.mode", "selective",
                                       "--activation_checkpoint.selective_ac_option", "op"]),
    # gradient accumulation: reduce-scatter every micro-batch (HSDP: all-reduce at the last only),
    # or keep the gradients unsharded until the last (training.gradient_accumulation_sync)
    ("fsdp2_accumulate2", 2, 2, ["--parallelism.dp_shard", "2", "--training.gradient_accumulation_steps", "2",
                                 "--training.gradient_accumulation_sync", "every_microbatch"]),
    ("fsdp2_accumulate2_sync_last", 2, 2, ["--parallelism.dp_shard", "2", "--training.gradient_accumulation_steps",
                                           "2", "--training.gradient_accumulation_sync", "last_microbatch"]),
    ("hsdp2x2_accumulate2", 4, 4, ["--parallelism.dp_replicate", "2", "--parallelism.dp_shard", "2",
                                   "--training.gradient_accumulation_steps", "2",
                                   "--training.gradient_accumulation_sync", "every_microbatch"]),
    # fused QKV and w1/w3 (compared with the unfused reference, mapped to its names)
    ("tp2_fused", 2, 1, ["--parallelism.tp", "2", "--parallelism.dp_shard", "1", *FUSED]),
    ("fsdp2xtp2_fused_ac_op", 4, 2, ["--parallelism.dp_shard", "2", "--parallelism.tp", "2", *FUSED,
                                     "--activation_checkpoint.mode", "selective",
                                     "--activation_checkpoint.selective_ac_option", "op"]),
]

# Pipeline parallel: every schedule of torch.distributed.pipelining, on 2 ranks. Single-stage
# schedules get 2 stages (one per rank); multi-stage ones 4 (two per rank: looped, or V-shaped).
PP = ["--parallelism.pp", "2", "--parallelism.dp_shard", "1"]
SCHEDULE_CASES = ["GPipe", "1F1B", "Interleaved1F1B", "LoopedBFS", "InterleavedZeroBubble", "ZBVZeroBubble", "DualPipeV"]
# (V-shaped schedules cannot run forward-only in torch, so those cases train without validation.)
NO_VALIDATION = ["--no-validation.enabled"]
LAYOUTS += [(f"pp2_{name}", 2, 1, [*PP, "--parallelism.pp_schedule", name, "--parallelism.pp_microbatches",
                                    "4" if name == "DualPipeV" else "2",
                                    *(NO_VALIDATION if name in ("ZBVZeroBubble", "DualPipeV") else [])])
            for name in SCHEDULE_CASES]
LAYOUTS += [
    ("pp2_split_points_ac_op", 2, 1, [*PP, "--parallelism.pp_split_points", "layers.1", "--parallelism.pp_microbatches", "2",
                                      "--activation_checkpoint.mode", "selective", "--activation_checkpoint.selective_ac_option", "op"]),
    ("pp2xfsdp2_interleaved", 4, 2, ["--parallelism.pp", "2", "--parallelism.dp_shard", "2",
                                     "--parallelism.pp_schedule", "interleaved_1f1b", "--parallelism.pp_microbatches", "2"]),
    ("pp2xtp2_1f1b_ac_full", 4, 1, ["--parallelism.pp", "2", "--parallelism.tp", "2", "--parallelism.dp_shard", "1",
                                    "--activation_checkpoint.mode", "full"]),
    ("pp2xfsdp2xtp2_compile", 8, 2, ["--parallelism.pp", "2", "--parallelism.dp_shard", "2", "--parallelism.tp", "2",
                                     "--training.compile", "--training.compile_backend", "aot_eager"]),
    ("pp2_accumulate2", 2, 1, [*PP, "--training.gradient_accumulation_steps", "2"]),
]


@pytest.fixture(scope="module")
def layouts(request, tmp_path_factory):
    """The selected layouts, run in one torchrun job (multi_worker.py) while the tests compute
    their single-process references."""
    selected = needed(request, lambda test, params: [params["name"]] if "name" in params else [])
    batch = Batch(tmp_path_factory.mktemp("parity"), [(name, nproc, "worker", layout_args(overrides, local_batch(name)))
                                                      for name, nproc, _, overrides in LAYOUTS if name in selected])
    yield batch
    batch.close()


@pytest.mark.parametrize("name,nproc,dp,overrides", LAYOUTS, ids=[x[0] for x in LAYOUTS])
def test_layout_matches_single_process(name, nproc, dp, overrides, tmp_path_factory, layouts):
    accumulation = 2 if "--training.gradient_accumulation_steps" in overrides else 1
    batch = local_batch(name)
    # same global batches: the reference's batch is the layout's global one (validation has no
    # accumulation: one batch per rank per validation step)
    ref_losses, ref_params, ref_val = reference(batch * dp * accumulation, batch * dp,
                                                str(tmp_path_factory.getbasetemp()))
    got = load_result(layouts.folder(name))
    if "--training.compile" in overrides:  # compiled afresh in the batched job, not fallen back to eager
        assert min(layouts.compiled_graphs(name)) > 0
    assert sorted(got["losses"]) == list(range(1, STEPS + 1))
    for step, loss in got["losses"].items():
        assert loss == pytest.approx(ref_losses[step], rel=1e-5), f"step {step}"
    # validation on the trained model: the same held-out batches, split over this layout's DP ranks
    if "--no-validation.enabled" not in overrides:
        assert got["val_losses"][STEPS] == pytest.approx(ref_val, rel=1e-5)
    if "--model.fused_qkv" in overrides:  # same weights under the unfused names
        got["params"] = unfuse_state_dict(got["params"], MODELS["llama3"].flavors["tiny"].with_(
            fused_qkv=True, fused_w13=True))
    assert got["params"].keys() == ref_params.keys()
    for key, value in got["params"].items():
        torch.testing.assert_close(value, ref_params[key], atol=1e-4, rtol=0, msg=lambda m: f"{key}: {m}")
