"""bench/gpu_check.py, the script a GPU session runs, checked on the CPU with --cpu-dry-run: every
step runs or says why it is skipped, results.json and summary.md are written, the throughput
numbers are parsed from the run's metrics, the profiler trace is kept, and a step that fails or
overruns its budget does not stop the next ones."""

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def run_check(out, *args, timeout=900):
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "gpu_check.py"), "--output", str(out),
                           "--cpu-dry-run", *args], capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return {r["step"]: r for r in json.loads((out / "results.json").read_text())["results"]}


def test_cpu_dry_run_runs_every_step_or_says_why(tmp_path):
    res = run_check(tmp_path)
    assert res["install"]["status"] == "skipped" and "dry run" in res["install"]["why"]
    tests = res["gpu-tests"]
    assert tests["status"] == "passed" and "skipped" in tests["tests"] and "passed" not in tests["tests"]
    assert "needs CUDA" in (tmp_path / tests["log"]).read_text()  # the clear word for what was skipped
    (tput,) = [r for name, r in res.items() if name.startswith("throughput:")]
    assert tput["status"] == "passed" and tput["tokens_per_s"] > 0 and 0 < tput["mfu"] < 100
    assert tput["memory_gib"] > 0 and tput["compiled"] is False and tput["seq"] == 128
    tt = res["vs-torchtitan"]
    assert tt["status"] == "skipped" and "torchtitan" in tt["why"] or tt["status"] == "passed"
    prof = res["profile:profile"]
    assert prof["status"] == "passed" and prof["traces"]
    assert json.loads((tmp_path / prof["traces"][0]).read_text())["traceEvents"]
    summary = (tmp_path / "summary.md").read_text()
    assert "CPU dry run" in summary and "tokens/s" in summary


def test_a_step_over_its_budget_is_stopped_and_the_next_ones_still_run(tmp_path):
    res = run_check(tmp_path, "--steps", "gpu-tests,throughput", "--budget-scale", "0.002", timeout=300)
    assert res["gpu-tests"]["status"] == "timeout"
    (tput,) = [r for name, r in res.items() if name.startswith("throughput:")]
    assert tput["status"] == "timeout" and "tokens_per_s" not in tput


def test_without_cuda_and_without_dry_run_it_refuses_in_one_line(tmp_path):
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "gpu_check.py"), "--output", str(tmp_path)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "--cpu-dry-run" in proc.stderr
