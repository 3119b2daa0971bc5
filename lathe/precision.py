"""Which floating-point types a run trains in, chosen by the hardware unless the config says.

``training.mixed_precision_param`` (the dtype FSDP gathers parameters in and computes in) defaults
to ``auto``: bfloat16 on GPUs and on CPUs whose matrix units multiply bfloat16 natively, float32 on
other CPUs. Without native support a CPU converts bfloat16 in software, and a bf16 matmul runs at
about a fifth of the fp32 speed (measured 0.18-0.20x on an AVX-512 CPU without AVX512-BF16/AMX),
so bf16 there would only make multi-process CPU runs slower and less precise. An explicit
``float32`` or ``bfloat16`` always wins. Single-device runs compute in float32 unless
``training.autocast_dtype`` says otherwise, as before.

Native support is read from the CPU's feature flags (no timing, so it does not depend on load):
- x86: AVX512-BF16 or AMX-BF16 for bfloat16, AVX512-FP16 or AMX-FP16 for float16;
- Arm: the BF16 extension for bfloat16, FP16 arithmetic (fphp/asimdhp, FEAT_FP16) for float16;
- elsewhere, or when the flags cannot be read: none assumed.

``compute_dtype`` tells the rest of lathe (MFU, logs) what a run computes its matmuls in.
"""

from __future__ import annotations

import functools
import logging
import platform
import subprocess
from pathlib import Path

import torch

logger = logging.getLogger("lathe")

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

# CPU feature flag -> the dtype it multiplies natively
_X86_FLAGS = {"avx512_bf16": "bfloat16", "amx_bf16": "bfloat16", "avx512_fp16": "float16", "amx_fp16": "float16"}
_ARM_FLAGS = {"bf16": "bfloat16", "fphp": "float16", "asimdhp": "float16"}
_MAC_SYSCTL = {"hw.optional.arm.FEAT_BF16": "bfloat16", "hw.optional.arm.FEAT_FP16": "float16"}


def cpu_flags() -> tuple[set[str], str]:
    """This CPU's feature flags and where they came from (empty where they cannot be read)."""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        try:
            text = cpuinfo.read_text(errors="replace")
        except OSError:
            text = ""
        for line in text.splitlines():
            key, _, value = line.partition(":")
            if key.strip().lower() in ("flags", "features"):  # x86 / Arm
                return set(value.split()), "/proc/cpuinfo"
    if platform.system() == "Darwin":
        flags = set()
        for name in _MAC_SYSCTL:
            try:
                out = subprocess.run(["sysctl", "-n", name], capture_output=True, text=True, timeout=5).stdout
            except (OSError, subprocess.SubprocessError):
                continue
            if out.strip() == "1":
                flags.add(name)
        return flags, "sysctl"
    return set(), "no CPU feature information on this platform"


@functools.lru_cache(maxsize=1)
def cpu_native_dtypes() -> frozenset[str]:
    """The half-precision dtypes ("bfloat16", "float16") this CPU multiplies natively."""
    flags, _ = cpu_flags()
    if platform.system() == "Darwin":
        table = _MAC_SYSCTL
    elif platform.machine().lower() in ("aarch64", "arm64"):
        table = _ARM_FLAGS
    else:
        table = _X86_FLAGS
    return frozenset(dtype for flag, dtype in table.items() if flag in flags)


def param_dtype(setting: str, device: torch.device) -> tuple[torch.dtype, str | None]:
    """The FSDP parameter/compute dtype for ``training.mixed_precision_param`` on ``device``, and
    why, when ``auto`` chose float32 (None otherwise)."""
    if setting != "auto":
        return DTYPES[setting], None
    if device.type != "cpu" or "bfloat16" in cpu_native_dtypes():
        return torch.bfloat16, None
    native = sorted(cpu_native_dtypes())
    why = ("this CPU has no native bfloat16 matrix multiply (no AVX512-BF16/AMX-BF16 or Arm BF16; "
           f"native half precision: {', '.join(native) or 'none'}), where bf16 runs several times slower than fp32")
    return torch.float32, why


def compute_dtype(mixed_precision_param: str, autocast_dtype: str, device: torch.device,
                  fsdp_enabled: bool) -> torch.dtype:
    """The dtype a run's matmuls compute in: FSDP's parameter dtype under FSDP, else the autocast
    dtype, else float32."""
    if fsdp_enabled:
        return param_dtype(mixed_precision_param, device)[0]
    if autocast_dtype != "none":
        return DTYPES[autocast_dtype]
    return torch.float32


def log_choice(mixed_precision_param: str, device: torch.device, fsdp_enabled: bool) -> torch.dtype | None:
    """Log, once per run, when ``auto`` picked float32 for lack of native bf16 (FSDP runs only:
    the setting means nothing without FSDP). Returns the chosen FSDP dtype (None without FSDP)."""
    if not fsdp_enabled:
        return None
    dtype, why = param_dtype(mixed_precision_param, device)
    if why is not None:
        logger.info("precision: FSDP parameters and compute in float32, not bfloat16: %s "
                    "(training.mixed_precision_param auto; set bfloat16 to force it)", why)
    return dtype
