"""Distributed checkpoints: what survives a restart, written so a crash never breaks "latest".

Layout of one checkpoint, ``{dump_folder}/{checkpoint.folder}/step-N/``:
- DCP files (``.metadata``, ``__R_0.distcp``): ``model`` and ``optimizer`` state, each rank writing
  its own shards. Parameter and optimizer entries are keyed by parameter name (optimizer state
  flattened), so any layout, and several model parts per rank, can load them.
- ``train_state.json`` (rank 0): step, tokens seen, logged losses, the LR schedule, the data
  stream's position, what the checkpoint contains and which model it holds. JSON, versioned.
- ``rng/rank{R}.json``: each rank's RNG state (restored when the same rank exists on resume).

Atomicity: everything is written into ``step-N.partial-<id>/`` and renamed to ``step-N`` by rank 0
only after every rank has finished. Only ``step-N`` folders count; partial ones are ignored and
removed at the next start. So a kill at any moment leaves the previous complete checkpoint as
"latest".

Modes (``checkpoint.async_mode``): ``disabled`` (training waits for the write), ``async`` (DCP
copies the state to CPU, then a thread writes it while training continues), and
``async_with_pinned_mem`` (DCP stages into (pinned) CPU memory and a separate process writes). The
next save and the end of training wait for the previous one; the log shows how long training
was blocked.

Loading never unpickles arbitrary objects: tensors load with ``weights_only=True`` and the few
non-tensor DCP entries (optimizer hyperparameters) too (``SafeLoadPlanner``).
"""

from __future__ import annotations

import base64
import dataclasses
import json
import logging
import re
import shutil
import time
import uuid
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.checkpoint.api import CheckpointException  # a BaseException, not Exception
from torch.distributed.checkpoint.state_dict_saver import AsyncCheckpointerType

from lathe.config import Checkpoint as CheckpointConfig
from lathe.errors import ConfigError

logger = logging.getLogger("lathe")

FORMAT_VERSION = 1
STEP_DIR = re.compile(r"step-(\d+)")
EXPORT_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


# Single-process saves and loads pass no_dist=True; DCP still warns that it "assumes" that intent.
warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")


class SafeLoadPlanner(DefaultLoadPlanner):
    """DCP's default planner unpickles non-tensor entries with weights_only=False; lathe's only
    non-tensor entries are optimizer hyperparameters (numbers, tuples, booleans)."""

    def load_bytes(self, read_item, value) -> None:
        loaded = torch.load(value, weights_only=True)
        if self.flatten_state_dict:
            from torch.distributed.checkpoint._nested_dict import set_element  # noqa: PLC0415

            set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], loaded)
        else:
            self.state_dict[read_item.dest_index.fqn] = loaded


@dataclass
class TrainState:
    """The trainer's own progress. Stateful through the manager's JSON sidecar."""

    step: int = 0
    tokens_seen: int = 0
    loss_log: list[list[float]] = field(default_factory=list)  # [step, loss] at log steps


# ---------------------------------------------------------------------------------------------
# Small helpers


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _barrier(group) -> None:
    if dist.is_initialized():
        dist.barrier(group=group)


def rng_state() -> dict[str, Any]:
    state = {"cpu": base64.b64encode(torch.get_rng_state().numpy().tobytes()).decode()}
    if torch.cuda.is_available():
        state["cuda"] = base64.b64encode(torch.cuda.get_rng_state().numpy().tobytes()).decode()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(torch.frombuffer(bytearray(base64.b64decode(state["cpu"])), dtype=torch.uint8))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(torch.frombuffer(bytearray(base64.b64decode(state["cuda"])), dtype=torch.uint8))


def complete_steps(folder: Path) -> list[int]:
    """Steps of the complete checkpoints in ``folder``, oldest first."""
    if not folder.is_dir():
        return []
    steps = []
    for child in folder.iterdir():
        m = STEP_DIR.fullmatch(child.name)
        if m and child.is_dir() and (child / ".metadata").is_file() and (child / "train_state.json").is_file():
            steps.append(int(m.group(1)))
    return sorted(steps)


def read_train_state(path: Path) -> dict[str, Any]:
    try:
        data = json.loads((path / "train_state.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ConfigError("checkpoint", f"cannot read {path / 'train_state.json'}: {e}",
                          "the checkpoint is damaged; remove it or pick another step") from None
    if data.get("format_version") != FORMAT_VERSION:
        raise ConfigError("checkpoint", f"{path} has format version {data.get('format_version')}",
                          f"this lathe reads version {FORMAT_VERSION}")
    return data


# ---------------------------------------------------------------------------------------------
# The manager


class CheckpointManager:
    def __init__(self, cfg: CheckpointConfig, dump_folder: Path, model_parts: list[nn.Module],
                 optimizers, schedules, data, train_state: TrainState, model_args):
        self.cfg = cfg
        self.enabled = cfg.enable_checkpoint
        self.folder = dump_folder / cfg.folder
        self.model_parts = model_parts
        self.optimizers = optimizers
        self.schedules = schedules
        self.data = data
        self.train_state = train_state
        from lathe.checkpoint.hf import model_identity  # noqa: PLC0415 (hf imports this module)

        self.model_args = dataclasses.asdict(model_args)
        self.identity = model_identity(model_args)
        self.pending = None  # (future, partial_dir, final_dir, step) of an async save in flight
        self.last_save_time = time.monotonic()
        # A gloo group of our own: collective checks from the training thread and DCP's async
        # coordination never share a communicator with NCCL compute traffic.
        self.group = dist.new_group(backend="gloo") if (self.enabled and dist.is_initialized()) else None
        if self.enabled and _rank() == 0:
            self._remove_partials()

    # --- state -----------------------------------------------------------------------------

    def _model_state(self) -> dict[str, torch.Tensor]:
        state = {}
        for part in self.model_parts:
            state.update(get_model_state_dict(part))
        return state

    def _optimizer_state(self) -> dict[str, Any]:
        state = {}
        options = StateDictOptions(flatten_optimizer_state_dict=True)
        for part, opt in zip(self.model_parts, self.optimizers.optimizers):
            state.update(get_optimizer_state_dict(part, opt, options=options))
        return state

    def _sidecar(self, contents: list[str]) -> dict[str, Any]:
        return {
            "format_version": FORMAT_VERSION,
            "contents": contents,
            "model": self.identity,
            "model_args": self.model_args,
            "train_state": dataclasses.asdict(self.train_state),
            "lr_schedule": _jsonable(self.schedules.state_dict()) if self.schedules else None,
            "data": self.data.state_dict() if self.data is not None else None,
            "world_size": dist.get_world_size() if dist.is_initialized() else 1,
            "time": time.strftime("%Y-%m-%d %H:%M:%S"),
        }

    # --- saving ----------------------------------------------------------------------------

    def should_save(self, step: int, last_step: bool) -> bool:
        if not self.enabled:
            return False
        if last_step:
            return True
        if self.cfg.interval_type == "steps":
            return step % self.cfg.interval == 0
        elapsed = time.monotonic() - self.last_save_time >= self.cfg.interval
        return self.agree(elapsed)

    def agree(self, flag: bool) -> bool:
        """True on every rank if ``flag`` is true on any rank (a tiny all-reduce on CPU)."""
        if self.group is None:
            return flag
        t = torch.tensor([int(flag)])
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self.group)
        return bool(t.item())

    def save(self, step: int, last_step: bool = False, weights_only: bool = False,
             mode: str | None = None) -> None:
        """Write checkpoint step-N. Waits for a previous async save first."""
        start = time.perf_counter()
        self.wait()
        final = self.folder / f"step-{step}"
        partial = self.folder / f"step-{step}.partial-{self._shared_id()}"
        if _rank() == 0:
            partial.mkdir(parents=True, exist_ok=True)
        _barrier(self.group)
        (partial / "rng").mkdir(parents=True, exist_ok=True)
        (partial / "rng" / f"rank{_rank()}.json").write_text(json.dumps(rng_state()))

        if weights_only:
            dtype = EXPORT_DTYPES[self.cfg.export_dtype]
            state = {"model": {k: v.to(dtype) for k, v in self._model_state().items()}}
            contents = ["model"]
        else:
            state = {"model": self._model_state(), "optimizer": self._optimizer_state()}
            contents = ["model", "optimizer", "lr_schedule", "data", "train_state"]
        sidecar = self._sidecar(contents) if _rank() == 0 else None

        mode = mode or self.cfg.async_mode
        if mode == "disabled" or last_step:
            dcp.save(state, checkpoint_id=str(partial), process_group=self.group, no_dist=not dist.is_initialized())
            self._finalize(partial, final, sidecar, step)
        else:
            kind = AsyncCheckpointerType.PROCESS if mode == "async_with_pinned_mem" else AsyncCheckpointerType.THREAD
            response = dcp.async_save(state, checkpoint_id=str(partial), process_group=self.group,
                                      async_checkpointer_type=kind, no_dist=not dist.is_initialized())
            future = getattr(response, "upload_completion", response)
            self.pending = (future, partial, final, sidecar, step)
        self.last_save_time = time.monotonic()
        logger.info("checkpoint step %d: %s, training blocked %.2fs", step,
                    "written" if self.pending is None else f"writing in the background ({mode})",
                    time.perf_counter() - start)

    def wait(self) -> None:
        """Block until an async save in flight is written and committed."""
        if self.pending is None:
            return
        future, partial, final, sidecar, step = self.pending
        self.pending = None
        start = time.perf_counter()
        future.result()
        self._finalize(partial, final, sidecar, step)
        waited = time.perf_counter() - start
        if waited > 0.01:
            logger.info("checkpoint step %d: waited %.2fs for the background write", step, waited)

    def _shared_id(self) -> str:
        """One random id for the partial folder, agreed by all ranks."""
        ident = [uuid.uuid4().hex[:8]]
        if dist.is_initialized():
            dist.broadcast_object_list(ident, src=0, group=self.group)
        return ident[0]

    def _finalize(self, partial: Path, final: Path, sidecar: dict | None, step: int) -> None:
        _barrier(self.group)  # every rank's shards and RNG file are on disk
        if _rank() == 0:
            (partial / "train_state.json").write_text(json.dumps(sidecar))
            if final.exists():  # an older save of the same step (e.g. rerun after a resume)
                shutil.rmtree(final)
            partial.rename(final)  # the commit point: atomic on one filesystem
            self._purge()
        _barrier(self.group)

    def _purge(self) -> None:
        k = self.cfg.keep_latest_k
        if k <= 0:
            return
        for step in complete_steps(self.folder)[:-k]:
            shutil.rmtree(self.folder / f"step-{step}", ignore_errors=True)
            logger.info("checkpoint step %d removed (keep_latest_k=%d)", step, k)

    def _remove_partials(self) -> None:
        if not self.folder.is_dir():
            return
        for child in self.folder.iterdir():
            if ".partial-" in child.name and child.is_dir():
                logger.warning("removing incomplete checkpoint %s (a save was interrupted)", child)
                shutil.rmtree(child, ignore_errors=True)

    def close(self) -> None:
        self.wait()

    # --- loading ---------------------------------------------------------------------------

    def load(self) -> bool:
        """Resume from this run's latest (or chosen) checkpoint, else start from
        ``initial_load_path`` if given. Returns True when something was loaded."""
        initial_load_path = self.cfg.initial_load_path
        if not self.enabled and not initial_load_path:
            return False
        steps = complete_steps(self.folder) if self.enabled else []
        if self.cfg.load_step >= 0:
            if self.cfg.load_step not in steps:
                raise ConfigError("checkpoint.load_step", f"no complete checkpoint step-{self.cfg.load_step} "
                                  f"in {self.folder}", f"available: {steps or 'none'}", self.cfg.load_step)
            return self._load(self.folder / f"step-{self.cfg.load_step}", model_only=False)
        if steps:
            return self._load(self.folder / f"step-{steps[-1]}", model_only=False)
        if initial_load_path:
            path = Path(initial_load_path)
            if not (path / ".metadata").is_file():
                raise ConfigError("checkpoint.initial_load_path", "not a lathe checkpoint folder (no .metadata)",
                                  "point it at a step-N folder", initial_load_path)
            return self._load(path, model_only=self.cfg.initial_load_model_only)
        return False

    def _load(self, path: Path, model_only: bool) -> bool:
        start = time.perf_counter()
        meta = read_train_state(path)
        self._check_identity(path, meta["model"])
        model_only = model_only or meta["contents"] == ["model"]
        state: dict[str, Any] = {"model": self._model_state()}
        if not model_only:
            state["optimizer"] = self._optimizer_state()
        try:
            dcp.load(state, checkpoint_id=str(path), process_group=self.group, planner=SafeLoadPlanner(),
                     no_dist=not dist.is_initialized())
        except (Exception, CheckpointException) as e:  # a damaged or truncated shard file
            raise ConfigError("checkpoint", f"cannot load {path}: {type(e).__name__}: {e}",
                              "the checkpoint is damaged; remove it or set checkpoint.load_step") from None
        for part in self.model_parts:
            set_model_state_dict(part, state["model"], options=StateDictOptions(strict=False))
        if not model_only:
            options = StateDictOptions(flatten_optimizer_state_dict=True)
            for part, opt in zip(self.model_parts, self.optimizers.optimizers):
                set_optimizer_state_dict(part, opt, state["optimizer"], options=options)
            self.schedules.load_state_dict(meta["lr_schedule"])
            if self.data is not None and meta.get("data") is not None:
                self.data.load_state_dict(meta["data"])
            saved = meta["train_state"]
            self.train_state.step = saved["step"]
            self.train_state.tokens_seen = saved["tokens_seen"]
            self.train_state.loss_log = saved["loss_log"]
            rng_file = path / "rng" / f"rank{_rank()}.json"
            if rng_file.is_file():
                set_rng_state(json.loads(rng_file.read_text()))
        what = "model weights" if model_only else f"everything at step {self.train_state.step}"
        logger.info("loaded %s from %s in %.2fs", what, path, time.perf_counter() - start)
        return True

    def _check_identity(self, path: Path, saved: dict[str, Any]) -> None:
        mismatched = {k: (saved.get(k), v) for k, v in self.identity.items() if saved.get(k) != v}
        if mismatched:
            detail = ", ".join(f"{k}: checkpoint {a!r} vs config {b!r}" for k, (a, b) in mismatched.items())
            raise ConfigError("checkpoint", f"{path} holds a different model ({detail})",
                              "use the model config it was saved with, or another checkpoint folder")


def _jsonable(obj: Any) -> Any:
    """LR scheduler state as plain JSON (it holds numbers, lists and None)."""
    return json.loads(json.dumps(obj, default=lambda o: None))
