"""Async tensor parallel: TP communication overlapped with the matmuls that need it (CUDA only).

Plain TP all-gathers a block's input, then runs the column-wise matmuls, then reduce-scatters the
row-wise output: the GPU's compute units wait for each collective. Async TP ("micro-pipelined"
TP) lets inductor rewrite each all-gather + matmul (and matmul + reduce-scatter) pair in the
compiled blocks into a fused op that splits the work into one chunk per rank and exchanges chunks
through symmetric memory (buffers every GPU of the TP group can read and write directly) while
the chunks already received are multiplied.

It therefore needs: CUDA GPUs with peer access (NVLink), ``training.compile`` (the rewrite is an
inductor pass), and ``parallelism.tp > 1``. On torch 2.11-2.13 switching on inductor's
``_micro_pipeline_tp`` pass is enough: symmetric memory is set up for a process group on first
use (``enable_symm_mem_for_group`` is deprecated and no longer needed).
"""

from __future__ import annotations

import logging

from lathe.errors import ConfigError

logger = logging.getLogger("lathe")

OPTION = "experimental.enable_async_tensor_parallel"


def check_config(cfg, cuda_available: bool) -> None:
    """Called from config validation, before any process group starts."""
    if not cfg.experimental.enable_async_tensor_parallel:
        return
    if not cuda_available or cfg.training.device == "cpu":
        raise ConfigError(OPTION, "needs CUDA GPUs (it exchanges tensor-parallel chunks through GPU symmetric "
                          "memory), and this run is on CPU", f"remove --{OPTION}, or run on GPUs", True)
    if not cfg.training.compile:
        raise ConfigError(OPTION, "needs training.compile (the overlap is an inductor rewrite of the compiled "
                          "blocks)", "add --training.compile", True)
    if cfg.parallelism.tp == 1:
        logger.warning("%s has no effect with parallelism.tp = 1 (there is no tensor-parallel communication)",
                       OPTION)


def enable() -> None:
    """Turn on inductor's micro-pipelined TP pass for the blocks compiled after this call."""
    import torch._inductor.config as inductor_config

    inductor_config._micro_pipeline_tp = True  # private in torch 2.11-2.13; no public switch exists
    logger.info("async tensor parallel: inductor overlaps TP all-gathers and reduce-scatters with matmuls")
