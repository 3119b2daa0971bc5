"""Custom model shapes: every ModelArgs field settable on top of a flavor; counts, FLOPs and the
checkpoint identity follow."""

import dataclasses
import json

import pytest
import torch

from lathe import config as config_lib
from lathe.config import load_config
from lathe.errors import ConfigError
from lathe.models import DERIVED_FIELDS, MODELS, model_args_from_config
from lathe.models.llama import ModelArgs, Transformer, flops_per_token, num_params
from lathe.trainer import train


def expected_params(a: ModelArgs) -> int:
    hd = a.dim // a.n_heads
    attn = a.dim * a.n_heads * hd * 2 + a.dim * a.kv_heads * hd * 2
    ffn = 3 * a.dim * a.ffn_hidden_dim
    return 2 * a.vocab_size * a.dim + a.n_layers * (attn + ffn + 2 * a.dim) + a.dim


def test_every_model_args_field_has_a_config_option():
    options = {f.name for f in dataclasses.fields(config_lib.Model)}
    missing = [f.name for f in dataclasses.fields(ModelArgs) if f.name not in options and f.name not in DERIVED_FIELDS]
    assert not missing, f"ModelArgs fields without a model.* option: {missing}"


@pytest.mark.parametrize("overrides,expect", [
    (["--model.n_layers", "6"], dict(n_layers=6, dim=256, n_heads=16)),
    (["--model.dim", "512", "--model.n_heads", "8", "--model.n_kv_heads", "2"], dict(dim=512, n_heads=8, n_kv_heads=2)),
    (["--model.ffn_dim_multiplier", "1.3", "--model.multiple_of", "64"], dict(ffn_dim_multiplier=1.3, multiple_of=64)),
    (["--model.rope_theta", "10000", "--model.norm_eps", "1e-6"], dict(rope_theta=10000.0, norm_eps=1e-6)),
])
def test_overrides_change_the_shape_and_counts_follow_the_formula(overrides, expect):
    cfg, _ = load_config(["--model.flavor", "debugmodel", *overrides])
    args = model_args_from_config(cfg, vocab_size=2048)
    flavor = MODELS["llama3"].flavors["debugmodel"]
    for key, value in expect.items():
        assert getattr(args, key) == value
    untouched = {"dim", "n_layers", "n_heads"} - {k for k in expect}
    assert all(getattr(args, k) == getattr(flavor, k) for k in untouched)
    assert args.max_seq_len == cfg.training.seq_len
    with torch.device("meta"):
        model = Transformer(args)
    assert num_params(model) == expected_params(args)
    hidden = int(2 * 4 * args.dim / 3)
    if args.ffn_dim_multiplier:
        hidden = int(args.ffn_dim_multiplier * hidden)
    assert args.ffn_hidden_dim == -(-hidden // args.multiple_of) * args.multiple_of
    n = num_params(model, exclude_embedding=True)
    assert flops_per_token(args, n, 256) == 6 * n + 12 * args.n_layers * args.n_heads * args.head_dim * 256


@pytest.mark.parametrize("overrides,option", [
    (["--model.n_heads", "3"], "model.n_heads"),  # 256 not divisible by 3
    (["--model.dim", "96", "--model.n_heads", "32"], "model.n_heads"),  # head size 3: odd
    (["--model.n_kv_heads", "5"], "model.n_kv_heads"),  # 16 heads not divisible by 5
    (["--model.n_layers", "-1"], "model.n_layers"),
    (["--model.rope_theta", "-5"], "model.rope_theta"),
    (["--model.n_heads", "6", "--model.dim", "384", "--parallelism.tp", "4"], "parallelism.tp"),
])
def test_impossible_shapes_fail_in_validation_naming_the_option(overrides, option):
    cfg, _ = load_config(["--model.flavor", "debugmodel", *overrides])
    world = 4 if "--parallelism.tp" in overrides else 1
    with pytest.raises(ConfigError) as e:
        config_lib.validate(cfg, world_size=world)
    assert e.value.option == option


def test_overridden_shape_trains_logs_and_is_part_of_the_checkpoint_identity(tmp_path, caplog):
    common = ["--model.flavor", "tiny", "--training.seq_len", "32", "--training.batch_size", "2",
              "--training.steps", "2", "--checkpoint.enable_checkpoint", "--checkpoint.interval", "2",
              "--job.dump_folder", str(tmp_path)]
    cfg, _ = load_config([*common, "--model.n_layers", "3", "--model.dim", "96", "--model.n_heads", "6",
                          "--model.n_kv_heads", "3"])
    with caplog.at_level("INFO", logger="lathe"):
        result = train(cfg)
    assert len(result.model.layers) == 3 and result.model.layers["0"].attention.wo.weight.shape == (96, 96)
    assert "(dim 96, n_layers 3, n_heads 6, n_kv_heads 3)" in caplog.text
    saved = json.loads((tmp_path / "checkpoint" / "step-2" / "train_state.json").read_text())
    assert saved["model"]["dim"] == 96 and saved["model"]["n_layers"] == 3 and saved["model_args"]["n_heads"] == 6
    # resuming with the flavor's shape is refused, naming the difference
    cfg, _ = load_config([*common, "--training.steps", "3"])
    with pytest.raises(ConfigError, match="dim: checkpoint 96 vs config 64"):
        train(cfg)
