"""The run manifest, ``{job.dump_folder}/run.json``: what ran, on what, with which data, and how it
ended. ``lathe replay RUN_DIR`` reruns a run from it.

Written by rank 0 when training starts (status ``running``) and rewritten when it ends
(``completed``, ``failed`` with the error, ``preempted`` or ``interrupted``). A run resumed in the
same folder moves the previous entry's times and status to ``previous_runs``.

Fields: lathe version and git commit (of the lathe source tree, with a dirty flag), the command
line, Python/torch/CUDA/NCCL versions, the hardware (host, CPU model and cores, memory, GPU names),
world size, nodes and the parallel layout, the resolved config and its hash, fingerprints of the
tokenizer file and of the training (and validation) data, start and end times, exit status, and the
step and token count reached.

The config hash is a SHA-256 of the resolved config without ``job.dump_folder`` and
``job.config_file`` (where a run writes and which file it was read from do not change what it
computes): two runs with the same hash, tokenizer and data fingerprints train the same thing.

Data fingerprints: the embedded corpus by its content hash; local files by path, size and SHA-256
of their content (files beyond 256 MiB in total are *sampled*: size plus the hash of their first
and last MiB, said so in the record); Hugging Face Hub datasets by id, config and split only (the
Hub's content is not fingerprinted).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

import lathe
from lathe import config as config_lib
from lathe.config import Config

logger = logging.getLogger("lathe")

MANIFEST = "run.json"
FORMAT_VERSION = 1
FULL_HASH_LIMIT = 256 * 2**20  # bytes of local data hashed whole; beyond, files are sampled
SAMPLE = 2**20


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


# ---------------------------------------------------------------------------------------------
# What the run ran


def config_hash(cfg: Config | dict) -> str:
    """SHA-256 of the resolved config without where it came from and where it writes."""
    values = json.loads(json.dumps(cfg if isinstance(cfg, dict) else cfg.to_dict()))
    for key in ("dump_folder", "config_file"):
        values.get("job", {}).pop(key, None)
    return hashlib.sha256(json.dumps(values, sort_keys=True).encode()).hexdigest()


def _git_commit() -> dict[str, Any]:
    """The commit of the lathe source tree, when it is a git checkout."""
    root = Path(lathe.__file__).resolve().parent.parent
    try:
        commit = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                                timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return {"git_commit": None}
    return {"git_commit": commit, "git_dirty": bool(dirty)}


def _versions() -> dict[str, Any]:
    nccl = None
    if torch.cuda.is_available():
        try:
            v = torch.cuda.nccl.version()
            nccl = ".".join(map(str, v)) if isinstance(v, tuple) else str(v)
        except (RuntimeError, AttributeError):
            pass
    return {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
            "nccl": nccl, "platform": platform.platform()}


def _hardware() -> dict[str, Any]:
    from lathe.metrics.peak import _cpu_name

    try:
        import psutil

        memory = psutil.virtual_memory().total / 2**30
    except ImportError:
        memory = None
    gpus = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if torch.cuda.is_available() else []
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count()
    return {"host": socket.gethostname(), "cpu": _cpu_name(), "cpu_count": os.cpu_count(), "cpus_usable": usable,
            "torch_threads": torch.get_num_threads(), "memory_gib": round(memory, 2) if memory else None,
            "gpus": gpus, "gpu_count": len(gpus)}


def _world(cfg: Config, world_size: int) -> dict[str, Any]:
    from lathe.parallel.dims import ParallelDims

    dims = ParallelDims.from_config(cfg.parallelism, world_size)
    local = int(os.environ.get("LOCAL_WORLD_SIZE", world_size))
    return {"world_size": world_size, "nodes": max(1, world_size // max(local, 1)), "processes_per_node": local,
            "layout": {"dp_replicate": dims.dp_replicate, "dp_shard": dims.dp_shard, "tp": dims.tp, "pp": dims.pp,
                       "cp": dims.cp}}


def _file_hash(path: Path, sampled: bool) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        if not sampled:
            for chunk in iter(lambda: f.read(SAMPLE), b""):
                h.update(chunk)
        else:
            size = path.stat().st_size
            h.update(f.read(SAMPLE))
            if size > SAMPLE:
                f.seek(max(SAMPLE, size - SAMPLE))
                h.update(f.read(SAMPLE))
    return h.hexdigest()


def _files_fingerprint(files: list[Path], root: str) -> dict[str, Any]:
    sizes = [f.stat().st_size for f in files]
    sampled = sum(sizes) > FULL_HASH_LIMIT
    entries = [[str(f), size, _file_hash(f, sampled)] for f, size in zip(files, sizes)]
    digest = hashlib.sha256(json.dumps([[Path(e[0]).name, e[1], e[2]] for e in entries]).encode()).hexdigest()
    return {"path": root, "files": len(files), "bytes": sum(sizes), "hashed": "sampled" if sampled else "whole",
            "sha256": digest}


def _spec_fingerprint(spec) -> dict[str, Any]:
    if spec.kind == "corpus":
        from lathe.data.corpus import build_corpus

        paths = build_corpus(spec.path)
        meta = json.loads(paths.manifest.read_text())
        return {"kind": "corpus", "name": spec.label, "sha256": meta.get("sha256"), "python": meta.get("python_version")}
    if spec.kind == "local":
        from lathe.data.sources import list_local_files

        files = [f for f, _ in list_local_files(spec.path, spec.option)]
        return {"kind": "local", **_files_fingerprint(files, str(spec.path))}
    return {"kind": "hf", "path": spec.path, "config": spec.config, "sha256": None,
            "note": "Hugging Face Hub content is not fingerprinted"}


def data_fingerprints(cfg: Config) -> dict[str, Any]:
    """Fingerprints of the tokenizer and of every training and validation source."""
    from lathe.data.sources import train_specs, validation_specs
    from lathe.data.tokenizer import resolve_tokenizer_file

    out: dict[str, Any] = {}
    try:
        tok = resolve_tokenizer_file(cfg.model.tokenizer_path)
        out["tokenizer"] = {"path": str(tok), "sha256": _file_hash(tok, sampled=False)}
    except OSError as e:
        out["tokenizer"] = {"path": cfg.model.tokenizer_path, "error": str(e)}
    try:
        out["data"] = [{"weight": w, **_spec_fingerprint(spec)} for spec, w in train_specs(cfg)]
        if cfg.validation.enabled:
            specs, separate = validation_specs(cfg)
            if separate:
                out["validation_data"] = [_spec_fingerprint(spec) for spec, _ in specs]
    except Exception as e:  # never stop a run for its manifest; say what could not be read
        out.setdefault("data", [])
        out["data_error"] = f"{type(e).__name__}: {e}"
    return out


def exit_status(error: BaseException | None) -> dict[str, Any]:
    """``{"status": ..., "exit_code": ..., "error": ...}`` for how a run ended."""
    if error is None:
        return {"status": "completed", "exit_code": 0}
    from lathe.checkpoint.preemption import Preempted
    from lathe.guard import TrainingError

    if isinstance(error, Preempted):
        return {"status": "preempted", "exit_code": 75, "error": str(error)}
    if isinstance(error, KeyboardInterrupt):
        return {"status": "interrupted", "exit_code": 130}
    code = 3 if isinstance(error, TrainingError) else 2 if isinstance(error, config_lib.ConfigError) else 1
    return {"status": "failed", "exit_code": code, "error": f"{type(error).__name__}: {error}"[:2000]}


# ---------------------------------------------------------------------------------------------
# The file


class RunManifest:
    """``run.json`` of one run folder (rank 0 only)."""

    def __init__(self, path: Path, record: dict[str, Any]):
        self.path, self.record = path, record

    @classmethod
    def start(cls, cfg: Config, dump_folder: Path, world_size: int) -> RunManifest:
        path = Path(dump_folder) / MANIFEST
        previous = read_manifest(path.parent, missing_ok=True)
        history = []
        if previous is not None:
            history = previous.get("previous_runs", [])
            history.append({k: previous.get(k) for k in ("start_time", "end_time", "status", "exit_code", "steps",
                                                        "error", "config_hash") if k in previous})
        record = {
            "format_version": FORMAT_VERSION,
            "lathe": {"version": lathe.__version__, **_git_commit()},
            "command": sys.argv,
            "versions": _versions(),
            "hardware": _hardware(),
            "world": _world(cfg, world_size),
            "config_hash": config_hash(cfg),
            "config": cfg.to_dict(),
            **data_fingerprints(cfg),
            "start_time": _now(),
            "end_time": None,
            "status": "running",
            "exit_code": None,
            "previous_runs": history,
        }
        if os.environ.get("LATHE_REPLAY_OF"):
            record["replay_of"] = os.environ["LATHE_REPLAY_OF"]
        manifest = cls(path, record)
        manifest.write()
        return manifest

    def finish(self, status: dict[str, Any], steps: int | None = None, tokens: int | None = None) -> None:
        self.record.update(status, end_time=_now())
        if steps is not None:
            self.record.update(steps=steps, tokens=tokens)
        self.write()

    def write(self) -> None:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.path.with_suffix(".json.tmp")
            tmp.write_text(json.dumps(self.record, indent=2, default=str) + "\n")
            os.replace(tmp, self.path)
        except OSError as e:  # never stop a run for its manifest
            logger.warning("could not write the run manifest %s: %s", self.path, e)


def read_manifest(run_dir: Path | str, missing_ok: bool = False) -> dict[str, Any] | None:
    path = Path(run_dir) / MANIFEST
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        if missing_ok:
            return None
        raise config_lib.ConfigError("RUN_DIR", f"no {MANIFEST} in {run_dir}",
                                     "point it at the job.dump_folder of a lathe run (lathe writes run.json there)",
                                     str(run_dir)) from None
    except (OSError, ValueError) as e:
        if missing_ok:
            return None
        raise config_lib.ConfigError("RUN_DIR", f"cannot read {path}: {e}", "restore the file", str(run_dir)) from None
    return data if isinstance(data, dict) else None


# ---------------------------------------------------------------------------------------------
# lathe replay


def replay(run_dir: str, output: str | None, overrides: list[str], force: bool = False) -> int:
    """Rerun the run in ``run_dir`` from its manifest: the same resolved config (plus
    ``overrides``), the same number of processes, into ``output`` (default ``RUN_DIR-replay``).
    The tokenizer and data must still have the manifest's fingerprints (``force`` runs anyway).
    Returns the exit code of the training run."""
    record = read_manifest(run_dir)
    source = Path(run_dir)
    out = Path(output) if output else source.with_name(source.name + "-replay")
    if out.resolve() == source.resolve():
        raise config_lib.ConfigError("--output", "is the run being replayed", "pick another folder", str(out))
    if out.exists() and any(out.iterdir()):
        raise config_lib.ConfigError("--output", "already holds files", "pick an empty or new folder", str(out))
    values = record["config"]
    values["job"]["dump_folder"] = str(out)
    values["job"]["config_file"] = None
    out.mkdir(parents=True, exist_ok=True)
    toml = out / "replay_config.toml"
    toml.write_text(config_lib.to_toml(values))
    cfg, _ = config_lib.load_config(["--config", str(toml), *overrides])
    if not force:
        _check_fingerprints(record, cfg)
    changed = [r for r in record.get("previous_runs", []) if r.get("config_hash") not in (None, record.get("config_hash"))]
    if changed:
        logger.warning("the run's config changed between its starts (e.g. training.steps raised on a resume): the "
                       "replay trains with the last one from the start, so it may not match the earlier steps")
    world = record.get("world", {})
    world_size, nodes = int(world.get("world_size", 1)), int(world.get("nodes", 1))
    logger.info("replaying %s (config %s, %d process%s) into %s", source, record.get("config_hash", "?")[:12],
                world_size, "" if world_size == 1 else "es", out)
    env = {**os.environ, "LATHE_REPLAY_OF": str(source.resolve())}
    args = ["--config", str(toml), *overrides]
    if nodes > 1:
        raise config_lib.ConfigError("RUN_DIR", f"the run used {nodes} nodes", "launch the replay on as many nodes "
                                     f"with: lathe train --config {toml}", str(run_dir))
    if world_size == 1:
        cmd = [sys.executable, "-m", "lathe", "train", *args]
    else:
        cmd = [sys.executable, "-m", "lathe", "launch", "--nproc-per-node", str(world_size), "--", *args]
    return subprocess.run(cmd, env=env).returncode


def _check_fingerprints(record: dict[str, Any], cfg: Config) -> None:
    now = data_fingerprints(cfg)
    then_tok, now_tok = record.get("tokenizer", {}), now.get("tokenizer", {})
    if then_tok.get("sha256") and then_tok.get("sha256") != now_tok.get("sha256"):
        raise config_lib.ConfigError("model.tokenizer_path", f"the tokenizer {now_tok.get('path')} changed since the run",
                                     "restore it, or pass --force to replay anyway")
    for then, cur in zip(record.get("data", []), now.get("data", [])):
        if then.get("sha256") and then.get("sha256") != cur.get("sha256"):
            raise config_lib.ConfigError("training.dataset_path", f"the data {cur.get('path') or cur.get('name')} changed "
                                         "since the run", "restore it, or pass --force to replay anyway")


__all__ = ["MANIFEST", "RunManifest", "config_hash", "data_fingerprints", "exit_status", "read_manifest", "replay"]
