"""Float8 training (torchao) on one CPU process: what the converter swaps, the checks that run
before any process group, and the numerics against the bf16 run.

Tolerance (measured with bench/float8_numerics.py: tiny Llama, seq 64, batch 4, lr 3e-3, 20
steps): float8 losses differ from the bf16 run by at most 1.0e-3 relative (tensorwise, eager or
inductor), 9.5e-4 (rowwise), 5.8e-4 (rowwise_with_gw_hp); float32 differs from bf16 by 1.4e-4.
The tests allow 5e-3, 5x the largest difference, i.e. 0.04 in loss while these 20 steps move the
loss by about 1.0. docs/float8.md records the numbers.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lathe.config import load_config, validate
from lathe.errors import ConfigError
from lathe.models import MODELS
from lathe.quant import float8

torchao = pytest.importorskip("torchao")
from torchao.float8.float8_linear import Float8Linear  # noqa: E402

TOLERANCE = 5e-3  # relative, per step; see the module docstring
STEPS = 20
BASE = ["--model.flavor", "tiny", "--training.seq_len", "64", "--training.batch_size", "4",
        "--training.steps", str(STEPS), "--metrics.log_freq", "100", "--lr_scheduler.warmup_steps", "2",
        "--optimizer.lr", "3e-3"]


def meta_model(flavor="tiny", **changes):
    args = MODELS["llama3"].flavors[flavor].with_(vocab_size=4096, max_seq_len=64, **changes)
    with torch.device("meta"):
        return MODELS["llama3"].build(args)


def cfg_for(*argv):
    return load_config(list(argv))[0]


def kinds(model):
    return {name: type(m) for name, m in model.named_modules() if isinstance(m, nn.Linear)}


def test_converter_swaps_block_linears_and_keeps_the_output_layer():
    model = float8.convert(meta_model(), cfg_for("--float8.enable_float8_linear"))
    converted = {n for n, k in kinds(model).items() if k is Float8Linear}
    assert converted == {f"layers.{i}.{m}" for i in range(4) for m in (
        "attention.wq", "attention.wk", "attention.wv", "attention.wo",
        "feed_forward.w1", "feed_forward.w2", "feed_forward.w3")}
    assert kinds(model)["output"] is nn.Linear
    assert all(p.device.type == "meta" for p in model.parameters())  # converted before materializing


def test_filter_by_name_parts_and_by_shape():
    cfg = cfg_for("--float8.enable_float8_linear", "--float8.filter_fqns", "output,w2,layers.0")
    model = float8.convert(meta_model(), cfg)
    k = kinds(model)
    assert all(k[f"layers.0.{m}"] is nn.Linear for m in ("attention.wq", "feed_forward.w1"))
    assert all(k[f"layers.{i}.feed_forward.w2"] is nn.Linear for i in range(4))
    assert k["layers.1.feed_forward.w1"] is Float8Linear and k["layers.3.attention.wo"] is Float8Linear
    # "output" names the layer, not any name containing the word
    keep = float8.module_filter(["output"])
    assert not keep(nn.Linear(32, 32), "output") and keep(nn.Linear(32, 32), "output_gate")
    # a dimension not divisible by 16 (here the key/value projection: 2 heads x 12 = 24) stays
    odd = float8.convert(meta_model(dim=96, n_heads=8, n_kv_heads=2), cfg_for("--float8.enable_float8_linear"))
    assert kinds(odd)["layers.0.attention.wk"] is nn.Linear
    assert kinds(odd)["layers.0.attention.wq"] is Float8Linear  # 96 x 96
    # tensor parallel: each shard must align, so tp 2 needs multiples of 32 (wk: 64 x 32 -> 16 per rank)
    assert float8.module_filter([], tp=2)(nn.Linear(64, 32), "wk")
    assert not float8.module_filter([], tp=4)(nn.Linear(64, 32), "wk")


@pytest.mark.parametrize("argv,message", [
    (["--float8.scaling_type_input", "delayed"], "float8.scaling_type_input='delayed': delayed scaling was removed"),
    (["--float8.recipe_name", "rowwise", "--float8.enable_fsdp_float8_all_gather"],
     "works with the tensorwise recipe only"),
])
def test_refused_settings_are_one_line(argv, message):
    with pytest.raises(ConfigError) as info:
        validate(cfg_for("--float8.enable_float8_linear", *argv))
    assert message in str(info.value) and "\n" not in str(info.value)


def test_missing_torchao_names_the_extra(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_torchao(name, *args, **kwargs):
        if name.startswith("torchao"):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_torchao)
    with pytest.raises(ConfigError, match=r"needs the torchao package.*pip install 'lathe\[float8\]'"):
        validate(cfg_for("--float8.enable_float8_linear"))


@pytest.mark.parametrize("name,capability,ok", [
    ("NVIDIA A100-SXM4-80GB", (8, 0), False), ("NVIDIA A40", (8, 6), False),
    ("NVIDIA L40S", (8, 9), True), ("NVIDIA H100 80GB HBM3", (9, 0), True), ("NVIDIA B200", (10, 0), True),
])
def test_hardware_check_names_the_gpu(monkeypatch, name, capability, ok):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index=0: capability)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda index=0: name)
    if ok:
        float8.check_hardware(0)
        return
    with pytest.raises(ConfigError) as info:
        float8.check_hardware(0)
    text = str(info.value)
    assert name in text and f"{capability[0]}.{capability[1]}" in text and "8.9" in text and "\n" not in text


def _train(tmp_path, name, *argv):
    from lathe.trainer import train

    return train(cfg_for(*BASE, "--job.dump_folder", str(tmp_path / name), *argv))


@pytest.fixture(scope="module")
def bf16_losses(tmp_path_factory):
    return _train(tmp_path_factory.mktemp("bf16"), "bf16", "--training.autocast_dtype", "bfloat16").losses


@pytest.mark.parametrize("recipe,backend", [("tensorwise", None), ("rowwise", None), ("rowwise_with_gw_hp", None),
                                            ("tensorwise", "inductor"), ("rowwise", "aot_eager")])
def test_float8_losses_track_the_bf16_run(tmp_path, bf16_losses, recipe, backend):
    argv = ["--float8.enable_float8_linear", "--float8.recipe_name", recipe]
    if backend:  # compiled blocks: inductor generates the float8 casts; aot_eager only traces them
        argv += ["--training.compile", "--training.compile_backend", backend]
    result = _train(tmp_path, recipe, *argv)
    assert sum(isinstance(m, Float8Linear) for m in result.model.modules()) == 28
    for step, loss in result.losses.items():
        assert loss == pytest.approx(bf16_losses[step], rel=TOLERANCE), f"step {step}"
    assert result.losses != bf16_losses  # float8 really ran: it rounds differently
