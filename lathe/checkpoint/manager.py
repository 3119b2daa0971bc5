"""Distributed checkpoints: what survives a restart, written so a crash never breaks "latest".

Layout of one checkpoint, ``{dump_folder}/{checkpoint.folder}/step-N/``:
- DCP files (``.metadata``, ``__R_0.distcp``): ``model`` and ``optimizer`` state, each rank writing
  its own shards. Parameter and optimizer entries are keyed by parameter name (optimizer state
  flattened), so any layout, and several model parts per rank, can load them.
- ``train_state.json`` (rank 0): step, tokens seen, logged losses, the LR schedule, the data
  stream's position, what the checkpoint contains and which model it holds. JSON, versioned.
- ``rng/rank{R}.json``: each rank's RNG state (restored when the same rank exists on resume).
- ``manifest.json``: size and CRC-32 checksums of every other file (integrity.py), verified before
  loading; a damaged checkpoint is named in one line and the newest earlier one that verifies is
  loaded instead (``checkpoint.on_damaged``).

Atomicity: everything is written into ``step-N.partial-<id>/`` and renamed to ``step-N`` by rank 0
only after every rank has finished. Only ``step-N`` folders count; partial ones are ignored and
removed at the next start by the run that holds the dump folder's lock (runlock.py). So a kill at
any moment leaves the previous complete checkpoint as "latest".

Modes (``checkpoint.async_mode``): ``disabled`` (training waits for the write), ``async`` (DCP
copies the state to CPU, then a thread writes it while training continues), and
``async_with_pinned_mem`` (DCP stages into (pinned) CPU memory and a separate process writes). A
background save is committed by a thread as soon as every rank's files are on disk, not at the
next save; the next save and the end of training wait for it. The log shows how long training was
blocked.

Loading never unpickles arbitrary objects: ``.metadata`` is read by a restricted unpickler that
builds only DCP's metadata types (``integrity.SafeFileSystemReader``), tensors load with
``weights_only=True`` and the few non-tensor DCP entries (optimizer hyperparameters) too
(``SafeLoadPlanner``).
"""

from __future__ import annotations

import base64
import dataclasses
import errno
import json
import logging
import re
import shutil
import threading
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

from lathe.checkpoint import integrity
from lathe.checkpoint.fused import to_fused, to_unfused
from lathe.checkpoint.integrity import DamagedCheckpoint, SafeFileSystemReader
from lathe.config import Checkpoint as CheckpointConfig
from lathe.errors import ConfigError

logger = logging.getLogger("lathe")

FORMAT_VERSION = 2  # 2: manifest.json with checksums; version 1 checkpoints load without them
READABLE_VERSIONS = (1, 2)
# ModelArgs fields that do not change the parameters or their meaning: a checkpoint loads across them
# Model options a checkpoint may differ in: they change neither the saved tensors nor their meaning
# (the FFN size is compared as ffn_hidden_dim; fused projections are saved under unfused names).
NOT_IDENTITY = frozenset({"max_seq_len", "depth_init", "multiple_of", "ffn_dim_multiplier", "fused_qkv", "fused_w13"})
COMMIT_TIMEOUT_S = 1800  # rank 0 waits this long for the other ranks' files of a background save
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
    # Non-finite and spike policies (lathe/guard.py). Older sidecars without these load as empty.
    skipped: list[dict] = field(default_factory=list)  # steps whose update was dropped: step, reason, windows
    skip_windows: list[list[int]] = field(default_factory=list)  # [start, end) global data windows to drop
    counters: dict[str, int] = field(default_factory=dict)  # skipped_steps, nonfinite_steps, spike_steps, rollbacks
    recent_losses: list[float] = field(default_factory=list)  # the spike detector's window
    wandb_run_id: str = ""  # the W&B run a resumed run continues
    run_id: str = ""  # the lathe run a resumed run continues: every metrics.jsonl record names it


def _restore_train_state(train_state: TrainState, saved: dict[str, Any]) -> None:
    """Set every field from a sidecar's ``train_state``; fields it lacks (older lathe) get their
    defaults."""
    for f in dataclasses.fields(TrainState):
        if f.name in saved:
            value = saved[f.name]
        else:
            value = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        setattr(train_state, f.name, value)


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
    """Steps of the committed checkpoints (``step-N`` folders) in ``folder``, oldest first.
    Committed does not mean intact: ``CheckpointManager`` verifies before it loads one."""
    if not folder.is_dir():
        return []
    return sorted(int(m.group(1)) for child in folder.iterdir()
                  if (m := STEP_DIR.fullmatch(child.name)) and child.is_dir())


SIDECAR_KEYS = ("format_version", "contents", "model", "model_args", "train_state", "lr_schedule", "data")  # 4: model-only


def read_train_state(path: Path) -> dict[str, Any]:
    """The JSON sidecar of checkpoint ``path``; DamagedCheckpoint if it is missing or incomplete."""
    file = path / "train_state.json"
    integrity.checkpoint_file(path, file.name)  # a regular file inside the checkpoint (not /dev/zero)
    try:
        data = json.loads(file.read_text())
    except FileNotFoundError:
        raise DamagedCheckpoint(file, "missing") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise DamagedCheckpoint(file, f"unreadable ({type(e).__name__}: {_one_line(e, 200)})") from None
    if not isinstance(data, dict):
        raise DamagedCheckpoint(file, "not a JSON object")
    version = data.get("format_version")
    if isinstance(version, bool) or version not in READABLE_VERSIONS:  # true == 1 in Python
        raise ConfigError("checkpoint", f"{path} has format version {data.get('format_version')}",
                          f"this lathe reads versions {', '.join(map(str, READABLE_VERSIONS))}")
    contents = data.get("contents", [])
    if not isinstance(contents, list) or not all(isinstance(c, str) for c in contents):
        raise DamagedCheckpoint(file, "'contents' is not a list of names")
    full = "optimizer" in contents
    missing = [k for k in (SIDECAR_KEYS if full else SIDECAR_KEYS[:4]) if k not in data]
    if full and isinstance(data.get("train_state"), dict):
        missing += [f"train_state.{k}" for k in ("step", "tokens_seen", "loss_log") if k not in data["train_state"]]
    if missing:
        raise DamagedCheckpoint(file, f"missing key{'s' if len(missing) > 1 else ''} {', '.join(missing)}")
    for key in ("model", "model_args") + (("train_state",) if full else ()):
        if not isinstance(data[key], dict):
            raise DamagedCheckpoint(file, f"'{key}' is not a JSON object")
    return data


def inspect_checkpoint(path: Path, mode: str, rank: int = 0, world_size: int = 1) -> dict[str, Any]:
    """Everything that can be checked before loading: the sidecar, the manifest's checksums (this
    rank's share of the files), and ``.metadata`` (safely parsed, its shard files present).
    Returns the sidecar; raises DamagedCheckpoint naming the first bad file."""
    if not path.is_dir():
        raise DamagedCheckpoint(path, "not a folder")
    meta = read_train_state(path)
    files = None
    if meta["format_version"] >= 2:
        files = integrity.manifest_files(path)
        rng = f"rng/rank{rank}.json"  # loaded on resume when present: it must be verified too
        for name in (".metadata", "train_state.json", *([rng] if (path / rng).is_file() else [])):
            if name not in files:
                raise DamagedCheckpoint(path / integrity.MANIFEST, f"does not list {name}")
        integrity.verify_files(path, integrity.my_share(list(files), rank, world_size), files, mode)
    if rank == 0 or mode != "off":
        integrity.check_metadata(path, files)  # every storage file it names is listed (version 2)
    return meta


def _checkpoint_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())


def _find_errno(exc: BaseException, code: int) -> OSError | None:
    """The OSError with ``code`` inside ``exc`` (DCP wraps the ranks' exceptions)."""
    seen, todo = set(), [exc]
    while todo:
        e = todo.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno == code:
            return e
        todo += [e.__cause__, e.__context__]
        for v in (getattr(e, "failures", None) or {}).values():  # DCP: rank -> (exception, traceback)
            todo += [x for x in (v if isinstance(v, tuple) else (v,)) if isinstance(x, BaseException)]
        todo += [a for a in getattr(e, "args", ()) if isinstance(a, BaseException)]
        todo += [v for a in getattr(e, "args", ()) if isinstance(a, dict) for v in a.values()
                 if isinstance(v, BaseException)]
        if isinstance(e, BaseException) and "No space left on device" in str(e):
            return OSError(errno.ENOSPC, "No space left on device")
    return None


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

        self.args = model_args
        self.model_args = dataclasses.asdict(model_args)
        self.identity = model_identity(model_args)
        self.pending: _BackgroundCommit | None = None  # an async save in flight
        self.last_save_time = time.monotonic()
        self.world_size = dist.get_world_size() if dist.is_initialized() else 1
        # Gloo groups of our own: DCP's collectives (in the background thread of an async save)
        # and the training thread's checks (agree, barriers) each get one, so they never share a
        # communicator with each other or with NCCL compute traffic.
        # The control group exists whenever there is a process group: the preemption check after
        # every step (lathe/checkpoint/preemption.agree) runs on it, on the CPU, also without
        # checkpoints, so it never waits for the GPU (an NCCL all-reduce read back each step would).
        uses_groups = (self.enabled or cfg.initial_load_path) and dist.is_initialized()
        self.group = dist.new_group(backend="gloo") if uses_groups else None
        self.control = dist.new_group(backend="gloo") if dist.is_initialized() else None
        if self.enabled and _rank() == 0:
            self._remove_partials()  # safe: this run holds the dump folder's lock

    # --- state -----------------------------------------------------------------------------

    def _model_state(self, unfused: bool = True) -> dict[str, torch.Tensor]:
        """The model's state; under the unfused projection names unless ``unfused`` is False."""
        state = {}
        for part in self.model_parts:
            state.update(get_model_state_dict(part))
        return to_unfused(state, self.args) if unfused else state

    def _optimizer_state(self, unfused: bool = True) -> dict[str, Any]:
        state = {}
        options = StateDictOptions(flatten_optimizer_state_dict=True)
        for part, opt in zip(self.model_parts, self.optimizers.optimizers):
            state.update(get_optimizer_state_dict(part, opt, options=options))
        return to_unfused(state, self.args) if unfused else state

    def _sidecar(self, contents: list[str]) -> dict[str, Any]:
        return {
            "format_version": FORMAT_VERSION,
            "contents": contents,
            "model": self.identity,
            "model_args": self.model_args,
            "train_state": dataclasses.asdict(self.train_state),
            "lr_schedule": _jsonable(self.schedules.state_dict()) if self.schedules else None,
            "data": self.data.state_dict() if self.data is not None else None,
            "world_size": self.world_size,
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
        if self.control is None:
            return flag
        t = torch.tensor([int(flag)])
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self.control)
        return bool(t.item())

    def save(self, step: int, last_step: bool = False, weights_only: bool = False,
             mode: str | None = None) -> None:
        """Write checkpoint step-N. Waits for a previous async save first."""
        start = time.perf_counter()
        self.wait()
        final = self.folder / f"step-{step}"
        partial = self.folder / f"step-{step}.partial-{self._shared_id()}"
        try:
            if _rank() == 0:
                partial.mkdir(parents=True, exist_ok=True)
            _barrier(self.control)
            (partial / "rng").mkdir(parents=True, exist_ok=True)
            rng_file = partial / "rng" / f"rank{_rank()}.json"
            rng_file.write_text(json.dumps(rng_state()))
        except OSError as e:
            self._write_failed(partial, step, e)

        if weights_only:
            dtype = EXPORT_DTYPES[self.cfg.export_dtype]
            state = {"model": {k: v.to(dtype) for k, v in self._model_state().items()}}
            contents = ["model"]
        else:
            state = {"model": self._model_state(), "optimizer": self._optimizer_state()}
            contents = ["model", "optimizer", "lr_schedule", "data", "train_state"]
        sidecar = self._sidecar(contents) if _rank() == 0 else None
        fs = integrity.ChecksummingFileSystem()
        writer = dcp.FileSystemWriter(str(partial))
        writer.fs = fs  # checksums each shard file while it is written
        job = _SaveJob(partial, final, sidecar, step, fs, _rank(), self.world_size)

        mode = mode or self.cfg.async_mode
        if mode == "disabled" or last_step:
            try:
                dcp.save(state, storage_writer=writer, process_group=self.group, no_dist=not dist.is_initialized())
                job.write_rank_manifest()
            except (Exception, CheckpointException) as e:
                self._write_failed(partial, step, e)
            if _rank() == 0:
                self._commit(job)
            _barrier(self.control)
        else:
            kind = AsyncCheckpointerType.PROCESS if mode == "async_with_pinned_mem" else AsyncCheckpointerType.THREAD
            response = dcp.async_save(state, storage_writer=writer, process_group=self.group,
                                      async_checkpointer_type=kind, no_dist=not dist.is_initialized())
            future = getattr(response, "upload_completion", response)
            self.pending = _BackgroundCommit(self, job, future)
        self.last_save_time = time.monotonic()
        logger.info("checkpoint step %d: %s, training blocked %.2fs", step,
                    "written" if self.pending is None else f"writing in the background ({mode})",
                    time.perf_counter() - start)

    def wait(self, timeout: float | None = None) -> None:
        """Block until an async save in flight is written and committed (it commits by itself as
        soon as it is on disk; this only waits for that). Raises if it failed."""
        if self.pending is None:
            return
        pending, self.pending = self.pending, None
        start = time.perf_counter()
        pending.join(timeout)
        if pending.error is not None:
            self._write_failed(pending.job.partial, pending.job.step, pending.error)
        waited = time.perf_counter() - start
        if waited > 0.01:
            logger.info("checkpoint step %d: waited %.2fs for the background write", pending.job.step, waited)

    def _shared_id(self) -> str:
        """One random id for the partial folder, agreed by all ranks."""
        ident = [uuid.uuid4().hex[:8]]
        if dist.is_initialized():
            dist.broadcast_object_list(ident, src=0, group=self.control)
        return ident[0]

    def _commit(self, job: "_SaveJob") -> None:
        """Rank 0: once every rank's files and manifest part are on disk, write the sidecar and
        the manifest, and rename step-N.partial-* to step-N: the commit point."""
        deadline = time.monotonic() + COMMIT_TIMEOUT_S
        while not integrity.rank_manifests_present(job.partial, job.world_size):
            if time.monotonic() > deadline:
                raise TimeoutError(f"ranks did not finish writing {job.partial} in {COMMIT_TIMEOUT_S}s")
            time.sleep(0.02)
        (job.partial / "train_state.json").write_text(json.dumps(job.sidecar))
        integrity.write_manifest(job.partial, job.world_size)
        if job.final.exists():  # an older save of the same step (e.g. rerun after a resume)
            shutil.rmtree(job.final)
        job.partial.rename(job.final)  # atomic on one filesystem
        integrity.fsync_dir(job.final.parent)
        self._purge()

    def _write_failed(self, partial: Path, step: int, error: BaseException):
        """A save that could not be written: remove what it wrote, keep the previous checkpoint,
        and stop with one line that says why (disk full: how much is needed and free)."""
        if _rank() == 0:
            shutil.rmtree(partial, ignore_errors=True)
        previous = complete_steps(self.folder)
        kept = f"the previous checkpoint step-{previous[-1]} is intact" if previous else "no earlier checkpoint exists"
        try:
            free = shutil.disk_usage(self.folder if self.folder.exists() else self.folder.parent).free
        except OSError:
            free = None
        need = _checkpoint_bytes(self.folder / f"step-{previous[-1]}") if previous else _state_bytes(self)
        # torch's writer reports a full disk as ENOSPC, or only as a failed zip write ("unexpected
        # pos"): a failed write with less space free than a checkpoint takes is a full disk too.
        if _find_errno(error, errno.ENOSPC) is not None or (free is not None and free < need):
            free = free or 0
            raise ConfigError("checkpoint.folder", f"disk full while writing checkpoint step-{step} in "
                              f"{self.folder}: it needs about {need / 2**30:.2f} GiB, {free / 2**30:.2f} GiB free; {kept}",
                              "free space, lower checkpoint.keep_latest_k, or point job.dump_folder elsewhere",
                              str(self.folder)) from None
        if isinstance(error, ConfigError):
            raise error
        raise ConfigError("checkpoint.folder", f"cannot write checkpoint step-{step} in {self.folder}: "
                          f"{_one_line(error)}; {kept}", "check the folder's permissions and filesystem",
                          str(self.folder)) from None

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

    def close(self, timeout: float | None = None) -> None:
        self.wait(timeout)

    # --- loading ---------------------------------------------------------------------------

    def load(self) -> bool:
        """Resume from this run's latest (or chosen) checkpoint, else start from
        ``initial_load_path`` if given. Returns True when something was loaded.

        Each candidate is verified first (``checkpoint.verify``); a damaged one is reported in one
        line and, with ``checkpoint.on_damaged=fallback``, the newest earlier one is tried."""
        initial_load_path = self.cfg.initial_load_path
        if not self.enabled and not initial_load_path:
            return False
        steps = complete_steps(self.folder) if self.enabled else []
        if self.cfg.load_step >= 0:
            if self.cfg.load_step not in steps:
                raise ConfigError("checkpoint.load_step", f"no checkpoint step-{self.cfg.load_step} "
                                  f"in {self.folder}", f"available: {steps or 'none'}", self.cfg.load_step)
            path = self.folder / f"step-{self.cfg.load_step}"
            problem = self._try_load(path, model_only=False)
            if problem:
                raise ConfigError("checkpoint.load_step", f"checkpoint damaged: {problem}",
                                  "pick another step, or -1 for the latest that verifies", self.cfg.load_step)
            return True
        damaged = []
        for step in reversed(steps):
            path = self.folder / f"step-{step}"
            problem = self._try_load(path, model_only=False)
            if problem is None:
                if damaged:
                    logger.warning("resumed from step %d instead of the damaged %s", step,
                                   ", ".join(f"step-{s}" for s, _ in damaged))
                return True
            damaged.append((step, problem))
            if self.cfg.on_damaged == "error":
                raise ConfigError("checkpoint.on_damaged", f"checkpoint damaged: {problem}",
                                  "restore or remove it, or set checkpoint.on_damaged=fallback to load the newest "
                                  "earlier checkpoint", self.cfg.on_damaged)
            logger.warning("checkpoint step-%d is damaged, trying an earlier one: %s", step, problem)
        if damaged:
            raise ConfigError("checkpoint", f"no usable checkpoint in {self.folder}: all {len(damaged)} are damaged "
                              f"(newest: {damaged[0][1]})", "restore them, or remove the step-N folders to "
                              "start from scratch")
        if initial_load_path:
            path = Path(initial_load_path)
            problem = self._try_load(path, model_only=self.cfg.initial_load_model_only, initial=True)
            if problem:
                raise ConfigError("checkpoint.initial_load_path", f"cannot load it: {problem}",
                                  "point it at an intact step-N folder", initial_load_path)
            return True
        return False

    def load_latest(self) -> bool:
        """Reload this run's newest complete checkpoint that verifies, whatever ``load_step`` says
        (a rollback: lathe/guard.py). False if there is none. Every rank must call it."""
        self.wait()
        _barrier(self.control)  # rank 0 has committed an async save before anyone lists the folder
        for step in reversed(complete_steps(self.folder)):
            problem = self._try_load(self.folder / f"step-{step}", model_only=False)
            if problem is None:
                return True
            logger.warning("checkpoint step-%d is damaged, trying an earlier one: %s", step, problem)
        return False

    def _try_load(self, path: Path, model_only: bool, initial: bool = False) -> str | None:
        """Verify and load ``path``; the problem (one line) if it is damaged, else None. Every
        rank checks its share of the files and all ranks agree on the verdict."""
        meta, problem = None, None
        try:
            meta = inspect_checkpoint(path, self.cfg.verify, _rank(), self.world_size)
        except DamagedCheckpoint as e:
            problem = str(e)
        problem = self._first_problem(problem)
        if problem is None:
            if meta["format_version"] < 2:
                logger.warning("%s was written by an older lathe without checksums: not verified", path)
            self._check_identity(path, meta, allow_change=initial and self.cfg.initial_load_allow_model_change)
            try:
                self._load(path, meta, model_only=model_only or meta["contents"] == ["model"],
                           strict=not (initial and self.cfg.initial_load_allow_model_change))
            except DamagedCheckpoint as e:  # what verification cannot see (verify=off, sampled)
                problem = str(e)
            problem = self._first_problem(problem)
        return problem

    def _first_problem(self, problem: str | None) -> str | None:
        if self.control is None:
            return problem
        problems: list[str | None] = [None] * self.world_size
        dist.all_gather_object(problems, problem, group=self.control)
        return next((p for p in problems if p), None)

    def _load(self, path: Path, meta: dict[str, Any], model_only: bool, strict: bool = True) -> None:
        start = time.perf_counter()
        rng = None if model_only else _read_rng(path)  # before anything is changed
        state: dict[str, Any] = {"model": self._model_state()}
        if not model_only:
            state["optimizer"] = self._optimizer_state()
        try:
            dcp.load(state, storage_reader=SafeFileSystemReader(str(path)), process_group=self.group,
                     planner=SafeLoadPlanner(allow_partial_load=not strict), no_dist=not dist.is_initialized())
        except DamagedCheckpoint:
            raise
        except (Exception, CheckpointException) as e:  # a damaged or truncated shard file
            damage = _find_exception(e, DamagedCheckpoint)  # the reader names the file and entry
            if damage is not None:
                raise damage from None
            raise DamagedCheckpoint(path, f"cannot be loaded ({_one_line(e)})") from None
        state["model"] = to_fused(state["model"], self.args, self._model_state(unfused=False))
        for part in self.model_parts:
            set_model_state_dict(part, state["model"], options=StateDictOptions(strict=False))
        if not model_only:
            state["optimizer"] = to_fused(state["optimizer"], self.args, self._optimizer_state(unfused=False))
            options = StateDictOptions(flatten_optimizer_state_dict=True)
            for part, opt in zip(self.model_parts, self.optimizers.optimizers):
                set_optimizer_state_dict(part, opt, state["optimizer"], options=options)
            self.schedules.load_state_dict(meta["lr_schedule"])
            if self.data is not None and meta.get("data") is not None:
                self.data.load_state_dict(meta["data"])
            _restore_train_state(self.train_state, meta["train_state"])
            if rng is not None:
                set_rng_state(rng)
        what = "model weights" if model_only else f"everything at step {self.train_state.step}"
        logger.info("loaded %s from %s in %.2fs", what, path, time.perf_counter() - start)

    def _check_identity(self, path: Path, meta: dict[str, Any], allow_change: bool = False) -> None:
        """Every model option that changes the parameters or their meaning must match."""
        # The identity's resolved values (n_kv_heads of None is n_heads) win over the raw arguments.
        saved = {**(meta.get("model_args") or {}), **(meta.get("model") or {})}
        current = {**self.model_args, **self.identity}
        mismatched = {k: (saved[k], v) for k, v in current.items()
                      if k in saved and k not in NOT_IDENTITY and _canonical(saved[k]) != _canonical(v)}
        if not mismatched:
            return
        detail = ", ".join(f"{k}: checkpoint {a!r} vs config {b!r}" for k, (a, b) in sorted(mismatched.items()))
        if allow_change:
            logger.warning("loading %s into a different model (checkpoint.initial_load_allow_model_change): %s",
                           path, detail)
            return
        fix = ("use the model config it was saved with, or another checkpoint folder" if not self.cfg.initial_load_path
               else "use the model config it was saved with, or set checkpoint.initial_load_allow_model_change "
                    "to load the weights that fit")
        raise ConfigError("checkpoint", f"{path} holds a different model ({detail})", fix)


@dataclass
class _SaveJob:
    """One save in progress: where it goes and what rank 0 writes at the commit."""

    partial: Path
    final: Path
    sidecar: dict | None
    step: int
    fs: integrity.ChecksummingFileSystem
    rank: int
    world_size: int

    def write_rank_manifest(self) -> None:
        """This rank's shard files (checksummed while written; read back when DCP wrote them in
        another process) and its RNG file."""
        entries = dict(self.fs.entries)
        for shard in self.partial.glob(f"__{self.rank}_*.distcp"):
            if shard.name not in entries:
                entries[shard.name] = integrity.file_entry(shard)
        rng = f"rng/rank{self.rank}.json"
        entries[rng] = integrity.file_entry(self.partial / rng)
        integrity.write_rank_manifest(self.partial, self.rank, entries)


class _BackgroundCommit:
    """Waits for an async save's write on a thread, then writes this rank's manifest part and, on
    rank 0, commits: a kill after the write finished never loses that checkpoint."""

    def __init__(self, manager: CheckpointManager, job: _SaveJob, future):
        self.job, self.future, self.error = job, future, None
        self.thread = threading.Thread(target=self._run, args=(manager,), name=f"lathe-commit-{job.step}",
                                       daemon=True)
        self.thread.start()

    def _run(self, manager: CheckpointManager) -> None:
        try:
            self.future.result()
            self.job.write_rank_manifest()
            if self.job.rank == 0:
                manager._commit(self.job)
                logger.info("checkpoint step %d: committed", self.job.step)
        except BaseException as e:  # reported by wait()
            self.error = e

    def join(self, timeout: float | None = None) -> None:
        self.thread.join(timeout)
        if self.thread.is_alive() and self.error is None:
            self.error = TimeoutError(f"background save of step {self.job.step} did not finish in {timeout}s")


def _state_bytes(manager: CheckpointManager) -> int:
    return sum(t.numel() * t.element_size() for t in manager._model_state().values()
               if isinstance(t, torch.Tensor)) * 3 * manager.world_size  # weights + two Adam moments


def _find_exception(exc: BaseException, cls: type) -> BaseException | None:
    """The first ``cls`` inside ``exc``: itself, its cause, or a rank's failure DCP wrapped."""
    seen, todo = set(), [exc]
    while todo:
        e = todo.pop(0)
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, cls):
            return e
        todo += [e.__cause__, e.__context__]
        for v in (getattr(e, "failures", None) or {}).values():  # DCP: rank -> (exception, traceback)
            todo += [x for x in (v if isinstance(v, tuple) else (v,)) if isinstance(x, BaseException)]
    return None


def _one_line(e: BaseException, limit: int = 300) -> str:
    """``Type: message`` on one line; for DCP's CheckpointException (whose text holds the ranks'
    tracebacks) the first rank's exception instead."""
    failures = getattr(e, "failures", None)
    if isinstance(failures, dict) and failures:
        first = next(iter(failures.values()))
        first = first[0] if isinstance(first, tuple) and first else first
        if isinstance(first, BaseException):
            e = first
    text = " ".join(str(e).split())
    return f"{type(e).__name__}: {text[:limit]}"


def _read_rng(path: Path) -> dict[str, Any] | None:
    """This rank's RNG state from ``rng/rankR.json`` (None when the checkpoint has none for this
    rank); DamagedCheckpoint if it is not a regular file of base64 generator states."""
    name = f"rng/rank{_rank()}.json"
    file = path / name
    if not file.exists() and not file.is_symlink():
        return None
    integrity.checkpoint_file(path, name)
    try:
        state = json.loads(file.read_text())
        if not isinstance(state, dict) or not isinstance(state.get("cpu"), str):
            raise ValueError("no 'cpu' generator state")
        if len(base64.b64decode(state["cpu"], validate=True)) != torch.get_rng_state().numel():
            raise ValueError("the CPU generator state has the wrong size")
        if "cuda" in state:
            base64.b64decode(state["cuda"], validate=True)
    except (OSError, ValueError, TypeError) as e:
        raise DamagedCheckpoint(file, f"not an RNG state ({_one_line(e, 200)})") from None
    return state


def _canonical(value: Any) -> Any:
    """JSON round trip: tuples and lists, ints and floats compare as they were saved."""
    return json.loads(json.dumps(value))


def _jsonable(obj: Any) -> Any:
    """LR scheduler state as plain JSON (it holds numbers, lists and None)."""
    return json.loads(json.dumps(obj, default=lambda o: None))
