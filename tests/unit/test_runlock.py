"""The run lock (lathe/runlock.py): exactly one holder however many processes race for a folder,
and a malformed lock is one line, never a traceback.

The race forks processes (no torch in them) that wait at a barrier, call ``RunLock(folder).acquire()``
at the same instant, wait at a second barrier (so every holder is still alive while the others
judge its lock), then report. Hundreds of trials, a few seconds in all.
"""

from __future__ import annotations

import errno
import json
import multiprocessing as mp
import os
import socket
import subprocess
import sys
import time

import pytest

from lathe.errors import ConfigError
from lathe.runlock import LOCK_NAME, YOUNG_S, RunLock

HELD, REFUSED, CRASHED = "held", "refused", "crashed"


def _contender(folders: list[str], start, attempted, released, out) -> None:
    """One process racing in every trial: acquire at the barrier, report, hold until all have
    tried, release, wait for all to release before the next trial."""
    for folder in folders:
        start.wait()
        lock = None
        try:
            lock = RunLock(folder).acquire()
            result = HELD
        except ConfigError as e:
            result = f"{REFUSED}: {e}"
        except BaseException as e:  # noqa: BLE001 (reported to the test)
            result = f"{CRASHED}: {type(e).__name__}: {e}"
        out.put((folder, result))
        attempted.wait()
        if lock is not None:
            lock.release()
        released.wait()


def race(folders: list, n: int) -> dict[str, list[str]]:
    """``n`` forked processes race for each folder in turn; the results per folder."""
    ctx = mp.get_context("fork")
    start, attempted, released, out = ctx.Barrier(n), ctx.Barrier(n), ctx.Barrier(n), ctx.Queue()
    folders = [str(f) for f in folders]
    procs = [ctx.Process(target=_contender, args=(folders, start, attempted, released, out)) for _ in range(n)]
    for p in procs:
        p.start()
    results: dict[str, list[str]] = {f: [] for f in folders}
    try:
        for _ in range(n * len(folders)):
            folder, result = out.get(timeout=120)
            results[folder].append(result)
    finally:
        for p in procs:
            p.join(timeout=60)
            if p.is_alive():
                p.kill()
                p.join()
    return results


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def _no_hard_links(src, dst):
    raise OSError(errno.EPERM, "Operation not permitted")


@pytest.mark.parametrize("n, trials, stale, links", [(2, 200, False, True), (4, 100, False, True),
                                                     (4, 100, True, True), (4, 100, False, False)],
                         ids=["2-procs", "4-procs", "4-procs-stale-lock", "4-procs-no-hard-links"])
def test_racing_processes_exactly_one_holds_the_lock(tmp_path, monkeypatch, n, trials, stale, links):
    """Every trial: one holder, the rest refuse naming it; with a stale lock planted (a dead
    PID), exactly one takes it over; on a filesystem without hard links (exclusive create, then
    write: the others may read the lock half-written) the young unreadable lock counts as live.
    The lock is gone after the holder releases it."""
    if not links:
        monkeypatch.setattr(os, "link", _no_hard_links)  # the forked contenders inherit it
    dead = _dead_pid()
    folders = [tmp_path / f"t{trial}" for trial in range(trials)]
    for folder in folders:
        folder.mkdir()
        if stale:
            (folder / LOCK_NAME).write_text(json.dumps({"host": socket.gethostname(), "pid": dead,
                                                        "process_start": "1", "started": "yesterday"}))
    results = race(folders, n)
    for trial, folder in enumerate(folders):
        got = results[str(folder)]
        assert len(got) == n and not [r for r in got if r.startswith(CRASHED)], (trial, got)
        assert got.count(HELD) == 1, (trial, got)
        refusals = [r for r in got if r != HELD]
        assert all("another run is using this folder" in r or (not links and "another run is starting" in r)
                   for r in refusals), (trial, refusals)
        assert not (folder / LOCK_NAME).exists()
        assert not [p.name for p in folder.iterdir() if p.name.endswith(".tmp")]


@pytest.mark.parametrize("content, expected", [
    ("[1]", "malformed (it holds JSON list, not a lock record)"),
    ("42", "malformed (it holds JSON int, not a lock record)"),
    ('{"host": "h", "pid": "abc"}', "malformed (its 'pid' is 'abc')"),
    ('{"host": "h", "pid": null}', "malformed (its 'pid' is None)"),
    ('{"host": "h", "pid": 1, "slurm_job_id": "7", "slurm_restart_count": "x"}',
     "malformed (its 'slurm_restart_count' is 'x')"),
    (None, "is a directory, not a lock file"),
], ids=["list", "int", "pid-str", "pid-null", "restart-count", "directory"])
def test_a_malformed_lock_is_one_line(tmp_path, content, expected):
    lock = tmp_path / LOCK_NAME
    if content is None:
        lock.mkdir()
    else:
        lock.write_text(content)
    with pytest.raises(ConfigError) as e:
        RunLock(tmp_path).acquire()
    message = str(e.value)
    assert "\n" not in message and expected in message and str(lock) in message, message
    assert message.startswith("job.dump_folder=") and "remove it if no run uses this folder" in message
    assert lock.exists()  # never removed: it is the user's to judge


def test_unreadable_lock_is_live_while_young_and_taken_over_when_old(tmp_path, caplog):
    lock = tmp_path / LOCK_NAME
    lock.write_text('{"host": "h", "pi')  # cut short, as by a writer still at work
    with pytest.raises(ConfigError, match="another run is starting in this folder"):
        RunLock(tmp_path).acquire()
    old = time.time() - YOUNG_S - 5
    os.utime(lock, (old, old))
    held = RunLock(tmp_path).acquire()
    try:
        assert json.loads(lock.read_text())["pid"] == os.getpid()
        assert "taking over the stale lock" in caplog.text and "unreadable" in caplog.text
    finally:
        held.release()
    assert not lock.exists()
