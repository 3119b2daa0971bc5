"""lathe on a real Slurm: `lathe slurm` scripts submitted to a two-node cluster (slurmctld and two
slurmd on this host, tests/cluster/slurm_cluster.py), trained with FSDP over both nodes.

- Two nodes x one process train what one process trains (parity-suite tolerance: 1e-5 relative).
- Preemption: `scancel --signal=USR1` (what `#SBATCH --signal=USR1@LEAD` sends before the time
  limit) twice during a run: each time every rank saves after its current step, the launchers
  exit 75, the script requeues the job, and the next start resumes. The job completes by itself
  after two requeues, loses no step, and its per-step losses equal the uninterrupted run's bit for
  bit (fp32, same layout).
- A dead rank: kill -9 of one node's worker; torchrun restarts both nodes' workers (max-restarts
  1), they resume from the last checkpoint and the job completes with the same losses.
- A head node with a loopback address while the nodes are different hosts: the script stops in
  seconds with one line instead of hanging.
"""

from __future__ import annotations

import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cluster_helpers import TRAIN, env, last_step, losses, wait_until, worker
from lathe.config import load_config
from lathe.trainer import train
from slurm_cluster import SlurmCluster

STEPS = 40
RUN = [*TRAIN, "--training.batch_size", "2", "--training.steps", str(STEPS),
       "--checkpoint.enable_checkpoint", "--checkpoint.interval", "5"]


def write_script(folder: Path, *slurm_args: str, train_args=RUN) -> Path:
    """`lathe slurm ... --output job.sbatch -- <train options>`, as a user would."""
    script = folder / "job.sbatch"
    proc = subprocess.run([sys.executable, "-m", "lathe", "slurm", "--nodes", "2", "--procs-per-node", "1",
                           "--time", "10", "--logs", str(folder / "logs"), "--python", sys.executable,
                           "--output", str(script), *slurm_args, "--", *train_args,
                           "--job.dump_folder", str(folder / "run")],
                          capture_output=True, text=True, env=env(), timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return script


def job_log(folder: Path) -> str:
    return "\n".join(p.read_text() for p in sorted((folder / "logs").glob("*")))


def submit(cluster: SlurmCluster, script: Path) -> int:
    return cluster.sbatch(script, f"--chdir={script.parent}")


def finish(cluster: SlurmCluster, job: int, folder: Path, timeout: float = 300) -> dict:
    info = cluster.wait(job, timeout=timeout)
    assert info["JobState"] == "COMPLETED", f"{info}\n{job_log(folder)[-6000:]}"
    return info


@pytest.fixture(scope="module")
def two_nodes(cluster, tmp_path_factory):
    """The uninterrupted two-node run: the reference for the preemption and crash tests."""
    folder = tmp_path_factory.mktemp("two-nodes")
    finish(cluster, submit(cluster, write_script(folder)), folder)
    return dict(losses(folder / "run"))


def test_two_nodes_train_what_one_process_trains(two_nodes, tmp_path):
    """FSDP over two Slurm nodes (batch 2 each) equals one process with batch 4."""
    cfg, _ = load_config([*RUN, "--training.batch_size", "4", "--no-checkpoint.enable_checkpoint",
                          "--job.dump_folder", str(tmp_path / "one")])
    one = train(cfg).losses
    assert sorted(two_nodes) == list(range(1, STEPS + 1))
    for step, loss in one.items():
        assert two_nodes[step] == pytest.approx(loss, rel=1e-5), (step, two_nodes[step], loss)


def test_preempted_twice_requeues_itself_and_matches_the_uninterrupted_run(cluster, two_nodes, tmp_path):
    job = submit(cluster, write_script(tmp_path))
    run = tmp_path / "run"
    for restart in (0, 1):  # a warning signal in each of the first two incarnations
        wait_until(lambda: int(cluster.job(job).get("Restarts", 0)) == restart and last_step(run) >= 5 * (restart + 1),
                   120, f"training to progress in restart {restart}")
        cluster.run("scancel", "--signal=USR1", str(job))
        wait_until(lambda: int(cluster.job(job).get("Restarts", 0)) == restart + 1, 120, "the requeue")
    info = finish(cluster, job, tmp_path)
    assert info["Restarts"] == "2"
    log = job_log(tmp_path)
    assert log.count("preempted with a checkpoint saved: requeueing") == 2, log[-6000:]
    assert "restart 2 on" in log and "torchrun restart 0; resuming at step" in log
    rows = losses(run)
    assert [s for s, _ in rows] == list(range(1, STEPS + 1)), "a step was lost or repeated"
    assert dict(rows) == two_nodes  # bitwise: same layout, same data, exact resume


def test_a_killed_rank_restarts_the_job_from_its_checkpoint(cluster, two_nodes, tmp_path):
    job = submit(cluster, write_script(tmp_path, "--max-restarts", "1"))
    run = tmp_path / "run"
    wait_until(lambda: last_step(run) >= 7, 120, "a checkpoint and two more steps")
    victim = wait_until(lambda: worker(run, rank=1), 30, "rank 1's process")
    victim.kill()  # SIGKILL: no chance to save
    finish(cluster, job, tmp_path)
    log = job_log(tmp_path)
    assert re.search(r"the previous run reached step \d+, its last complete checkpoint is step \d+", log), log[-6000:]
    rows = losses(run)
    assert rows[-1][0] == STEPS
    assert len(rows) > STEPS  # the steps after the checkpoint ran twice
    for step, loss in rows:  # ... and both times they computed the same thing
        assert loss == two_nodes[step], (step, loss, two_nodes[step])


def test_loopback_head_address_on_different_hosts_fails_fast(slurm_ready, tmp_path):
    """Slurm says the nodes are two hosts but gives the head the address 127.0.0.1: no other host
    could reach it, so the script refuses at once (on one host, as in the tests above, loopback
    is right and accepted)."""
    with SlurmCluster(tmp_path / "slurm", node_hostnames=["hostA", "hostB"]) as other:
        other.env.update(env())
        start = time.monotonic()
        job = submit(other, write_script(tmp_path))
        info = other.wait(job, timeout=60)
        took = time.monotonic() - start
    assert info["JobState"] == "FAILED" and info["ExitCode"] == "2:0", info
    assert took < 30
    err = job_log(tmp_path)
    assert "loopback address 127.0.0.1 but the job's 2 nodes are 2 different hosts" in err, err
    assert not (tmp_path / "run").exists()  # nothing started
