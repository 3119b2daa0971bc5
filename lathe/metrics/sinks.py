"""Where metrics go besides the console: ``metrics.jsonl``, TensorBoard and (``wandb_sink.py``)
Weights & Biases, all behind one small interface, :class:`Sink`.

A sink gets two kinds of records, both flat dicts:

* metrics at a step (``log(record, step)``): the training record of a log step, validation results;
* events (``log(record, None)``, the record has an ``"event"`` key): ``start`` (device, peak FLOPs,
  ...), ``skip`` and ``rollback`` (non-finite and spike policies), ``end``.

:class:`Sinks` sends every record to all enabled sinks; the trainer never talks to one directly.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

import torch

from lathe.errors import ConfigError


class Sink(Protocol):
    """One destination of metrics records."""

    def log(self, record: Mapping[str, Any], step: int | None = None) -> None:
        """Record metrics at ``step``, or an event when ``step`` is None."""

    def close(self, exit_code: int = 0) -> None:
        """Flush and release files or connections; ``exit_code`` 0 = the run succeeded."""


class Sinks:
    """All enabled sinks, written together in the order given."""

    def __init__(self, sinks: Sequence[Sink] = ()):
        self.sinks = list(sinks)

    def log(self, record: Mapping[str, Any], step: int | None = None) -> None:
        for sink in self.sinks:
            sink.log(record, step)

    def close(self, exit_code: int = 0) -> None:
        for sink in self.sinks:
            sink.close(exit_code)

    def __len__(self) -> int:
        return len(self.sinks)


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
    every metric it logged (and ``tail -f`` works). ``ids`` (the run and attempt ids) go into every
    record, so that runs sharing a folder's file are told apart (lathe/metrics/history.py).
    """

    def __init__(self, path: Path | str, ids: Mapping[str, str] | None = None):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.ids = dict(ids or {})
        self._file = open(self.path, "a")

    def log(self, record: Mapping[str, Any], step: int | None = None) -> None:
        row = {k: _json_safe(v) for k, v in record.items()}
        row.setdefault("time", time.time())  # Unix timestamp, seconds
        row.update(self.ids)
        self._file.write(json.dumps(row) + "\n")
        self._file.flush()

    def close(self, exit_code: int = 0) -> None:
        if not self._file.closed:
            self._file.close()


# Flat metric names (as in the JSONL records) -> TensorBoard tags. The "group/" prefixes make
# TensorBoard show related curves in one collapsible section.
TENSORBOARD_TAGS: dict[str, str] = {
    "loss": "loss_metrics/global_avg_loss",
    "step_loss": "loss_metrics/step_loss",
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
    "tokens_seen_per_rank": "tokens_seen_per_rank",
    "mfu_causal": "mfu_causal(%)",
    "elapsed": "time_metrics/elapsed(s)",
    "eta": "time_metrics/eta(s)",
    "skipped_steps": "anomalies/skipped_steps",
    "nonfinite_steps": "anomalies/nonfinite_steps",
    "spike_steps": "anomalies/spike_steps",
    "rollbacks": "anomalies/rollbacks",
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
        except ImportError:
            raise ConfigError("metrics.enable_tensorboard", "needs the tensorboard package, which is not installed",
                              "pip install 'lathe[tensorboard]' (or: pip install tensorboard)", True) from None
        self.log_dir = Path(log_dir)
        self._writer = SummaryWriter(log_dir=str(self.log_dir))

    def log(self, metrics: Mapping[str, Any], step: int | None = None) -> None:
        if step is None:
            return  # events are not scalars
        for key, value in metrics.items():
            if key in ("step", "time", "event"):
                continue
            value = _json_safe(value)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                continue  # TensorBoard scalars only; None (non-finite) is skipped too
            self._writer.add_scalar(TENSORBOARD_TAGS.get(key, key), value, step)
        self._writer.flush()

    def close(self, exit_code: int = 0) -> None:
        self._writer.close()

