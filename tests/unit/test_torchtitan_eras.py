"""torchtitan config files of every TOML era load into the right lathe values (issue 23, item 6).

The files are written here from torchtitan's published key lists (its config manager at each
era, read from the public repository): before the HSDP rename (mid 2024: `training.data_parallel_degree`,
`training.fp8_linear`, ...), the dataclass era of 2025 (`training.local_batch_size`, `[parallelism]`,
`optimizer.implementation`, `model.converters`, `[validation]`, `[mx]`, `[fault_tolerance]`...), and the
last TOML era up to February 2026 (`job.print_config`, `model.hf_assets_path`, `[compile]`,
`checkpoint.enable`, `validation.enable`, `lr_scheduler.min_lr_factor`, `[quantize.linear.float8]`...).
The late-2024 files are tests/unit/test_torchtitan_configs.py's.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from lathe import config as C
from lathe.config import load_config, validate

sys.path.insert(0, str(Path(__file__).parent))
from test_torchtitan_configs import write_toml  # noqa: E402

# Spring 2024 (torchtitan before September 2024): FSDP degree under its old name, float8 as a
# training key, pipeline degree under training.
SPRING_2024 = {
    "job": {"dump_folder": "./outputs", "description": "Llama 3 debug training", "use_for_integration_test": True},
    "profiling": {"enable_profiling": True, "save_traces_folder": "profile_trace", "profile_freq": 10},
    "metrics": {"log_freq": 1, "enable_color_printing": True, "enable_tensorboard": True, "save_tb_folder": "tb"},
    "model": {"name": "llama3", "flavor": "debugmodel", "norm_type": "rmsnorm", "tokenizer_path": ""},
    "optimizer": {"name": "AdamW", "lr": 8e-4},
    "training": {"batch_size": 8, "seq_len": 2048, "warmup_steps": 2, "max_norm": 1.0, "steps": 10,
                 "data_parallel_degree": -1, "data_parallel_replicate_degree": 1, "tensor_parallel_degree": 1,
                 "enable_loss_parallel": True, "pipeline_parallel_degree": 1, "compile": False,
                 "compiled_autograd": False, "fp8_linear": "dynamic", "gc_freq": 50, "dataset": "c4_test"},
    "checkpoint": {"enable_checkpoint": False, "folder": "checkpoint", "interval_type": "steps", "interval": 5,
                   "model_weights_only": False, "export_dtype": "float32", "create_seed_checkpoint": False,
                   "async_mode": "disabled"},
    "activation_checkpoint": {"mode": "selective", "selective_ac_option": "2"},
    "comm": {"init_timeout_seconds": 300, "train_timeout_seconds": 100, "trace_buf_size": 20000},
}

# The earliest files (torchtrain, early 2024): checkpointing and selective AC as training keys.
EARLY_2024 = {
    "job": {"dump_folder": "./outputs", "description": "debug"},
    "profiling": {"run_profiler": True, "save_traces_folder": "profiling/traces", "profile_every_x_iter": 5},
    "metrics": {"enable_tensorboard": False, "log_freq": 10, "save_tb_folder": "tb"},
    "model": {"name": "llama3", "flavor": "debugmodel", "tokenizer_path": ""},
    "optimizer": {"name": "AdamW", "lr": 8e-4},
    "training": {"dataset": "c4_test", "batch_size": 4, "seq_len": 512, "warmup_steps": 2, "max_norm": 1.0,
                 "steps": 10, "data_parallel_degree": 2, "sequence_parallel_degree": 1, "pipeline_parallel_degree": 1,
                 "compile": False, "checkpoint_interval": 7, "checkpoint_interval_type": "steps",
                 "checkpoint_folder": "ckpt", "fp8_linear_type": "", "enable_selective_ac": True},
}

# The dataclass JobConfig of mid 2025 (torchtitan/config/job_config.py), every key with a value.
MID_2025 = {
    "job": {"dump_folder": "./outputs", "description": "d", "use_for_integration_test": False, "print_args": True},
    "profiling": {"enable_profiling": False, "save_traces_folder": "t", "profile_freq": 10,
                  "enable_memory_snapshot": False, "save_memory_snapshot_folder": "m"},
    "metrics": {"log_freq": 5, "enable_tensorboard": False, "disable_color_printing": True, "save_tb_folder": "tb",
                "save_for_all_ranks": False, "enable_wandb": False},
    "model": {"name": "llama3", "flavor": "debugmodel", "tokenizer_path": "", "converters": ["float8"],
              "print_after_conversion": False},
    "optimizer": {"name": "AdamW", "lr": 3e-4, "beta1": 0.9, "beta2": 0.95, "eps": 1e-8, "weight_decay": 0.1,
                  "implementation": "foreach", "early_step_in_backward": False},
    "lr_scheduler": {"warmup_steps": 20, "decay_type": "cosine", "lr_min": 0.1},
    "training": {"dataset": "c4_test", "local_batch_size": 4, "global_batch_size": 16, "seq_len": 256,
                 "max_norm": 1.0, "steps": 100, "enable_cpu_offload": False, "mixed_precision_param": "bfloat16",
                 "mixed_precision_reduce": "float32", "compile": False, "gc_freq": 50, "gc_debug": False, "seed": 7,
                 "deterministic": False},
    "parallelism": {"data_parallel_replicate_degree": 1, "enable_compiled_autograd": False,
                    "data_parallel_shard_degree": -1, "fsdp_reshard_after_forward": "default",
                    "tensor_parallel_degree": 2, "disable_loss_parallel": True, "enable_async_tensor_parallel": False,
                    "pipeline_parallel_degree": 1, "pipeline_parallel_split_points": [],
                    "pipeline_parallel_schedule": "1F1B", "pipeline_parallel_schedule_csv": "",
                    "pipeline_parallel_microbatch_size": 2, "context_parallel_degree": 1,
                    "context_parallel_rotate_method": "allgather", "expert_parallel_degree": 1},
    "checkpoint": {"enable_checkpoint": True, "folder": "checkpoint", "initial_load_model_only": True,
                   "interval": 50, "last_save_model_only": True, "export_dtype": "float32", "create_seed_checkpoint": False,
                   "async_mode": "disabled", "keep_latest_k": 10, "load_step": -1, "exclude_from_loading": [],
                   "enable_first_step_checkpoint": False, "last_save_in_hf": False, "initial_load_in_hf": False},
    "activation_checkpoint": {"mode": "selective", "selective_ac_option": "2",
                              "per_op_sac_force_recompute_mm_shapes_by_fqns": ["moe.router.gate"]},
    "float8": {"enable_fsdp_float8_all_gather": True, "precompute_float8_dynamic_scale_for_fsdp": True,
               "recipe_name": "tensorwise", "filter_fqns": ["output"], "emulate": False, "moe_fqns_prototype": []},
    "comm": {"init_timeout_seconds": 300, "train_timeout_seconds": 100, "trace_buf_size": 20000,
             "save_traces_folder": "comm_traces"},
    "memory_estimation": {"enabled": False, "disable_fake_mode": False},
    "experimental": {"custom_import": "", "custom_args_module": ""},
    "validation": {"enabled": True, "dataset": "c4_test", "local_batch_size": 2, "seq_len": 256, "freq": 10,
                   "steps": 3},
}

# The last TOML era (to February 2026): torchtitan's integration-test base config and its
# 8xB200 presets.
LATE_2025 = {
    "job": {"dump_folder": "./outputs", "description": "model debug training for integration test",
            "print_config": True},
    "profiling": {"enable_profiling": False, "save_traces_folder": "profile_trace", "profile_freq": 10,
                  "enable_memory_snapshot": False, "save_memory_snapshot_folder": "memory_snapshot"},
    "metrics": {"log_freq": 1, "disable_color_printing": False, "enable_tensorboard": False, "save_tb_folder": "tb",
                "enable_wandb": False},
    "model": {"name": "llama3", "flavor": "debugmodel", "hf_assets_path": "./tests/assets/tokenizer",
              "converters": []},
    "optimizer": {"name": "AdamW", "lr": 8e-4, "eps": 1e-8, "implementation": "fused"},
    "lr_scheduler": {"warmup_steps": 2, "decay_ratio": 0.8, "decay_type": "linear", "min_lr_factor": 0.0},
    "training": {"local_batch_size": 8, "seq_len": 2048, "max_norm": 1.0, "steps": 10, "dataset": "c4_test",
                 "dtype": "float32", "mixed_precision_reduce": "bfloat16"},
    "parallelism": {"data_parallel_replicate_degree": 1, "data_parallel_shard_degree": -1,
                    "fsdp_reshard_after_forward": "default", "tensor_parallel_degree": 1,
                    "enable_async_tensor_parallel": False, "pipeline_parallel_degree": 1, "context_parallel_degree": 1,
                    "expert_parallel_degree": 1, "expert_tensor_parallel_degree": 1},
    "checkpoint": {"enable": True, "folder": "checkpoint", "interval": 10, "last_save_model_only": False,
                   "export_dtype": "float32", "async_mode": "disabled"},
    "activation_checkpoint": {"mode": "selective", "selective_ac_option": "2"},
    "compile": {"enable": True, "components": ["model", "loss"]},
    "quantize.linear.float8": {"enable_fsdp_float8_all_gather": False,
                               "precompute_float8_dynamic_scale_for_fsdp": False, "filter_fqns": ["output"]},
    "validation": {"enable": False, "dataset": "c4_validation", "freq": 5, "steps": 10},
    "debug": {"seed": 3, "deterministic": False},
}


def _load(tmp_path, sections, *argv):
    return load_config(["--config", str(write_toml(tmp_path / "tt.toml", sections)), *argv])[0]


def test_spring_2024_file_loads(tmp_path):
    cfg = _load(tmp_path, SPRING_2024)
    assert cfg.parallelism.dp_shard == -1 and cfg.parallelism.pp == 1 and cfg.parallelism.loss_parallel
    assert cfg.float8.enable_float8_linear is True  # training.fp8_linear = "dynamic"
    assert cfg.experimental.enable_compiled_autograd is False
    assert (cfg.training.batch_size, cfg.lr_scheduler.warmup_steps) == (8, 2)
    assert cfg.metrics.enable_color_printing and cfg.checkpoint.interval == 5


def test_early_2024_file_loads(tmp_path):
    cfg = _load(tmp_path, EARLY_2024)
    assert cfg.parallelism.dp_shard == 2 and cfg.parallelism.tp == 1
    assert cfg.checkpoint.enable_checkpoint and cfg.checkpoint.folder == "ckpt" and cfg.checkpoint.interval == 7
    assert cfg.activation_checkpoint.mode == "selective" and cfg.float8.enable_float8_linear is False
    assert cfg.profiling.enable_profiling and cfg.profiling.profile_freq == 5
    assert _load(tmp_path, {"training": {"checkpoint_folder": "", "enable_selective_ac": False}}).activation_checkpoint.mode == "none"


def test_mid_2025_file_loads(tmp_path):
    cfg = _load(tmp_path, MID_2025)
    t, p = cfg.training, cfg.parallelism
    assert t.batch_size == 4 and t.global_batch_size == 16  # local = per rank; global implies accumulation
    assert C.accumulation_steps(cfg, dp_degree=2) == 2
    assert (p.tp, p.dp_shard, p.loss_parallel, p.pp_schedule) == (2, -1, False, "1F1B")
    assert p.pp_microbatches == 2  # local_batch_size 4 / pipeline_parallel_microbatch_size 2
    assert cfg.float8.enable_float8_linear and cfg.float8.enable_fsdp_float8_all_gather  # converters = ["float8"]
    assert (cfg.optimizer.fused, cfg.optimizer.foreach) == (False, True)  # implementation = "foreach"
    assert cfg.lr_scheduler.decay_type == "cosine" and cfg.lr_scheduler.min_lr_ratio == 0.1  # lr_min
    assert cfg.metrics.rank_0_only is True and cfg.metrics.enable_color_printing is False
    assert cfg.checkpoint.enable_checkpoint and cfg.checkpoint.model_weights_only  # last_save_model_only
    assert cfg.validation.enabled and cfg.validation.batch_size == 2 and cfg.validation.steps == 3
    assert cfg.training.seed == 7 and cfg.job.print_args


def test_late_2025_file_loads(tmp_path):
    cfg = _load(tmp_path, LATE_2025, "--training.device", "cpu")
    assert cfg.job.print_args and cfg.model.tokenizer_path == "./tests/assets/tokenizer"
    assert cfg.training.batch_size == 8 and cfg.training.global_batch_size == 0
    assert cfg.training.compile is True and cfg.checkpoint.enable_checkpoint and cfg.checkpoint.interval == 10
    assert cfg.optimizer.fused is True and cfg.training.mixed_precision_reduce == "bfloat16"
    assert cfg.validation.enabled is False and cfg.training.seed == 3
    assert cfg.float8.filter_fqns == ["output"] and cfg.float8.enable_float8_linear is False
    # decay_ratio 0.8 of 10 steps = 8 decay steps of the 8 after warmup: decay right after warmup
    s = cfg.lr_scheduler
    assert (s.decay_type, s.decay_ratio, s.min_lr_ratio) == ("wsd", 1.0, 0.0)
    cfg = _load(tmp_path, LATE_2025, "--training.steps", "102")  # 82 of the 100 post-warmup steps decay
    assert cfg.lr_scheduler.decay_type == "wsd" and cfg.lr_scheduler.decay_ratio == pytest.approx(0.82)


def test_a_lathe_file_keeps_its_decay_ratio(tmp_path):
    """Only a torchtitan file means decay_ratio torchtitan's way: lathe's printed config loads back the same."""
    cfg = C.Config()
    cfg.lr_scheduler.decay_ratio = 0.3
    path = tmp_path / "lathe.toml"
    path.write_text(C.to_toml(cfg))
    again, _ = load_config(["--config", str(path)])
    assert (again.lr_scheduler.decay_type, again.lr_scheduler.decay_ratio) == ("linear", 0.3)


def test_cosine_after_a_stable_phase_is_refused(tmp_path):
    sections = {**LATE_2025, "lr_scheduler": {"decay_ratio": 0.5, "decay_type": "cosine"}}
    with pytest.raises(C.ConfigError, match="lr_scheduler.decay_ratio=0.5: torchtitan's stable phase before a cosine"):
        _load(tmp_path, sections)


def test_every_unknown_key_is_listed_in_one_line(tmp_path):
    sections = {**MID_2025,
                "training": {**MID_2025["training"], "gc_debgu": False},
                "fault_tolerance": {"enable": False, "replica_id": 0},
                "mx": {"recipe_name": "mxfp8"},
                "parallelism": {**MID_2025["parallelism"], "pipeline_parallel_layers_per_stage": 2}}
    with pytest.raises(C.ConfigError) as e:
        _load(tmp_path, sections)
    message = str(e.value)
    assert "\n" not in message and message.startswith(str(tmp_path / "tt.toml")) and "5 unknown options" in message
    for key in ("training.gc_debgu (did you mean 'training.gc_debug'?)",
                "fault_tolerance.enable (torchtitan's, no lathe equivalent)", "fault_tolerance.replica_id",
                "mx.recipe_name", "parallelism.pipeline_parallel_layers_per_stage (torchtitan's, no lathe equivalent)"):
        assert key in message


def test_the_cli_refuses_unknown_keys_in_one_line_with_exit_2(tmp_path):
    sections = {"training": {"local_batch_size": 2, "gc_debug": False}, "mx": {"recipe_name": "mxfp8"},
                "fault_tolerance": {"enable": True}}
    path = write_toml(tmp_path / "tt.toml", sections)
    r = subprocess.run([sys.executable, "-m", "lathe", "train", "--config", str(path)], capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    lines = [line for line in (r.stdout + r.stderr).splitlines() if line.strip()]
    assert len(lines) == 1 and "mx.recipe_name" in lines[0] and "fault_tolerance.enable" in lines[0], lines


def test_no_wrong_suggestions():
    # local_batch_size was offered as global_batch_size; it is the per-rank batch.
    assert load_config(["--training.local_batch_size", "3"])[0].training.batch_size == 3
    with pytest.raises(C.ConfigError, match="torchtitan option with no lathe equivalent") as e:
        load_config(["--profiling.profiler_warmup", "3"])
    assert "did you mean" not in str(e.value)


@pytest.mark.parametrize("argv,message", [
    (["--model.converters", "float8,mx"], "model.converters=.*mx has no lathe equivalent"),
    (["--training.dtype", "bfloat16"], "training.dtype='bfloat16': only 'float32' is supported"),
    (["--parallelism.expert_parallel_degree", "2"], "expert_parallel_degree=2: only 1 is supported"),
    (["--optimizer.implementation", "apex"], "must be one of fused, foreach, for-loop"),
    (["--training.local_batch_size", "3", "--parallelism.pipeline_parallel_microbatch_size", "2"],
     "must divide training.batch_size"),
    (["--validation.seq_len", "100"], "lathe validates at training.seq_len"),
])
def test_converted_keys_refuse_what_lathe_cannot_do(argv, message):
    with pytest.raises(C.ConfigError, match=message):
        load_config(argv)


def test_converted_keys_from_the_command_line():
    cfg, _ = load_config(["--checkpoint.enable", "--compile.enable", "--model.converters", "float8",
                          "--training.global_batch_size", "-1", "--optimizer.implementation", "for-loop",
                          "--no-parallelism.disable_loss_parallel"])
    assert cfg.checkpoint.enable_checkpoint and cfg.training.compile and cfg.float8.enable_float8_linear
    assert cfg.training.global_batch_size == 0 and not cfg.optimizer.foreach and cfg.parallelism.loss_parallel


def test_late_2025_file_validates(tmp_path):
    cfg = _load(tmp_path, {**LATE_2025, "model": {"name": "llama3", "flavor": "debugmodel", "converters": []},
                           "optimizer": {"implementation": "foreach"}, "compile": {"enable": False}})
    validate(cfg)


def test_unknown_sections_join_the_one_line(tmp_path):
    with pytest.raises(C.ConfigError) as e:
        _load(tmp_path, {"trainig": {"steps": 3}, "training": {"gc_debgu": False}})
    assert "1 unknown options and 1 unknown sections: [trainig] (did you mean [training]?)" in str(e.value)
    assert "training.gc_debgu (did you mean 'training.gc_debug'?)" in str(e.value)
    with pytest.raises(C.ConfigError, match=r"\[trainig\]: unknown section in .*did you mean \[training\]"):
        _load(tmp_path, {"trainig": {"steps": 3}})
