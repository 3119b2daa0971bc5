"""Checkpoint save cost: how long each ``checkpoint.async_mode`` blocks training, on CPU.

    python bench/checkpoint.py                    # debug model, batch 8 x seq 256, 20 steps, save every 5, x2
    python bench/checkpoint.py --steps 30 --interval 10 --batch-size 4 --seq-len 512 --repeats 1
    python bench/checkpoint.py --modes off,async --keep /tmp/ckbench

For the llama3 ``debugmodel`` (~8.9M parameters; model + AdamW state is ~109 MB per checkpoint in
fp32) the script trains the same short run several times, each as its own ``python -m lathe
train`` subprocess with its own temporary dump folder:

- ``off``: checkpointing disabled, the baseline step time;
- ``disabled``: ``--checkpoint.enable_checkpoint --checkpoint.async_mode disabled`` (synchronous
  ``dcp.save``: training waits for the whole write);
- ``async``: DCP's thread-based ``async_save`` (state copied to CPU memory, a thread writes it);
- ``async_with_pinned_mem``: DCP's process-based ``async_save`` (state staged into CPU memory, a
  separate writer process writes it).

Why a subprocess and not ``lathe.trainer.train`` in-process: the process-based writer is started
with the ``spawn`` method, which re-imports ``__main__`` in the helper; through lathe's CLI that
is ``lathe/__main__.py`` (guarded), so the helper never re-runs this script.

What is measured
----------------
Everything comes from what lathe writes itself:

- the console log, captured to ``{dump}/train.log``. Each save logs ``checkpoint step N: written |
  writing in the background (MODE), training blocked X.XXs``; a save that had to wait for the
  previous background write first logs ``checkpoint step M: waited X.XXs for the background
  write`` (only when the wait exceeds 0.01 s). The "blocked" time of a save *includes* any such
  wait, since ``CheckpointManager.save`` starts its clock before waiting.
- ``{dump}/metrics.jsonl`` with ``metrics.log_freq 1``: ``step_time`` of every step. Step 1
  (tokenizing the first data chunk, lazy init) is dropped. A step's logging window opens right
  after the previous step's log, so the window of step K+1 contains the save made after step K, and
  the windows of the next steps contain whatever the background writer (a thread or a process
  competing for the same cores) slows down. So, per run: the *clean median* is the median step
  time over the steps that are not among the ``AFTER_SAVE`` (2) steps following an interval save,
  and the *extra step time of a save* is the sum, over those following steps, of their excess over
  the clean median. It is the training time one save really costs (blocked time plus contention),
  and since it is measured against steps of the same run it is much less sensitive to the load of
  the machine than a comparison with the ``off`` run. The final save happens after the last window
  has closed and is in no step time.
- the size on disk of one complete checkpoint (the first interval save, ``step-{interval}``).

The final save (``step == training.steps``) is always synchronous in lathe, whatever the mode,
and it first waits for the last background write; it is reported in its own column and left out
of the blocked-time statistics.

Noise
-----
The runs are sequential, not interleaved, so each sees whatever else the machine is doing at the
time. On a small shared CPU this is not a few percent: with torch using both cores of a 2-core
machine, one other busy process can make a debug-model step 5-15x slower (its threads wait on each
other), and that load comes and goes within a run. So the script cycles through all modes
``--repeats`` times (default 2) and keeps, for each mode, only the *quiet* runs: those whose clean
median step time is within ``QUIET_FACTOR`` (1.5x) of the fastest clean median of any run (the
machine's floor). If a mode has no quiet run, all its runs are used and the table says so (the
"quiet runs used" column); ``--extra-repeats N`` reruns, up to N more times, each mode that has
no quiet run yet. The 1-minute load average at the start of each run is printed too.
Even so, treat step-time differences of less than ~10% between modes as noise.

OpenMP waiting policy
---------------------
lathe leaves ``OMP_WAIT_POLICY`` to the environment (a ``PASSIVE`` default for the async modes was
tried and reverted: it made every step 1.2-1.5x slower; docs/performance.md), so by default every
run uses OpenMP's default (busy-waiting for a while). ``--omp-wait-policy active|passive`` sets one
policy for every run, to compare the policies with each other. The tables in docs/performance.md
made while the CLI still set ``PASSIVE`` for the async modes say so.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MODEL, FLAVOR = "llama3", "debugmodel"
MODES = ("off", "disabled", "async", "async_with_pinned_mem")
AFTER_SAVE = 2  # steps after an interval save whose step time is charged to it
QUIET_FACTOR = 1.5  # a run is "quiet" if its clean median step is within this factor of the fastest

SAVE_RE = re.compile(r"checkpoint step (\d+): (written|writing in the background \(([\w]+)\)), "
                     r"training blocked ([\d.]+)s")
WAIT_RE = re.compile(r"checkpoint step (\d+): waited ([\d.]+)s for the background write")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="cost of lathe's checkpoint saves per async mode (CPU)")
    p.add_argument("--steps", type=int, default=20, help="training steps per run (default 20)")
    p.add_argument("--interval", type=int, default=5, help="checkpoint.interval in steps (default 5)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--modes", default=",".join(MODES),
                   help=f"comma-separated subset of {', '.join(MODES)} (default: all, in that order)")
    p.add_argument("--threads", type=int, default=0,
                   help="OMP_NUM_THREADS for the runs (default 0: leave torch's default, one per core)")
    p.add_argument("--omp-wait-policy", choices=("lathe", "active", "passive"), default="lathe",
                   help="OMP_WAIT_POLICY for every run (default 'lathe': left to the environment, as lathe does)")
    p.add_argument("--repeats", type=int, default=2, help="cycle through the modes this many times (default 2)")
    p.add_argument("--extra-repeats", type=int, default=0,
                   help="then rerun, up to this many times, each mode that has no quiet run yet (default 0)")
    p.add_argument("--timeout", type=int, default=900, help="seconds before a run is killed (default 900)")
    p.add_argument("--json", metavar="FILE", help="also write every run's raw numbers to FILE")
    p.add_argument("--keep", metavar="DIR", help="keep each run's dump folder under DIR (else temporary)")
    args = p.parse_args(argv)
    args.modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    bad = [m for m in args.modes if m not in MODES]
    if bad or not args.modes:
        p.error(f"--modes: unknown {bad}; choose from {', '.join(MODES)}")
    if args.steps < 3 or args.interval < 1 or args.repeats < 1 or args.threads < 0 or args.extra_repeats < 0:
        p.error("--steps must be >= 3, --interval and --repeats >= 1, --threads and --extra-repeats >= 0")
    if args.interval >= args.steps:
        p.error("--interval must be < --steps, or only the final (synchronous) save happens")
    return args


# ---------------------------------------------------------------------------------------------
# One run


@dataclass
class Run:
    mode: str
    wall_s: float = 0.0
    load_avg: float = 0.0
    step_times: dict[int, float] = field(default_factory=dict)  # step -> step_time, step 1 included
    saves: dict[int, float] = field(default_factory=dict)  # interval save step -> blocked s
    save_kinds: dict[int, str] = field(default_factory=dict)  # step -> "written" / mode name
    final_blocked: float | None = None
    waits: dict[int, float] = field(default_factory=dict)  # step of the write waited for -> s
    ckpt_bytes: int | None = None
    complete: list[int] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)


def lathe_command(args: argparse.Namespace, mode: str, dump: Path) -> list[str]:
    cmd = [sys.executable, "-m", "lathe", "train",
           "--job.dump_folder", str(dump),
           "--training.device", "cpu",
           "--training.steps", str(args.steps),
           "--training.batch_size", str(args.batch_size),
           "--training.seq_len", str(args.seq_len),
           "--model.name", MODEL, "--model.flavor", FLAVOR,
           "--metrics.log_freq", "1"]
    if mode != "off":
        cmd += ["--checkpoint.enable_checkpoint",
                "--checkpoint.interval", str(args.interval),
                "--checkpoint.async_mode", mode]
    return cmd


def folder_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def run_once(args: argparse.Namespace, mode: str, dump: Path) -> Run:
    run = Run(mode=mode, load_avg=os.getloadavg()[0])
    dump.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
    if args.threads:
        env["OMP_NUM_THREADS"] = str(args.threads)
    if args.omp_wait_policy != "lathe":
        env["OMP_WAIT_POLICY"] = args.omp_wait_policy.upper()
    log_path = dump / "train.log"
    t0 = time.perf_counter()
    with log_path.open("w") as log:
        try:
            proc = subprocess.run(lathe_command(args, mode, dump), cwd=ROOT, env=env, stdout=log,
                                  stderr=subprocess.STDOUT, timeout=args.timeout, check=False)
            rc = proc.returncode
        except subprocess.TimeoutExpired:
            rc = None
    run.wall_s = time.perf_counter() - t0
    text = log_path.read_text(errors="replace")
    if rc != 0:
        tail = "\n".join(text.splitlines()[-20:])
        raise SystemExit(f"run '{mode}' {'timed out' if rc is None else f'exited with code {rc}'}; "
                         f"log {log_path}:\n{tail}")

    for m in SAVE_RE.finditer(text):
        step, blocked = int(m.group(1)), float(m.group(4))
        kind = "written" if m.group(2) == "written" else m.group(3)
        if step == args.steps:
            run.final_blocked = blocked
            if kind != "written":
                run.problems.append(f"final save at step {step} was not synchronous ({kind})")
        else:
            run.saves[step] = blocked
            run.save_kinds[step] = kind
    for m in WAIT_RE.finditer(text):
        run.waits[int(m.group(1))] = float(m.group(2))

    metrics = dump / "metrics.jsonl"
    for line in metrics.read_text().splitlines():
        rec = json.loads(line)
        if "step_time" in rec:
            run.step_times[rec["step"]] = rec["step_time"]
    if sorted(run.step_times) != list(range(1, args.steps + 1)):
        run.problems.append(f"metrics.jsonl has steps {sorted(run.step_times)}, expected 1..{args.steps}")

    if mode != "off":
        expected = [s for s in range(args.interval, args.steps, args.interval)]
        if sorted(run.saves) != expected:
            run.problems.append(f"interval saves logged at steps {sorted(run.saves)}, expected {expected}")
        if run.final_blocked is None:
            run.problems.append("no final save logged")
        want_kind = "written" if mode == "disabled" else mode
        odd = {s: k for s, k in run.save_kinds.items() if k != want_kind}
        if odd:
            run.problems.append(f"saves not in mode {want_kind}: {odd}")
        ck = dump / "checkpoint"
        run.complete = sorted(int(p.name.split("-")[1]) for p in ck.glob("step-*")
                              if p.is_dir() and ".partial-" not in p.name
                              and (p / ".metadata").is_file() and (p / "train_state.json").is_file())
        partials = [p.name for p in ck.glob("step-*.partial-*")]
        if partials:
            run.problems.append(f"partial folders left behind: {partials}")
        if run.complete != expected + [args.steps]:
            run.problems.append(f"complete checkpoints {run.complete}, expected {expected + [args.steps]}")
        first = ck / f"step-{args.interval}"
        if first.is_dir():
            run.ckpt_bytes = folder_bytes(first)
    return run


# ---------------------------------------------------------------------------------------------
# Report


def med(xs: list[float]) -> float | None:
    return statistics.median(xs) if xs else None


def fmt(x: float | None, spec: str = ".2f", unit: str = "") -> str:
    return "-" if x is None else f"{x:{spec}}{unit}"


def save_costs(run: Run, interval: int) -> tuple[float | None, list[float]]:
    """(clean median step time, extra step time of each interval save) of one run."""
    span = min(AFTER_SAVE, interval)
    charged = {k + j: k for k in run.saves for j in range(1, span + 1)}
    clean = med([t for s, t in run.step_times.items() if s >= 2 and s not in charged])
    if clean is None:
        return None, []
    extra = {k: 0.0 for k in run.saves}
    for s, k in charged.items():
        if s in run.step_times:
            extra[k] += run.step_times[s] - clean
    return clean, list(extra.values())


def summarize(mode: str, all_runs: list[Run], interval: int, floor: float | None) -> dict:
    """Statistics over the quiet runs of a mode (all of its runs if none is quiet)."""
    quiet = [r for r in all_runs if floor is not None and (c := save_costs(r, interval)[0]) is not None
             and c <= QUIET_FACTOR * floor]
    runs = quiet or all_runs
    costs = [save_costs(r, interval) for r in runs]
    clean = [c for c, _ in costs if c is not None]
    extra = [e for _, es in costs for e in es]
    blocked = [b for r in runs for b in r.saves.values()]
    finals = [r.final_blocked for r in runs if r.final_blocked is not None]
    sizes = [r.ckpt_bytes for r in runs if r.ckpt_bytes]
    return {
        "mode": mode,
        "saves": sum(len(r.saves) for r in runs) / len(runs),
        "blocked_med": med(blocked),
        "blocked_max": max(blocked) if blocked else None,
        "waited": sum(sum(r.waits.values()) for r in runs) / len(runs),
        "waited_before_final": sum(r.waits.get(max(r.saves, default=-1), 0.0) for r in runs) / len(runs),
        "final": med(finals),
        "clean_med": med(clean),  # median over runs of each run's clean median
        "extra_med": med(extra),
        "extra_max": max(extra) if extra else None,
        "size_mb": sizes[0] / 1e6 if sizes else None,
        "wall": statistics.fmean(r.wall_s for r in runs),
        "load": ", ".join(f"{r.load_avg:.1f}" for r in all_runs),
        "used": f"{len(quiet)}/{len(all_runs)}" + ("" if quiet else " (none quiet: all used)"),
        "problems": [p for r in runs for p in r.problems],
    }


def pair(r: dict, a: str, b: str) -> str:
    return "-" if r["mode"] == "off" else f"{fmt(r[a], '.2f', ' s')} / {fmt(r[b], '.2f', ' s')}"


def print_table(rows: list[dict], base: float | None) -> None:
    head = ("| mode | interval saves per run | training blocked per save, median / max "
            "| waited for the background write, per run | final save (sync) "
            "| extra step time per save, median / max | median step (clean) | vs off "
            "| checkpoint size | wall per run | quiet runs used | load avg at start (all runs) |")
    print(head)
    print("|" + "---|" * (head.count("|") - 1))
    for r in rows:
        off = r["mode"] == "off"
        rel = None if (base is None or r["clean_med"] is None) else r["clean_med"] / base
        print(f"| {r['mode']} "
              f"| {'-' if off else format(r['saves'], 'g')} "
              f"| {pair(r, 'blocked_med', 'blocked_max')} "
              f"| {'-' if off else fmt(r['waited'], '.2f', ' s')} "
              f"| {'-' if off else fmt(r['final'], '.2f', ' s')} "
              f"| {pair(r, 'extra_med', 'extra_max')} "
              f"| {fmt(r['clean_med'], '.3f', ' s')} "
              f"| {fmt(rel, '.2f', 'x')} "
              f"| {'-' if off else fmt(r['size_mb'], '.1f', ' MB')} "
              f"| {r['wall']:.0f} s | {r['used']} | {r['load']} |")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import torch  # only for the version line; the runs are subprocesses

    print(f"lathe checkpoint save cost: {MODEL} {FLAVOR}, batch {args.batch_size} x seq {args.seq_len}, "
          f"{args.steps} steps, checkpoint.interval {args.interval} (+ the final save), CPU "
          f"({os.cpu_count()} cores), torch {torch.__version__}", flush=True)
    threads = args.threads or f"torch default ({torch.get_num_threads()})"
    policy = (args.omp_wait_policy.upper() if args.omp_wait_policy != "lathe"
              else f"{os.environ['OMP_WAIT_POLICY']} (from the environment)" if "OMP_WAIT_POLICY" in os.environ
              else "lathe's choice (its CLI sets PASSIVE for the async modes)")
    print(f"modes: {', '.join(args.modes)}; repeats: {args.repeats}; threads: {threads}; "
          f"OMP_WAIT_POLICY: {policy}; step 1 dropped from step times", flush=True)
    t_start = time.perf_counter()
    runs: dict[str, list[Run]] = {m: [] for m in args.modes}
    parent = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="lathe-ckbench-"))
    parent.mkdir(parents=True, exist_ok=True)

    def floor() -> float | None:
        return min((c for rs in runs.values() for r in rs if (c := save_costs(r, args.interval)[0]) is not None),
                   default=None)

    def is_quiet(run: Run, lowest: float | None) -> bool:
        clean = save_costs(run, args.interval)[0]
        return clean is not None and lowest is not None and clean <= QUIET_FACTOR * lowest

    def one(label: str, mode: str) -> None:
        n = len(runs[mode])
        dump = parent / f"{mode}-{n}" if args.keep else Path(tempfile.mkdtemp(prefix=f"{mode}-", dir=parent))
        if args.keep and dump.exists():
            shutil.rmtree(dump)
        run = run_once(args, mode, dump)
        runs[mode].append(run)
        clean, extra = save_costs(run, args.interval)
        saves = ", ".join(f"{s}: {b:.2f}s" for s, b in sorted(run.saves.items()))
        print(f"  [{label}] {mode:<22} {run.wall_s:4.0f} s wall, load {run.load_avg:.1f}, "
              f"clean median step {fmt(clean, '.3f')} s"
              + (f"; blocked {saves}; extra step time {', '.join(f'{e:.2f}s' for e in extra)}; "
                 f"final {fmt(run.final_blocked)} s" if mode != "off" else ""), flush=True)
        if not args.keep:  # ~110 MB per checkpoint: free the disk as we go
            shutil.rmtree(dump, ignore_errors=True)

    try:
        for rep in range(args.repeats):
            for mode in args.modes:
                one(f"{rep + 1}/{args.repeats}", mode)
        for extra_round in range(args.extra_repeats):
            lowest = floor()
            missing = [m for m in args.modes if not any(is_quiet(r, lowest) for r in runs[m])]
            if not missing:
                break
            print(f"  no quiet run yet for {', '.join(missing)}: running {'it' if len(missing) == 1 else 'them'} "
                  "again", flush=True)
            for mode in missing:
                one(f"extra {extra_round + 1}/{args.extra_repeats}", mode)
    finally:
        if not args.keep:
            shutil.rmtree(parent, ignore_errors=True)

    lowest = floor()
    rows = [summarize(m, runs[m], args.interval, lowest) for m in args.modes]
    if args.json:
        raw = {m: [dataclasses.asdict(r) for r in rs] for m, rs in runs.items()}
        Path(args.json).write_text(json.dumps({"args": vars(args), "runs": raw, "summary": rows}, indent=1))
    base = next((r["clean_med"] for r in rows if r["mode"] == "off"), None)
    print()
    print_table(rows, base)
    print()
    print(f"training blocked: per interval save, as lathe logs it (includes any wait for the previous "
          f"background write). final save: always synchronous; it first waits for the last background "
          f"write. extra step time: sum of the excess step_time of the {AFTER_SAVE} steps after an interval "
          f"save over the run's clean median (steps not following a save); that is blocked time plus the "
          f"slowdown from the background writer. vs off: clean median / the off run's median (different "
          f"runs: load changes, and the OMP_WAIT_POLICY when it differs between modes). checkpoint "
          f"size: one complete step-N folder (model + AdamW state, fp32). All columns but the last use "
          f"only the quiet runs (clean median step <= {QUIET_FACTOR}x the fastest run's, {fmt(lowest, '.3f')} s).")
    for r in rows:
        if r["mode"] != "off" and r["waited_before_final"] > 0:
            print(f"{r['mode']}: {r['waited_before_final']:.2f} s of the waited time was the final save "
                  "waiting for the last background write")
    problems = [(r["mode"], p) for r in rows for p in r["problems"]]
    for mode, p in problems:
        print(f"PROBLEM ({mode}): {p}")
    print(f"wall time: {time.perf_counter() - t_start:.0f} s")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
