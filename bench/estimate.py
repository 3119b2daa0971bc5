"""Memory estimate vs measured, and predicted vs measured step time, for the parity suite's layouts.

    python bench/estimate.py                        # every eager layout of the parity suite (CPU, gloo)
    python bench/estimate.py --layouts fsdp2,pp2_1F1B --steps 8
    python bench/estimate.py --cuda                 # on a GPU: single-GPU configs vs max_memory_allocated

CPU: all layouts train in one torchrun job (tests/parallel/memory_worker.py: the tiny model, fp32,
``--steps`` steps, 1 thread per rank); the trainer's memory check measures each rank's peak tensor
memory over the first two steps (``lathe.memtrack.MemoryTracker``) and ``metrics.jsonl`` gives the
step time (median of the steps after the second). Meanwhile this process runs ``lathe estimate``
(fake tensors) and the analytic model for the same layouts, and ``lathe plan``'s cost model predicts
the step time for a "device" with this CPU's measured single-thread matmul peak and
``--gloo-gbps`` links. Memory is the same quantity on both sides; the step-time prediction is the
GPU cost model applied to a CPU, where per-op overhead dominates tiny models: printed, not asserted.

CUDA (``--cuda``): for each config, one process trains 2 steps on the GPU and its memory check reads
``torch.cuda.max_memory_allocated``; the estimate runs on fake tensors. Record the ratios in
docs/performance.md.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests" / "parallel"))

MIB = 2**20


def cpu_bench(args) -> None:
    import torch

    from lathe.config import load_config
    from lathe.devices import Device
    from lathe.estimate import estimate
    from lathe.memory_model import estimate_rank, layout_from_config
    from lathe.metrics import measure_matmul_flops
    from lathe.parallel.dims import ParallelDims
    from lathe.plan import step_cost
    from test_estimate_accuracy import CASES, _config

    cases = [c for c in CASES if not args.layouts or c[0] in args.layouts.split(",")]
    folder = Path(tempfile.mkdtemp(prefix="lathe-bench-estimate-"))
    extra = ["--training.steps", str(args.steps)]
    layouts = [[name, nproc, [*_config(name, overrides), *extra]] for name, nproc, overrides in cases]
    (folder / "layouts.json").write_text(json.dumps(layouts))
    world = max(nproc for _, nproc, _ in cases)
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={world}", "--rdzv_backend=c10d",
           "--rdzv_endpoint=localhost:0", str(ROOT / "tests" / "parallel" / "memory_worker.py"),
           str(folder / "layouts.json"), str(folder)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    started = time.perf_counter()
    with open(folder / "worker.log", "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
        rows = []
        torch.set_num_threads(1)
        peak_flops, how = measure_matmul_flops(torch.device("cpu"))
        cpu = Device("cpu (1 thread)", 0, peak_flops, args.gloo_gbps, args.gloo_gbps)
        for name, nproc, overrides in cases:
            cfg, _ = load_config([*_config(name, overrides), *extra])
            t0 = time.perf_counter()
            est = estimate(cfg, nproc)
            seconds = time.perf_counter() - t0
            dims = ParallelDims.from_config(cfg.parallelism, nproc)
            analytic = [estimate_rank(cfg, dims, est.vocab_size, r).peak for r in range(dims.pp)]
            lay = layout_from_config(cfg, dims, est.vocab_size)
            global_batch = cfg.training.batch_size * dims.dp * lay.accumulation
            predicted = step_cost(lay, global_batch, nproc, cpu)["step"]
            rows.append((name, nproc, est, analytic, predicted, seconds, dims))
        code = proc.wait()
    if code != 0:
        sys.exit(f"the training job failed (exit {code}); see {folder / 'worker.log'}")
    print(f"CPU matmul peak (1 thread): {peak_flops / 1e9:.1f} GFLOP/s ({how}); gloo links assumed {args.gloo_gbps} GB/s")
    print(f"training job: {time.perf_counter() - started:.0f} s for {len(cases)} layouts ({folder})\n")
    head = (f"{'layout':<26} {'pp':>3} {'estimate MiB':>12} {'measured MiB':>12} {'ratio':>6} {'analytic':>9} "
            f"{'ratio':>6} {'pred. step s':>12} {'meas. step s':>12} {'estimator s':>11}")
    print(head)
    print("-" * len(head))
    worst = 0.0
    for name, nproc, est, analytic, predicted, seconds, dims in rows:
        checks = {r: json.loads((folder / f"{name}_rank{r}.json").read_text()) for r in range(nproc)}
        logged = [json.loads(x) for x in (folder / name / "metrics.jsonl").read_text().splitlines()]
        times = [r["step_time"] for r in logged if "step_time" in r and r.get("step", 0) > 2]
        measured_step = statistics.median(times) if times else float("nan")
        for r in est.ranks:
            measured = max(checks[k]["measured"] for k in r.role.members(dims))  # the ranks of its role
            ratio, a_ratio = r.peak / measured, analytic[r.pp_rank] / measured
            worst = max(worst, abs(ratio - 1))
            first = r.pp_rank == 0
            print(f"{name if first else '':<26} {r.pp_rank:>3} {r.peak / MIB:>12.3f} {measured / MIB:>12.3f} {ratio:>6.3f} "
                  f"{analytic[r.pp_rank] / MIB:>9.3f} {a_ratio:>6.3f} "
                  + (f"{predicted:>12.4f} {measured_step:>12.4f} {seconds:>11.1f}" if first else ""))
    print(f"\nlargest estimate error: {worst:.1%}")


CUDA_CONFIGS = [
    ("debugmodel seq 2048 x 8", ["--model.flavor", "debugmodel", "--training.seq_len", "2048", "--training.batch_size", "8"]),
    ("llama2 1B seq 2048 x 4, AC op", ["--model.name", "llama2", "--model.flavor", "1B", "--model.vocab_size", "32000",
                                       "--training.seq_len", "2048", "--training.batch_size", "4",
                                       "--activation_checkpoint.mode", "selective",
                                       "--activation_checkpoint.selective_ac_option", "op"]),
    ("llama3 8B seq 2048 x 1, AC full", ["--model.flavor", "8B", "--model.vocab_size", "128256", "--training.seq_len", "2048",
                                         "--training.batch_size", "1", "--activation_checkpoint.mode", "full"]),
]


def cuda_bench(args) -> None:
    """One GPU: the estimate vs torch.cuda.max_memory_allocated of 2 real steps (bf16 autocast off:
    a single process computes in float32 unless FSDP casts, so these are float32 runs)."""
    import torch

    from lathe.config import load_config
    from lathe.estimate import estimate
    from lathe.trainer import train

    if not torch.cuda.is_available():
        sys.exit("--cuda needs a CUDA device")
    print(f"{'config':<36} {'estimate GiB':>12} {'max allocated GiB':>18} {'ratio':>6}")
    for label, overrides in CUDA_CONFIGS:
        common = [*overrides, "--training.steps", "2", "--metrics.log_freq", "1", "--no-validation.enabled",
                  "--training.device", "cuda", "--job.dump_folder", tempfile.mkdtemp(prefix="lathe-bench-cuda-")]
        cfg, _ = load_config(common)
        est = estimate(cfg, 1)
        torch.cuda.reset_peak_memory_stats()
        result = train(cfg)
        measured = result.memory["measured"]
        print(f"{label:<36} {est.peak / 2**30:>12.2f} {measured / 2**30:>18.2f} {est.peak / measured:>6.3f}")
        del result
        torch.cuda.empty_cache()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layouts", default="", help="comma-separated layout names (default: all)")
    parser.add_argument("--steps", type=int, default=6, help="training steps per layout (memory: the first 2)")
    parser.add_argument("--gloo-gbps", type=float, default=2.0, help="assumed gloo bandwidth on loopback, GB/s")
    parser.add_argument("--cuda", action="store_true", help="single-GPU configs against max_memory_allocated")
    args = parser.parse_args()
    import logging

    logging.basicConfig(level=logging.WARNING)
    cuda_bench(args) if args.cuda else cpu_bench(args)


if __name__ == "__main__":
    main()
