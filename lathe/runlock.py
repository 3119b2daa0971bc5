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

Taking the lock has no window in which another run can see it half-written: the record is written
to a private temporary file first and ``os.link``-ed into place (atomic; fails if a lock exists).
A lock is only ever removed (taken over as stale) while holding ``flock`` on ``lathe.lock.guard``,
so two runs that find the same stale lock cannot both take it. An unreadable lock (empty or cut
short: a filesystem without hard links, or an older lathe) younger than ``YOUNG_S`` is treated as
live; a malformed one (a directory, JSON that is not a lock record) is refused in one line.

Limits (documented in docs/reliability.md): the lock is advisory and works on one filesystem view;
a folder shared by hosts whose clocks disagree by more than ``STALE_S`` may see a live lock as
stale; on a filesystem without ``flock`` two runs that find the same stale lock at the same
instant race for it.
"""

from __future__ import annotations

import errno
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
GUARD_NAME = "lathe.lock.guard"
YOUNG_S = 30.0  # an unreadable lock younger than this may be one being written: live
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
            owner.get("slurm_restart_count", 0) < me["slurm_restart_count"]:
        return f"it belongs to an earlier run of Slurm job {owner['slurm_job_id']}"
    if owner.get("host") == me["host"]:
        pid = owner["pid"]
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


def _malformed(owner) -> str | None:
    """What is wrong with a parsed lock record, or None if it is one."""
    if not isinstance(owner, dict):
        return f"it holds JSON {type(owner).__name__}, not a lock record"
    for key, kind in (("host", str), ("pid", int)):
        if not isinstance(owner.get(key), kind) or isinstance(owner.get(key), bool):
            return f"its {key!r} is {owner.get(key)!r}"
    count = owner.get("slurm_restart_count", 0)
    if not isinstance(count, int) or isinstance(count, bool):
        return f"its 'slurm_restart_count' is {count!r}"
    return None


class RunLock:
    def __init__(self, folder: Path):
        self.path = Path(folder) / LOCK_NAME
        self.record = _owner_record()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def acquire(self) -> "RunLock":
        for _ in range(5):
            if self._create():
                self._thread = threading.Thread(target=self._heartbeat, name="lathe-lock-heartbeat", daemon=True)
                self._thread.start()
                return self
            with self._guard():
                self._take_over_if_stale()
        raise ConfigError("job.dump_folder", f"could not take the lock {self.path} (another run keeps taking it)",
                          "use another job.dump_folder", str(self.path.parent))

    def _create(self) -> bool:
        """Put a complete lock record in place atomically; False if a lock (or anything) is there."""
        data = json.dumps(self.record).encode()
        tmp = self.path.with_name(f".{LOCK_NAME}.{os.getpid()}.{threading.get_ident()}.tmp")
        try:
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            try:
                os.link(tmp, self.path)  # atomic, and fails if the lock exists
                return True
            except FileExistsError:
                return False
            except OSError as e:  # no hard links here (some FUSE/SMB mounts): exclusive create
                if e.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.ENOSYS, errno.EXDEV):
                    raise
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                return False
            with os.fdopen(fd, "wb") as f:  # readers treat a young unreadable lock as live
                f.write(data)
            return True
        finally:
            try:
                tmp.unlink()
            except OSError:
                pass

    def _guard(self):
        """Exclusive ``flock`` on ``lathe.lock.guard`` while a lock is judged and removed (a no-op
        context where the filesystem has no flock)."""
        import contextlib
        import fcntl

        @contextlib.contextmanager
        def held():
            try:
                fd = os.open(self.path.with_name(GUARD_NAME), os.O_CREAT | os.O_RDWR, 0o644)
            except OSError:
                yield
                return
            try:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX)
                except OSError:
                    pass
                yield
            finally:
                os.close(fd)  # releases the flock

        return held()

    def _refuse(self, problem: str, fix: str) -> ConfigError:
        return ConfigError("job.dump_folder", problem, fix, str(self.path.parent))

    def _take_over_if_stale(self) -> None:
        """Under the guard: remove the lock if its run is gone; else refuse in one line."""
        try:
            text = self.path.read_text()
        except FileNotFoundError:
            return
        except IsADirectoryError:
            raise self._refuse(f"the lock {self.path} is a directory, not a lock file",
                               "remove it if no run uses this folder") from None
        except (OSError, UnicodeDecodeError) as e:
            raise self._refuse(f"cannot read the lock {self.path}: {getattr(e, 'strerror', None) or e}",
                               "fix its permissions, or remove it if no run uses this folder") from None
        try:
            owner = json.loads(text)
        except ValueError:
            owner = None
        if owner is None:  # empty or cut short: being written (young), or left by a crash (old)
            try:
                age = time.time() - self.path.stat().st_mtime
            except FileNotFoundError:
                return
            if age < YOUNG_S:
                raise self._refuse(f"another run is starting in this folder (lock {self.path} is being written, "
                                   f"{age:.0f}s old)", "wait for it, stop it, or use another job.dump_folder")
            reason = f"it is unreadable and {age:.0f}s old"
        else:
            problem = _malformed(owner)
            if problem is not None:
                raise self._refuse(f"the lock {self.path} is malformed ({problem})",
                                   "remove it if no run uses this folder")
            reason = stale_reason(owner, self.path)
        if reason is None:
            raise self._refuse(f"another run is using this folder (lock {self.path}: pid {owner.get('pid')} on "
                               f"{owner.get('host')}, started {owner.get('started')})",
                               "wait for it to finish, stop it, or use another job.dump_folder")
        logger.warning("taking over the stale lock %s: %s", self.path, reason)
        try:
            self.path.unlink()  # under the guard: nobody else removes it, nobody can create it
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
        except (OSError, ValueError, AttributeError):
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
