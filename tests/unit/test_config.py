"""The config tree: TOML + CLI loading, precedence, booleans, aliases, errors, help and print."""

import re
from pathlib import Path

import pytest

from lathe import config as C
from lathe.config import ConfigError, load_config, to_toml, validate

REPO = Path(__file__).resolve().parents[2]
TORCHTITAN_DEBUG = REPO / "tests" / "assets" / "torchtitan_debug_model.toml"


def write(tmp_path, text, name="c.toml"):
    p = tmp_path / name
    p.write_text(text)
    return str(p)


def test_defaults_are_the_cpu_sized_debug_run():
    cfg, printed = load_config([])
    assert not printed
    assert (cfg.model.name, cfg.model.flavor) == ("llama3", "debugmodel")
    assert cfg.training.seq_len == 256 and cfg.training.batch_size == 8
    validate(cfg)  # the default config is runnable as is


def test_precedence_cli_over_toml_over_default(tmp_path):
    path = write(tmp_path, "[training]\nsteps = 7\nbatch_size = 3\n[optimizer]\nlr = 0.01\n")
    cfg, _ = load_config(["--config", path, "--training.steps", "9", "--optimizer.lr=0.5"])
    assert cfg.training.steps == 9  # CLI beats TOML
    assert cfg.training.batch_size == 3  # TOML beats default
    assert cfg.optimizer.lr == 0.5
    assert cfg.training.seq_len == C.Training().seq_len  # default


def test_cli_before_config_file_still_wins(tmp_path):
    path = write(tmp_path, "[training]\nsteps = 7\n")
    cfg, _ = load_config(["--training.steps", "9", "--config", path])
    assert cfg.training.steps == 9


@pytest.mark.parametrize("argv,expected", [
    (["--training.compile"], True),
    (["--training.compile", "true"], True),
    (["--training.compile=false"], False),
    (["--training.compile", "false"], False),
    (["--no-training.compile"], False),
])
def test_booleans_both_ways(argv, expected):
    cfg, _ = load_config(argv)
    assert cfg.training.compile is expected


def test_boolean_default_true_can_be_switched_off_from_cli():
    assert load_config([])[0].parallelism.loss_parallel is True
    assert load_config(["--no-parallelism.loss_parallel"])[0].parallelism.loss_parallel is False
    assert load_config(["--training.enable_loss_parallel=false"])[0].parallelism.loss_parallel is False


def test_bare_flag_followed_by_another_option():
    cfg, _ = load_config(["--training.compile", "--training.steps", "3"])
    assert cfg.training.compile and cfg.training.steps == 3


def test_lists_dtypes_enums_and_negative_numbers():
    cfg, _ = load_config(["--parallelism.pp_split_points", "layers.2,layers.4",
                          "--training.mixed_precision_param", "float32",
                          "--optimizer.name", "adam", "--parallelism.dp_shard", "-1"])
    assert cfg.parallelism.pp_split_points == ["layers.2", "layers.4"]
    assert cfg.training.mixed_precision_param == "float32"
    assert cfg.optimizer.name == "Adam"  # enum values are matched case-insensitively
    assert cfg.parallelism.dp_shard == -1
    with pytest.raises(ConfigError, match="must be one of auto, float32, bfloat16"):
        load_config(["--training.mixed_precision_param", "int8"])


def test_max_norm_accepts_int_and_float_from_cli():
    assert load_config(["--training.max_norm", "2"])[0].training.max_norm == 2.0
    assert load_config(["--training.max_norm", "0.5"])[0].training.max_norm == 0.5


def test_torchtitan_debug_model_toml_loads_unchanged():
    cfg, _ = load_config(["--config", str(TORCHTITAN_DEBUG)])
    assert cfg.training.seq_len == 2048 and cfg.training.batch_size == 8 and cfg.training.steps == 10
    assert cfg.lr_scheduler.warmup_steps == 2  # training.warmup_steps -> lr_scheduler
    assert cfg.parallelism.dp_shard == -1 and cfg.parallelism.tp == 1  # training.*_degree
    assert cfg.parallelism.pp == 1  # experimental.pipeline_parallel_degree
    assert cfg.activation_checkpoint.mode == "selective"
    assert cfg.activation_checkpoint.selective_ac_option == "2"
    assert cfg.profiling.enable_profiling and cfg.metrics.enable_tensorboard
    assert cfg.job.use_for_integration_test is True


@pytest.mark.parametrize("name", sorted(p.name for p in (REPO / "configs").glob("*.toml")))
def test_shipped_configs_load(name):
    from lathe.models import MODELS

    cfg, _ = load_config(["--config", str(REPO / "configs" / name)])
    assert cfg.model.flavor in MODELS[cfg.model.name].flavors
    assert name == "debug_model.toml" or cfg.model.name in name  # llama3_8b.toml is a llama3


def test_shipped_debug_model_is_runnable_and_has_torchtitan_shape():
    cfg, _ = load_config(["--config", str(REPO / "configs" / "debug_model.toml")])
    assert (cfg.training.seq_len, cfg.training.batch_size) == (2048, 8)
    validate(cfg)


def test_print_config_round_trips(tmp_path):
    cfg, printed = load_config(["--print-config", "--training.steps", "11",
                                "--parallelism.pp_split_points", "layers.1", "--no-metrics.rank_0_only"])
    assert printed
    path = write(tmp_path, to_toml(cfg))
    again, _ = load_config(["--config", path])
    assert again.job.config_file == path  # the file it came from; every other value is equal
    again.job.config_file = None
    assert again == cfg


def test_help_lists_every_option_with_default():
    text = C.help_text()
    for key in C.options():
        assert f"--{key}" in text
    assert "(default: 256)" in text  # training.seq_len


def test_unknown_keys_name_the_closest_valid_key(tmp_path):
    with pytest.raises(ConfigError, match="did you mean 'training.steps'"):
        load_config(["--training.stpes", "3"])
    with pytest.raises(ConfigError, match="did you mean 'optimizer.lr'"):
        load_config(["--training.lr", "3"])
    path = write(tmp_path, "[trainng]\nsteps = 3\n")
    with pytest.raises(ConfigError, match=r"did you mean \[training\]"):
        load_config(["--config", path])
    path = write(tmp_path, "[training]\nbatch_sise = 3\n", "d.toml")
    with pytest.raises(ConfigError, match="did you mean 'training.batch_size'"):
        load_config(["--config", path])


def test_not_supported_yet_is_refused_not_ignored(tmp_path):
    for spec in C.NOT_SUPPORTED_YET:  # every entry, from the command line and from a file
        key, _, bad = spec.partition("=")
        section, name = key.split(".")
        with pytest.raises(ConfigError, match=f"{re.escape(key)}.*not supported yet"):
            load_config([f"--{key}", bad or "true"])
        path = write(tmp_path, f"[{section}]\n{name} = {repr(bad) if bad else 'true'}\n")
        with pytest.raises(ConfigError, match="not supported yet"):
            load_config(["--config", path])
    # the same keys at their defaults are fine (a torchtitan file lists them all)
    load_config(["--no-metrics.enable_wandb", "--checkpoint.interval", "5"])


# At least 15 distinct bad inputs, each with one clear message naming the option.
BAD = [
    (["--training.batch_size", "0"], "training.batch_size=0: must be >= 1"),
    (["--training.steps", "-3"], "training.steps=-3: must be >= 1"),
    (["--training.batch_size", "eight"], "training.batch_size='eight': expected an integer"),
    (["--optimizer.lr", "0"], "optimizer.lr=0.0: must be a positive number"),
    (["--optimizer.beta2", "1.5"], "optimizer.beta2=1.5: must be in"),
    (["--optimizer.name", "SGD"], "optimizer.name='SGD': must be one of Adam, AdamW"),
    (["--model.flavor", "debugmodl"], "did you mean 'debugmodel'"),
    (["--model.name", "gpt2"], "model.name='gpt2': must be one of llama2, llama3"),
    (["--model.tokenizer_path", "/nonexistent/tokenizer.json"], "model.tokenizer_path='/nonexistent/tokenizer.json': file not found"),
    (["--training.dataset", "c44"], "training.dataset='c44': unknown dataset"),
    (["--metrics.log_freq", "0"], "metrics.log_freq=0: must be >= 1"),
    (["--lr_scheduler.min_lr_ratio", "2"], "lr_scheduler.min_lr_ratio=2.0: must be in [0, 1]"),
    (["--training.global_batch_size", "20", "--training.batch_size", "8"], "not divisible by batch_size"),
    (["--training.global_batch_size", "32", "--training.batch_size", "8",
      "--training.gradient_accumulation_steps", "2"], "contradicts training.global_batch_size"),
    (["--parallelism.tp", "2"], "must equal the number of processes (1)"),
    (["--parallelism.tp", "0"], "parallelism.tp=0: must be >= 1"),
    (["--activation_checkpoint.mode", "selective", "--activation_checkpoint.selective_ac_option", "x"],
     "must be 'op' or a positive whole number"),
    (["--training.device", "cuda"], "needs CUDA"),
    (["--optimizer.fused"], "optimizer.fused=True: needs CUDA"),
    (["--training.max_norm", "-1"], "training.max_norm=-1.0: must be >= 0"),
    (["--training.seq_len", "1"], "training.seq_len=1: must be >= 2"),
    (["--training.steps"], "training.steps: missing value"),
    (["training.steps", "3"], "unexpected argument"),
    (["--no-training.steps"], "--no- works only with boolean options"),
    (["--config", "/nonexistent.toml"], "job.config_file='/nonexistent.toml': file not found"),
]


@pytest.mark.parametrize("argv,message", BAD, ids=[" ".join(a) for a, _ in BAD])
def test_bad_inputs_give_one_precise_message(argv, message):
    with pytest.raises(ConfigError) as info:
        cfg, _ = load_config(argv)
        validate(cfg, world_size=1, cuda_available=False)
    assert message in str(info.value)
    assert "\n" not in str(info.value)


def test_invalid_toml_is_reported(tmp_path):
    path = write(tmp_path, "[training\nsteps = 3\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(["--config", path])


@pytest.mark.parametrize("argv,world,message", [
    (["--parallelism.tp", "3"], 3, "has 16 attention heads, not divisible by tp"),
    (["--model.flavor", "tiny", "--parallelism.tp", "4"], 4, "has 2 key/value heads, not divisible by tp"),
    (["--parallelism.tp", "2", "--training.seq_len", "255"], 2, "not divisible by parallelism.tp=2"),
    (["--parallelism.tp", "2", "--parallelism.dp_replicate", "2", "--parallelism.dp_shard", "1"], 4,
     "DDP (replicate without shard) does not compose with tensor parallel"),
    (["--parallelism.dp_shard", "3"], 4, "must equal the number of processes (4)"),
    (["--parallelism.pp", "2", "--parallelism.pp_schedule", "nope"], 2, "unknown pipeline schedule"),
    (["--parallelism.pp", "2", "--parallelism.pp_split_points", "layers.4,layers.6"], 2,
     "3 stages cannot be spread evenly over pp=2"),
    (["--parallelism.pp", "2", "--parallelism.pp_split_points", "layers.9"], 2, "must be increasing"),
    (["--parallelism.pp", "2", "--parallelism.pp_schedule", "1F1B", "--parallelism.pp_stages_per_rank", "2"], 2,
     "runs one stage per rank, but there are 2"),
    (["--parallelism.pp", "2", "--parallelism.pp_microbatches", "3"], 2, "does not split into 3 micro-batches"),
    (["--parallelism.pp", "2", "--parallelism.pp_microbatches", "1", "--training.batch_size", "4"], 2,
     "needs at least as many micro-batches as stages (2)"),
    (["--parallelism.pp", "2", "--parallelism.pp_schedule", "ZBVZeroBubble", "--validation.enabled"], 2,
     "torch cannot run V-shaped schedules forward-only"),
    (["--parallelism.pp", "2", "--parallelism.dp_replicate", "2", "--parallelism.dp_shard", "1"], 4,
     "does not compose with pipeline parallel"),
])
def test_layout_errors(argv, world, message):
    cfg, _ = load_config(argv)
    with pytest.raises(ConfigError, match=re.escape(message)):
        validate(cfg, world_size=world)


def test_layouts_that_fit_validate():
    for argv, world in ((["--parallelism.tp", "2"], 4), (["--parallelism.dp_replicate", "2"], 4),
                        (["--parallelism.dp_replicate", "2", "--parallelism.tp", "2"], 8)):
        validate(load_config(argv)[0], world_size=world)


def test_config_reference_doc_is_current():
    doc = REPO / "docs" / "config.md"
    assert doc.read_text() == C.markdown_reference(), "regenerate with: lathe config-docs > docs/config.md"
