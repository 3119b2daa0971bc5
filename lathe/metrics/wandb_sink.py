"""The Weights & Biases sink: every record the console and ``metrics.jsonl`` get, through the real
``wandb`` library (optional: ``pip install 'lathe[wandb]'``).

* The run is created in ``{job.dump_folder}/wandb/`` with ``metrics.wandb_project``, ``_entity``,
  ``_run_name``, ``_tags`` and ``_mode`` (``online``, or ``offline``: written to disk only, upload
  later with ``wandb sync``). The resolved lathe config is the run's config.
* Resume: the W&B run id is part of the checkpointed train state (``TrainState.wandb_run_id``), so
  a run resumed from a checkpoint continues the same W&B run (``resume="allow"``); a fresh start
  creates a new one.
* Steps: lathe logs its own ``step`` as a field and W&B plots every metric against it
  (``define_metric``). W&B's internal step only ever grows, so steps logged again after a
  checkpoint resume or a rollback are kept, not dropped.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from lathe.errors import ConfigError

logger = logging.getLogger("lathe")

MODES = ("online", "offline")


def new_run_id() -> str:
    """A W&B run id: lowercase letters and digits, like the ones W&B makes."""
    return uuid.uuid4().hex[:12]


def _import_wandb():
    try:
        import wandb
    except ImportError:
        raise ConfigError("metrics.enable_wandb", "needs the wandb package, which is not installed",
                          "pip install 'lathe[wandb]' (or: pip install wandb)", True) from None
    return wandb


def _scalar(value: Any) -> Any:
    """What W&B gets for one value: numbers as they are (NaN/inf as None), other things as text."""
    if hasattr(value, "item"):  # a 0-dim tensor
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)


class WandbLogger:
    """A :class:`lathe.metrics.sinks.Sink` writing to one W&B run."""

    def __init__(self, *, dump_folder: Path | str, run_id: str, config: Mapping[str, Any] | None = None,
                 project: str = "lathe", entity: str = "", name: str = "", tags: list[str] | tuple = (),
                 mode: str = "online"):
        wandb = _import_wandb()
        self.dir = Path(dump_folder)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.run_id = run_id
        # console="off": lathe's own log lines stay untouched (W&B would wrap stdout/stderr).
        settings = wandb.Settings(console="off", quiet=True, disable_git=True, save_code=False)
        self.run = wandb.init(project=project, entity=entity or None, name=name or None, tags=list(tags) or None,
                              config=dict(config or {}), dir=str(self.dir), mode=mode, id=run_id, resume="allow",
                              settings=settings)
        self.run.define_metric("step")
        self.run.define_metric("*", step_metric="step")
        logger.info("W&B run %s (%s, project %s) in %s", run_id, mode, project, self.dir / "wandb")

    def log(self, record: Mapping[str, Any], step: int | None = None) -> None:
        if step is None:
            event = str(record.get("event", "event"))
            if event == "start":  # what the run runs on: part of the run's config
                info = {k: _scalar(v) for k, v in record.items() if k not in ("event", "time", "time_str")}
                self.run.config.update({"lathe_start": info}, allow_val_change=True)
                return
            row = {f"event/{event}/{k}": _scalar(v) for k, v in record.items() if k not in ("event", "step")}
            if "step" in record:
                row["step"] = record["step"]
            self.run.log(row)
            return
        row = {k: _scalar(v) for k, v in record.items() if k not in ("time",)}
        row["step"] = step
        self.run.log(row)

    def close(self, exit_code: int = 0) -> None:
        if self.run is not None:
            self.run.finish(exit_code=exit_code)
            self.run = None


def open_wandb(cfg, dump_folder: Path, train_state) -> WandbLogger:
    """The W&B sink for a training run, continuing ``train_state.wandb_run_id`` when the run was
    resumed from a checkpoint that has one (and recording a new id in it otherwise)."""
    m = cfg.metrics
    if not train_state.wandb_run_id:
        train_state.wandb_run_id = new_run_id()
    elif train_state.step > 0:
        logger.info("W&B: continuing run %s from step %d", train_state.wandb_run_id, train_state.step)
    return WandbLogger(dump_folder=dump_folder, run_id=train_state.wandb_run_id, config=dataclasses.asdict(cfg),
                       project=m.wandb_project, entity=m.wandb_entity, name=m.wandb_run_name, tags=m.wandb_tags,
                       mode=m.wandb_mode)


def optional_sinks(cfg, dump_folder: Path, train_state) -> list:
    """The sinks beyond JSONL and TensorBoard that the config enables (W&B)."""
    return [open_wandb(cfg, dump_folder, train_state)] if cfg.metrics.enable_wandb else []
