"""The Weights & Biases sink: every record the console and ``metrics.jsonl`` get, through the real
``wandb`` library (optional: ``pip install 'lathe[wandb]'``).

* W&B's own conventions hold: its environment variables (``WANDB_MODE``, ``WANDB_PROJECT``,
  ``WANDB_ENTITY``, ``WANDB_NAME``, ``WANDB_TAGS``, ``WANDB_DIR``, ``WANDB_RUN_GROUP``,
  ``WANDB_JOB_TYPE``, ``WANDB_NOTES``, ``WANDB_BASE_URL``, ``WANDB_CONSOLE``, ...) and ``wandb
  offline`` apply unless the config sets the same thing (``metrics.wandb_project``, ``_entity``,
  ``_run_name``, ``_tags``, ``_mode``). ``metrics.wandb_mode=auto`` (the default) lets W&B choose:
  ``$WANDB_MODE``, else online. Offline runs are written to disk only; upload them later with
  ``wandb sync`` (the way to use W&B where compute nodes have no internet).
* The run is created in ``{job.dump_folder}/wandb/`` (in ``$WANDB_DIR/wandb/`` if that is set).
  The resolved lathe config is the run's config.
* Online without an API key, with an invalid one, or with a W&B server that cannot be reached,
  the run stops before training with one line naming both fixes (``wandb login``, or offline).
  The key is looked up before ``wandb.init`` (environment, netrc), so nothing ever waits at a prompt.
* Resume: the W&B run id is part of the checkpointed train state (``TrainState.wandb_run_id``), so
  a run resumed from a checkpoint continues the same W&B run (``resume="allow"``); a fresh start
  creates a new one (``$WANDB_RUN_ID`` if set).
* Steps: lathe logs its own ``step`` as a field and W&B plots every metric against it
  (``define_metric``). W&B's internal step only ever grows, so steps logged again after a
  checkpoint resume or a rollback are kept, not dropped.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from lathe.errors import ConfigError

logger = logging.getLogger("lathe")

MODES = ("auto", "online", "offline")
_FIXES = ("run `wandb login` or set WANDB_API_KEY; or train offline (WANDB_MODE=offline, or "
          "metrics.wandb_mode=offline) and upload later with `wandb sync`")
# Settings lathe prefers, each applied only when its environment variable does not say otherwise.
# console off: lathe's own log lines stay untouched (W&B would wrap stdout/stderr).
_QUIET_SETTINGS = {"console": ("WANDB_CONSOLE", "off"), "quiet": ("WANDB_QUIET", True),
                   "disable_git": ("WANDB_DISABLE_GIT", True), "save_code": ("WANDB_SAVE_CODE", False)}


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


def _global_settings(wandb):
    """W&B's own settings from its environment variables and settings files (what ``wandb.init``
    starts from); None where this wandb version has no such thing."""
    try:
        from wandb.sdk import wandb_setup

        return wandb_setup.singleton().settings
    except Exception:  # noqa: BLE001 - another wandb version: wandb.init decides alone
        return None


def resolved_mode(cfg_mode: str, settings) -> str:
    """The mode the run will have: the config's, or with ``auto`` W&B's own ($WANDB_MODE, else online)."""
    if cfg_mode != "auto":
        return cfg_mode
    mode = str(getattr(settings, "mode", None) or os.environ.get("WANDB_MODE") or "online").lower()
    return "offline" if mode == "dryrun" else mode


def _has_api_key(wandb, settings) -> bool:
    """Whether W&B has credentials for its server (environment, netrc, settings), without asking
    the server or prompting. True where this wandb version cannot tell: wandb.init decides."""
    host = getattr(settings, "base_url", None) or os.environ.get("WANDB_BASE_URL") or "https://api.wandb.ai"
    try:
        from wandb.sdk.lib.wbauth import authenticate
    except ImportError:
        try:
            from wandb.sdk.lib import apikey

            return bool(apikey.api_key(settings=settings))
        except Exception:  # noqa: BLE001
            return True
    try:
        return authenticate.authenticate_session(host=host, source="lathe", prompt=False,
                                                 update_session=False) is not None
    except wandb.errors.Error as e:  # a key in the wrong format
        raise ConfigError("metrics.enable_wandb", f"W&B rejects its API key: {_one_line(e)}", _FIXES) from None
    except TypeError:  # another signature
        return True


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split())[:300] or type(e).__name__


def check_config(cfg) -> None:
    """Before anything starts: wandb is installed, and an online run has an API key (no prompt,
    no network)."""
    m = cfg.metrics
    if not m.enable_wandb:
        return
    wandb = _import_wandb()
    settings = _global_settings(wandb)
    mode = resolved_mode(m.wandb_mode, settings)
    if mode == "online" and not _has_api_key(wandb, settings):
        where = "metrics.wandb_mode=online" if m.wandb_mode == "online" else \
            ("WANDB_MODE=online" if os.environ.get("WANDB_MODE") else "online, W&B's default")
        raise ConfigError("metrics.enable_wandb", f"W&B has no API key configured ({where})", _FIXES)


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
                 mode: str = "auto"):
        """Empty ``project``/``entity``/``name``/``tags`` and ``mode="auto"``: W&B's environment
        variables decide (``project`` then defaults to ``lathe``); ``dump_folder`` is the run's
        folder unless ``$WANDB_DIR`` is set."""
        wandb = _import_wandb()
        env = os.environ
        self.dir = Path(env["WANDB_DIR"]) if env.get("WANDB_DIR") else Path(dump_folder)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.run_id = run_id
        settings = wandb.Settings(**{k: v for k, (var, v) in _QUIET_SETTINGS.items() if var not in env})
        project = project or (None if env.get("WANDB_PROJECT") else "lathe")
        try:
            self.run = wandb.init(project=project, entity=entity or None, name=name or None,
                                  tags=list(tags) or None, config=dict(config or {}),
                                  dir=None if env.get("WANDB_DIR") else str(self.dir),
                                  mode=None if mode == "auto" else mode, id=run_id,
                                  resume=None if env.get("WANDB_RESUME") else "allow", settings=settings)
        except (wandb.errors.Error, TimeoutError) as e:  # no/invalid key, W&B server unreachable
            raise ConfigError("metrics.enable_wandb", f"W&B could not start the run: {_one_line(e)}",
                              _FIXES) from None
        self.run.define_metric("step")
        self.run.define_metric("*", step_metric="step")
        logger.info("W&B run %s (%s, project %s) in %s", run_id, self.run.settings.mode, self.run.project,
                    self.dir / "wandb")

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
        train_state.wandb_run_id = os.environ.get("WANDB_RUN_ID") or new_run_id()
    elif train_state.step > 0:
        logger.info("W&B: continuing run %s from step %d", train_state.wandb_run_id, train_state.step)
    return WandbLogger(dump_folder=dump_folder, run_id=train_state.wandb_run_id, config=dataclasses.asdict(cfg),
                       project=m.wandb_project, entity=m.wandb_entity, name=m.wandb_run_name, tags=m.wandb_tags,
                       mode=m.wandb_mode)


def optional_sinks(cfg, dump_folder: Path, train_state) -> list:
    """The sinks beyond JSONL and TensorBoard that the config enables (W&B)."""
    return [open_wandb(cfg, dump_folder, train_state)] if cfg.metrics.enable_wandb else []
