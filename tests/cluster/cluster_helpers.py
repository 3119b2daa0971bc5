"""Shared pieces of the cluster tests (their fixtures are in conftest.py): the tiny training run
they use, reading its losses, finding one rank's worker process, waiting.

Slurm comes from Debian's slurm-wlm (scripts/install_test_deps.sh; `.ci/run` installs it). Where
it is missing, or the tests cannot run it as root, the Slurm tests are skipped with that reason,
except under CI (LATHE_REQUIRE_SLURM=1), where that is a failure.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parents[2]
# fp32 FSDP (like the parity suite), a checkpoint every 5 steps, every step logged.
TRAIN = ["--model.flavor", "tiny", "--training.seq_len", "32", "--optimizer.lr", "1e-3",
         "--lr_scheduler.warmup_steps", "2", "--metrics.log_freq", "1",
         "--training.mixed_precision_param", "float32", "--training.mixed_precision_reduce", "float32"]


def env() -> dict[str, str]:
    """The environment of every process a cluster test starts: this checkout first on the path,
    one OpenMP thread per process (the CI machine has 2 cores), no inherited torchrun variables."""
    e = {k: v for k, v in os.environ.items()
         if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "LOG_RANK", "NGPU")}
    e["PYTHONPATH"] = os.pathsep.join([str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])])
    e["OMP_NUM_THREADS"] = "1"
    e["PYTHONUNBUFFERED"] = "1"
    return e


def losses(folder: Path) -> list[tuple[int, float]]:
    """(step, loss) of every logged step in order, repeats included (a restart logs steps again)."""
    path = Path(folder) / "metrics.jsonl"
    rows = []
    for line in path.read_text().splitlines() if path.exists() else []:
        try:
            record = json.loads(line)
        except ValueError:  # a line cut short by a kill
            continue
        if "loss" in record:
            rows.append((record["step"], record["loss"]))
    return rows


def last_step(folder: Path) -> int:
    rows = losses(folder)
    return rows[-1][0] if rows else 0


def wait_until(predicate, timeout: float, what: str, poll: float = 0.05):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(poll)
    raise TimeoutError(f"waited {timeout:.0f}s for {what}")


def worker(folder: Path, rank: int, restart: int = 0) -> psutil.Process | None:
    """The training process of global ``rank`` writing to ``folder`` (in torchrun restart
    ``restart``), found by its command line (``folder``, or a relative path to it from the
    process's folder) and environment, or None."""
    for proc in psutil.process_iter(["cmdline"]):
        cmd = proc.info["cmdline"] or []
        if "train" not in cmd:
            continue
        try:
            e, cwd = proc.environ(), proc.cwd()
        except psutil.Error:
            continue
        if str(folder) not in (os.path.join(cwd, a) for a in cmd):
            continue
        if e.get("RANK") == str(rank) and e.get("TORCHELASTIC_RESTART_COUNT", "0") == str(restart):
            return proc
    return None
