"""`lathe launch` (torchrun with exit codes a job script can act on) and multi-node start-up,
without Slurm:

- preemption: SIGTERM or SIGUSR1 to the launcher -> every worker saves after its step -> exit 75;
- a kill -9 of the launcher leaves no worker training on, orphaned;
- a hang: one rank stopped with SIGSTOP -> the others exit within the watchdog time, naming it;
- a bad rendezvous (unresolvable host, nobody listening) fails in seconds with one line;
- a config error under NGPU=2: one line and exit 2, at launch or raised later on a rank;
- two torchrun agents with --nnodes 2 on one host train FSDP x 2 like one process.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from cluster_helpers import REPO, TRAIN, env, last_step, losses, wait_until, worker
from lathe.checkpoint.manager import complete_steps
from lathe.config import load_config
from lathe.trainer import train

LAUNCH = [sys.executable, "-m", "lathe", "launch", "--nproc-per-node", "2", "--rdzv-backend", "c10d",
          "--rdzv-endpoint", "localhost:0"]


def start(folder: Path, *launch_args: str, steps=100000, extra=()) -> subprocess.Popen:
    return subprocess.Popen([*LAUNCH, *launch_args, "--", *TRAIN, "--training.batch_size", "2",
                             "--training.steps", str(steps), "--job.dump_folder", str(folder), *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env(),
                            start_new_session=True)


def stop(proc: subprocess.Popen, timeout=120) -> tuple[str, str]:
    """Wait for the launcher; whatever happens, leave nothing of it running."""
    try:
        return proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGUSR1])
def test_a_signal_to_the_launcher_saves_and_exits_75(tmp_path, sig):
    proc = start(tmp_path, extra=["--checkpoint.enable_checkpoint", "--checkpoint.interval", "1000"])
    try:
        wait_until(lambda: last_step(tmp_path) >= 3, 120, "training to start")
        proc.send_signal(sig)
    finally:
        out, err = stop(proc)
    assert proc.returncode == 75, out[-3000:] + err[-3000:]
    saved = complete_steps(tmp_path / "checkpoint")
    assert saved == [last_step(tmp_path)]  # the step it was in when the signal came: nothing lost


def test_killing_the_launcher_leaves_no_orphans(tmp_path):
    proc = start(tmp_path)
    try:
        wait_until(lambda: last_step(tmp_path) >= 2, 120, "training to start")
        workers = [worker(tmp_path, rank) for rank in (0, 1)]
        assert all(workers)
        proc.kill()  # SIGKILL: the launcher cannot forward anything
        gone, alive = psutil.wait_procs(workers, timeout=60)
        assert not alive, f"workers still running after their launcher died: {alive}"
    finally:
        stop(proc)


def test_a_stopped_rank_ends_the_job_within_the_watchdog_time_and_is_named(tmp_path):
    proc = start(tmp_path, extra=["--comm.watchdog_timeout_seconds", "8"])
    victim = None
    try:
        wait_until(lambda: last_step(tmp_path) >= 3, 120, "training to start")
        victim = worker(tmp_path, rank=1)
        victim.suspend()  # SIGSTOP: alive, holding its sockets, answering nothing
        stopped_at = time.monotonic()
        out, err = stop(proc, timeout=120)
        took = time.monotonic() - stopped_at
    finally:
        if victim is not None and victim.is_running():
            victim.kill()
        stop(proc)
    assert proc.returncode == 76, out[-3000:] + err[-3000:]
    assert took < 8 + 30, took  # the watchdog time plus a margin for a loaded 2-core machine
    text = out + err
    assert "lathe watchdog: rank 0 made no progress for 8s" in text, text[-3000:]
    assert f"stopped answering: rank 1 ({socket.gethostname()}:{victim.pid}, last step" in text, text[-3000:]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("endpoint, expected", [
    ("no-such-head.invalid:29400", "cannot resolve the rendezvous host 'no-such-head.invalid'"),
    ("127.0.0.2:{port}", "cannot reach the rendezvous from"),  # another address, nobody listening
], ids=["unresolvable", "unreachable"])
def test_a_bad_rendezvous_fails_fast_with_one_line(tmp_path, endpoint, expected):
    start_time = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "lathe", "launch", "--nnodes", "2", "--nproc-per-node", "1",
                           "--rdzv-backend", "c10d", "--rdzv-endpoint", endpoint.format(port=_free_port()),
                           "--rdzv-conf", "join_timeout=5", "--", *TRAIN, "--job.dump_folder", str(tmp_path)],
                          capture_output=True, text=True, env=env(), timeout=120)
    assert time.monotonic() - start_time < 30
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-3000:]
    lines = [x for x in proc.stderr.splitlines() if x.strip()]
    assert len(lines) == 1 and lines[0].startswith("lathe: error: --rdzv-endpoint"), proc.stderr
    assert expected in lines[0]


@pytest.mark.parametrize("args, expected", [
    (["--training.batch_size", "0"], "training.batch_size=0: must be >= 1"),  # caught by the launcher
    (["--training.dataset_path", "{empty}"], "folder holds no data files"),   # raised on the ranks
], ids=["at-launch", "on-a-rank"])
def test_a_config_error_under_ngpu_2_is_one_line_and_exit_2(tmp_path, args, expected):
    (tmp_path / "empty").mkdir()
    proc = subprocess.run([str(REPO / "scripts" / "run_train.sh"), *TRAIN, "--training.steps", "2",
                           "--job.dump_folder", str(tmp_path / "run"),
                           *[a.format(empty=tmp_path / "empty") for a in args]],
                          capture_output=True, text=True, env={**env(), "NGPU": "2"}, timeout=300)
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-3000:]
    lines = [x for x in proc.stderr.splitlines() if x.strip()]
    assert len(lines) == 1 and lines[0].startswith("lathe: error: ") and expected in lines[0], proc.stderr
    assert "Traceback" not in proc.stdout + proc.stderr


def test_two_torchrun_agents_with_nnodes_2_train_like_one_process(tmp_path):
    """Multi-node start-up without Slurm: two agents (as on two machines) meet at a c10d
    rendezvous and train FSDP x 2; the losses equal one process with the same global batch."""
    port = _free_port()
    folder = tmp_path / "two"
    agents = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes", "2",
                                "--nproc-per-node", "1", "--rdzv-backend", "c10d",
                                "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", "lathe-test",
                                "-m", "lathe", "train", *TRAIN, "--training.batch_size", "2",
                                "--training.steps", "5", "--job.dump_folder", str(folder)],
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env())
              for _ in range(2)]
    outputs = [stop(a, timeout=300)[0] for a in agents]
    assert [a.returncode for a in agents] == [0, 0], "\n".join(o[-3000:] for o in outputs)
    cfg, _ = load_config([*TRAIN, "--training.batch_size", "4", "--training.steps", "5",
                          "--job.dump_folder", str(tmp_path / "one")])
    one = train(cfg).losses
    two = dict(losses(folder))
    assert sorted(two) == [1, 2, 3, 4, 5]
    for step, loss in one.items():
        assert two[step] == pytest.approx(loss, rel=1e-5), (step, two[step], loss)
