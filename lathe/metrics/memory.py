"""Peak memory per logging window: CUDA's caching-allocator peaks, or the process RSS on CPU."""

from __future__ import annotations

import logging
import os
import platform
from dataclasses import dataclass
from pathlib import Path

import torch

logger = logging.getLogger("lathe")

GIB = 1024**3


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

