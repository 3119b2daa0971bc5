"""Training metrics: peak FLOPs, MFU, memory, the console line, JSONL and TensorBoard sinks.

The trainer talks to one object, :class:`MetricsProcessor`. Every step it hands over the loss (as
a tensor), the number of tokens and the learning rate; every ``log_freq`` steps the processor turns
what it accumulated into a metrics dict, prints the familiar console line and writes the dict to
``metrics.jsonl`` (and TensorBoard if enabled).

A few definitions, since they are easy to get subtly wrong:

* **wps** ("words" per second) is *tokens* per second *per device*: the tokens this rank processed
  since the last log, divided by the elapsed time and by the model-parallel degree (ranks of one
  tensor/pipeline/context-parallel group all work on the same tokens, so each owns a share).
* **MFU** (model FLOPs utilisation) is ``flops_per_token * wps / peak_flops``: the fraction of the
  device's peak arithmetic throughput the model's FLOPs would need at the observed speed. The
  peak comes from a datasheet table for known GPUs and from a short matmul benchmark otherwise
  (see :func:`peak_flops`); the ``metrics.jsonl`` start record says which one was used.
* **memory** is the peak since the last log: CUDA's peak *reserved* memory (what the caching
  allocator holds, i.e. what other processes cannot use), or the process RSS on CPU.
"""

from __future__ import annotations

import json
import logging
import math
import os
import platform
import re
import tempfile
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

logger = logging.getLogger("lathe")

GIB = 1024**3

# --------------------------------------------------------------------------------------------------
# Peak FLOPs
# --------------------------------------------------------------------------------------------------

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


def measure_matmul_flops(device: torch.device, budget_s: float = 0.5) -> tuple[float, str]:
    """Measure the achievable matmul throughput of ``device`` in FLOP/s, in about ``budget_s``.

    Times square matmuls (fp32 on CPU, bf16 on CUDA, matching what training runs in there) and
    returns the best run, since a best-of-N is the least noisy estimate of what the hardware can
    do. Returns ``(flop_per_s, description of the benchmark)``.

    This is an *achievable* peak, a bit below a datasheet peak, so MFU against it reads higher than
    MFU against a datasheet would.
    """
    device = torch.device(device)
    on_cuda = device.type == "cuda"
    dtype = torch.bfloat16 if on_cuda else torch.float32
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
            # Slow machines: estimate the speed on a smaller problem first and shrink n if a
            # 2048^3 run would not fit at least four times into the budget.
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
    what = f"best of {runs} runs of {reps}x {str(dtype).removeprefix('torch.')} {n}x{n} matmul"
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


def peak_flops(device: torch.device | str, *, budget_s: float = 0.5) -> tuple[float, str]:
    """Peak FLOP/s of ``device`` for MFU, and a sentence saying where the number came from.

    * A CUDA GPU listed in :data:`PEAK_BF16_DENSE_FLOPS` gets its datasheet bf16 dense peak.
    * Anything else (CPUs, unlisted GPUs, MIG slices) is measured once with
      :func:`measure_matmul_flops` and the result cached in ``peak_flops.json`` under the cache
      directory (``$LATHE_CACHE_DIR``, ``$XDG_CACHE_HOME/lathe`` or ``~/.cache/lathe``). The cache
      key is the device name and torch version, plus the thread count on CPU (CPU matmul speed
      scales with threads; a GPU's doesn't).

    A measurement taken while other work was competing for the device comes out low and stays
    cached: delete the cache file (its path is in the returned source) to measure again.
    """
    device = torch.device(device)
    name = _device_name(device)

    if device.type == "cuda":
        key = _canonical_gpu_name(name)
        if key is not None:
            peak = PEAK_BF16_DENSE_FLOPS[key]
            source = f"datasheet bf16 dense peak for {key} (device name {name!r})"
            _log_once(key, "MFU uses peak %.3g TFLOP/s: %s", peak / 1e12, source)
            return peak, source

    cache_key = f"{device.type}|{name}|torch {torch.__version__}"
    if device.type == "cpu":
        cache_key += f"|threads {torch.get_num_threads()}"
    path = _peak_cache_path()
    entry = _read_peak_cache(path).get(cache_key)
    if (
        isinstance(entry, dict)
        and isinstance(entry.get("flops"), (int, float))
        and entry["flops"] > 0
    ):
        peak = float(entry["flops"])
        source = (
            f"measured matmul peak for {name!r} ({entry.get('method', '?')}, "
            f"cached in {path} on {entry.get('measured_at', '?')})"
        )
        _log_once(cache_key, "MFU uses peak %.3g TFLOP/s: %s", peak / 1e12, source)
        return peak, source

    _log_once(
        "measuring " + cache_key,
        "No datasheet peak for %r; measuring matmul throughput (about %.1f s)...",
        name,
        budget_s,
    )
    peak, method = measure_matmul_flops(device, budget_s=budget_s)
    measured_at = time.strftime("%Y-%m-%d %H:%M:%S")
    _write_peak_cache(
        path, cache_key, {"flops": peak, "method": method, "measured_at": measured_at}
    )
    source = f"measured matmul peak for {name!r} ({method}, just now; cached in {path})"
    _log_once(cache_key, "MFU uses peak %.3g TFLOP/s: %s", peak / 1e12, source)
    return peak, source


def mfu(flops_per_token: float, tokens_per_second: float, peak: float) -> float:
    """Model FLOPs utilisation in percent: achieved model FLOP/s over the device's peak."""
    if peak <= 0:
        return 0.0
    return 100.0 * flops_per_token * tokens_per_second / peak


def is_finite(loss: torch.Tensor | float) -> bool:
    """True if the loss is neither NaN nor infinite.

    For a GPU tensor this waits for the GPU (a host-device sync), which is why
    :meth:`MetricsProcessor.step` does not call it every step; the trainer decides how often.
    """
    if isinstance(loss, torch.Tensor):
        return bool(torch.isfinite(loss.detach()).all())
    return math.isfinite(loss)


# --------------------------------------------------------------------------------------------------
# Memory
# --------------------------------------------------------------------------------------------------


@dataclass
class MemStats:
    """Peak memory since the last :meth:`MemoryMonitor.reset_peak`.

    ``gib``/``pct`` are what the console shows: peak reserved memory on CUDA, peak RSS on CPU.
    """

    gib: float
    pct: float
    allocated_gib: float  # CUDA: peak memory in live tensors (<= reserved). CPU: same as gib
    capacity_gib: float  # GPU memory, or RAM available to this process (cgroup limit if smaller)
    num_alloc_retries: int = 0  # CUDA: times the allocator had to free its cache and retry
    num_ooms: int = 0  # CUDA: out-of-memory errors raised


def _cgroup_memory_limit() -> int | None:
    """The container's memory limit in bytes, if there is one (cgroup v2, then v1)."""
    for path in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            text = Path(path).read_text().strip()
        except OSError:
            continue
        if text.isdigit() and int(text) < 1 << 60:  # "max" / a huge number mean "no limit"
            return int(text)
    return None


def _ru_maxrss_bytes() -> int | None:
    """Lifetime peak RSS of this process from getrusage (None where unavailable, e.g. Windows)."""
    try:
        import resource
    except ImportError:
        return None
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # Linux reports kilobytes, macOS bytes.
    return maxrss if platform.system() == "Darwin" else maxrss * 1024


class MemoryMonitor:
    """Peak device memory between :meth:`reset_peak` calls.

    On CUDA the caching allocator tracks exact peaks for us. On CPU (and other devices whose
    memory is host RAM) we track the process's resident set size (RSS). RSS can only be *sampled*,
    so the peak is the max over samples taken at :meth:`peak` and :meth:`sample` calls; in addition
    ``getrusage``'s lifetime peak is used as a floor when it rose after the last reset (a new
    lifetime peak that appeared after the reset must have happened inside this window), which
    catches short spikes between samples.
    """

    def __init__(self, device: torch.device | str):
        self.device = torch.device(device)
        self._is_cuda = self.device.type == "cuda"
        self._last_retries = 0
        self._last_ooms = 0
        if self._is_cuda:
            self._capacity = torch.cuda.get_device_properties(self.device).total_memory
        else:
            try:
                import psutil

                self._process = psutil.Process()
                total = psutil.virtual_memory().total
            except ImportError:  # psutil is a dependency, but degrade rather than crash
                self._process = None
                total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
            limit = _cgroup_memory_limit()
            self._capacity = min(total, limit) if limit else total
        self.reset_peak()

    def _rss(self) -> int:
        if self._process is not None:
            return self._process.memory_info().rss
        return _ru_maxrss_bytes() or 0

    def sample(self) -> None:
        """CPU: record the current RSS into the running peak (no-op on CUDA). Call it where memory
        is likely highest (e.g. after backward) to sharpen the CPU peak."""
        if not self._is_cuda:
            self._peak_rss = max(self._peak_rss, self._rss())

    def reset_peak(self) -> None:
        if self._is_cuda:
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            self._peak_rss = self._rss()
            self._ru_maxrss_at_reset = _ru_maxrss_bytes()

    def peak(self) -> MemStats:
        cap_gib = self._capacity / GIB
        if self._is_cuda:
            reserved = torch.cuda.max_memory_reserved(self.device)
            allocated = torch.cuda.max_memory_allocated(self.device)
            stats = torch.cuda.memory_stats(self.device)
            retries = int(stats.get("num_alloc_retries", 0))
            ooms = int(stats.get("num_ooms", 0))
            # These counters only ever grow, so warn when they grew since the last look, not on
            # every log line forever after.
            if retries > self._last_retries:
                logger.warning(
                    "CUDA allocator retries: %d so far (+%d since last log). Memory is nearly "
                    "full and the allocator is flushing its cache, which slows training.",
                    retries,
                    retries - self._last_retries,
                )
            if ooms > self._last_ooms:
                logger.warning("CUDA out-of-memory errors: %d so far", ooms)
            self._last_retries, self._last_ooms = retries, ooms
            return MemStats(
                gib=reserved / GIB,
                pct=100.0 * reserved / self._capacity,
                allocated_gib=allocated / GIB,
                capacity_gib=cap_gib,
                num_alloc_retries=retries,
                num_ooms=ooms,
            )

        self.sample()
        peak = self._peak_rss
        maxrss = _ru_maxrss_bytes()
        if maxrss is not None and self._ru_maxrss_at_reset is not None:
            if maxrss > self._ru_maxrss_at_reset:
                peak = max(peak, maxrss)
        return MemStats(
            gib=peak / GIB,
            pct=100.0 * peak / self._capacity,
            allocated_gib=peak / GIB,
            capacity_gib=cap_gib,
        )


# --------------------------------------------------------------------------------------------------
# Console line
# --------------------------------------------------------------------------------------------------

# ANSI escape codes (bright variants: plain blue is hard to read on dark terminals).
_CYAN, _GREEN, _YELLOW, _BLUE, _MAGENTA = "\033[96m", "\033[92m", "\033[93m", "\033[94m", "\033[95m"
_DIM, _RESET = "\033[2m", "\033[0m"


def format_console_line(
    *,
    step: int,
    loss: float,
    memory_gib: float,
    memory_pct: float,
    wps: float,
    mfu: float,
    color: bool = False,
    tokens_seen: int | None = None,
    lr: float | None = None,
    grad_norm: float | None = None,
    step_time: float | None = None,
    data_loading_pct: float | None = None,
) -> str:
    """The one-line progress report, in the shape torchtitan users know::

        step: 10  loss:  7.1234  memory:  0.52GiB(2.14%)  wps: 1,710  mfu: 3.50%  | tokens: ...

    The part after ``|`` holds the optional extras (only those given), dimmed when ``color``.
    """
    parts = [
        (_CYAN, f"step: {step:2}"),
        (_GREEN, f"loss: {loss:7.4f}"),
        (_YELLOW, f"memory: {memory_gib:5.2f}GiB({memory_pct:.2f}%)"),
        (_BLUE, f"wps: {round(wps):,}"),
        (_MAGENTA, f"mfu: {mfu:.2f}%"),
    ]
    line = "  ".join(f"{c}{text}{_RESET}" if color else text for c, text in parts)

    extras = []
    if tokens_seen is not None:
        extras.append(f"tokens: {tokens_seen:,}")
    if lr is not None:
        extras.append(f"lr: {lr:.3e}")
    if grad_norm is not None:
        extras.append(f"gnorm: {grad_norm:.4f}")
    if step_time is not None:
        extras.append(f"step_time: {step_time:.2f}s")
    if data_loading_pct is not None:
        extras.append(f"data: {data_loading_pct:.1f}%")
    if extras:
        tail = "| " + "  ".join(extras)
        line += "  " + (f"{_DIM}{tail}{_RESET}" if color else tail)
    return line


# --------------------------------------------------------------------------------------------------
# Sinks
# --------------------------------------------------------------------------------------------------


def _json_safe(value: Any) -> Any:
    """Make a value JSON-serialisable. NaN/inf become null: Python's json would write the bare
    tokens NaN/Infinity, which are not JSON and break jq, JavaScript and friends."""
    if isinstance(value, torch.Tensor):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Path):
        return str(value)
    return value


class JsonlLogger:
    """Appends one JSON object per line to ``path``, flushed after every record.

    Flushing each time costs nothing at log frequency and means a crashed or killed run still has
    every metric it logged (and ``tail -f`` works).
    """

    def __init__(self, path: Path | str):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(self.path, "a")

    def log(self, record: Mapping[str, Any]) -> None:
        row = {k: _json_safe(v) for k, v in record.items()}
        row.setdefault("time", time.time())  # Unix timestamp, seconds
        self._file.write(json.dumps(row) + "\n")
        self._file.flush()

    def close(self) -> None:
        if not self._file.closed:
            self._file.close()


# Flat metric names (as in the JSONL records) -> TensorBoard tags. The "group/" prefixes make
# TensorBoard show related curves in one collapsible section.
TENSORBOARD_TAGS: dict[str, str] = {
    "loss": "loss_metrics/global_avg_loss",
    "max_loss": "loss_metrics/global_max_loss",
    "wps": "wps",
    "mfu": "mfu(%)",
    "step_time": "time_metrics/end_to_end(s)",
    "data_loading_time": "time_metrics/data_loading(s)",
    "data_loading_pct": "time_metrics/data_loading(%)",
    "memory_gib": "memory/max_reserved(GiB)",
    "memory_pct": "memory/max_reserved(%)",
    "memory_allocated_gib": "memory/max_allocated(GiB)",
    "num_alloc_retries": "memory/num_alloc_retries",
    "num_ooms": "memory/num_ooms",
    "lr": "optim/lr",
    "grad_norm": "optim/grad_norm",
    "tokens_seen": "tokens_seen",
    "val_loss": "validation/loss",
    "val_perplexity": "validation/perplexity",
    "val_tokens": "validation/tokens",
}


class TensorBoardLogger:
    """Writes metrics dicts as TensorBoard scalars, renaming keys via :data:`TENSORBOARD_TAGS`."""

    def __init__(self, log_dir: Path | str):
        try:
            # Imported here, not at module top: tensorboard is optional and slow to import.
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as e:
            raise ImportError(
                "TensorBoard logging needs the tensorboard package: "
                "pip install tensorboard  (or: pip install 'lathe[tensorboard]')"
            ) from e
        self.log_dir = Path(log_dir)
        self._writer = SummaryWriter(log_dir=str(self.log_dir))

    def log(self, metrics: Mapping[str, Any], step: int) -> None:
        for key, value in metrics.items():
            if key in ("step", "time", "event"):
                continue
            value = _json_safe(value)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                continue  # TensorBoard scalars only; None (non-finite) is skipped too
            self._writer.add_scalar(TENSORBOARD_TAGS.get(key, key), value, step)
        self._writer.flush()

    def close(self) -> None:
        self._writer.close()


# --------------------------------------------------------------------------------------------------
# Distributed loss reduction
# --------------------------------------------------------------------------------------------------

ReduceFn = Callable[[dict[str, torch.Tensor]], Mapping[str, Any]]


def make_dist_reduce_fn(group: Any = None) -> ReduceFn:
    """A ``reduce_fn`` for :class:`MetricsProcessor` that reduces over a torch.distributed group
    (pass the data-parallel group; None = the default group).

    ``avg_loss`` is averaged over ranks (SUM then divide, because gloo has no AVG op) and
    ``max_loss`` maxed. Every rank of the group must call it, which MetricsProcessor does on
    every log step.
    """
    import torch.distributed as dist

    def reduce(local: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        avg = local["avg_loss"].detach().clone()
        mx = local["max_loss"].detach().clone()
        dist.all_reduce(avg, op=dist.ReduceOp.SUM, group=group)
        dist.all_reduce(mx, op=dist.ReduceOp.MAX, group=group)
        return {"avg_loss": avg / dist.get_world_size(group), "max_loss": mx}

    return reduce


# --------------------------------------------------------------------------------------------------
# MetricsProcessor
# --------------------------------------------------------------------------------------------------


class MetricsProcessor:
    """Accumulates per-step values and, every ``log_freq`` steps, logs them.

    Usage in a training loop::

        metrics = MetricsProcessor(log_freq=10, device=device, flops_per_token=fpt, dump_folder=out)
        for step in range(start + 1, steps + 1):
            t0 = time.perf_counter()
            batch = next(data)
            metrics.data_loading_time(time.perf_counter() - t0)
            loss = train_step(batch)
            metrics.step(step, loss, ntokens=batch.numel(), lr=lr, grad_norm=gnorm)
        metrics.close()

    Args:
        log_freq: log on step 1 and every ``log_freq`` steps.
        device: the training device (for peak FLOPs and memory).
        flops_per_token: model FLOPs per token for forward + backward (for MFU).
        dump_folder: run output folder; ``metrics.jsonl`` and the TensorBoard folder go there.
        color: ANSI colours in the console line.
        enable_tensorboard: also write TensorBoard events to ``{dump_folder}/{tb_folder}/{time}``.
        jsonl: write ``{dump_folder}/metrics.jsonl`` (appended to across runs/resumes).
        is_logging_rank: only this rank prints and writes files. All ranks must still call
            :meth:`step`, because ``reduce_fn`` is a collective.
        model_parallel_size: tensor x pipeline x context parallel degree; ranks in one model-
            parallel group share their tokens, so wps is divided by it to stay per-device.
        reduce_fn: given ``{"avg_loss": t, "max_loss": t}`` (0-dim float tensors on the training
            device, this rank's values since the last log), returns the same keys reduced over
            the data-parallel ranks (tensors or floats). None = single process, nothing to reduce.
            :func:`make_dist_reduce_fn` builds one.
    """

    def __init__(
        self,
        *,
        log_freq: int,
        device: torch.device | str,
        flops_per_token: float,
        dump_folder: Path | str,
        color: bool = False,
        enable_tensorboard: bool = False,
        tb_folder: str = "tb",
        jsonl: bool = True,
        is_logging_rank: bool = True,
        model_parallel_size: int = 1,
        reduce_fn: ReduceFn | None = None,
    ):
        if log_freq < 1:
            raise ValueError(f"log_freq must be >= 1, got {log_freq}")
        if model_parallel_size < 1:
            raise ValueError(f"model_parallel_size must be >= 1, got {model_parallel_size}")
        self.log_freq = log_freq
        self.device = torch.device(device)
        self.flops_per_token = flops_per_token
        self.dump_folder = Path(dump_folder)
        self.color = color
        self.is_logging_rank = is_logging_rank
        self.model_parallel_size = model_parallel_size
        self.reduce_fn = reduce_fn

        # Tokens this rank has processed. Public so the trainer can restore it on resume.
        self.tokens_seen = 0

        self.peak_flops, self.peak_flops_source = peak_flops(self.device)
        self.memory = MemoryMonitor(self.device)

        self.jsonl: JsonlLogger | None = None
        self.tensorboard: TensorBoardLogger | None = None
        if is_logging_rank:
            if jsonl:
                self.jsonl = JsonlLogger(self.dump_folder / "metrics.jsonl")
                self.jsonl.log(
                    {
                        "event": "start",
                        "time": time.time(),
                        "time_str": time.strftime("%Y-%m-%d %H:%M:%S"),
                        "device": str(self.device),
                        "device_name": _device_name(self.device),
                        "peak_flops": self.peak_flops,
                        "peak_flops_source": self.peak_flops_source,
                        "flops_per_token": flops_per_token,
                        "log_freq": log_freq,
                        "model_parallel_size": model_parallel_size,
                    }
                )
            if enable_tensorboard:
                tb_dir = self.dump_folder / tb_folder / time.strftime("%Y%m%d-%H%M")
                self.tensorboard = TensorBoardLogger(tb_dir)
                logger.info("TensorBoard logs: %s", tb_dir)

        self._reset_window()

    def _reset_window(self) -> None:
        """Start a new logging window: clear accumulators, restart the clock and memory peak."""
        self._loss_sum: torch.Tensor | None = None
        self._loss_max: torch.Tensor | None = None
        self._steps = 0
        self._tokens = 0
        self._data_time = 0.0
        self.memory.reset_peak()
        self._window_start = time.perf_counter()

    def data_loading_time(self, seconds: float) -> None:
        """Record time spent waiting for a batch (counted into the current window)."""
        self._data_time += seconds

    def step(
        self,
        step: int,
        loss: torch.Tensor | float,
        ntokens: int,
        lr: float,
        grad_norm: torch.Tensor | float,
    ) -> dict[str, Any] | None:
        """Record one optimizer step; on log steps, log and return the metrics dict, else None.

        ``ntokens`` is the number of tokens this rank's batch had in this step.
        """
        # Keep the loss on the device and combine with tensor ops: calling .item() here would make
        # the CPU wait for the GPU every step and stall the pipeline of queued kernels.
        loss_t = torch.as_tensor(loss).detach().float()
        if self._loss_sum is None:
            self._loss_sum, self._loss_max = loss_t.clone(), loss_t.clone()
        else:
            self._loss_sum = self._loss_sum + loss_t
            self._loss_max = torch.maximum(self._loss_max, loss_t)
        self._steps += 1
        self._tokens += int(ntokens)
        self.tokens_seen += int(ntokens)

        if not (step == 1 or step % self.log_freq == 0):
            return None
        return self._log(step, lr, grad_norm)

    def _log(self, step: int, lr: float, grad_norm: torch.Tensor | float) -> dict[str, Any]:
        assert self._loss_sum is not None and self._loss_max is not None
        avg_loss, max_loss = self._loss_sum / self._steps, self._loss_max
        if self.reduce_fn is not None:
            reduced = self.reduce_fn({"avg_loss": avg_loss, "max_loss": max_loss})
            avg_loss, max_loss = reduced["avg_loss"], reduced["max_loss"]
        # One host-device sync per log step, here. Timing is read after it, so the window's
        # elapsed time includes the GPU actually finishing the work.
        avg_loss, max_loss = float(avg_loss), float(max_loss)
        if isinstance(grad_norm, torch.Tensor):
            if hasattr(grad_norm, "full_tensor"):  # a DTensor (sharded model): materialise it
                grad_norm = grad_norm.full_tensor()
            grad_norm = grad_norm.item()
        elapsed = max(time.perf_counter() - self._window_start, 1e-9)

        wps = self._tokens / elapsed / self.model_parallel_size
        mem = self.memory.peak()
        metrics: dict[str, Any] = {
            "step": step,
            "loss": avg_loss,
            "max_loss": max_loss,
            "grad_norm": float(grad_norm),
            "lr": float(lr),
            "tokens_seen": self.tokens_seen,
            "wps": wps,
            "mfu": mfu(self.flops_per_token, wps, self.peak_flops),
            "step_time": elapsed / self._steps,
            "data_loading_time": self._data_time / self._steps,
            "data_loading_pct": 100.0 * self._data_time / elapsed,
            "memory_gib": mem.gib,
            "memory_pct": mem.pct,
            "memory_allocated_gib": mem.allocated_gib,
            "num_alloc_retries": mem.num_alloc_retries,
            "num_ooms": mem.num_ooms,
        }

        if self.is_logging_rank:
            logger.info(
                format_console_line(
                    step=step,
                    loss=avg_loss,
                    memory_gib=mem.gib,
                    memory_pct=mem.pct,
                    wps=wps,
                    mfu=metrics["mfu"],
                    color=self.color,
                    tokens_seen=self.tokens_seen,
                    lr=metrics["lr"],
                    grad_norm=metrics["grad_norm"],
                    step_time=metrics["step_time"],
                    data_loading_pct=metrics["data_loading_pct"],
                )
            )
            if self.jsonl is not None:
                self.jsonl.log(metrics)
            if self.tensorboard is not None:
                self.tensorboard.log(metrics, step)

        self._reset_window()
        return metrics

    def log_validation(self, step: int, values: dict[str, Any]) -> None:
        """Validation results: one console line, and the same sinks as training metrics."""
        if not self.is_logging_rank:
            return
        logger.info("validation step %d: loss %.4f  perplexity %.2f  (%s tokens)", step, values["val_loss"],
                    values["val_perplexity"], f"{values['val_tokens']:,}")
        record = {"step": step, **values}
        if self.jsonl is not None:
            self.jsonl.log(record)
        if self.tensorboard is not None:
            self.tensorboard.log(record, step)

    def close(self) -> None:
        if self.jsonl is not None:
            self.jsonl.close()
        if self.tensorboard is not None:
            self.tensorboard.close()

    def __enter__(self) -> MetricsProcessor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


__all__ = [
    "PEAK_BF16_DENSE_FLOPS",
    "TENSORBOARD_TAGS",
    "JsonlLogger",
    "MemStats",
    "MemoryMonitor",
    "MetricsProcessor",
    "TensorBoardLogger",
    "format_console_line",
    "is_finite",
    "lookup_peak_flops",
    "make_dist_reduce_fn",
    "measure_matmul_flops",
    "mfu",
    "peak_flops",
]
