"""torchtitan's 2024 options under real process groups (torchrun, gloo, CPU): float8 with FSDP and
TP, FSDP CPU offload, optimizer step in backward, a pipeline schedule from a CSV file, fused
RMSNorm under TP, and the 405B configs with their float8 settings.

Exact techniques (offload, optimizer in backward, CSV schedule, fused norm) are held to the parity
tolerances of test_parity.py against the single process. Float8 is held to the bf16 run of the
same layout within FLOAT8_TOLERANCE (see tests/unit/test_float8.py and docs/float8.md for the
measurements behind it). Each case also checks the technique is really in force, from the facts
options_worker.py writes about the trained model. The selected runs of this module share one
torchrun job (multi_worker.py).
"""

from __future__ import annotations

import functools
import json
import sys
from pathlib import Path

import pytest
import torch

from lathe.config import load_config
from lathe.parallel import clean_name
from lathe.trainer import train

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "unit"))
from multi_worker import Batch, needed  # noqa: E402
from test_parity import COMMON, STEPS, layout_args, reference  # noqa: E402
from test_torchtitan_configs import torchtitan_configs, write_toml  # noqa: E402
from worker import load_result  # noqa: E402

torchao = pytest.importorskip("torchao")

FLOAT8_TOLERANCE = 5e-3  # relative, per step (measured here at sequence 32: <= 8.0e-4, 8.9e-4 at
# sequence 64; the bf16 loss moves from 8.7 to 7.1 in these 20 steps; see tests/unit/test_float8.py)
# 20 steps (the float8 error grows over the run: ~1e-5 at step 1, its largest after step 14), at
# sequence 32: 64 tokens per rank, the smallest float8-aligned shape (matmul dims divisible by 16)
# with 2 sequences per rank: half the matmul work of sequence 64. On a CPU without AVX-512 torch's
# bf16 matmuls (FSDP's bf16 parameters, the bf16 reference runs) take a slow path (measured: ~8x a
# float32 matmul of these shapes on the non-oneDNN path).
FLOAT8_STEPS = ["--training.steps", "20", "--training.seq_len", "32", "--optimizer.lr", "3e-3",
                "--no-validation.enabled", "--training.mixed_precision_param", "bfloat16"]
# tiny Llama: 4 blocks x 7 linears become float8; the output layer stays
FLOAT8_LINEARS = 28


def facts(folder: Path, rank: int = 0) -> dict:
    return json.loads((folder / f"facts_rank{rank}.json").read_text())


def result(runs: Batch, name: str) -> dict:
    """A run of options_worker.py: losses, parameters and the facts of rank 0."""
    folder = runs.folder(name)
    return {**load_result(folder), "facts": facts(folder)}


def assert_parity(got: dict, ref_losses: dict, ref_params: dict) -> None:
    for step, loss in got["losses"].items():
        assert loss == pytest.approx(ref_losses[step], rel=1e-5), f"step {step}"
    assert got["params"].keys() == ref_params.keys()
    for key, value in got["params"].items():
        torch.testing.assert_close(value, ref_params[key], atol=1e-4, rtol=0, msg=lambda m: f"{key}: {m}")


# ---------------------------------------------------------------------------------------------
# Float8

LAYOUTS = {"fsdp2": ["--parallelism.dp_shard", "2"],
           "tp2": ["--parallelism.tp", "2", "--parallelism.dp_shard", "1", "--training.autocast_dtype", "bfloat16"]}


FLOAT8_CASES = [
    ("fsdp2", "tensorwise_fp8_all_gather", ["--float8.enable_fsdp_float8_all_gather",
                                            "--float8.precompute_float8_dynamic_scale_for_fsdp"]),
    ("fsdp2", "rowwise", ["--float8.recipe_name", "rowwise"]),
    ("tp2", "tensorwise_compiled", ["--training.compile", "--training.compile_backend", "aot_eager"]),
    ("tp2", "rowwise", ["--float8.recipe_name", "rowwise"]),
]


def float8_overrides(layout: str, extra: list[str]) -> list[str]:
    layout_overrides = LAYOUTS[layout]
    if layout == "tp2":  # the float8 matmuls are the low-precision part; the rest stays fp32
        layout_overrides = [a for a in layout_overrides if a not in ("--training.autocast_dtype", "bfloat16")]
    return [*FLOAT8_STEPS, *layout_overrides, "--float8.enable_float8_linear", *extra]


def config_405b_overrides(era: str, path: Path) -> tuple[int, list[str]]:
    """Processes and overrides: only size and placement change on the command line."""
    degrees = ["--parallelism.tp", "2"] if era == "2024-09" else ["--parallelism.tp", "1"]  # FSDP x TP, or FSDP
    nproc = 4 if era == "2024-09" else 2
    return nproc, ["--config", str(path), "--model.flavor", "tiny", "--training.steps", "3", "--training.seq_len", "32",
                   *degrees, "--no-experimental.enable_async_tensor_parallel", "--no-training.compile",
                   "--training.dataset", "lathe_corpus", "--model.tokenizer_path", "", "--no-profiling.enable_profiling"]


ERAS = ["2024-09", "2024-12"]
PP_CSV = "0F0,0F1,2F0,2F1,2B0,2B1,0B0,0B1\n1F0,1F1,3F0,3F1,3B0,3B1,1B0,1B1\n"
# (name, processes, overrides) of the exact techniques; `runs` writes the CSV file
EXACT = [("offload", 2, ["--parallelism.dp_shard", "2", "--training.enable_cpu_offload"]),
         ("in_backward", 2, ["--parallelism.dp_shard", "2", "--optimizer.early_step_in_backward",
                             "--training.max_norm", "0"]),
         ("pp_csv", 2, ["--parallelism.pp", "2", "--parallelism.dp_shard", "1",
                        "--experimental.pipeline_parallel_schedule_csv", "{csv}"]),
         ("tp_fused_norm", 2, ["--parallelism.tp", "2", "--parallelism.dp_shard", "1",
                               "--model.norm_type", "fused_rmsnorm"])]
NEEDS = {"test_fsdp_cpu_offload_matches_single_process": ["offload"],
         "test_optimizer_step_in_backward_under_fsdp_matches_single_process": ["in_backward"],
         "test_pipeline_schedule_from_csv_matches_single_process": ["pp_csv"],
         "test_fused_rmsnorm_under_tensor_parallel_matches_single_process": ["tp_fused_norm"]}


def needs(test: str, params: dict) -> list[str]:
    if test == "test_float8_tracks_the_bf16_run":
        return [f"bf16_{params['layout']}", f"float8_{params['layout']}_{params['name']}"]
    if test == "test_torchtitan_405b_config_runs_on_cpu_with_its_float8_settings":
        return [f"405b_{params['era']}"]
    return NEEDS.get(test, [])


@pytest.fixture(scope="module")
def runs(request, tmp_path_factory):
    """Every selected run of this module, in one torchrun job (multi_worker.py): the float8 cases
    and the bf16 runs they track, the 405B configs, the exact techniques."""
    selected = needed(request, needs)
    folder = tmp_path_factory.mktemp("options")
    specs = []
    for layout in LAYOUTS:  # worker.py, as launched alone before
        specs.append((f"bf16_{layout}", 2, "worker", layout_args([*FLOAT8_STEPS, *LAYOUTS[layout]])))
    for layout, name, extra in FLOAT8_CASES:
        specs.append((f"float8_{layout}_{name}", 2, "options_worker", layout_args(float8_overrides(layout, extra))))
    for era in ERAS:
        if f"405b_{era}" in selected:
            (folder / f"config_{era}").mkdir()
            path = write_toml(folder / f"config_{era}" / "llama3_405b.toml",
                              torchtitan_configs(era == "2024-09")["llama3_405b.toml"])
            nproc, overrides = config_405b_overrides(era, path)
            specs.append((f"405b_{era}", nproc, "options_worker", overrides))
    csv = folder / "schedule.csv"
    csv.write_text(PP_CSV)
    for name, nproc, overrides in EXACT:
        specs.append((name, nproc, "options_worker", layout_args([o.format(csv=csv) for o in overrides])))
    batch = Batch(folder, [spec for spec in specs if spec[0] in selected])
    yield batch
    batch.close()


@pytest.mark.parametrize("layout,name,extra", FLOAT8_CASES, ids=[f"{a}_{b}" for a, b, _ in FLOAT8_CASES])
def test_float8_tracks_the_bf16_run(runs, layout, name, extra):
    ref = load_result(runs.folder(f"bf16_{layout}"))
    got = result(runs, f"float8_{layout}_{name}")
    if "--training.compile" in extra:  # compiled afresh in the batched job, not fallen back to eager
        assert min(runs.compiled_graphs(f"float8_{layout}_{name}")) > 0
    assert got["facts"]["float8_linears"] == FLOAT8_LINEARS
    all_gather = "--float8.enable_fsdp_float8_all_gather" in extra
    # float8 all-gather: FSDP's weight shards are torchao's float8-casting tensors, scales precomputed
    assert got["facts"]["float8_all_gather_weights"] == (FLOAT8_LINEARS if all_gather else 0)
    assert got["facts"]["precomputed_scales"] == (FLOAT8_LINEARS if all_gather else 0)
    assert sorted(got["losses"]) == list(range(1, 21))
    for step, loss in got["losses"].items():
        assert loss == pytest.approx(ref["losses"][step], rel=FLOAT8_TOLERANCE), f"step {step}"
    assert got["losses"] != ref["losses"]


@pytest.mark.parametrize("era", ERAS)
def test_torchtitan_405b_config_runs_on_cpu_with_its_float8_settings(runs, era):
    """Only size and placement change on the command line; the file's float8 settings (float8
    linears, float8 FSDP all-gather, precomputed scales) stay in force."""
    got = result(runs, f"405b_{era}")
    _, overrides = config_405b_overrides(era, runs.out / f"config_{era}" / "llama3_405b.toml")
    cfg, _ = load_config(overrides)
    assert cfg.float8.enable_float8_linear and cfg.float8.enable_fsdp_float8_all_gather
    assert cfg.activation_checkpoint.mode == "full" and cfg.optimizer.lr == 8e-5
    f = got["facts"]
    assert f["float8_linears"] == FLOAT8_LINEARS
    assert f["float8_all_gather_weights"] == FLOAT8_LINEARS and f["precomputed_scales"] == FLOAT8_LINEARS
    assert f["steps"] == 3 and 8 < got["losses"][1] < 9  # the file logs every 10 steps (and step 1)


# ---------------------------------------------------------------------------------------------
# Exact techniques: the single-process numbers


def test_fsdp_cpu_offload_matches_single_process(tmp_path_factory, runs):
    ref_losses, ref_params, _ = reference(4, 4, str(tmp_path_factory.getbasetemp()))
    got = result(runs, "offload")
    assert got["facts"]["offload_policy"] == "CPUOffloadPolicy"
    assert got["facts"]["param_devices"] == ["cpu"]
    assert_parity(got, ref_losses, ref_params)


@functools.lru_cache(maxsize=None)
def reference_without_clipping(root: str):
    cfg, _ = load_config([*COMMON, "--training.batch_size", "4", "--validation.batch_size", "4",
                          "--training.max_norm", "0", "--job.dump_folder", f"{root}/ref_noclip"])
    result = train(cfg)
    return result.losses, {clean_name(n): p.detach().clone() for n, p in result.model.named_parameters()}


def test_optimizer_step_in_backward_under_fsdp_matches_single_process(tmp_path_factory, runs):
    """Each parameter steps as its gradient shard arrives; nothing clips, so the reference does not
    clip either."""
    ref_losses, ref_params = reference_without_clipping(str(tmp_path_factory.getbasetemp()))
    got = result(runs, "in_backward")
    assert got["facts"]["grads_left"] == 0  # every gradient was freed inside backward
    assert_parity(got, ref_losses, ref_params)


def test_pipeline_schedule_from_csv_matches_single_process(tmp_path_factory, runs):
    """Two stages per rank, looped (stage s on rank s % 2), 2 micro-batches, breadth first."""
    ref_losses, ref_params, ref_val = reference(2, 2, str(tmp_path_factory.getbasetemp()))
    got = result(runs, "pp_csv")
    assert sorted(got["losses"]) == list(range(1, STEPS + 1))
    assert_parity(got, ref_losses, ref_params)
    assert got["val_losses"][STEPS] == pytest.approx(ref_val, rel=1e-5)


def test_fused_rmsnorm_under_tensor_parallel_matches_single_process(tmp_path_factory, runs):
    ref_losses, ref_params, _ = reference(2, 2, str(tmp_path_factory.getbasetemp()))
    got = result(runs, "tp_fused_norm")
    assert got["facts"]["fused_norms"] == 9  # 2 per block and the final norm
    assert_parity(got, ref_losses, ref_params)
