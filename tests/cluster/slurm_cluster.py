"""A real two-node Slurm on one host, for tests: ``slurmctld`` plus ``slurmd -N n1`` and
``slurmd -N n2`` (Debian's slurm-wlm), ``auth/none``, both nodes at NodeAddr 127.0.0.1 with their
own ports. Node names do not resolve by DNS, as on many clusters; their address is what Slurm
knows. Tasks are bound to the CPUs Slurm gives them (``task/affinity``, cores), as on clusters
that confine jobs to their CPUs, so a step that asks for too few CPUs gets too few. Started in a
temporary folder and stopped by PID. One setting differs from a production cluster:
``AuthInfo=cred_expire=5``. Slurm holds a requeued job back for that long (default 120 s,
so on a real cluster a requeued job restarts about two minutes after it stopped).

    with SlurmCluster(tmp_path) as cluster:
        job = cluster.sbatch(script_path)
        cluster.wait(job)
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path


def slurm_available() -> bool:
    return all(shutil.which(x) for x in ("slurmctld", "slurmd", "sbatch", "scontrol", "squeue"))


def _free_ports(n: int) -> list[int]:
    socks, ports = [], []
    for _ in range(n):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        socks.append(s)
        ports.append(s.getsockname()[1])
    for s in socks:
        s.close()
    return ports


class SlurmCluster:
    def __init__(self, root: Path, nodes: int = 2, cpus: int = 2, kill_wait: int = 30,
                 node_hostnames: list[str] | None = None):
        self.root = Path(root)
        self.nodes = [f"n{i + 1}" for i in range(nodes)]
        # What Slurm believes each node's host is called (all this host by default). Another name
        # makes Slurm think the nodes are different machines, though all run here.
        self.node_hostnames = node_hostnames
        self.cpus, self.kill_wait = cpus, kill_wait
        self.procs: list[subprocess.Popen] = []
        self.conf = self.root / "slurm.conf"
        self.env = {**os.environ, "SLURM_CONF": str(self.conf)}

    def _write_conf(self) -> None:
        host = socket.gethostname().split(".")[0]
        ctl, *node_ports = _free_ports(1 + len(self.nodes))
        for d in ("state", "spool", "log"):
            (self.root / d).mkdir(parents=True, exist_ok=True)
        lines = [
            "ClusterName=lathetest", f"SlurmctldHost={host}(127.0.0.1)", f"SlurmctldPort={ctl}",
            "AuthType=auth/none", "CredType=cred/none", "AuthInfo=cred_expire=5", "SlurmUser=root", "SlurmdUser=root",
            f"StateSaveLocation={self.root}/state", f"SlurmdSpoolDir={self.root}/spool/%n",
            f"SlurmctldPidFile={self.root}/slurmctld.pid", f"SlurmdPidFile={self.root}/slurmd-%n.pid",
            f"SlurmctldLogFile={self.root}/log/slurmctld.log", f"SlurmdLogFile={self.root}/log/slurmd-%n.log",
            "ProctrackType=proctrack/linuxproc", "TaskPlugin=task/affinity", "TaskPluginParam=cores",
            "SwitchType=switch/none",
            "MpiDefault=none", "SelectType=select/cons_tres", "SelectTypeParameters=CR_CPU",
            "SchedulerType=sched/builtin", "JobAcctGatherType=jobacct_gather/none",
            "AccountingStorageType=accounting_storage/none", "ReturnToService=2", "JobRequeue=1",
            f"KillWait={self.kill_wait}", "MinJobAge=600", "InactiveLimit=0", "SlurmdTimeout=30",
            "SlurmctldTimeout=30", "MessageTimeout=30", "SchedulerParameters=sched_interval=1",
            "PrologFlags=NoHold", "LaunchParameters=use_interactive_step",
        ]
        for i, (name, port) in enumerate(zip(self.nodes, node_ports)):
            node_host = self.node_hostnames[i] if self.node_hostnames else host
            lines.append(f"NodeName={name} NodeHostname={node_host} NodeAddr=127.0.0.1 Port={port} "
                         f"CPUs={self.cpus} RealMemory=4000 State=UNKNOWN")
        lines.append(f"PartitionName=debug Nodes={','.join(self.nodes)} Default=YES MaxTime=INFINITE "
                     "State=UP OverSubscribe=FORCE:4")
        self.conf.write_text("\n".join(lines) + "\n")

    def __enter__(self) -> "SlurmCluster":
        self._write_conf()
        self.procs.append(subprocess.Popen(["slurmctld", "-D", "-i", "-f", str(self.conf)], env=self.env,
                                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        for name in self.nodes:
            self.procs.append(subprocess.Popen(["slurmd", "-D", "-N", name, "-f", str(self.conf)], env=self.env,
                                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        deadline = time.time() + 60
        while time.time() < deadline:
            out = self.run("sinfo", "-h", "-N", "-o", "%N %t", check=False).stdout
            states = dict(line.split() for line in out.splitlines() if len(line.split()) == 2)
            if len(states) == len(self.nodes) and all(s in ("idle", "mix", "alloc") for s in states.values()):
                return self
            for proc in self.procs:
                if proc.poll() is not None:
                    self.__exit__()
                    raise RuntimeError(f"a Slurm daemon exited: {proc.args}; logs in {self.root}/log")
            time.sleep(0.5)
        self.__exit__()
        raise RuntimeError(f"the Slurm nodes did not come up: {out!r}; logs in {self.root}/log")

    def __exit__(self, *exc) -> None:
        self.run("scancel", "--full", "--signal=KILL", "-u", "root", check=False)
        for proc in reversed(self.procs):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.procs:
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self.procs.clear()

    def run(self, *cmd: str, check: bool = True, cwd: Path | None = None) -> subprocess.CompletedProcess:
        return subprocess.run(list(cmd), env=self.env, capture_output=True, text=True, check=check, timeout=60,
                              cwd=cwd)

    def sbatch(self, script: Path, *args: str, cwd: Path | None = None) -> int:
        out = self.run("sbatch", "--parsable", *args, str(script), cwd=cwd).stdout
        return int(out.strip().split(";")[0])

    def job(self, job_id: int) -> dict[str, str]:
        out = self.run("scontrol", "show", "job", "-o", str(job_id), check=False).stdout
        return dict(re.findall(r"(\w+)=(\S*)", out))

    def wait(self, job_id: int, timeout: float = 600, states=("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT",
                                                               "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL")) -> dict:
        deadline = time.time() + timeout
        info = {}
        while time.time() < deadline:
            info = self.job(job_id)
            if info.get("JobState") in states:
                return info
            time.sleep(0.5)
        raise TimeoutError(f"job {job_id} still {info.get('JobState')} after {timeout}s")
