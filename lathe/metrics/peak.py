"""Peak FLOP/s of the training device, in the dtype the run computes in, and MFU: a datasheet table
for known GPUs, a short matmul benchmark (several trials, cached per device, dtype, torch version
and thread count, re-measured when stale or beaten by a run) for everything else."""

from __future__ import annotations

import json
import logging
import os
import platform
import re
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

logger = logging.getLogger("lathe")

# Peak bf16 tensor-core throughput in FLOP/s, DENSE (no 2:4 structured sparsity). NVIDIA datasheets
# usually print the sparse number with a footnote; the dense number is half of it. Sources: the
# NVIDIA product datasheets for each GPU (A100, A40, RTX A6000, L40, L40S, H100, H200, and the
# DGX/HGX B200 datasheet), "BF16 Tensor Core" row, sparse value / 2.
PEAK_BF16_DENSE_FLOPS: dict[str, float] = {
    "A100": 312e12,  # SXM and PCIe have the same tensor-core peak (the PCIe card has a lower TDP)
    "A40": 149.7e12,  # datasheet: 149.7 / 299.4 (sparse) TFLOPS
    "RTX A6000": 154.8e12,  # datasheet: 154.8 / 309.7 (sparse) TFLOPS
    "L40": 181e12,  # datasheet: 181.05 / 362.1 (sparse) TFLOPS
    "L40S": 362e12,  # datasheet: 362.05 / 733 (sparse) TFLOPS
    "H100 SXM": 989e12,  # datasheet: 1,979 (sparse) TFLOPS; reports itself as "H100 80GB HBM3"
    "H100 PCIe": 756e12,  # datasheet: 1,513 (sparse) TFLOPS
    "H100 NVL": 835e12,  # datasheet: 1,671 (sparse) TFLOPS per GPU
    "H200": 989e12,  # H200 SXM, same compute die as H100 SXM: 1,979 (sparse) TFLOPS
    "H200 NVL": 835e12,  # datasheet: 1,671 (sparse) TFLOPS, the lower-power PCIe card
    # Grace Hopper: the GPU half is an H100-class die at SXM clocks; the GH200 datasheet lists the
    # same 1,979 (sparse) TFLOPS as H100 SXM, for both the HBM3 and HBM3e variants.
    "GH200": 989e12,
    "B200": 2.25e15,  # DGX/HGX B200 datasheet: 4.5 PFLOPS (sparse) per GPU
}

# How device-name strings map onto the table. Order matters: the first match wins, so the more
# specific names come first. The patterns use word boundaries (\b) rather than plain substrings,
# because substrings bite: "A40" is a substring of "RTX A4000", "L40" of "L40S", "H200" of "GH200".
_GPU_NAME_PATTERNS: list[tuple[re.Pattern[str], str]] = [
    (re.compile(p, re.IGNORECASE), key)
    for p, key in [
        (r"\bGH200\b", "GH200"),
        (r"\bH200\b.*\bNVL\b", "H200 NVL"),
        (r"\bH200\b", "H200"),
        (r"\bH100\b.*\bNVL\b", "H100 NVL"),
        (r"\bH100\b.*\bPCIe\b", "H100 PCIe"),
        # The SXM part reports itself as e.g. "NVIDIA H100 80GB HBM3". A bare "H100" with neither
        # HBM3 nor SXM in the name is ambiguous, so it deliberately matches nothing (-> measured).
        (r"\bH100\b.*\b(SXM\w*|HBM3)\b", "H100 SXM"),
        (r"\bB200\b", "B200"),
        (r"\bA100\b", "A100"),  # "A100-SXM4-80GB", "A100-PCIE-40GB", "A100 80GB PCIe"
        (r"\bRTX A6000\b", "RTX A6000"),
        (r"\bA40\b", "A40"),
        (r"\bL40S\b", "L40S"),
        (r"\bL40\b", "L40"),
    ]
]


def _canonical_gpu_name(name: str) -> str | None:
    """The key in PEAK_BF16_DENSE_FLOPS that a device name refers to, or None if not known."""
    # A MIG slice ("NVIDIA A100-SXM4-40GB MIG 1g.5gb") owns only a fraction of the GPU's compute,
    # so the whole-GPU datasheet peak would be wrong: treat it as unknown and measure instead.
    if re.search(r"\bMIG\b", name):
        return None
    for pattern, key in _GPU_NAME_PATTERNS:
        if pattern.search(name):
            return key
    return None


def lookup_peak_flops(name: str) -> float | None:
    """Datasheet bf16 dense peak FLOP/s for a device name like ``torch.cuda.get_device_name()``.

    Returns None for anything not in the table. It never guesses "closest known GPU": an MFU
    computed against another GPU's peak looks plausible and is silently wrong.
    """
    key = _canonical_gpu_name(name)
    return None if key is None else PEAK_BF16_DENSE_FLOPS[key]


def _cache_dir() -> Path:
    """``$LATHE_CACHE_DIR``, else ``$XDG_CACHE_HOME/lathe``, else ``~/.cache/lathe``."""
    if os.environ.get("LATHE_CACHE_DIR"):
        return Path(os.environ["LATHE_CACHE_DIR"])
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg) if xdg else Path.home() / ".cache"
    return base / "lathe"


def _peak_cache_path() -> Path:
    return _cache_dir() / "peak_flops.json"


def _cpu_name() -> str:
    """A human-readable CPU model name (platform.processor() is often empty on Linux)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    if device.type == "cpu":
        return _cpu_name()
    return f"{device.type} ({_cpu_name()})"


def _synchronize(device: torch.device) -> None:
    """Wait for queued kernels, so wall-clock timings cover the work and not just its launch."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type != "cpu":
        backend = getattr(torch, device.type, None)  # e.g. torch.mps, torch.xpu
        if backend is not None and hasattr(backend, "synchronize"):
            backend.synchronize()


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def default_compute_dtype(device: torch.device | str) -> torch.dtype:
    """What a run computes in when nobody says: bf16 on CUDA, fp32 elsewhere."""
    return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32


def measure_matmul_flops(device: torch.device, budget_s: float = 0.5, *,
                         dtype: torch.dtype | None = None) -> tuple[float, str]:
    """Measure the achievable matmul throughput of ``device`` in ``dtype``, in about ``budget_s``.

    Times square matmuls in ``dtype`` (default :func:`default_compute_dtype`: the dtype the MFU
    will be computed for must be the one measured, since a CPU without native bf16 runs bf16
    matmuls at a fraction of its fp32 speed) and returns the best run, since a best-of-N is the
    least noisy estimate of what the hardware can do. Returns ``(flop_per_s, description)``.

    This is an *achievable* peak, a bit below a datasheet peak, so MFU against it reads higher than
    MFU against a datasheet would.
    """
    device = torch.device(device)
    on_cuda = device.type == "cuda"
    dtype = dtype or default_compute_dtype(device)
    # One timed run should be long enough that timer resolution and launch overhead don't matter,
    # yet short enough that several runs fit in the budget. A GPU needs several large matmuls per
    # run (one 8192^3 bf16 matmul takes ~1 ms on an H100).
    n, reps = (8192, 10) if on_cuda else (2048, 1)

    def time_run(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor, k: int) -> float:
        _synchronize(device)
        t0 = time.perf_counter()
        for _ in range(k):
            torch.matmul(a, b, out=out)
        _synchronize(device)
        return time.perf_counter() - t0

    with torch.no_grad():
        if not on_cuda:
            # Slow machines (or a dtype the CPU emulates): estimate the speed on a smaller problem
            # first and shrink n to 1024 if a 2048^3 run would not fit four times into the budget.
            small = torch.randn(1024, 1024, device=device, dtype=dtype)
            tmp = torch.empty_like(small)
            time_run(small, small, tmp, 1)  # warm-up (thread pool, caches)
            fastest = min(time_run(small, small, tmp, 1) for _ in range(2))
            if fastest * (n / 1024) ** 3 > budget_s / 4:
                n = 1024
            del small, tmp
        a = torch.randn(n, n, device=device, dtype=dtype)
        b = torch.randn(n, n, device=device, dtype=dtype)
        out = torch.empty(n, n, device=device, dtype=dtype)
        time_run(a, b, out, 1)  # warm-up: kernel selection, allocator, clock ramp-up

        flop_per_run = 2 * n**3 * reps  # a (n x n) @ (n x n) matmul is n^3 multiply-adds
        best = 0.0
        runs = 0
        deadline = time.perf_counter() + budget_s
        # At least 3 runs so one unlucky run can't decide the result; at most 100 on fast devices.
        while runs < 3 or (time.perf_counter() < deadline and runs < 100):
            best = max(best, flop_per_run / time_run(a, b, out, reps))
            runs += 1
        del a, b, out
    what = f"best of {runs} runs of {reps}x {_dtype_name(dtype)} {n}x{n} matmul"
    return best, what


def _read_peak_cache(path: Path) -> dict[str, Any]:
    try:
        with open(path) as f:
            data = json.load(f)
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}  # missing, or corrupt (e.g. edited by hand): treat as empty and re-measure


def _write_peak_cache(path: Path, key: str, entry: dict[str, Any]) -> None:
    """Add one entry to the cache file. Written to a temp file and renamed into place, so several
    ranks measuring at once can at worst lose each other's entries, never corrupt the file."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        data = _read_peak_cache(path)
        data[key] = entry
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".peak_flops.", suffix=".tmp")
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=2, sort_keys=True)
        os.replace(tmp, path)
    except OSError as e:  # a read-only home directory must not stop training
        logger.warning("could not write the peak-FLOPs cache %s: %s", path, e)


_logged_peaks: set[str] = set()


def _log_once(key: str, msg: str, *args: Any) -> None:
    if key not in _logged_peaks:
        _logged_peaks.add(key)
        logger.info(msg, *args)


# A cached measurement is trusted only if it was taken by this method (several trials, in the
# run's dtype) and is younger than this; older entries (e.g. one taken while the machine was busy,
# which would make every later MFU read too high) are measured again.
CACHE_VERSION = 2
CACHE_MAX_AGE_DAYS = 30
TRIALS = 3  # short measurements, a moment apart; the best is kept
TRIAL_PAUSE_S = 0.2
# A CPU entry records the 1-minute load average it was measured under; a run that starts with a
# load at least this much lower measures again and keeps the higher peak (a busy machine only ever
# makes the measurement lower, and an MFU against too low a peak reads too high).
LOAD_DROP = 1.0


def _cache_key(device: torch.device, name: str, dtype: torch.dtype) -> str:
    key = f"{device.type}|{name}|{_dtype_name(dtype)}|torch {torch.__version__}"
    if device.type == "cpu":
        key += f"|threads {torch.get_num_threads()}"  # CPU matmul speed scales with threads
    return key


def _fresh_entry(entry: Any, dtype: torch.dtype) -> bool:
    """A cache entry measured by the current method, in ``dtype``, with this torch and thread
    count, and not older than CACHE_MAX_AGE_DAYS."""
    if not isinstance(entry, dict) or entry.get("version") != CACHE_VERSION:
        return False
    flops, when = entry.get("flops"), entry.get("measured_unix")
    if not isinstance(flops, (int, float)) or flops <= 0 or not isinstance(when, (int, float)):
        return False
    if entry.get("dtype") != _dtype_name(dtype) or entry.get("torch") != torch.__version__:
        return False
    if entry.get("threads") not in (None, torch.get_num_threads()):
        return False
    return time.time() - when <= CACHE_MAX_AGE_DAYS * 86400


def _load_average() -> float | None:
    """The machine's 1-minute load average (runnable processes), None where the OS has none."""
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return None


def _busier_then(entry: dict[str, Any], load: float | None) -> bool:
    """A CPU peak measured while the machine was busier than it is now (1-minute load average at
    least LOAD_DROP higher then): other work shared the cores, so the entry may be too low."""
    then = entry.get("load")
    return isinstance(then, (int, float)) and load is not None and then - load >= LOAD_DROP


def _measure_best(device: torch.device, dtype: torch.dtype, budget_s: float, trials: int) -> tuple[float, str]:
    """``trials`` measurements of ``budget_s`` each, a moment apart, the best kept: a burst of
    other work during one of them lowers that trial only."""
    best, method = 0.0, ""
    for i in range(trials):
        if i:
            time.sleep(TRIAL_PAUSE_S)
        flops, what = measure_matmul_flops(device, budget_s, dtype=dtype)
        if flops > best:
            best, method = flops, what
    return best, f"best of {trials} trials, each {method}"


def peak_flops(device: torch.device | str, *, dtype: torch.dtype | None = None, budget_s: float = 0.5,
               trials: int = TRIALS, at_least: float = 0.0) -> tuple[float, str]:
    """Peak FLOP/s of ``device`` in ``dtype`` for MFU, and a sentence saying where it came from.

    ``dtype`` is the dtype the run's matmuls compute in (default :func:`default_compute_dtype`).

    * A CUDA GPU listed in :data:`PEAK_BF16_DENSE_FLOPS` computing in bf16 or fp16 gets its
      datasheet dense peak (the tensor cores of these GPUs run both at the same rate).
    * Anything else (CPUs, unlisted GPUs, MIG slices, fp32 compute) is measured with
      :func:`measure_matmul_flops` in ``dtype``: ``trials`` trials of about ``budget_s`` each, a
      moment apart, the best kept. The result
      is cached in ``peak_flops.json`` under the cache directory (``$LATHE_CACHE_DIR``,
      ``$XDG_CACHE_HOME/lathe`` or ``~/.cache/lathe``), keyed by device name, dtype and torch
      version, plus the thread count on CPU. An entry from an older measuring method or older than
      :data:`CACHE_MAX_AGE_DAYS` is measured again. On CPU the entry also records the 1-minute load
      average it was measured under; when a later call finds the load :data:`LOAD_DROP` or more
      lower, it measures again and keeps the higher of the two peaks (with the lower load).
    * ``at_least``: FLOP/s a run actually achieved. A cached peak below it is wrong (measured while
      the machine was busy), so it is measured again; if the new measurement is still lower, the
      achieved rate itself is the peak (it is a proven lower bound) and the source says so.
    """
    device = torch.device(device)
    dtype = dtype or default_compute_dtype(device)
    name = _device_name(device)
    dname = _dtype_name(dtype)

    if device.type == "cuda" and dtype in (torch.bfloat16, torch.float16):
        key = _canonical_gpu_name(name)
        if key is not None:
            peak = PEAK_BF16_DENSE_FLOPS[key]
            source = f"datasheet {dname} dense peak for {key} (device name {name!r})"
            _log_once(key + dname, "MFU uses peak %.3g TFLOP/s: %s", peak / 1e12, source)
            return peak, source

    cache_key = _cache_key(device, name, dtype)
    path = _peak_cache_path()
    entry = _read_peak_cache(path).get(cache_key)
    load = _load_average() if device.type == "cpu" else None
    fresh = _fresh_entry(entry, dtype)
    busier = fresh and _busier_then(entry, load)
    if fresh and entry["flops"] >= at_least and not busier:
        peak = float(entry["flops"])
        source = (
            f"measured {dname} matmul peak for {name!r} ({entry.get('method', '?')}, "
            f"cached in {path} on {entry.get('measured_at', '?')})"
        )
        _log_once(cache_key, "MFU uses peak %.3g TFLOP/s: %s", peak / 1e12, source)
        return peak, source

    if at_least > 0 and isinstance(entry, dict):
        why = (f"the run achieved {at_least / 1e12:.3g} TFLOP/s, above the cached peak "
               f"{float(entry.get('flops') or 0) / 1e12:.3g}")
    elif busier:
        why = (f"the cached peak was measured under a load average of {entry['load']:.1f}, now "
               f"{load:.1f}")
    elif isinstance(entry, dict):
        why = "the cached measurement is stale"
    else:
        why = "no datasheet peak"
    logger.info("%s for %r in %s; measuring matmul throughput (about %.1f s)...", why, name, dname,
                (budget_s + TRIAL_PAUSE_S) * trials)
    peak, method = _measure_best(device, dtype, budget_s, trials)
    measured_at, measured_unix, when = time.strftime("%Y-%m-%d %H:%M:%S"), time.time(), "just now"
    if busier and float(entry["flops"]) > peak:  # the quieter machine measured less: keep the old peak
        method = f"{entry.get('method', '?')}; at load {load:.1f} a new measurement gave only {peak / 1e12:.3g} TFLOP/s"
        peak, measured_at, measured_unix = float(entry["flops"]), entry.get("measured_at", "?"), entry["measured_unix"]
        when = f"on {measured_at}"
    lower_bound = peak < at_least
    if lower_bound:
        peak, method = at_least, f"the FLOP/s a run achieved; a new measurement gave only {peak / 1e12:.3g} TFLOP/s"
    _write_peak_cache(path, cache_key, {
        "flops": peak, "method": method, "measured_at": measured_at, "measured_unix": measured_unix,
        "version": CACHE_VERSION, "dtype": dname, "torch": torch.__version__,
        "threads": torch.get_num_threads() if device.type == "cpu" else None, "load": load})
    source = f"measured {dname} matmul peak for {name!r} ({method}, {when}; cached in {path})"
    logger.info("MFU uses peak %.3g TFLOP/s: %s", peak / 1e12, source)
    _logged_peaks.add(cache_key)
    return peak, source


def mfu(flops_per_token: float, tokens_per_second: float, peak: float) -> float:
    """Model FLOPs utilisation in percent: achieved model FLOP/s over the device's peak."""
    if peak <= 0:
        return 0.0
    return 100.0 * flops_per_token * tokens_per_second / peak

