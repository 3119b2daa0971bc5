"""Host memory on CPU runs: keep freed blocks in the process instead of handing them back to the OS.

PyTorch's CPU tensors come from the C library's ``malloc``. glibc serves a large request (above a
threshold that adapts up to 32 MiB) with a fresh ``mmap`` and returns it to the kernel on ``free``;
smaller blocks freed at the top of the heap are trimmed back too. A training step allocates and
frees the same activation-sized buffers every step, so each one comes back as untouched pages, and
the first write to every 4 KiB page is a page fault in which the kernel zeroes it. Measured on a
2-core CPU (torchtitan's seed debug shape, fp32, batch 8 x 2048, lathe's model): 158,000-1,070,000
faults per step and steps of 14.7-19.7 s; with freed memory retained, 0 faults from the third step
on and 13.6-15.8 s (docs/performance.md). The same elementwise op on the same shapes ran in 1 ms or
in 25 ms depending on whether its output landed on recycled or on fresh pages.

``retain`` (the default, ``training.cpu_allocator``) sets two glibc ``mallopt`` parameters when a run
trains on the CPU: ``M_MMAP_MAX = 0`` (large blocks come from the heap too) and ``M_TRIM_THRESHOLD =
-1`` (the heap is never trimmed; mallopt(3)). Freed blocks are then reused by later steps; the price is that
the process's resident memory stays at its peak instead of falling between steps, which is what a
training process does anyway (the peak recurs every step). PyTorch's CPU tuning guide reaches the
same end by preloading jemalloc or tcmalloc; this needs no extra library. Where the C library is
not glibc (macOS, musl), nothing changes and the run logs why. ``system`` leaves malloc as it is.

Only the process that calls it is affected (every rank of a multi-process run calls it for itself),
and only allocations made after the call; the trainer calls it before building the model.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import platform

logger = logging.getLogger("lathe")

M_TRIM_THRESHOLD = -1  # glibc <malloc.h>
M_MMAP_MAX = -4


def retain_freed_memory() -> str | None:
    """Make glibc malloc keep freed memory for reuse. Returns None when done, else why not."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return f"the C library here is not glibc ({platform.system()} {platform.libc_ver()[0] or 'unknown libc'})"
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError) as e:
        return f"glibc's mallopt could not be loaded ({e})"
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    # 0: never mmap a block of its own; -1: never trim the heap (both as documented in mallopt(3))
    ok = mallopt(M_MMAP_MAX, 0) == 1 and mallopt(M_TRIM_THRESHOLD, -1) == 1
    return None if ok else "glibc's mallopt refused the settings"


def configure(setting: str, device_type: str) -> None:
    """Apply ``training.cpu_allocator`` for a run on ``device_type``; logs what it did."""
    if device_type != "cpu" or setting == "system":
        return
    why_not = retain_freed_memory()
    if why_not is None:
        logger.info("host memory: freed tensor memory is kept for reuse (no page faults on recycled buffers; "
                    "resident memory stays at its peak). training.cpu_allocator=system turns this off")
    else:
        logger.info("host memory: malloc left as it is: %s (training.cpu_allocator=retain)", why_not)
