"""``lathe launch``: torchrun, with the exit codes and signals a job script can act on.

    lathe launch [torchrun options] -- [lathe train options]
    lathe launch --nproc-per-node 4 --max-restarts 2 -- --config configs/llama3_8b.toml

This is torchrun itself (``torch.distributed.run``, run in this process as its elastic agent)
with what plain torchrun lacks for unattended cluster jobs:

- The training config is loaded and validated here first: a bad option is one line and exit 2
  before any worker starts. A config error a worker raises later (a held lock, an empty data
  folder, a damaged checkpoint) is printed once, as the worker's one line, and the launcher exits
  2 too (torchrun would print a 40-line traceback and exit 1).
- Preemption: SIGTERM and SIGUSR1 sent to the launcher (Slurm's ``--signal``, ``scancel``) are
  forwarded to every worker, which saves a checkpoint after the current step and exits 0 with a
  marker; the launcher then exits ``EXIT_PREEMPTED`` (75), so the job script can requeue. (A
  worker exiting non-zero would make torchrun restart it, and plain torchrun exits 1 anyway.)
  The handler is installed before anything else; a signal that comes while workers are still
  starting is written as a marker they read once their own handler is in place (only workers
  with a handler are signalled: see checkpoint/preemption.py), and one that comes before any
  worker exists ends the launch at once. Whenever the launcher received a preemption signal it
  exits 75 (unless a config error: 2).
- A dead worker (kill -9, OOM) makes torchrun stop the others; with ``--max-restarts N`` the group
  restarts and resumes from the latest complete checkpoint (each rendezvous round gets a fresh
  store for the workers, ``TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1``: see ``main``). Workers die with the launcher
  (``PR_SET_PDEATHSIG``): a ``kill -9`` of the launcher leaves no orphans (they get SIGTERM, save
  and exit).
- Quiet: torchrun's own banner and failure tables are hidden (``LATHE_LAUNCH_VERBOSE=1`` shows
  them); the launcher prints one line saying which rank failed first and how.
- A hang: workers run lathe's watchdog (``comm.watchdog_timeout_seconds``) and exit 76 naming the
  stuck ranks; the launcher exits 76.
"""

from __future__ import annotations

import glob
import logging
import os
import shutil
import signal
import sys
import tempfile
from pathlib import Path

from lathe.errors import ConfigError

EXIT_CONFIG_ERROR = 2
EXIT_PREEMPTED = 75
EXIT_HUNG = 76
FORWARDED = (signal.SIGTERM, signal.SIGUSR1)

USAGE = """usage: lathe launch [torchrun options] -- [lathe train options]

Runs `lathe train` under torchrun (torch.distributed.run) with clean exit codes:
0 done, 2 bad config (one line), 75 preempted (checkpoint saved: requeue), 76 a rank hung,
1 a worker failed (after --max-restarts attempts).

torchrun options (all of torchrun's are accepted), e.g.:
  --nproc-per-node N     processes on this node (GPUs, or CPU processes with gloo)
  --nnodes N             nodes in the job
  --rdzv-backend c10d --rdzv-endpoint HOST:PORT --rdzv-id ID   multi-node rendezvous
  --max-restarts N       restart the worker group after a failure (resumes from the checkpoint)
"""


def split_argv(argv: list[str]) -> tuple[list[str], list[str]]:
    if "--" in argv:
        i = argv.index("--")
        return argv[:i], argv[i + 1:]
    return argv, []


def _world_size(args) -> int | None:
    from torch.distributed.run import parse_min_max_nnodes

    try:
        _, max_nodes = parse_min_max_nnodes(args.nnodes)
        return int(max_nodes) * int(args.nproc_per_node)
    except (ValueError, TypeError):
        return None  # "auto"/"gpu" per node, or elastic node ranges: checked by the workers


def check_launcher_args(args) -> None:
    """The process and node counts torchrun would reject later with a traceback: one line now."""
    from torch.distributed.run import determine_local_world_size, parse_min_max_nnodes

    fix = "a number of processes per node, or auto, cpu or gpu"
    try:
        n = determine_local_world_size(str(args.nproc_per_node))
    except ValueError as e:
        problem = "not a number of processes" if str(e).startswith("Unsupported") else str(e)
        raise ConfigError("--nproc-per-node", problem, fix, args.nproc_per_node) from None
    if n < 1:
        raise ConfigError("--nproc-per-node", "must be at least 1", fix, args.nproc_per_node)
    try:
        low, high = parse_min_max_nnodes(str(args.nnodes))
    except (ValueError, RuntimeError):
        raise ConfigError("--nnodes", "not a node count", "a number of nodes N, or a range MIN:MAX",
                          args.nnodes) from None
    if not 1 <= int(low) <= int(high):
        raise ConfigError("--nnodes", "needs 1 <= MIN <= MAX", "a number of nodes N, or a range MIN:MAX", args.nnodes)


def die_with_parent() -> None:
    """Linux: get SIGTERM when the launching process dies (so a kill -9 of torchrun or of
    ``lathe launch`` leaves no orphaned workers training on; SIGTERM means save and exit)."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    parent = os.getppid()
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, int(signal.SIGTERM))  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if os.getppid() != parent:  # the parent died before prctl took effect
        os.kill(os.getpid(), signal.SIGTERM)


def worker_config_error(error: ConfigError) -> bool:
    """In a worker under ``lathe launch``: hand the one line to the launcher. True if handled."""
    folder = os.environ.get("LATHE_LAUNCH_DIR")
    if not folder:
        return False
    rank = os.environ.get("RANK", "0")
    try:
        Path(folder, f"error.rank{rank}").write_text(f"lathe: error: {error}\n")
    except OSError:
        return False
    return True


def worker_preempted(step: int = 0, saved: bool = True) -> int:
    """In a worker that stopped for preemption: the exit code to use (0 under the launcher, with a
    marker it reads, so torchrun does not restart the group; else 75)."""
    folder = os.environ.get("LATHE_LAUNCH_DIR")
    if folder:
        try:
            Path(folder, f"preempted.rank{os.environ.get('RANK', '0')}").write_text(
                f"{'saved' if saved else 'unsaved'} {step}")
            return 0
        except OSError:
            pass
    return EXIT_PREEMPTED


def worker_hung() -> None:
    """In a worker whose watchdog fired: tell the launcher (see ``_HangReaper``)."""
    folder = os.environ.get("LATHE_LAUNCH_DIR")
    if folder:
        try:
            Path(folder, f"hung.rank{os.environ.get('RANK', '0')}").write_text("")
        except OSError:
            pass


class _HangReaper:
    """When a worker's watchdog fires, SIGKILL this node's other workers at once. torchrun would
    send them SIGTERM and wait 30 s, and a stopped (SIGSTOP) or wedged process never answers
    SIGTERM; nothing of a hung group's state is worth saving."""

    def __init__(self, launch_dir: str):
        import threading

        self.launch_dir, self.stop = launch_dir, threading.Event()
        self.thread = threading.Thread(target=self._run, name="lathe-hang-reaper", daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def _run(self) -> None:
        import psutil

        while not self.stop.wait(0.5):
            markers = glob.glob(os.path.join(self.launch_dir, "hung.rank*"))
            if not markers:
                continue
            for child in psutil.Process().children(recursive=False):
                try:
                    child.kill()
                except psutil.Error:
                    pass
            for marker in markers:  # a restarted group (--max-restarts) is watched afresh
                os.replace(marker, marker.replace("hung.", "was-hung."))

    def __exit__(self, *exc):
        self.stop.set()


def _write_stderr(text: str) -> None:
    try:
        os.write(2, text.encode())  # not print: a handler may interrupt a write to sys.stderr
    except OSError:
        pass


class _Forwarder:
    """SIGTERM/SIGUSR1 to this process, from its first instant: remembered (the launcher then
    exits 75), written as ``LATHE_LAUNCH_DIR/preempt`` for workers still starting, and sent to every
    worker whose handler is in place (``ready.PID``); such a worker saves after its current step and
    exits 0. A second signal during the run ends the agent as plain torchrun would (it stops the
    workers)."""

    def __init__(self):
        self.received: int | None = None
        self.launch_dir: str | None = None
        self.in_run = False
        self.previous = {}

    def __enter__(self):
        for sig in FORWARDED:
            self.previous[sig] = signal.signal(sig, self._handle)
        import psutil  # noqa: F401 (imported now, not inside the handler)

        return self

    def set_launch_dir(self, launch_dir: str) -> None:
        self.launch_dir = launch_dir
        if self.received is not None:
            self._mark()

    def _handle(self, signum, frame) -> None:
        if self.received is not None:
            if self.in_run:
                from torch.distributed.elastic.multiprocessing.api import SignalException

                raise SignalException(f"lathe launch received {signal.Signals(signum).name}", signal.Signals(signum))
            return
        self.received = signum
        _write_stderr(f"lathe launch: received {signal.Signals(signum).name}: telling the workers to save and stop\n")
        self._mark()
        self._forward(signum)

    def _mark(self) -> None:
        """The marker first, then the ready workers: a worker not yet ready reads the marker."""
        if self.launch_dir is None:
            return
        tmp = os.path.join(self.launch_dir, "preempt.tmp")
        try:
            with open(tmp, "w") as f:
                f.write(str(int(self.received)))
            os.replace(tmp, os.path.join(self.launch_dir, "preempt"))
        except OSError:
            pass

    def _forward(self, signum: int) -> None:
        import psutil

        if self.launch_dir is None:
            return
        for child in psutil.Process().children(recursive=False):
            if not os.path.exists(os.path.join(self.launch_dir, f"ready.{child.pid}")):
                continue  # still starting: it reads the marker once its handler is in place
            try:
                child.send_signal(signum)
            except psutil.Error:
                pass

    def __exit__(self, *exc):
        for sig, prev in self.previous.items():
            signal.signal(sig, prev)


def main(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE, end="")
        return 0
    from lathe.checkpoint.preemption import pause_point

    with _Forwarder() as forwarder:  # before anything else: no signal is lost
        pause_point("launcher-start", lambda: forwarder.received is not None)
        code = _launch(argv, forwarder)
    if forwarder.received is not None and code != EXIT_CONFIG_ERROR:
        return EXIT_PREEMPTED
    return code


def _launch(argv: list[str], forwarder: _Forwarder) -> int:
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser, run

    from lathe import config as config_lib

    launcher_argv, train_argv = split_argv(argv)
    parser = get_args_parser()
    parser.prog = "lathe launch"

    def one_line_error(message: str):  # argparse would print the usage and exit
        raise ConfigError("lathe launch", message, "see lathe launch --help and torchrun --help")

    parser.error = one_line_error
    args = parser.parse_args([*launcher_argv, "-m", "lathe", "train", *train_argv])
    check_launcher_args(args)
    cfg, _ = config_lib.load_config(train_argv)
    world = _world_size(args)
    if world is not None:  # else ("auto" processes, elastic node ranges) the workers check it
        config_lib.validate(cfg, world_size=world, cuda_available=_cuda())

    check_rendezvous(args)
    launch_dir = tempfile.mkdtemp(prefix="lathe-launch-")
    os.environ["LATHE_LAUNCH_DIR"] = launch_dir
    forwarder.set_launch_dir(launch_dir)
    try:
        if forwarder.received is not None:
            print(f"lathe launch: received {signal.Signals(forwarder.received).name} before any worker started: "
                  f"nothing to save; exit code {EXIT_PREEMPTED} (a requeued job starts from the latest checkpoint, "
                  "or from the start)", file=sys.stderr, flush=True)
            return EXIT_PREEMPTED
        # SIGTERM and SIGUSR1 are ours to forward (torchrun's agent would stop the workers instead,
        # giving them 30 s before SIGKILL, and exit 143). torchrun writes its option into the
        # environment variable its process handler reads, so set both.
        ours = ",".join(s.name for s in FORWARDED)
        theirs = ",".join(x for x in getattr(args, "signals_to_handle", None) or "SIGTERM,SIGINT,SIGHUP,SIGQUIT"
                          .split(",") if x.strip() not in ours)
        if hasattr(args, "signals_to_handle"):
            args.signals_to_handle = theirs
        os.environ["TORCHELASTIC_SIGNALS_TO_HANDLE"] = theirs
        os.environ.setdefault("PYTHONUNBUFFERED", "1")
        # Workers get a fresh store per rendezvous round: sharing the agent's c10d store makes a
        # restarted group read the previous round's addresses (gloo: "connectFullMesh failed ...
        # Connection refused"; NCCL: a stale unique id), so --max-restarts never recovers
        # (pytorch/pytorch#135712, #167288; seen with torch 2.13).
        os.environ.setdefault("TORCH_DISABLE_SHARE_RDZV_TCP_STORE", "1")
        if os.environ.get("LATHE_LAUNCH_VERBOSE", "0") != "1":  # torchrun's banner and failure tables
            for name in list(logging.root.manager.loggerDict):
                if name.startswith(("torch.distributed.run", "torch.distributed.elastic",
                                    "torch.distributed.launcher")):
                    logging.getLogger(name).setLevel(logging.CRITICAL)
        failures = None
        with _HangReaper(launch_dir):
            forwarder.in_run = True
            try:
                run(args)
                code = 0
            except ChildFailedError as e:
                failures = e.failures
                code = 1
            except SignalException as e:
                code = 128 + int(e.sigval)
            finally:
                forwarder.in_run = False
        return _outcome(code, failures, launch_dir, forwarder.received)
    finally:
        shutil.rmtree(launch_dir, ignore_errors=True)


def _preempted_summary(markers: list[str]) -> str:
    """What the ranks' ``preempted.rankR`` markers say: where each stopped, whether it saved."""
    seen = set()
    for marker in markers:
        try:
            kind, step = Path(marker).read_text().split()
            seen.add((kind, int(step)))
        except (OSError, ValueError):
            continue
    if not seen:
        return "no rank reported a save"
    if len(seen) == 1:
        kind, step = seen.pop()
        return f"every rank saved a checkpoint at step {step}" if kind == "saved" else \
            f"every rank stopped at step {step} with nothing new to save"
    return "ranks stopped at " + ", ".join(f"step {s} ({k})" for k, s in sorted(seen, key=lambda x: x[1]))


def _outcome(code: int, failures, launch_dir: str, received: int | None) -> int:
    errors = sorted(glob.glob(os.path.join(launch_dir, "error.rank*")),
                    key=lambda p: int(p.rsplit("rank", 1)[1]))
    if errors:
        print(Path(errors[0]).read_text().strip(), file=sys.stderr)
        return EXIT_CONFIG_ERROR
    preempted = glob.glob(os.path.join(launch_dir, "preempted.rank*"))
    if received is not None or (code == 0 and preempted):
        how = f"received {signal.Signals(received).name}" if received is not None else "workers were signalled"
        note = ""
        if failures:
            rank, first = min(failures.items(), key=lambda kv: kv[1].timestamp)
            note = f"; rank {rank} ended with {_how(first)} after the signal"
        print(f"lathe launch: preempted ({how}): {_preempted_summary(preempted)}{note}; "
              f"exit code {EXIT_PREEMPTED}", file=sys.stderr, flush=True)
        return EXIT_PREEMPTED
    if code == 0:
        return 0
    if failures:
        codes = {f.exitcode for f in failures.values()}
        if EXIT_HUNG in codes or glob.glob(os.path.join(launch_dir, "*hung.rank*")):
            return EXIT_HUNG
        rank, first = min(failures.items(), key=lambda kv: kv[1].timestamp)
        print(f"lathe launch: rank {rank} failed first ({_how(first)}, pid {first.pid}); "
              f"{len(failures)} worker(s) failed in all; their output above says why", file=sys.stderr)
        return 1
    return code


def _how(failure) -> str:
    return f"signal {failure.signal_name()}" if failure.exitcode < 0 else f"exit code {failure.exitcode}"


def _local_addresses() -> set[str]:
    import socket

    import psutil

    addrs = {"localhost", socket.gethostname(), socket.getfqdn()}
    for entries in psutil.net_if_addrs().values():
        addrs.update(e.address.split("%")[0] for e in entries)
    return addrs


def check_rendezvous(args, timeout_s: float | None = None) -> None:
    """Before starting the agent: the c10d rendezvous host must resolve, and, seen from a node
    that does not host it, answer within the join timeout. One line instead of a hang."""
    import socket
    import time

    if args.rdzv_backend != "c10d" or not args.rdzv_endpoint or args.standalone:
        return
    host, _, port = args.rdzv_endpoint.rpartition(":")
    host = host.strip("[]") or args.rdzv_endpoint
    if not port.isdigit():
        return  # torchrun's default port: it reports problems itself
    try:
        resolved = {info[4][0] for info in socket.getaddrinfo(host, int(port), type=socket.SOCK_STREAM)}
    except socket.gaierror as e:
        raise ConfigError("--rdzv-endpoint", f"cannot resolve the rendezvous host {host!r} ({e.strerror})",
                          "use the head node's IP address (lathe slurm takes Slurm's NodeAddr)",
                          args.rdzv_endpoint) from None
    if resolved & _local_addresses() or host in _local_addresses() or int(port) == 0:
        return  # this node hosts the rendezvous (or shares a host with it)
    if timeout_s is None:
        conf = dict(kv.split("=", 1) for kv in (args.rdzv_conf or "").split(",") if "=" in kv)
        timeout_s = float(conf.get("join_timeout", 600))
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with socket.create_connection((host, int(port)), timeout=2):
                return
        except OSError as e:
            if time.monotonic() > deadline:
                raise ConfigError("--rdzv-endpoint", f"cannot reach the rendezvous from {socket.gethostname()} "
                                  f"within {timeout_s:.0f}s ({e.strerror or e})",
                                  "is the first node's launcher running? is the address the right network's? "
                                  "does a firewall block the port?", args.rdzv_endpoint) from None
            time.sleep(1)


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()
