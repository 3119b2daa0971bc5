"""``lathe slurm``: an sbatch script for a run, printed, written or submitted.

    lathe slurm --nodes 2 --gpus-per-node 8 --time 4:00:00 --partition ckpt --account mylab \\
        --submit -- --config configs/llama3_8b.toml --checkpoint.interval 200

The script runs one ``lathe launch`` (torchrun) per node (``--ntasks-per-node=1``), which starts
the node's workers. What it does, in order, and why:

- Paths: the job folder (``#SBATCH --chdir``, default: where ``lathe slurm`` runs), the log folder
  and a relative ``--config`` file are made absolute when the script is written, so the script
  can be submitted from any folder (Slurm opens the ``.out``/``.err`` files before the script
  runs: a relative log folder that does not exist where ``sbatch`` runs means no log at all).
- CPUs: ``#SBATCH --cpus-per-task`` (default ``CPUS_PER_PROC`` per training process; the whole
  node with ``--exclusive``), and ``SRUN_CPUS_PER_TASK`` exported, because since Slurm 22.05
  ``srun`` no longer inherits the job's ``--cpus-per-task``: without it the node's task, so all
  its ranks, would get one CPU.
- Rendezvous on the node the script runs on (the allocation's first), at the address Slurm
  has for it (``scontrol show node`` NodeAddr; DNS only if that is empty, since node names need
  not resolve), on a port derived from the job id (jobs sharing a node do not clash), or the next
  one up that no socket on the head node holds (a port held by another program would make the
  head's launcher a client of that program, and the job fail), with ``--rdzv-id=$SLURM_JOB_ID``.
  It stops within seconds with one line instead of hanging when the address cannot be found, or
  is a loopback address while the nodes are different hosts (NodeHostname differs; on a one-host
  test cluster loopback is right). Each launcher on another node gives up after
  ``--rdzv-timeout`` seconds if the rendezvous cannot be reached.
- Preemption: ``#SBATCH --signal=USR1@LEAD`` asks Slurm for a warning LEAD seconds before the time
  limit; ``--requeue`` lets Slurm requeue on preemption. SIGUSR1/SIGTERM make every worker save a
  checkpoint after the current step, and the launchers exit 75; the script then requeues the job
  itself (``scontrol requeue``, which a user may do to their own job) and the next run resumes
  from that checkpoint. ``--signal-lead`` defaults to the rule in ``signal_lead``.
- Crashes: ``--max-restarts`` restarts the worker group in place (torchrun), resuming from the
  newest complete checkpoint; periodic checkpoints bound the loss when no warning comes.
- Output: one ``.out`` and ``.err`` per job id, opened in append mode, so a requeued job adds to
  the same files. ``--submit`` keeps the submitted script next to them, as ``NAME-JOBID.sbatch``.
"""

from __future__ import annotations

import argparse
import math
import os
import re
import shlex
import subprocess
import tempfile
from pathlib import Path

from lathe.errors import ConfigError

DEFAULT_LEAD_S = 180
# CPUs per training process when --cpus-per-task is not given: the rank's Python thread, its
# OpenMP/intra-op threads, data loading and tokenization (done in the rank), asynchronous
# checkpoint writes. Slurm's own default is one CPU for the node's whole task.
CPUS_PER_PROC = 4
# How many ports up from 20000 + job id % 20000 the script looks for a free one.
PORT_SEARCH = 100


def signal_lead(step_s: float, save_s: float) -> int:
    """Seconds of warning before the time limit: finish the step in flight, save (twice the
    measured time: the filesystem is busier at the end of a job slot), and leave a 60 s margin
    for the processes to exit and the script to requeue. At least 90 s."""
    return max(90, math.ceil(step_s + 2 * save_s + 60))


def parse_mem(text: str) -> str:
    """``--mem``: Slurm's memory per node: a number with an optional K/M/G/T unit (M if none);
    0 asks for all of each node's memory."""
    if re.fullmatch(r"\d+[KMGT]?", text, re.IGNORECASE):
        return text
    raise ConfigError("--mem", "not a Slurm memory size", "e.g. 200G, or 0 for all of each node's memory", text)


def absolute(path: str | Path, base: str | Path | None = None) -> Path:
    """``path`` made absolute against ``base`` (default: the current folder), ``..`` removed,
    symbolic links kept as written."""
    return Path(os.path.normpath(Path(base or Path.cwd()).absolute() / Path(path).expanduser()))


def absolute_config(train_args: list[str]) -> list[str]:
    """``train_args`` with a relative ``--config FILE`` (or ``--job.config_file``) made absolute
    against the current folder, where ``lathe slurm`` read it."""
    out, i = [], 0
    while i < len(train_args):
        arg = train_args[i]
        key, eq, value = arg[2:].partition("=") if arg.startswith("--") else ("", "", "")
        if key.replace("-", "_") in ("config", "job.config_file"):
            if eq:
                arg = f"--{key}={absolute(value)}"
            elif i + 1 < len(train_args):
                out.append(arg)
                i += 1
                arg = str(absolute(train_args[i]))
        out.append(arg)
        i += 1
    return out


def parse_time(text: str) -> str:
    """``--time``: minutes ("90"), or Slurm's forms ("1:30:00", "2-00:00:00", "30:00")."""
    if re.fullmatch(r"\d+", text) or re.fullmatch(r"(\d+-)?\d+(:\d{1,2}){0,2}", text):
        return text
    raise ConfigError("--time", "not a Slurm time", "minutes (90) or [D-]HH:MM:SS (4:00:00)", text)


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, like every lathe error (argparse prints usage + exits)
        raise ConfigError("lathe slurm", message, "see lathe slurm --help")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="lathe slurm", description="Write (and submit) a Slurm batch script that runs "
                                "`lathe train` on N nodes. Options after `--` are `lathe train` options.")
    p.add_argument("--nodes", type=int, default=1, help="nodes (default 1)")
    p.add_argument("--gpus-per-node", type=int, default=0, help="GPUs per node to request (0: CPU-only)")
    p.add_argument("--gpu-type", default="", help="GPU type to request, e.g. l40s or h100 "
                   "(--gpus-per-node=TYPE:N; names are your cluster's)")
    p.add_argument("--procs-per-node", type=int, default=0,
                   help="training processes per node (default: --gpus-per-node, or 1 without GPUs)")
    p.add_argument("--cpus-per-task", type=int, default=0, help="CPUs for each node's task, that is for all its "
                   f"training processes (default: {CPUS_PER_PROC} per process; with --exclusive: every CPU of the "
                   "node); srun gets them too (SRUN_CPUS_PER_TASK)")
    p.add_argument("--exclusive", action="store_true", help="whole nodes: no other job shares them "
                   "(#SBATCH --exclusive); add --mem 0 for all their memory")
    p.add_argument("--mem", default="", help="memory per node, e.g. 200G; 0: all of each node's memory "
                   "(default: Slurm's)")
    p.add_argument("--time", default="60", help="time limit: minutes or [D-]HH:MM:SS (default 60)")
    p.add_argument("--partition", default="", help="partition, e.g. ckpt (HYAK's preemptible one)")
    p.add_argument("--account", default="", help="account to charge")
    p.add_argument("--qos", default="", help="quality of service")
    p.add_argument("--job-name", default="lathe", help="job name (default lathe)")
    p.add_argument("--logs", default="slurm-logs", help="folder for the job's .out/.err files, relative to "
                   "--workdir (default slurm-logs); written into the script as an absolute path")
    p.add_argument("--max-restarts", type=int, default=1, help="restart the workers this many times after a "
                   "crash, resuming from the latest checkpoint (default 1)")
    p.add_argument("--signal-lead", type=int, default=0, help="seconds of warning before the time limit "
                   f"(default: from --step-seconds/--save-seconds, else {DEFAULT_LEAD_S})")
    p.add_argument("--step-seconds", type=float, default=0, help="measured seconds per training step")
    p.add_argument("--save-seconds", type=float, default=0, help="measured seconds per checkpoint save")
    p.add_argument("--no-requeue", action="store_true", help="do not requeue after a preemption save")
    p.add_argument("--rdzv-timeout", type=int, default=120, help="seconds a node waits for the rendezvous "
                   "(default 120)")
    p.add_argument("--module", action="append", default=[], help="a `module load` line (repeatable)")
    p.add_argument("--setup", action="append", default=[], help="a shell line run before training, e.g. "
                   "'source ~/venvs/lathe/bin/activate' (repeatable)")
    p.add_argument("--apptainer", default="", help="run inside this Apptainer/Singularity image (.sif)")
    p.add_argument("--enroot", default="", help="run inside this container image with enroot/pyxis "
                   "(srun --container-image)")
    p.add_argument("--sbatch", action="append", default=[], help="an extra #SBATCH option, written with "
                   "'=': --sbatch=--constraint=h100 (repeatable)")
    p.add_argument("--python", default="python", help="the Python that has lathe installed (default python)")
    p.add_argument("--workdir", default="", help="folder the job runs in (#SBATCH --chdir; default: the current "
                   "folder, where relative paths in the train options were checked)")
    p.add_argument("--no-check", action="store_true", help="do not validate the train options here (when the "
                   "tokenizer or data exist only where the job runs); the job then checks them at its start")
    p.add_argument("--output", default="", help="write the script to this file (default: print it)")
    p.add_argument("--submit", action="store_true", help="submit it with sbatch and print the job id; the "
                   "script is kept as LOGS/NAME-JOBID.sbatch (unless --output)")
    return p


def render(opts: argparse.Namespace, train_args: list[str], argv: list[str]) -> str:
    """The sbatch script; ``argv`` (this command's arguments) is recorded in its first comment."""
    procs = opts.procs_per_node or opts.gpus_per_node or 1
    lead = opts.signal_lead or (signal_lead(opts.step_seconds, opts.save_seconds)
                                if opts.step_seconds or opts.save_seconds else DEFAULT_LEAD_S)
    workdir = absolute(opts.workdir or ".")
    logs = absolute(opts.logs, workdir)
    train_args = absolute_config(train_args)
    sb = [f"--job-name={opts.job_name}", f"--nodes={opts.nodes}", "--ntasks-per-node=1",
          f"--time={opts.time}", f"--chdir={workdir}", f"--output={logs}/%x-%j.out", f"--error={logs}/%x-%j.err",
          "--open-mode=append", f"--signal=USR1@{lead}"]
    if not opts.no_requeue:
        sb.append("--requeue")
    for flag, value in (("partition", opts.partition), ("account", opts.account), ("qos", opts.qos),
                        ("mem", opts.mem)):
        if value:
            sb.append(f"--{flag}={value}")
    if opts.gpus_per_node:
        sb.append(f"--gpus-per-node={opts.gpu_type + ':' if opts.gpu_type else ''}{opts.gpus_per_node}")
    cpus = opts.cpus_per_task or (0 if opts.exclusive else CPUS_PER_PROC * procs)
    if cpus:
        sb.append(f"--cpus-per-task={cpus}")
    if opts.exclusive:
        sb.append("--exclusive")
    sb += opts.sbatch
    q = shlex.quote
    launcher = [opts.python, "-m", "lathe", "launch", "--nnodes", "$SLURM_NNODES", "--nproc-per-node", str(procs),
                "--rdzv-backend", "c10d", "--rdzv-endpoint", '"$HEAD_ADDR:$PORT"', "--rdzv-id", '"$SLURM_JOB_ID"',
                "--rdzv-conf", f"join_timeout={opts.rdzv_timeout}", "--max-restarts", str(opts.max_restarts),
                "--", *[q(a) for a in train_args]]
    srun = ["srun", "--kill-on-bad-exit=0", "--ntasks-per-node=1"]
    if opts.enroot:
        srun.append(f"--container-image={q(opts.enroot)}")
    inner = launcher if not opts.apptainer else ["apptainer", "exec", "--nv" if opts.gpus_per_node else "",
                                                  q(opts.apptainer), *launcher]
    command = " ".join(x for x in [*srun, *inner] if x)
    lines = ["#!/bin/bash", f"# Written by: lathe slurm {' '.join(q(a) for a in argv)}".rstrip(),
             "# Submit with `sbatch THIS_FILE`. Edit the #SBATCH lines and the `lathe train` options (after",
             "# `--` on the srun line) freely; docs/clusters.md explains every part.",
             *[f"#SBATCH {x}" for x in sb], "",
             "set -uo pipefail",
             f"mkdir -p {q(str(logs))}",
             *[f"module load {q(m)}" for m in opts.module],
             *opts.setup,
             "",
             "# --- CPUs: srun does not inherit --cpus-per-task since Slurm 22.05; without this, each node's",
             "# task (all its ranks) would run on one CPU. Every CPU of the node with --exclusive. ------",
             "export SRUN_CPUS_PER_TASK=${SRUN_CPUS_PER_TASK:-${SLURM_CPUS_PER_TASK:-$SLURM_CPUS_ON_NODE}}",
             "",
             "# --- rendezvous host: this node (the allocation's first), at the address Slurm knows for it",
             'HEAD=${SLURMD_NODENAME:-$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)}',
             'HEAD_ADDR=$(scontrol show node "$HEAD" | grep -o "NodeAddr=[^ ]*" | cut -d= -f2)',
             'if [ -z "$HEAD_ADDR" ] || [ "$HEAD_ADDR" = "$HEAD" ]; then  # no address configured: DNS',
             '  HEAD_ADDR=$(getent hosts "$HEAD" | awk \'{print $1; exit}\')',
             "fi",
             'if [ -z "$HEAD_ADDR" ]; then',
             '  echo "lathe slurm: error: cannot find an address for the head node $HEAD (no NodeAddr in '
             'scontrol show node, no DNS entry); ask your admins, or set HEAD_ADDR in --setup" >&2',
             "  exit 2",
             "fi",
             'case "$HEAD_ADDR" in',
             "  127.*|::1|localhost)",
             '    HOSTS=$(for n in $(scontrol show hostnames "$SLURM_JOB_NODELIST"); do scontrol show node "$n" | '
             'grep -io "NodeHostName=[^ ]*"; done | sort -u | wc -l)',
             '    if [ "$SLURM_NNODES" -gt 1 ] && [ "$HOSTS" -gt 1 ]; then',
             '      echo "lathe slurm: error: the head node $HEAD has the loopback address $HEAD_ADDR but the job\'s '
             '$SLURM_NNODES nodes are $HOSTS different hosts: the other nodes could never reach it; fix NodeAddr '
             'or set HEAD_ADDR in --setup" >&2',
             "      exit 2",
             "    fi;;",
             "esac",
             "",
             "# --- rendezvous port: per job (jobs sharing a node do not clash), and free on this node: a",
             "# port another program holds would make this node's launcher that program's client (the job",
             "# fails). Any TCP socket on it counts (/proc/net/tcp*); the next port up is tried instead.",
             "port_in_use() {",
             "  cat /proc/net/tcp /proc/net/tcp6 2>/dev/null | awk -v p=\"$(printf ':%04X' \"$1\")\" \\",
             "    'substr($2, length($2) - 4) == p { found = 1 } END { exit !found }'",
             "}",
             "BASE_PORT=$((20000 + SLURM_JOB_ID % 20000))",
             "PORT=$BASE_PORT",
             'while port_in_use "$PORT"; do',
             "  PORT=$((PORT + 1))",
             f'  if [ "$PORT" -ge $((BASE_PORT + {PORT_SEARCH})) ]; then',
             '    echo "lathe slurm: error: ports $BASE_PORT-$((PORT - 1)) are all in use on the head node $HEAD; '
             'stop what holds them, or requeue the job" >&2',
             "    exit 2",
             "  fi",
             "done",
             '[ "$PORT" = "$BASE_PORT" ] || echo "lathe slurm: port $BASE_PORT is in use on $HEAD: the rendezvous '
             'uses $PORT, the next free one"',
             'echo "lathe slurm: job $SLURM_JOB_ID restart ${SLURM_RESTART_COUNT:-0} on $SLURM_JOB_NODELIST, '
             'rendezvous $HEAD_ADDR:$PORT, $SRUN_CPUS_PER_TASK CPUs per node"',
             "",
             "# --- NCCL/Gloo/Python: defaults that surface errors instead of hanging or dying silently;",
             "# a variable you set (in your environment or --setup) wins ----------------------------",
             "export TORCH_NCCL_ASYNC_ERROR_HANDLING=${TORCH_NCCL_ASYNC_ERROR_HANDLING:-3}",
             "export NCCL_DEBUG=${NCCL_DEBUG:-WARN}  # NCCL's own warnings and errors, not its info lines",
             "export PYTHONFAULTHANDLER=${PYTHONFAULTHANDLER:-1}  # a Python stack on a crash (SIGSEGV, SIGABRT)",
             'if [ -n "${LATHE_NET_IFNAME:-}" ]; then export NCCL_SOCKET_IFNAME=$LATHE_NET_IFNAME '
             "GLOO_SOCKET_IFNAME=$LATHE_NET_IFNAME; fi",
             "",
             command,
             "rc=$?",
             'echo "lathe slurm: lathe launch exited with $rc"',
             ]
    if not opts.no_requeue:
        lines += ['if [ "$rc" -eq 75 ]; then',
                  '  echo "lathe slurm: preempted with a checkpoint saved: requeueing job $SLURM_JOB_ID"',
                  '  scontrol requeue "$SLURM_JOB_ID" && exit 0',
                  "fi"]
    lines.append("exit $rc")
    return "\n".join(lines) + "\n"


def main(argv: list[str]) -> int:
    from lathe import config as config_lib
    from lathe.launch import split_argv

    mine, train_args = split_argv(argv)
    opts = build_parser().parse_args(mine)
    for name in ("nodes", "procs_per_node", "gpus_per_node", "cpus_per_task", "max_restarts", "signal_lead",
                 "rdzv_timeout"):
        value = getattr(opts, name)
        low = 1 if name == "nodes" else 0
        if value < low:
            raise ConfigError(f"--{name.replace('_', '-')}", f"must be >= {low}", "", value)
    parse_time(opts.time)
    if opts.mem:
        parse_mem(opts.mem)
    if opts.gpu_type and not opts.gpus_per_node:
        raise ConfigError("--gpu-type", "needs --gpus-per-node", "add --gpus-per-node N", opts.gpu_type)
    if opts.apptainer and opts.enroot:
        raise ConfigError("--apptainer", "cannot be combined with --enroot", "pick one container runtime")
    cfg, _ = config_lib.load_config(train_args)  # bad train options: one line now, not in the job
    world = opts.nodes * (opts.procs_per_node or opts.gpus_per_node or 1)
    if not opts.no_check:
        config_lib.validate(cfg, world_size=world, cuda_available=bool(opts.gpus_per_node))
    script = render(opts, train_args, argv)
    if opts.output or opts.submit:
        logs = absolute(opts.logs, absolute(opts.workdir or "."))
        try:  # Slurm opens the .out/.err files before the script runs: the folder must exist
            logs.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise ConfigError("--logs", f"cannot create the log folder {logs}: {e.strerror}",
                              "pick a folder you can write that every node sees") from None
        if opts.output:
            path = absolute(opts.output)
            path.parent.mkdir(parents=True, exist_ok=True)
        else:  # a new file per submission; renamed after the job id below, so none is ever overwritten
            fd, name = tempfile.mkstemp(prefix=f"{opts.job_name}-submitting-", suffix=".sbatch", dir=logs)
            os.close(fd)
            path = Path(name)
        path.write_text(script)
        path.chmod(0o755)
        if not opts.submit:
            print(f"wrote {path}")
            return 0
        try:
            proc = subprocess.run(["sbatch", "--parsable", str(path)], capture_output=True, text=True)
        except FileNotFoundError:
            proc = None
        if proc is None or proc.returncode != 0:
            if not opts.output:
                path.unlink()
            if proc is None:
                raise ConfigError("--submit", "sbatch not found", "run this on a Slurm login node, or drop --submit "
                                  "and submit the script yourself")
            raise ConfigError("--submit", f"sbatch refused the job: {' '.join(proc.stderr.split())}",
                              "check --partition/--account/--qos/--time/--cpus-per-task/--mem")
        job = proc.stdout.strip().split(";")[0]
        if not opts.output:
            kept = logs / f"{opts.job_name}-{job}.sbatch"  # next to the job's .out/.err
            if kept.exists():  # another cluster's job with this id wrote to the same folder
                kept = path
            else:
                path.rename(kept)
            path = kept
        print(f"submitted job {job}; script {path}, logs {logs}/{opts.job_name}-{job}.out and .err")
    else:
        print(script, end="")
    return 0
