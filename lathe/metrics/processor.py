"""The object the trainer talks to: accumulates per-step values and logs them every ``log_freq``
steps (console line, JSONL, TensorBoard), with the loss reduced over data-parallel ranks."""

from __future__ import annotations

import logging
import math
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from lathe.metrics.console import format_console_line
from lathe.metrics.memory import MemoryMonitor
from lathe.metrics.peak import _device_name, _dtype_name, default_compute_dtype, mfu, peak_flops
from lathe.metrics.sinks import JsonlLogger, Sink, Sinks, TensorBoardLogger

logger = logging.getLogger("lathe")


def is_finite(loss: torch.Tensor | float) -> bool:
    """True if the loss is neither NaN nor infinite.

    For a GPU tensor this waits for the GPU (a host-device sync), which is why
    :meth:`MetricsProcessor.step` does not call it every step; the trainer decides how often.
    """
    if isinstance(loss, torch.Tensor):
        return bool(torch.isfinite(loss.detach()).all())
    return math.isfinite(loss)



ReduceFn = Callable[[dict[str, torch.Tensor]], Mapping[str, Any]]


def make_dist_reduce_fn(group: Any = None) -> ReduceFn:
    """A ``reduce_fn`` for :class:`MetricsProcessor` that reduces over a torch.distributed group
    (pass the data-parallel group; None = the default group).

    ``max_loss`` is maxed over ranks, every other value (``avg_loss``, ``step_loss``) averaged
    (SUM then divide, because gloo has no AVG op). Every rank of the group must call it, which
    MetricsProcessor does on every log step.
    """
    import torch.distributed as dist

    def reduce(local: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        names = [k for k in local if k != "max_loss"]
        mean = torch.stack([local[k].detach().float() for k in names])
        mx = local["max_loss"].detach().clone()
        dist.all_reduce(mean, op=dist.ReduceOp.SUM, group=group)
        dist.all_reduce(mx, op=dist.ReduceOp.MAX, group=group)
        mean = mean / dist.get_world_size(group)
        return {"max_loss": mx, **{k: mean[i] for i, k in enumerate(names)}}

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
        flops_per_token: model FLOPs per token for forward + backward (for MFU), counting
            attention over the full S x S score matrix (torchtitan's convention).
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
        compute_dtype: the dtype the run's matmuls compute in; the peak for MFU is taken in it
            (default: bf16 on CUDA, fp32 elsewhere).
        attention_flops_per_token: the part of ``flops_per_token`` spent on attention scores
            (QK^T and AV). A causal kernel skips about half of it: ``mfu_causal`` counts that half
            only.
        dp_degree: data-parallel ranks (ranks whose batches differ); global tokens = this rank's
            tokens x dp_degree.
        total_steps: the run's last step, for the ETA in the console line.
        sinks: further sinks (e.g. :class:`lathe.metrics.wandb_sink.WandbLogger`), written with the
            JSONL and TensorBoard ones on the logging rank.
        run_id: the run's id, kept across resumes (the checkpointed train state holds it); every
            metrics.jsonl record carries it. None = a fresh one.
        resumed_from: the step this start resumes from (0 = a fresh run), in the start record.
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
        compute_dtype: torch.dtype | None = None,
        attention_flops_per_token: float = 0.0,
        dp_degree: int = 1,
        total_steps: int | None = None,
        sinks: Sequence[Sink] = (),
        run_id: str | None = None,
        resumed_from: int = 0,
    ):
        if log_freq < 1:
            raise ValueError(f"log_freq must be >= 1, got {log_freq}")
        if model_parallel_size < 1:
            raise ValueError(f"model_parallel_size must be >= 1, got {model_parallel_size}")
        self.log_freq = log_freq
        self.device = torch.device(device)
        self.flops_per_token = flops_per_token
        self.attention_flops_per_token = attention_flops_per_token
        self.dump_folder = Path(dump_folder)
        self.color = color
        self.is_logging_rank = is_logging_rank
        self.model_parallel_size = model_parallel_size
        self.reduce_fn = reduce_fn
        self.dp_degree = max(1, dp_degree)
        self.total_steps = total_steps
        self.compute_dtype = compute_dtype or default_compute_dtype(self.device)
        # Who wrote a record: the run (kept across resumes) and this start of it (lathe/metrics/history.py).
        self.run_id, self.attempt = run_id or new_id(), new_id()

        # Tokens this rank has processed. Public so the trainer can restore it on resume.
        self.tokens_seen = 0

        self.peak_flops, self.peak_flops_source = peak_flops(self.device, dtype=self.compute_dtype)
        self._peak_rechecked = False
        self.memory = MemoryMonitor(self.device)

        self.jsonl: JsonlLogger | None = None
        self.tensorboard: TensorBoardLogger | None = None
        self.sinks = Sinks()
        if is_logging_rank:
            if jsonl:
                self.jsonl = JsonlLogger(self.dump_folder / "metrics.jsonl",
                                         {"run_id": self.run_id, "attempt": self.attempt})
                self.sinks.sinks.append(self.jsonl)
            if enable_tensorboard:
                tb_dir = self.dump_folder / tb_folder / time.strftime("%Y%m%d-%H%M")
                self.tensorboard = TensorBoardLogger(tb_dir)
                self.sinks.sinks.append(self.tensorboard)
                logger.info("TensorBoard logs: %s", tb_dir)
            self.sinks.sinks.extend(sinks)
            self.sinks.log(
                {
                    "event": "start",
                    "time": time.time(),
                    "time_str": time.strftime("%Y-%m-%d %H:%M:%S"),
                    "device": str(self.device),
                    "device_name": _device_name(self.device),
                    "compute_dtype": _dtype_name(self.compute_dtype),
                    "peak_flops": self.peak_flops,
                    "peak_flops_dtype": _dtype_name(self.compute_dtype),
                    "peak_flops_source": self.peak_flops_source,
                    "flops_per_token": flops_per_token,
                    "attention_flops_per_token": attention_flops_per_token,
                    "flops_convention": FLOPS_CONVENTION,
                    "log_freq": log_freq,
                    "model_parallel_size": model_parallel_size,
                    "dp_degree": self.dp_degree,
                    "total_steps": total_steps,
                    "resumed_from": resumed_from,
                }
            )

        self._run_start = time.perf_counter()
        self._pace: tuple[int, float] | None = None  # (step, time) at the end of the first window
        self._reset_window()

    def _reset_window(self) -> None:
        """Start a new logging window: clear accumulators, restart the clock and memory peak."""
        self._loss_sum: torch.Tensor | None = None
        self._loss_max: torch.Tensor | None = None
        self._last_loss: torch.Tensor | None = None  # the loss of the window's last step (None: skipped)
        self._steps = 0
        self._trained = 0  # steps of the window whose update was applied (not skipped)
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
        *,
        skipped: bool = False,
        counters: Mapping[str, int] | None = None,
    ) -> dict[str, Any] | None:
        """Record one optimizer step; on log steps, log and return the metrics dict, else None.

        ``ntokens`` is the number of tokens this rank's batch had in this step. ``skipped``: the
        step's update was dropped (non-finite or spike policy); its loss is left out of the
        window's average, as the model did not train on it. ``counters`` (skipped, non-finite,
        spike steps, rollbacks) go into the log line and the record as they are.
        """
        # Keep the loss on the device and combine with tensor ops: calling .item() here would make
        # the CPU wait for the GPU every step and stall the pipeline of queued kernels.
        self._last_loss = None
        if not skipped:
            loss_t = torch.as_tensor(loss).detach().float()
            self._last_loss = loss_t
            if self._loss_sum is None:
                self._loss_sum, self._loss_max = loss_t.clone(), loss_t.clone()
            else:
                self._loss_sum = self._loss_sum + loss_t
                self._loss_max = torch.maximum(self._loss_max, loss_t)
            self._trained += 1
        self._steps += 1
        self._tokens += int(ntokens)
        self.tokens_seen += int(ntokens)

        if not (step == 1 or step % self.log_freq == 0):
            return None
        return self._log(step, lr, grad_norm, counters or {})

    def _log(self, step: int, lr: float, grad_norm: torch.Tensor | float,
             counters: Mapping[str, int]) -> dict[str, Any]:
        nan = torch.tensor(float("nan"), device=self.device)
        if self._loss_sum is None:  # every step of the window was skipped: no trained loss
            avg_loss, max_loss = nan, nan
        else:
            avg_loss, max_loss = self._loss_sum / self._trained, self._loss_max
        step_loss = nan if self._last_loss is None else self._last_loss.to(nan.device)
        if self.reduce_fn is not None:
            reduced = self.reduce_fn({"avg_loss": avg_loss, "max_loss": max_loss, "step_loss": step_loss})
            avg_loss, max_loss = reduced["avg_loss"], reduced["max_loss"]
            step_loss = reduced.get("step_loss", step_loss)
        # One host-device sync per log step, here. Timing is read after it, so the window's
        # elapsed time includes the GPU actually finishing the work.
        avg_loss, max_loss, step_loss = float(avg_loss), float(max_loss), float(step_loss)
        if isinstance(grad_norm, torch.Tensor):
            if hasattr(grad_norm, "full_tensor"):  # a DTensor (sharded model): materialise it
                grad_norm = grad_norm.full_tensor()
            grad_norm = grad_norm.item()
        now = time.perf_counter()
        elapsed = max(now - self._window_start, 1e-9)

        wps = self._tokens / elapsed / self.model_parallel_size
        self._check_peak(wps)
        mem = self.memory.peak()
        causal_fpt = self.flops_per_token - self.attention_flops_per_token / 2
        run_elapsed = now - self._run_start
        eta = self._eta(step, now)
        metrics: dict[str, Any] = {
            "step": step,
            "loss": avg_loss,  # the mean over the window's trained steps (loss_steps of them)
            "loss_steps": self._trained,
            "step_loss": step_loss,  # this step's own loss: equal in a resumed and an uninterrupted run
            "max_loss": max_loss,
            "grad_norm": float(grad_norm),
            "lr": float(lr),
            "tokens_seen": self.tokens_seen * self.dp_degree,  # global: all data-parallel ranks
            "tokens_seen_per_rank": self.tokens_seen,
            "wps": wps,
            "mfu": mfu(self.flops_per_token, wps, self.peak_flops),
            "mfu_causal": mfu(causal_fpt, wps, self.peak_flops),
            "step_time": elapsed / self._steps,
            "data_loading_time": self._data_time / self._steps,
            "data_loading_pct": 100.0 * self._data_time / elapsed,
            "memory_gib": mem.gib,
            "memory_pct": mem.pct,
            "memory_allocated_gib": mem.allocated_gib,
            "num_alloc_retries": mem.num_alloc_retries,
            "num_ooms": mem.num_ooms,
            "elapsed": run_elapsed,
            "eta": eta,
            **{k: int(v) for k, v in counters.items()},
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
                    tokens_seen=metrics["tokens_seen"],
                    lr=metrics["lr"],
                    grad_norm=metrics["grad_norm"],
                    step_time=metrics["step_time"],
                    data_loading_pct=metrics["data_loading_pct"],
                    elapsed=run_elapsed,
                    eta=eta,
                    counters=counters,
                )
            )
            self.sinks.log(metrics, step)

        self._reset_window()
        return metrics

    def _eta(self, step: int, now: float) -> float | None:
        """Seconds left at the pace since the first log step (which holds warm-up, compilation)."""
        if self.total_steps is None:
            return None
        if self._pace is None or step <= self._pace[0]:
            self._pace = (step, now)
            per_step = (now - self._window_start) / max(self._steps, 1)
        else:
            per_step = (now - self._pace[1]) / (step - self._pace[0])
        return max(self.total_steps - step, 0) * per_step

    def _check_peak(self, wps: float) -> None:
        """A measured peak below what this run achieves is wrong (measured while the machine was
        busy): measure again, once per run (logging rank only, the others keep training)."""
        achieved = self.flops_per_token * wps
        if (achieved <= self.peak_flops or self._peak_rechecked or not self.is_logging_rank
                or "measured" not in self.peak_flops_source):
            return
        self._peak_rechecked = True
        logger.warning("MFU: the run achieves %.3g TFLOP/s, above the measured peak %.3g TFLOP/s; measuring "
                       "the peak again", achieved / 1e12, self.peak_flops / 1e12)
        self.peak_flops, self.peak_flops_source = peak_flops(self.device, dtype=self.compute_dtype,
                                                             at_least=achieved)
        self.sinks.log({"event": "peak_flops", "peak_flops": self.peak_flops,
                        "peak_flops_dtype": _dtype_name(self.compute_dtype),
                        "peak_flops_source": self.peak_flops_source})

    def log_validation(self, step: int, values: dict[str, Any]) -> None:
        """Validation results: one console line, and the same sinks as training metrics."""
        if not self.is_logging_rank:
            return
        logger.info("validation step %d: loss %.4f  perplexity %.2f  (%s tokens)", step, values["val_loss"],
                    values["val_perplexity"], f"{values['val_tokens']:,}")
        self.sinks.log({"step": step, **values}, step)

    def log_event(self, record: Mapping[str, Any]) -> None:
        """A run event (``{"event": name, ...}``: skip, rollback, end) to every sink."""
        if self.is_logging_rank:
            self.sinks.log(dict(record))

    def close(self, exit_code: int = 0) -> None:
        """Close every sink; ``exit_code`` tells W&B whether the run succeeded (0) or failed."""
        self.sinks.close(exit_code)

    def __enter__(self) -> MetricsProcessor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def new_id() -> str:
    """A short random id (12 hex digits) for a run or one start of it."""
    return uuid.uuid4().hex[:12]


# What flops_per_token counts, said next to every MFU figure (metrics.jsonl start record, docs).
FLOPS_CONVENTION = (
    "6 x non-embedding parameters + 12 x layers x heads x head_dim x seq_len per token: attention "
    "scores counted over the full S x S matrix (torchtitan's convention); mfu_causal counts half of "
    "the attention term, what a causal kernel computes"
)


