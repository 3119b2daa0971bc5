"""torchtitan's 2024 config files load and train unchanged.

The files are recreated here from their key sets (torchtitan at d2a4904f, 2024-09-12, and at
3f20451b, 2024-12-26; see /work/shared/reference), written as TOML by this test: section by
section, the keys and values each file sets. The debug configs train 2 steps (the trainer's memory
check spans the first two; each step of the file's 8 x 2048 tokens costs ~15 s on a 2-core CPU)
with only ``--training.steps`` on the command line (in a folder laid out like torchtitan's checkout: the
test tokenizer at the path the file names; ``c4_test`` is lathe's local sample). The 405B configs
run on CPU with size and placement overrides only, and with the file's float8 settings in force:
tests/parallel/test_torchtitan_options_parallel.py.
"""

from __future__ import annotations

import copy
import math
import sys
from pathlib import Path

import pytest

from lathe import config as C
from lathe.config import load_config, validate

sys.path.insert(0, str(Path(__file__).parent))
from test_data_fixtures import make_docs, write_tiktoken_file  # noqa: E402

# ---------------------------------------------------------------------------------------------
# The files, as key sets


def _debug(sept: bool) -> dict:
    return {
        "job": {"dump_folder": "./outputs", "description": "Llama 3 debug training", "use_for_integration_test": True,
                **({} if sept else {"print_args": False})},
        "profiling": {"enable_profiling": sept, "save_traces_folder": "profile_trace", "profile_freq": 10,
                      "enable_memory_snapshot": False, "save_memory_snapshot_folder": "memory_snapshot"},
        "metrics": {"log_freq": 1, **({"enable_color_printing": True} if sept else {"disable_color_printing": False}),
                    "enable_tensorboard": sept, "save_tb_folder": "tb", **({} if sept else {"enable_wandb": False})},
        "model": {"name": "llama3", "flavor": "debugmodel", "norm_type": "rmsnorm",
                  "tokenizer_path": "./test/assets/test_tiktoken.model" if sept else "./tests/assets/test_tiktoken.model"},
        "optimizer": {"name": "AdamW", "lr": 8e-4},
        "training": {"batch_size": 8, "seq_len": 2048, "warmup_steps": 2, "max_norm": 1.0, "steps": 10,
                     "data_parallel_replicate_degree": 1, "data_parallel_shard_degree": -1,
                     "tensor_parallel_degree": 1, "compile": False, "dataset": "c4_test"},
        "experimental": {**({} if sept else {"context_parallel_degree": 1}), "pipeline_parallel_degree": 1,
                         "enable_async_tensor_parallel": False},
        "checkpoint": {"enable_checkpoint": False, "folder": "checkpoint", "interval_type": "steps", "interval": 5,
                       "model_weights_only": False, "export_dtype": "float32", "async_mode": "disabled"},
        "activation_checkpoint": {"mode": "selective", "selective_ac_option": "2"},
        "float8": {"enable_float8_linear": False},
    }


def _large(sept: bool, name: str, flavor: str, lr: float, batch: int, seq: int, tp: int, ac: str, *,
           warmup: int = 200, steps: int = 1000, compile: bool = False, async_tp: bool = False,
           float8: bool = False) -> dict:
    tokenizer = "original/tokenizer.model" if name == "llama3" else "tokenizer.model"
    return {
        "job": {"dump_folder": "./outputs", "description": f"{name} {flavor} training"},
        "profiling": {"enable_profiling": True, "save_traces_folder": "profile_trace", "profile_freq": 100},
        "metrics": {"log_freq": 10, "enable_tensorboard": True, "save_tb_folder": "tb"},
        "model": {"name": name, "flavor": flavor, "norm_type": "rmsnorm",
                  "tokenizer_path": f"./torchtitan/datasets/tokenizer/{tokenizer}"},
        "optimizer": {"name": "AdamW", "lr": lr},
        "training": {"batch_size": batch, "seq_len": seq, "warmup_steps": warmup, "max_norm": 1.0, "steps": steps,
                     "data_parallel_replicate_degree": 1, "data_parallel_shard_degree": -1,
                     "tensor_parallel_degree": tp, "compile": compile, "dataset": "c4"},
        "experimental": {**({} if sept else {"context_parallel_degree": 1}), "pipeline_parallel_degree": 1,
                         **({"enable_async_tensor_parallel": True} if async_tp else {})},
        "checkpoint": {"enable_checkpoint": False, "folder": "checkpoint", "interval_type": "steps", "interval": 500,
                       "model_weights_only": False, "export_dtype": "float32", "async_mode": "disabled"},
        "activation_checkpoint": {"mode": ac, **({"selective_ac_option": "op"} if ac == "selective" else {})},
        "float8": {"enable_float8_linear": float8,
                   **({"enable_fsdp_float8_all_gather": True, "precompute_float8_dynamic_scale_for_fsdp": True}
                      if float8 else {})},
    }


def torchtitan_configs(sept: bool) -> dict[str, dict]:
    files = {
        "debug_model.toml": _debug(sept),
        "llama2_7b.toml": _large(sept, "llama2", "7B", 3e-4, 8, 2048, 1, "selective"),
        "llama2_13b.toml": _large(sept, "llama2", "13B", 3e-4, 2, 4096, 1, "selective"),
        "llama2_70b.toml": _large(sept, "llama2", "70B", 1.5e-4, 16, 4096, 8, "full"),
        "llama3_8b.toml": _large(sept, "llama3", "8B", 3e-4, 1, 8192, 1, "selective"),
        "llama3_70b.toml": _large(sept, "llama3", "70B", 1.5e-4, 8, 8192, 8, "full"),
        "llama3_405b.toml": _large(sept, "llama3", "405B", 8e-5, 2, 8192, 8, "full", warmup=600, steps=3000,
                                   compile=True, async_tp=True, float8=True),
    }
    return copy.deepcopy(files)


# torchtitan's late-2024 schema: every key its config manager knew (experimental.
# context_parallel_rotate_method comes with lathe's context parallel, issue 15), with a value.
SCHEMA_2024 = {
    "job": {"config_file": "", "dump_folder": "./outputs", "description": "d", "use_for_integration_test": False,
            "print_args": True},
    "profiling": {"enable_profiling": False, "save_traces_folder": "t", "profile_freq": 10,
                  "enable_memory_snapshot": False, "save_memory_snapshot_folder": "m"},
    "metrics": {"log_freq": 10, "enable_color_printing": False, "disable_color_printing": True,
                "enable_tensorboard": False, "save_tb_folder": "tb", "rank_0_only": True, "enable_wandb": False},
    "model": {"name": "llama3", "flavor": "debugmodel", "norm_type": "fused_rmsnorm", "tokenizer_path": ""},
    "optimizer": {"name": "AdamW", "lr": 8e-4, "fused": False, "early_step_in_backward": True},
    "training": {"dataset": "c4_test", "dataset_path": "x", "batch_size": 8, "seq_len": 2048, "warmup_steps": 200,
                 "max_norm": 1.0, "steps": 10, "data_parallel_replicate_degree": 1, "data_parallel_shard_degree": -1,
                 "enable_cpu_offload": True, "tensor_parallel_degree": 1, "disable_loss_parallel": True,
                 "enable_loss_parallel": False, "mixed_precision_param": "bfloat16",
                 "mixed_precision_reduce": "float32", "compile": True, "gc_freq": 50, "seed": 1,
                 "deterministic": True},
    "experimental": {"enable_async_tensor_parallel": True, "pipeline_parallel_degree": 1,
                     "pipeline_parallel_split_points": ["layers.4"], "pipeline_parallel_schedule": "1f1b",
                     "pipeline_parallel_schedule_csv": "s.csv", "pipeline_parallel_microbatches": 2,
                     "enable_compiled_autograd": True, "context_parallel_degree": 1},
    "checkpoint": {"enable_checkpoint": True, "folder": "c", "interval_type": "steps", "interval": 5,
                   "model_weights_only": True, "export_dtype": "bfloat16", "create_seed_checkpoint": False,
                   "async_mode": "async_with_pinned_mem", "keep_latest_k": 2, "load_step": -1},
    "activation_checkpoint": {"mode": "selective", "selective_ac_option": "op"},
    "float8": {"enable_float8_linear": True, "enable_fsdp_float8_all_gather": True,
               "precompute_float8_dynamic_scale_for_fsdp": True, "scaling_type_input": "dynamic",
               "scaling_type_weight": "dynamic", "scaling_type_grad_output": "dynamic"},
    "comm": {"init_timeout_seconds": 300, "train_timeout_seconds": 100, "trace_buf_size": 20000},
    "memory_estimation": {"enabled": False, "disable_fake_mode": False},
}


def write_toml(path: Path, sections: dict) -> Path:
    lines = []
    for section, values in sections.items():
        lines.append(f"[{section}]")
        lines += [f"{key} = {C._toml_value(value)}" for key, value in values.items()]
        lines.append("")
    path.write_text("\n".join(lines))
    return path


CASES = [(era, name) for era in ("2024-09", "2024-12") for name in torchtitan_configs(True)]


@pytest.mark.parametrize("era,name", CASES, ids=[f"{e}-{n}" for e, n in CASES])
def test_torchtitan_config_loads(tmp_path, era, name):
    sections = torchtitan_configs(era == "2024-09")[name]
    cfg, _ = load_config(["--config", str(write_toml(tmp_path / name, sections))])
    t = sections["training"]
    assert (cfg.model.name, cfg.model.flavor) == (sections["model"]["name"], sections["model"]["flavor"])
    assert (cfg.training.seq_len, cfg.training.batch_size, cfg.parallelism.tp) == (
        t["seq_len"], t["batch_size"], t["tensor_parallel_degree"])
    assert cfg.lr_scheduler.warmup_steps == t["warmup_steps"]
    assert cfg.float8.enable_float8_linear is sections["float8"]["enable_float8_linear"]
    if name == "debug_model.toml":
        assert cfg.metrics.enable_color_printing is True  # Sept: enable_color_printing; Dec: disable_ = false
        assert cfg.training.dataset == "c4_test"


def test_every_key_of_the_late_2024_schema_is_accepted(tmp_path):
    cfg, _ = load_config(["--config", str(write_toml(tmp_path / "all.toml", SCHEMA_2024))])
    assert cfg.parallelism.loss_parallel is False  # disable_loss_parallel = true (and enable_ = false)
    assert cfg.metrics.enable_color_printing is False  # disable_color_printing = true wins (read later)
    assert cfg.parallelism.pp_schedule_csv == "s.csv"
    assert cfg.training.enable_cpu_offload and cfg.optimizer.early_step_in_backward and cfg.job.print_args
    assert cfg.model.norm_type == "fused_rmsnorm" and cfg.float8.enable_float8_linear


def test_inverted_keys_from_the_command_line_and_files(tmp_path):
    assert load_config(["--training.disable_loss_parallel"])[0].parallelism.loss_parallel is False
    assert load_config(["--no-training.disable_loss_parallel"])[0].parallelism.loss_parallel is True
    assert load_config(["--metrics.disable_color_printing", "false"])[0].metrics.enable_color_printing is True
    assert load_config(["--metrics.disable_color_printing=true"])[0].metrics.enable_color_printing is False
    with pytest.raises(C.ConfigError, match="metrics.disable_color_printing='sometimes': expected true or false"):
        load_config(["--metrics.disable_color_printing=sometimes"])
    assert "training.disable_loss_parallel -> not parallelism.loss_parallel" in C.help_text()


@pytest.mark.parametrize("era", ["2024-09", "2024-12"])
def test_torchtitan_debug_config_trains_unchanged(tmp_path, monkeypatch, era):
    """A folder laid out like torchtitan's checkout: the test tokenizer where the file names it."""
    from lathe.trainer import train

    sections = torchtitan_configs(era == "2024-09")["debug_model.toml"]
    monkeypatch.chdir(tmp_path)
    write_tiktoken_file(tmp_path / sections["model"]["tokenizer_path"], make_docs(200, seed=1, max_words=20))
    path = write_toml(tmp_path / "debug_model.toml", sections)
    cfg, _ = load_config(["--config", str(path), "--training.steps", "1"])  # a step is 8 x 2048 tokens
    validate(cfg)
    result = train(cfg)
    assert sorted(result.losses) == [1] and math.isfinite(result.losses[1])
    assert result.tokens == 8 * 2048
    assert Path(tmp_path, "outputs", "metrics.jsonl").is_file()  # the file's dump folder, relative to the run
    if era == "2024-09":
        assert any(Path(tmp_path, "outputs", "tb").iterdir())  # the file enables TensorBoard
