"""Many training layouts in one torchrun job: the launch-and-compare tests (parity, context
parallel, torchtitan options) pay for starting Python, torch and gloo once per job, not once per
layout (5 s for 2 processes, 14 s for 8 on a 2-core machine).

Worker side, ``multi_worker.py LAYOUTS_JSON OUT_FOLDER`` under torchrun: LAYOUTS_JSON lists
``[name, nproc, worker, args]``. For each layout in turn, ranks below ``nproc`` set RANK,
WORLD_SIZE, LOCAL_RANK and LOCAL_WORLD_SIZE to the layout's, form a fresh gloo process group of
``nproc`` ranks (on the job's store, under a prefix of its own) and call ``run(args)`` of the
worker module named (``worker`` or ``options_worker``: what those files do when launched alone),
with ``--job.dump_folder OUT_FOLDER/name`` appended; then barrier and destroy the group. The other
ranks wait at a store barrier. Between layouts every rank runs ``gc.collect()`` and
``torch._dynamo.reset()`` (a compile layout compiles afresh, never hitting the recompile limit
of the ones before), and each layout's ranks write their dynamo counters to
``OUT_FOLDER/name.dynamo_rank{R}.json`` (how a test checks that compilation really happened).
Files: ``name.started`` when the layout begins, ``name.done`` when all ranks finished it (its
result files complete), ``name.error`` with the traceback of a rank that raised, after which that
rank leaves with exit code 1 and torchrun tears the job down (the others would hang in a
collective).

Test side, ``Batch``: launches the job for the layouts a test module selected, hands each test its
layout's dump folder as soon as the layout is done, and after a failed job records the failure
against the layout that broke (its ``.error``, else the job's output tail, with the exit code) and
relaunches the layouts not yet done, so one broken layout fails exactly its own test.
"""

from __future__ import annotations

import atexit
import gc
import json
import os
import signal
import subprocess
import sys
import time
import traceback
from datetime import timedelta
from pathlib import Path

HERE = Path(__file__).parent
WORKERS = ("worker", "options_worker")


# --- worker side ------------------------------------------------------------------------------


def store_barrier(store, key: str, world: int) -> None:
    """Every rank of the job arrives; waits without polling (the last to arrive opens it)."""
    if int(store.add(key, 1)) == world:
        store.set(f"{key}/open", "1")
    store.wait([f"{key}/open"], timedelta(hours=2))


def dynamo_counters() -> dict:
    from torch._dynamo.utils import counters

    return {kind: dict(values) for kind, values in counters.items()}


def main() -> None:
    import importlib

    import torch
    import torch.distributed as dist

    layouts = json.loads(Path(sys.argv[1]).read_text())
    out = Path(sys.argv[2])
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False,
                          timeout=timedelta(seconds=300))
    sys.path.insert(0, str(HERE))
    for i, (name, nproc, worker, args) in enumerate(layouts):
        start = time.perf_counter()
        if rank == 0:
            (out / f"{name}.started").touch()
        if rank < nproc:
            try:
                os.environ.update(WORLD_SIZE=str(nproc), RANK=str(rank), LOCAL_RANK=str(rank),
                                  LOCAL_WORLD_SIZE=str(nproc))
                dist.init_process_group("gloo", store=dist.PrefixStore(f"multi_worker/layout{i}", store), rank=rank,
                                        world_size=nproc, timeout=timedelta(seconds=300))
                importlib.import_module(worker).run([*args, "--job.dump_folder", str(out / name)])
                (out / f"{name}.dynamo_rank{rank}.json").write_text(json.dumps(dynamo_counters()))
                gc.collect()
                dist.barrier()
                dist.destroy_process_group()
            except BaseException:
                with open(out / f"{name}.error", "a") as f:
                    f.write(f"rank {rank}:\n{traceback.format_exc()}\n")
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(1)
        gc.collect()
        torch._dynamo.reset()
        torch._dynamo.utils.counters.clear()
        store_barrier(store, f"multi_worker/done{i}", world)
        if rank == 0:
            (out / f"{name}.done").touch()
            print(f"multi_worker: {name} took {time.perf_counter() - start:.1f} s", flush=True)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


# --- test side --------------------------------------------------------------------------------


def needed(request, names_for) -> set[str]:
    """The layouts the collected tests of the requesting module need: ``names_for(test function
    name, its parameters)`` for each (so ``pytest -k`` launches only what it selected)."""
    names = set()
    for item in request.session.items:
        if getattr(item, "module", None) is request.module:
            params = item.callspec.params if hasattr(item, "callspec") else {}
            names.update(names_for(item.originalname, params))
    return names


class Batch:
    """Layouts ``(name, nproc, worker, args)`` run in torchrun jobs of ``multi_worker.py`` (world
    size: the largest nproc), started at once; ``folder(name)`` waits for that layout."""

    def __init__(self, folder: Path, layouts: list, stall_timeout_s: float = 600):
        for name, nproc, worker, args in layouts:
            assert worker in WORKERS, worker
            assert "--job.dump_folder" not in args, f"{name}: the batch gives each layout its own dump folder"
        assert len({x[0] for x in layouts}) == len(layouts), "layout names must be unique"
        self.out = folder
        self.pending = list(layouts)  # not done and not failed, in launch order
        self.errors: dict[str, str] = {}
        self.stall_timeout_s = stall_timeout_s
        self.jobs = 0
        self.proc = self.running = self.log = None
        atexit.register(self.close)
        if self.pending:
            self._launch()

    def folder(self, name: str) -> Path:
        """The layout's dump folder once all its ranks are done; fails the calling test with the
        layout's recorded error if it broke."""
        import pytest

        while True:
            if (self.out / f"{name}.done").exists():
                return self.out / name
            if name in self.errors:
                pytest.fail(self.errors[name], pytrace=False)
            if self.proc is None:
                assert any(x[0] == name for x in self.pending), f"layout {name} was not selected for the batch"
                self._launch()
            code = self.proc.poll()
            if code is None and time.time() - self._last_progress() > self.stall_timeout_s:
                self._kill()
                code = f"killed: no layout finished for {self.stall_timeout_s:.0f} s"
            if code is None:
                time.sleep(0.2)
            else:
                self._job_ended(code)

    def compiled_graphs(self, name: str) -> list[int]:
        """Per rank of the layout, the graphs dynamo compiled (``unique_graphs``)."""
        files = sorted(self.out.glob(f"{name}.dynamo_rank*.json"))
        assert files, f"no dynamo counters for {name}"
        return [json.loads(f.read_text()).get("stats", {}).get("unique_graphs", 0) for f in files]

    def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self._kill()
        if self.log is not None:
            self.log.close()
        self.proc = None

    # -- internals

    def _launch(self) -> None:
        self.jobs += 1
        self.running = self.pending
        spec = self.out / f"job{self.jobs}.json"
        spec.write_text(json.dumps(self.running))
        world = max(nproc for _, nproc, _, _ in self.running)
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={world}", "--rdzv_backend=c10d",
               "--rdzv_endpoint=localhost:0", str(HERE / "multi_worker.py"), str(spec), str(self.out)]
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
        if self.log is not None:
            self.log.close()
        self.log = open(self.out / f"job{self.jobs}.log", "w")
        self.started = time.time()
        # a session of its own: the whole job (torchrun and its workers) can be stopped at once
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, env=env, start_new_session=True)

    def _last_progress(self) -> float:
        times = [self.started]
        for name, *_ in self.running:
            for suffix in (".started", ".done"):
                if (self.out / f"{name}{suffix}").exists():
                    times.append((self.out / f"{name}{suffix}").stat().st_mtime)
        return max(times)

    def _kill(self) -> None:
        """Stop the job's whole session: torchrun, then any worker it left."""
        for sig, wait in ((signal.SIGTERM, 30), (signal.SIGKILL, None)):
            try:
                os.killpg(self.proc.pid, sig)
            except ProcessLookupError:
                pass
            try:
                self.proc.wait(timeout=wait)
            except subprocess.TimeoutExpired:
                pass

    def _job_ended(self, code) -> None:
        if code != 0:
            self._kill()  # a worker torchrun did not stop would keep the session's cores busy
        remaining = [x for x in self.running if not (self.out / f"{x[0]}.done").exists()]
        finished = len(self.running) - len(remaining)
        self.proc = None
        self.pending = []
        if not remaining:
            return
        # the layout that broke: the one a rank wrote an error for, else the one under way
        failed = [x for x in remaining if (self.out / f"{x[0]}.error").exists()]
        failed = failed or [x for x in remaining if (self.out / f"{x[0]}.started").exists()][:1]
        if not failed and not finished:  # the job failed outside any layout: so would a relaunch
            failed = remaining
        tail = (self.out / f"job{self.jobs}.log").read_text(errors="replace")[-6000:]
        for name, *_ in failed:
            error = self.out / f"{name}.error"
            detail = error.read_text() if error.exists() else f"job output (tail):\n{tail}"
            self.errors[name] = (f"layout {name} failed in batched torchrun job {self.jobs} (exit {code}; log "
                                 f"{self.out}/job{self.jobs}.log):\n{detail}")
        self.pending = [x for x in remaining if x not in failed]


if __name__ == "__main__":
    main()
