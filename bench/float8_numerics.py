"""Float8 numerics on one process: how far each float8 recipe's losses are from the bf16 run.

    python bench/float8_numerics.py                      # tiny Llama, seq 64, batch 4, lr 3e-3, 20 steps
    python bench/float8_numerics.py --runs fp32,bf16,tensorwise --steps 40

Each run trains the same model on the same data in-process (lathe.trainer.train) and the script
prints, per run, the largest relative difference of a step's loss from the bf16 (autocast) run
over all steps, and the wall time. These are the measurements behind the float8 tolerance of the
tests (tests/unit/test_float8.py, tests/parallel/test_torchtitan_options.py) and the table in
docs/float8.md. Speed on CPU says nothing about GPU float8 (the CPU ``_scaled_mm`` is slower than
a float32 matmul).
"""

from __future__ import annotations

import argparse
import logging
import tempfile
import time

from lathe.config import load_config
from lathe.trainer import train

RUNS = {
    "fp32": [],
    "bf16": ["--training.autocast_dtype", "bfloat16"],
    "tensorwise": ["--float8.enable_float8_linear"],
    "rowwise": ["--float8.enable_float8_linear", "--float8.recipe_name", "rowwise"],
    "rowwise_with_gw_hp": ["--float8.enable_float8_linear", "--float8.recipe_name", "rowwise_with_gw_hp"],
    "tensorwise_inductor": ["--float8.enable_float8_linear", "--training.compile"],
    "rowwise_aot_eager": ["--float8.enable_float8_linear", "--float8.recipe_name", "rowwise", "--training.compile",
                          "--training.compile_backend", "aot_eager"],
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", default=",".join(RUNS), help="comma-separated, from: " + ", ".join(RUNS))
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    base = ["--model.flavor", "tiny", "--training.seq_len", "64", "--training.batch_size", "4", "--training.steps",
            str(args.steps), "--metrics.log_freq", "1000", "--lr_scheduler.warmup_steps", "2", "--optimizer.lr", "3e-3"]
    names = args.runs.split(",")
    if "bf16" not in names:
        names.insert(0, "bf16")
    losses, seconds = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            cfg, _ = load_config([*base, *RUNS[name], "--job.dump_folder", f"{tmp}/{name}"])
            start = time.perf_counter()
            losses[name] = train(cfg).losses
            seconds[name] = time.perf_counter() - start
    ref = losses["bf16"]
    first, last = ref[1], ref[args.steps]
    print(f"bf16 loss: step 1 {first:.4f}, step {args.steps} {last:.4f}")
    print(f"{'run':<22} {'max rel diff vs bf16':>21} {'wall s':>8}")
    for name in names:
        diff = max(abs(losses[name][s] - ref[s]) / ref[s] for s in ref)
        print(f"{name:<22} {diff:>21.2e} {seconds[name]:>8.1f}")


if __name__ == "__main__":
    main()
