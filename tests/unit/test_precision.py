"""Precision chosen by the hardware: FSDP's parameter dtype follows the CPU's native bf16 support
unless set explicitly."""

import logging

import pytest
import torch

from lathe import precision


@pytest.fixture
def cpu_with(monkeypatch):
    def set_flags(flags: set[str], machine: str = "x86_64", system: str = "Linux"):
        monkeypatch.setattr(precision, "cpu_flags", lambda: (set(flags), "test"))
        monkeypatch.setattr(precision.platform, "machine", lambda: machine)
        monkeypatch.setattr(precision.platform, "system", lambda: system)
        precision.cpu_native_dtypes.cache_clear()
    yield set_flags
    precision.cpu_native_dtypes.cache_clear()


CPU = torch.device("cpu")


def test_cpu_without_native_bf16_defaults_to_fp32_and_says_why(cpu_with, caplog):
    cpu_with({"avx2", "avx512f", "avx512bw"})  # AVX-512 without AVX512-BF16/AMX
    assert precision.cpu_native_dtypes() == frozenset()
    dtype, why = precision.param_dtype("auto", CPU)
    assert dtype == torch.float32 and "no native bfloat16" in why
    assert precision.compute_dtype("auto", "none", CPU, fsdp_enabled=True) == torch.float32
    with caplog.at_level(logging.INFO, logger="lathe"):
        precision.log_choice("auto", CPU, fsdp_enabled=True)
    lines = [r.getMessage() for r in caplog.records if "precision" in r.getMessage()]
    assert len(lines) == 1 and "float32" in lines[0] and "mixed_precision_param" in lines[0]


@pytest.mark.parametrize("flags,machine,system", [
    ({"avx512f", "avx512_bf16"}, "x86_64", "Linux"),
    ({"amx_bf16", "amx_tile"}, "x86_64", "Linux"),
    ({"fp", "asimd", "bf16"}, "aarch64", "Linux"),
    ({"hw.optional.arm.FEAT_BF16"}, "arm64", "Darwin"),
])
def test_cpu_with_native_bf16_keeps_bf16(cpu_with, flags, machine, system, caplog):
    cpu_with(flags, machine, system)
    assert "bfloat16" in precision.cpu_native_dtypes()
    assert precision.param_dtype("auto", CPU) == (torch.bfloat16, None)
    with caplog.at_level(logging.INFO, logger="lathe"):
        precision.log_choice("auto", CPU, fsdp_enabled=True)
    assert "precision" not in caplog.text


def test_fp16_only_cpu_is_reported_but_not_used(cpu_with):
    cpu_with({"avx512f", "avx512_fp16"})
    assert precision.cpu_native_dtypes() == frozenset({"float16"})
    dtype, why = precision.param_dtype("auto", CPU)
    assert dtype == torch.float32 and "float16" in why


def test_explicit_settings_and_gpus_are_unchanged(cpu_with):
    cpu_with(set())
    assert precision.param_dtype("bfloat16", CPU) == (torch.bfloat16, None)  # an explicit setting wins
    assert precision.param_dtype("float32", CPU) == (torch.float32, None)
    assert precision.param_dtype("auto", torch.device("cuda", 0)) == (torch.bfloat16, None)
    # without FSDP the setting means nothing: single-device runs compute in fp32 or the autocast dtype
    assert precision.compute_dtype("auto", "none", CPU, fsdp_enabled=False) == torch.float32
    assert precision.compute_dtype("auto", "bfloat16", CPU, fsdp_enabled=False) == torch.bfloat16
    assert precision.log_choice("auto", CPU, fsdp_enabled=False) is None


def test_real_cpu_flags_are_read():
    flags, source = precision.cpu_flags()
    if source == "/proc/cpuinfo":
        assert flags  # every Linux CPU lists some feature flags
