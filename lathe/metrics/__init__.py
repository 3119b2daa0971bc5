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

One concern per module:

* ``peak.py``: peak FLOP/s (datasheet table, measured and cached matmul peak) and MFU.
* ``memory.py``: :class:`MemoryMonitor`, peak memory per logging window.
* ``console.py``: :func:`format_console_line`, the console line.
* ``sinks.py``: :class:`JsonlLogger`, :class:`TensorBoardLogger`.
* ``processor.py``: :class:`MetricsProcessor` and the distributed loss reduction.

Everything is re-exported here: ``from lathe.metrics import MetricsProcessor`` keeps working.
"""

from __future__ import annotations


from lathe.metrics.console import format_console_line
from lathe.metrics.memory import GIB, MemoryMonitor, MemStats
from lathe.metrics.peak import (
    PEAK_BF16_DENSE_FLOPS,
    lookup_peak_flops,
    measure_matmul_flops,
    mfu,
    peak_flops,
)
from lathe.metrics.processor import MetricsProcessor, ReduceFn, is_finite, make_dist_reduce_fn
from lathe.metrics.sinks import TENSORBOARD_TAGS, JsonlLogger, TensorBoardLogger

__all__ = [
    "GIB",
    "ReduceFn",
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
