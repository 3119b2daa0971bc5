"""lathe on a real Slurm: `lathe slurm` scripts submitted to a two-node cluster (slurmctld and two
slurmd on this host, tests/cluster/slurm_cluster.py), trained with FSDP over both nodes.

Every script is written in its own folder with relative paths (logs, run folder) and submitted
from another folder, with no --chdir: the paths in the script are absolute and its
``#SBATCH --chdir`` is where it was written.

- Two nodes x one process train what one process trains (parity-suite tolerance: 1e-5 relative).
- Preemption: `scancel --signal=USR1` (what `#SBATCH --signal=USR1@LEAD` sends before the time
  limit) twice during a run: each time every rank saves after its current step, the launchers
  exit 75, the script requeues the job, and the next start resumes. The job completes by itself
  after two requeues, loses no step, and its per-step losses equal the uninterrupted run's bit for
  bit (fp32, same layout). Its rendezvous port (20000 + job id % 20000) is held by another
  program the whole time: every start takes the next free port and runs. It asks for whole nodes
  (--exclusive --mem 0), and its ranks run on all of the node's CPUs.
- A dead rank: kill -9 of one node's worker; torchrun restarts both nodes' workers (max-restarts
  1), they resume from the last checkpoint and the job completes with the same losses. Its ranks
  run on the --cpus-per-task CPUs (srun gets them: SRUN_CPUS_PER_TASK).
- A head node with a loopback address while the nodes are different hosts: the script stops in
  seconds with one line instead of hanging.
"""

from __future__ import annotations

import re
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from cluster_helpers import TRAIN, env, last_step, losses, wait_until, worker
from lathe.config import load_config
from lathe.slurm import main as slurm_main
from lathe.trainer import train
from slurm_cluster import SlurmCluster

STEPS = 20
RUN = [*TRAIN, "--training.batch_size", "2", "--training.steps", str(STEPS),
       "--checkpoint.enable_checkpoint", "--checkpoint.interval", "5"]
CPUS = ("--cpus-per-task", "2")  # each test node has 2 CPUs (lathe's default, 4 per process, would not fit)


def write_script(folder: Path, *slurm_args: str, train_args=RUN) -> Path:
    """`lathe slurm ... --output job.sbatch -- <train options>` run in ``folder``, as a user would,
    with relative paths: logs in folder/logs, the run in folder/run."""
    proc = subprocess.run([sys.executable, "-m", "lathe", "slurm", "--nodes", "2", "--procs-per-node", "1",
                           "--time", "10", "--logs", "logs", "--python", sys.executable,
                           "--output", "job.sbatch", *slurm_args, "--", *train_args, "--job.dump_folder", "run"],
                          capture_output=True, text=True, env=env(), timeout=120, cwd=folder)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return folder / "job.sbatch"


def job_log(folder: Path) -> str:
    return "\n".join(p.read_text() for p in sorted((folder / "logs").glob("*")))


def submit(cluster: SlurmCluster, script: Path, *args: str) -> int:
    """sbatch from the cluster's folder, not the script's: the script's paths and --chdir must do."""
    return cluster.sbatch(script, *args, cwd=cluster.root)


def restarts(cluster: SlurmCluster, job: int) -> int:
    return int(cluster.job(job).get("Restarts", 0))


def finish(cluster: SlurmCluster, job: int, folder: Path, timeout: float = 300) -> dict:
    info = cluster.wait(job, timeout=timeout)
    assert info["JobState"] == "COMPLETED", f"{info}\n{job_log(folder)[-6000:]}"
    return info


@pytest.fixture(scope="module")
def two_nodes(cluster, tmp_path_factory):
    """The uninterrupted two-node run: the reference for the preemption and crash tests."""
    folder = tmp_path_factory.mktemp("two-nodes")
    job = submit(cluster, write_script(folder, *CPUS))
    finish(cluster, job, folder)
    return SimpleNamespace(losses=dict(losses(folder / "run")), folder=folder, job=job)


def test_two_nodes_train_what_one_process_trains(two_nodes, tmp_path):
    """FSDP over two Slurm nodes (batch 2 each) equals one process with batch 4."""
    cfg, _ = load_config([*RUN, "--training.batch_size", "4", "--no-checkpoint.enable_checkpoint",
                          "--job.dump_folder", str(tmp_path / "one")])
    one = train(cfg).losses
    assert sorted(two_nodes.losses) == list(range(1, STEPS + 1))
    for step, loss in one.items():
        assert two_nodes.losses[step] == pytest.approx(loss, rel=1e-5), (step, two_nodes.losses[step], loss)
    # submitted from elsewhere, it ran and logged where it was written (#SBATCH --chdir, absolute paths)
    out = (two_nodes.folder / "logs" / f"lathe-{two_nodes.job}.out").read_text()
    assert f"lathe slurm: job {two_nodes.job} restart 0 on n[1-2]" in out and ", 2 CPUs per node" in out, out


def test_preempted_twice_requeues_itself_and_matches_the_uninterrupted_run(cluster, two_nodes, tmp_path):
    job = submit(cluster, write_script(tmp_path, "--exclusive", "--mem", "0"), "--hold")
    port = 20000 + job % 20000
    taken = socket.create_server(("", port))  # another program holds the job's port on the head node
    try:
        cluster.run("scontrol", "release", str(job))
        run, resumed = tmp_path / "run", 0
        for restart in (0, 1):  # a warning signal in each of the first two incarnations
            wait_until(lambda: last_step(run) >= resumed + 2 and restarts(cluster, job) == restart, 120,
                       f"training to progress in restart {restart}", poll=0.1)
            if restart == 0:  # whole nodes: srun's task, so every rank, got all of the node's CPUs
                assert [len(worker(run, rank).cpu_affinity()) for rank in (0, 1)] == [2, 2]
            cluster.run("scancel", "--signal=USR1", str(job))
            wait_until(lambda: restarts(cluster, job) == restart + 1, 120, "the requeue", poll=0.25)
            resumed = last_step(run)  # the incarnation has stopped: its last step is the saved one
        info = finish(cluster, job, tmp_path)
    finally:
        taken.close()
    assert info["Restarts"] == "2"
    log = job_log(tmp_path)
    assert log.count("preempted with a checkpoint saved: requeueing") == 2, log[-6000:]
    assert "restart 2 on" in log and "torchrun restart 0; resuming at step" in log
    assert log.count(f"port {port} is in use on n1: the rendezvous uses") == 3, log[-6000:]
    rows = losses(run)
    assert [s for s, _ in rows] == list(range(1, STEPS + 1)), "a step was lost or repeated"
    assert dict(rows) == two_nodes.losses  # bitwise: same layout, same data, exact resume


def test_a_killed_rank_restarts_the_job_from_its_checkpoint(cluster, two_nodes, tmp_path):
    job = submit(cluster, write_script(tmp_path, *CPUS, "--max-restarts", "1"))
    run = tmp_path / "run"
    wait_until(lambda: last_step(run) >= 7, 120, "a checkpoint and two more steps")
    victim = wait_until(lambda: worker(run, rank=1), 30, "rank 1's process")
    assert len(victim.cpu_affinity()) == 2  # the --cpus-per-task CPUs, not srun's default of one
    victim.kill()  # SIGKILL: no chance to save
    finish(cluster, job, tmp_path)
    log = job_log(tmp_path)
    assert re.search(r"the previous run reached step \d+, its last complete checkpoint is step \d+", log), log[-6000:]
    rows = losses(run)
    assert rows[-1][0] == STEPS
    assert len(rows) > STEPS  # the steps after the checkpoint ran twice
    for step, loss in rows:  # ... and both times they computed the same thing
        assert loss == two_nodes.losses[step], (step, loss, two_nodes.losses[step])


def test_loopback_head_address_on_different_hosts_fails_fast(slurm_ready, tmp_path):
    """Slurm says the nodes are two hosts but gives the head the address 127.0.0.1: no other host
    could reach it, so the script refuses at once (on one host, as in the tests above, loopback
    is right and accepted)."""
    with SlurmCluster(tmp_path / "slurm", node_hostnames=["hostA", "hostB"]) as other:
        other.env.update(env())
        start = time.monotonic()
        job = submit(other, write_script(tmp_path, *CPUS))
        info = other.wait(job, timeout=60)
        took = time.monotonic() - start
    assert info["JobState"] == "FAILED" and info["ExitCode"] == "2:0", info
    assert took < 30
    err = job_log(tmp_path)
    assert "loopback address 127.0.0.1 but the job's 2 nodes are 2 different hosts" in err, err
    assert not (tmp_path / "run").exists()  # nothing started


def test_submit_keeps_each_script_under_its_job_id(cluster, tmp_path, monkeypatch, capsys):
    """`lathe slurm --submit` twice with the same job name: two scripts, named after their job ids
    next to the jobs' logs, neither overwritten (held jobs: nothing runs). In this process: the
    real sbatch, without two more Python start-ups."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("SLURM_CONF", cluster.env["SLURM_CONF"])
    jobs = []
    try:
        for steps in ("3", "4"):
            assert slurm_main(["--nodes", "2", *CPUS, "--time", "10", "--sbatch=--hold", "--submit", "--",
                               *TRAIN, "--training.steps", steps]) == 0
            out = capsys.readouterr().out
            jobs.append(int(re.search(r"submitted job (\d+)", out).group(1)))
    finally:
        for job in jobs:
            cluster.run("scancel", str(job), check=False)
    logs = tmp_path / "slurm-logs"
    saved = [logs / f"lathe-{job}.sbatch" for job in jobs]
    assert sorted(logs.glob("*.sbatch")) == sorted(saved)
    for path, steps in zip(saved, ("3", "4")):  # each its own job's script
        assert path.read_text().rstrip().splitlines()[1].endswith(f"--training.steps {steps}")  # "Written by"
    assert f"submitted job {jobs[1]}; script {saved[1]}, logs {logs}/lathe-{jobs[1]}.out and .err" in out
