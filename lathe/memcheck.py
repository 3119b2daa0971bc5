"""A training run checks the memory estimate for its own layout.

At the start, ``lathe train`` logs what the analytic model (``lathe.memory_model``) predicts for
this rank's peak tensor memory. Over the first two steps of the run (step 1 creates the optimizer states,
step 2 is the steady state) it measures the same quantity and logs both with their ratio; a miss of more
than ``WARN_RATIO`` either way is a warning.

Measured: on CUDA the caching allocator's peak of allocated bytes (``max_memory_allocated``; free,
it is always on); on CPU, where no allocator keeps statistics, the bytes of live tensor storages
counted by ``lathe.memtrack.MemoryTracker`` during those two steps only (a Python hook per op, 130 us
measured on a busy 2-core CPU where the op itself took 30 us; nothing after step 2; not on compiled CPU
runs). ``--no-memory_estimation.check`` switches it off.
"""

from __future__ import annotations

import contextlib
import logging

import torch

logger = logging.getLogger("lathe")

GIB = 2**30
WARN_RATIO = 1.25  # measured / predicted beyond [1/1.25, 1.25] is a warning
STEPS = 2


class MemoryCheck:
    def __init__(self, cfg, dims, parts, optimizers, device: torch.device, pp_rank: int, vocab_size: int,
                 last_step: int, enabled: bool = True):
        self.enabled = enabled
        self.device = device
        self.last_step = last_step
        self.result: dict = {}
        self.steps_measured = 0
        if not enabled:
            return
        from lathe.memory_model import estimate_rank

        if cfg.float8.enable_float8_linear or cfg.optimizer.early_step_in_backward:
            logger.info("memory: no analytic estimate with %s (the model does not cover it yet; `lathe estimate` "
                        "runs it on fake tensors)", "float8 training" if cfg.float8.enable_float8_linear
                        else "the optimizer step in backward")
            self.enabled = False
            return
        try:
            self.predicted = estimate_rank(cfg, dims, vocab_size, pp_rank, device).peak
        except Exception as e:  # a layout the model does not cover must not stop training
            logger.warning("memory check skipped: the analytic model failed for this layout (%s: %s)",
                           type(e).__name__, e)
            self.enabled = False
            return
        self.tracker = None
        if device.type == "cpu":
            # a dispatch mode around compiled code would change what runs (or stop it compiling)
            compiled = [name for name, on in (("training.compile", cfg.training.compile),
                                              ("model.norm_type fused_rmsnorm", cfg.model.norm_type == "fused_rmsnorm"),
                                              ("experimental.enable_compiled_autograd",
                                               cfg.experimental.enable_compiled_autograd)) if on]
            if compiled:
                logger.info("memory: the analytic model predicts %.3f GiB per rank for the eager run; not "
                            "measured on CPU with compiled code (%s)", self.predicted / GIB, ", ".join(compiled))
                self.enabled = False
                return
            from lathe.memtrack import MemoryTracker

            self.tracker = MemoryTracker(parts, optimizers.torch_optimizers())
        logger.info("memory: the analytic model predicts a peak of %.3f GiB of tensors per rank (pipeline rank "
                    "%d); measured over the first %d steps", self.predicted / GIB, pp_rank, STEPS)

    @contextlib.contextmanager
    def measuring(self, step: int):
        """Wrap each training step: the first ``STEPS`` of this run are measured, then reported."""
        if not self.enabled:
            yield
            return
        with self.tracker if self.tracker is not None else contextlib.nullcontext():
            yield
        self.steps_measured += 1
        if self.steps_measured == STEPS or step == self.last_step:
            self._report(step)

    def _report(self, step: int) -> None:
        self.enabled = False
        by_step = []
        if self.tracker is not None:
            measured, how, by_step = self.tracker.peak, "tracked tensor storages", self.tracker.peak_by_step
            self.tracker = None
        else:
            measured, how = torch.cuda.max_memory_allocated(self.device), "CUDA max_memory_allocated"
        ratio = measured / self.predicted if self.predicted else float("inf")
        self.result = {"predicted": self.predicted, "measured": measured, "ratio": ratio, "step": step,
                       "measured_by_step": by_step}
        message = "memory check after step %d: predicted %.3f GiB, measured %.3f GiB (%s), ratio %.2f"
        args = (step, self.predicted / GIB, measured / GIB, how, ratio)
        if 1 / WARN_RATIO <= ratio <= WARN_RATIO:
            logger.info(message, *args)
        else:
            logger.warning(message + ": the estimate is off for this layout; `lathe estimate` measures it "
                           "exactly on fake tensors (please report the config)", *args)
