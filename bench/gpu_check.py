"""One prepared script for a GPU machine: every CUDA path, then throughput, MFU and torchtitan.

    python bench/gpu_check.py --output gpu-results                        # on the GPU machine
    python bench/gpu_check.py --output gpu-results --wheels wheels/       # + torchao/torchtitan wheels
    python bench/gpu_check.py --output /tmp/dry --cpu-dry-run             # the plumbing, on a CPU (CI)

GPU time is scarce (about 15 minutes a session, start-up included, no network), so the script
runs its steps in order of value, each under its own time budget (a step past its budget is
stopped, recorded as "timeout", and the next one starts), and never stops at a failure. Every
step's command, exit code, time and log go to ``--output``: ``results.json`` (machine-readable),
``summary.md`` (the table for docs/performance.md) and ``logs/STEP.log``.

Steps
-----
1. ``install``: ``pip install -e . --no-deps`` (the GPU machine has torch and the tokenizer
   libraries; no network), then every wheel in ``--wheels`` (e.g. torchao, torchtitan) with
   ``--no-deps --no-index``.
2. ``gpu-tests``: ``python -m pytest tests/gpu -q``: NCCL through ``lathe launch``, bf16 autocast,
   inductor compile, CUDA memory statistics in the log line, memory snapshot, profiler trace with
   CUDA kernels, async checkpoint with pinned memory and its resume, FlexAttention block-causal,
   float8 with torchao (capability >= 8.9), and the 2-GPU tests (skipped on one GPU).
3. ``throughput``: ``lathe train`` on the 1B shape below, bf16 autocast (one GPU: no FSDP),
   for seq 8192 (batch 2) and 2048 (batch 8), op-level selective AC and none, compiled and eager:
   tokens/s, MFU against the datasheet peak lathe prints, peak memory. The target configuration
   (compiled, seq 8192, selective AC) runs first.
4. ``vs-torchtitan``: ``bench/vs_torchtitan.py --device cuda --shapes gpu1b`` (both models built
   by their own code, trained in lockstep in two processes on the same GPU, same batches, same
   loop, bf16 autocast, op-level AC, each block compiled): the ratio lathe/torchtitan. Needs
   torchtitan importable (from ``--wheels``, or ``--torchtitan-python``).
5. ``profile``: one compiled step of the target configuration under torch.profiler; the trace is
   copied to ``OUTPUT/profile/``.

The 1B shape: Llama 3.2 1B's block (dim 2048, 32 heads, 8 KV heads, SwiGLU hidden 8192 from
ffn_dim_multiplier 1.5 and multiple_of 256, RoPE theta 500000), 16 blocks, vocabulary 128256
(Llama 3's), untied output layer: 1.50B parameters. The data is the embedded corpus (its tokenizer
has 4,096 tokens; the model's vocabulary is set to 128256 so the output layer costs what Llama 3's
does).

``--cpu-dry-run`` runs the same steps on a CPU with the debug model, a few steps each, and says
for each thing it skips that it needs CUDA; CI runs it (tests/e2e/test_gpu_check.py) so the
script cannot rot between GPU sessions.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

SHAPE_1B = ["--model.name", "llama3", "--model.flavor", "debugmodel", "--model.dim", "2048",
            "--model.n_layers", "16", "--model.n_heads", "32", "--model.n_kv_heads", "8",
            "--model.ffn_dim_multiplier", "1.5", "--model.multiple_of", "256", "--model.rope_theta", "500000",
            "--model.vocab_size", "128256"]
# (name, seq, batch, AC, compiled): the target first, then the rest of the grid
GRID = [("seq8192-selective-compiled", 8192, 2, "selective", True),
        ("seq8192-none-compiled", 8192, 2, "none", True),
        ("seq2048-selective-compiled", 2048, 8, "selective", True),
        ("seq2048-none-compiled", 2048, 8, "none", True),
        ("seq8192-selective-eager", 8192, 2, "selective", False),
        ("seq8192-none-eager", 8192, 2, "none", False),
        ("seq2048-selective-eager", 2048, 8, "selective", False),
        ("seq2048-none-eager", 2048, 8, "none", False)]
BUDGETS = {"install": 180, "gpu-tests": 420, "throughput": 150, "vs-torchtitan": 240, "profile": 150}
DRY_BUDGETS = {"install": 60, "gpu-tests": 120, "throughput": 180, "vs-torchtitan": 120, "profile": 180}


class Check:
    def __init__(self, out: Path, dry: bool, budget_scale: float):
        self.out, self.dry, self.scale = out, dry, budget_scale
        self.results: list[dict] = []
        (out / "logs").mkdir(parents=True, exist_ok=True)

    def budget(self, step: str) -> float:
        return (DRY_BUDGETS if self.dry else BUDGETS)[step] * self.scale

    def skip(self, step: str, why: str) -> dict:
        rec = {"step": step, "status": "skipped", "why": why}
        print(f"[{step}] skipped: {why}", flush=True)
        self.results.append(rec)
        self.save()
        return rec

    def run(self, step: str, cmd: list[str], budget: float | None = None, env: dict | None = None,
            **extra) -> dict:
        """Run one command under its budget; its output goes to logs/STEP.log. Never raises."""
        budget = budget or self.budget(step.split(":")[0])
        log = self.out / "logs" / f"{step.replace(':', '_')}.log"
        print(f"[{step}] {' '.join(cmd)} (budget {budget:.0f} s)", flush=True)
        start = time.monotonic()
        with open(log, "w") as f:
            f.write(f"$ {' '.join(cmd)}\n")
            f.flush()
            proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT,
                                    env={**os.environ, **(env or {})}, start_new_session=True)
            try:
                rc = proc.wait(timeout=budget)
                status = "passed" if rc == 0 else "failed"
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, 9)  # the command and everything it started (torchrun workers)
                proc.wait()
                rc, status = None, "timeout"
        rec = {"step": step, "status": status, "rc": rc, "seconds": round(time.monotonic() - start, 1),
               "command": cmd, "log": str(log.relative_to(self.out)), **extra}
        tail = log.read_text(errors="replace").splitlines()[-3:]
        print(f"[{step}] {status} in {rec['seconds']} s" + ("" if status == "passed" else
                                                           "; last lines:\n    " + "\n    ".join(tail)), flush=True)
        self.results.append(rec)
        self.save()
        return rec

    def save(self) -> None:
        info = {"date": time.strftime("%Y-%m-%d %H:%M %Z"), "dry_run": self.dry, "host": os.uname().nodename}
        try:
            import torch

            info.update(torch=torch.__version__, cuda=torch.version.cuda,
                        gpu=torch.cuda.get_device_name() if torch.cuda.is_available() else None)
        except Exception as e:  # the report is written whatever happens
            info["torch"] = f"not importable: {e}"
        (self.out / "results.json").write_text(json.dumps({"info": info, "results": self.results}, indent=1))
        (self.out / "summary.md").write_text(summary(info, self.results))


def summary(info: dict, results: list[dict]) -> str:
    lines = [f"GPU check, {info['date']}: {info.get('gpu') or 'no GPU (CPU dry run)'}, torch {info.get('torch')}, "
             f"CUDA {info.get('cuda')}", "", "| step | status | seconds | result |", "|---|---|---|---|"]
    for r in results:
        res = r.get("why", "")
        if "tokens_per_s" in r:
            res = (f"{r['tokens_per_s']:,.0f} tokens/s, MFU {r['mfu']:.1f}%, peak {r['memory_gib']:.1f} GiB "
                   f"(median of steps {r['measured_steps']})")
        if "ratio" in r:
            res = f"lathe/torchtitan {r['ratio']:.3f} (median of per-step ratios {r['ratio_median']:.3f})"
        if "tests" in r:
            res = r["tests"]
        lines.append(f"| {r['step']} | {r['status']} | {r.get('seconds', '')} | {res} |")
    return "\n".join(lines) + "\n"


def step_install(c: Check, wheels: Path | None) -> None:
    if c.dry:
        c.skip("install", "CPU dry run: the environment is the one already installed (CI's)")
        return
    c.run("install", [sys.executable, "-m", "pip", "install", "--no-deps", "--no-build-isolation", "-e", "."])
    if wheels:
        files = sorted(str(p) for p in wheels.glob("*.whl"))
        if files:
            c.run("install:wheels", [sys.executable, "-m", "pip", "install", "--no-deps", "--no-index", *files])
        else:
            c.skip("install:wheels", f"no .whl files in {wheels}")


def step_gpu_tests(c: Check) -> None:
    rec = c.run("gpu-tests", [sys.executable, "-m", "pytest", "tests/gpu", "-q", "-rs", "-p", "no:cacheprovider",
                              f"--junitxml={c.out / 'gpu-tests.xml'}"])
    log = (c.out / rec["log"]).read_text(errors="replace").splitlines()
    outcome = next((x for x in reversed(log) if " passed" in x or " skipped" in x or " failed" in x), "")
    rec["tests"] = outcome.strip("= ")
    if c.dry:
        rec["note"] = "CPU dry run: every test in tests/gpu needs CUDA and says so when skipped"
    c.save()


def lathe_run(c: Check, name: str, seq: int, batch: int, ac: str, compiled: bool, steps: int,
              extra: list[str] = (), step_prefix: str = "throughput") -> dict:
    dump = c.out / "runs" / name
    shutil.rmtree(dump, ignore_errors=True)
    if c.dry:  # the debug model as it is, a short sequence, float32, eager: the plumbing only
        shape, precision = [], []
        seq, batch = 128, 2
        compiled = False
    else:
        shape, precision = SHAPE_1B, ["--training.autocast_dtype", "bfloat16"]
    cmd = [sys.executable, "-m", "lathe", "train", *shape, *precision, "--training.seq_len", str(seq),
           "--training.batch_size", str(batch), "--training.steps", str(steps), "--metrics.log_freq", "1",
           "--activation_checkpoint.mode", ac, "--no-metrics.enable_color_printing",
           "--job.dump_folder", str(dump), "--lr_scheduler.warmup_steps", "2"]
    if ac == "selective":
        cmd += ["--activation_checkpoint.selective_ac_option", "op"]
    if compiled:
        cmd += ["--training.compile"]
    rec = c.run(f"{step_prefix}:{name}", [*cmd, *extra], seq=seq, batch=batch, ac=ac, compiled=compiled)
    records = []
    metrics = dump / "metrics.jsonl"
    if metrics.is_file():
        records = [json.loads(x) for x in metrics.read_text().splitlines() if '"wps"' in x]
    measured = [r for r in records if r["step"] > min(3, steps - 1)]  # warm-up and compile excluded
    if measured:
        rec.update(tokens_per_s=statistics.median(r["wps"] for r in measured),
                   mfu=statistics.median(r["mfu"] for r in measured),
                   memory_gib=max(r["memory_gib"] for r in records),
                   measured_steps=f"{measured[0]['step']}-{measured[-1]['step']}")
        c.save()
    return rec


def step_throughput(c: Check) -> None:
    grid = GRID[:1] if c.dry else GRID
    for name, seq, batch, ac, compiled in grid:
        lathe_run(c, name, seq, batch, ac, compiled, steps=3 if c.dry else 12)


def step_vs_torchtitan(c: Check, torchtitan_python: str | None) -> None:
    python = torchtitan_python or sys.executable
    probe = subprocess.run([python, "-c", "import torchtitan.models.llama3"], capture_output=True, text=True)
    if probe.returncode != 0:
        c.skip("vs-torchtitan", f"torchtitan is not importable by {python} (give --wheels with a torchtitan "
                                f"wheel for this torch, or --torchtitan-python): "
                                f"{(probe.stderr.strip().splitlines() or ['?'])[-1]}")
        return
    out_json = c.out / "vs_torchtitan.json"
    if c.dry:
        args = ["--device", "cpu", "--shapes", "head", "--seq", "128", "--batch", "2", "--steps", "2"]
    else:
        args = ["--device", "cuda", "--shapes", "gpu1b", "--compile", "--steps", "8", "--warmup", "3"]
    rec = c.run("vs-torchtitan", [sys.executable, "bench/vs_torchtitan.py", "--torchtitan-python", python,
                                  *args, "--json", str(out_json)])
    if out_json.is_file():
        r = json.loads(out_json.read_text())["results"][0]
        rec.update(ratio=r["ratio"], ratio_median=r["ratio_median_of_steps"], tokens_per_s_both=r["tokens_per_s"],
                   peak_gib=r.get("peak_gib"))
        c.save()


def step_profile(c: Check) -> None:
    if c.dry:
        print("[profile] CPU dry run: an eager step of the debug model is profiled (compile is a GPU matter here)")
    name, seq, batch, ac, compiled = GRID[0]
    steps = 2 if c.dry else 4
    rec = lathe_run(c, "profile", seq, batch, ac, compiled, steps=steps,
                    extra=["--profiling.enable_profiling", "--profiling.profile_freq", str(steps)], step_prefix="profile")
    traces = sorted((c.out / "runs" / "profile").rglob("*trace.json"))
    if traces:
        dest = c.out / "profile"
        dest.mkdir(exist_ok=True)
        for t in traces:
            shutil.copy(t, dest / f"{t.parent.name}_{t.name}")
        rec["traces"] = [str(p.relative_to(c.out)) for p in sorted(dest.iterdir())]
        c.save()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--output", required=True, type=Path, help="folder for results.json, summary.md and logs")
    p.add_argument("--cpu-dry-run", action="store_true", help="the same steps on a CPU with the debug model")
    p.add_argument("--wheels", type=Path, help="folder of wheels to install without network (torchao, torchtitan)")
    p.add_argument("--torchtitan-python", help="python of an environment with torchtitan (default: this one)")
    p.add_argument("--steps", default="install,gpu-tests,throughput,vs-torchtitan,profile",
                   help="comma-separated subset, in this order")
    p.add_argument("--budget-scale", type=float, default=1.0, help="multiply every step's time budget")
    args = p.parse_args(argv)
    import torch

    if not args.cpu_dry_run and not torch.cuda.is_available():
        print("gpu_check: no CUDA device here; use --cpu-dry-run to check the plumbing on a CPU", file=sys.stderr)
        return 2
    args.output.mkdir(parents=True, exist_ok=True)
    c = Check(args.output.resolve(), args.cpu_dry_run, args.budget_scale)
    wanted = args.steps.split(",")
    steps = {"install": lambda: step_install(c, args.wheels), "gpu-tests": lambda: step_gpu_tests(c),
             "throughput": lambda: step_throughput(c),
             "vs-torchtitan": lambda: step_vs_torchtitan(c, args.torchtitan_python), "profile": lambda: step_profile(c)}
    unknown = [s for s in wanted if s not in steps]
    if unknown:
        print(f"gpu_check: unknown step(s) {unknown}; choose from {list(steps)}", file=sys.stderr)
        return 2
    for name in steps:
        if name in wanted:
            try:
                steps[name]()
            except Exception as e:  # never stop at the first failure
                c.results.append({"step": name, "status": "error", "why": f"{type(e).__name__}: {e}"})
                c.save()
    print(f"\n{(c.out / 'summary.md').read_text()}\nresults in {c.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
