"""One run per dump folder: a lock file, like a database's ``postmaster.pid``.

``{job.dump_folder}/lathe.lock`` holds the owner's host, PID, process start time, Slurm job id and
start time (JSON). Rank 0 takes it before anything is written to the folder and removes it when
the run ends; while the run lives, a daemon thread touches it every ``HEARTBEAT_S`` seconds.

A second run in the same folder refuses in one line naming the owner, unless the lock is stale:
- same host: the owner's PID is gone, or belongs to a newer process (start time differs);
- another host (a requeued Slurm job lands on a different node): no heartbeat for ``STALE_S``
  seconds, or the lock belongs to an earlier incarnation of the same Slurm job;
a stale lock is reported and taken over. Because only the lock holder runs in the folder, the
partial checkpoints it finds at start are from dead runs and can be removed safely.

Limits (documented in docs/reliability.md): the lock is advisory and works on one filesystem view;
a folder shared by hosts whose clocks disagree by more than ``STALE_S`` may see a live lock as
stale; two runs that find the same stale lock at the same instant race for it.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
from pathlib import Path

from lathe.errors import ConfigError

logger = logging.getLogger("lathe")

LOCK_NAME = "lathe.lock"
HEARTBEAT_S = 30.0
STALE_S = 180.0


def _process_start(pid: int) -> str | None:
    """The kernel's start time of ``pid`` (field 22 of /proc/PID/stat), or None if gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _owner_record() -> dict:
    return {"host": socket.gethostname(), "pid": os.getpid(), "process_start": _process_start(os.getpid()),
            "slurm_job_id": os.environ.get("SLURM_JOB_ID"),
            "slurm_restart_count": int(os.environ.get("SLURM_RESTART_COUNT", 0) or 0),
            "started": time.strftime("%Y-%m-%d %H:%M:%S")}


def stale_reason(owner: dict, lock_path: Path) -> str | None:
    """Why the lock ``owner`` is stale, or None if its run may still be alive."""
    me = _owner_record()
    if owner.get("slurm_job_id") and owner.get("slurm_job_id") == me["slurm_job_id"] and \
            int(owner.get("slurm_restart_count", 0)) < me["slurm_restart_count"]:
        return f"it belongs to an earlier run of Slurm job {owner['slurm_job_id']}"
    if owner.get("host") == me["host"]:
        pid = int(owner.get("pid", -1))
        if pid == me["pid"]:
            return None
        if not _alive(pid):
            return f"process {pid} on {owner['host']} is gone"
        start = _process_start(pid)
        if owner.get("process_start") and start and start != owner["process_start"]:
            return f"process {pid} on {owner['host']} is a different process now"
        return None
    try:
        age = time.time() - lock_path.stat().st_mtime
    except OSError:
        return "it disappeared"
    if age > STALE_S:
        return f"no heartbeat from {owner.get('host')} for {age:.0f}s"
    return None


class RunLock:
    def __init__(self, folder: Path):
        self.path = Path(folder) / LOCK_NAME
        self.record = _owner_record()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def acquire(self) -> "RunLock":
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                self._take_over_if_stale()
                continue
            with os.fdopen(fd, "w") as f:
                json.dump(self.record, f)
            self._thread = threading.Thread(target=self._heartbeat, name="lathe-lock-heartbeat", daemon=True)
            self._thread.start()
            return self
        raise ConfigError("job.dump_folder", f"could not take the lock {self.path} (another run keeps taking it)",
                          "use another job.dump_folder", str(self.path.parent))

    def _take_over_if_stale(self) -> None:
        try:
            text = self.path.read_text()
            owner = json.loads(text)
        except FileNotFoundError:
            return
        except (OSError, ValueError):
            owner, text = {}, None
        reason = stale_reason(owner, self.path) if owner else "it is unreadable"
        if reason is None:
            raise ConfigError("job.dump_folder", f"another run is using this folder (lock {self.path}: pid "
                              f"{owner.get('pid')} on {owner.get('host')}, started {owner.get('started')})",
                              "wait for it to finish, stop it, or use another job.dump_folder",
                              str(self.path.parent))
        logger.warning("taking over the stale lock %s: %s", self.path, reason)
        try:
            if text is None or self.path.read_text() == text:  # nobody took it meanwhile
                self.path.unlink()
        except FileNotFoundError:
            pass

    def _heartbeat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            try:
                os.utime(self.path)
            except OSError:
                pass

    def release(self) -> None:
        self._stop.set()
        try:
            if json.loads(self.path.read_text()).get("pid") == self.record["pid"]:
                self.path.unlink()
        except (OSError, ValueError):
            pass


def check_writable(folder: Path, option: str) -> None:
    """``folder`` is (or can be made) a folder lathe can write into; else one-line ConfigError."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise ConfigError(option, "is a file, not a folder", "point it at a folder (it is created if missing)",
                          str(folder))
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".lathe-write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise ConfigError(option, f"cannot write there: {e.strerror or e}",
                          "choose a writable folder (check permissions, read-only mounts, immutable flags)",
                          str(folder)) from None
