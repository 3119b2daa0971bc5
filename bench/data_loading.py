"""Data-loading share of step time for the debug model on CPU, with and without background workers.

    python bench/data_loading.py                         # 40 steps, batch 8, seq 256, workers 0 and 1
    python bench/data_loading.py --steps 60 --workers 0 1 2 --seq-len 512

Each configuration runs lathe's real trainer (`lathe.trainer.train`) on the embedded corpus with
``metrics.log_freq 1``, so every step writes a ``metrics.jsonl`` record whose ``data_loading_pct``
is the time the training loop spent waiting in ``next(data)`` as a percentage of that step's wall
time. The script prints, per ``training.data_workers`` value, the median and the mean over the
steps after the first ``--warmup`` (the first batches include starting the worker and reading the
first documents), and the median step time.

With ``data_workers 0`` the trainer tokenizes and packs inline, so the share is the real cost of
the data pipeline; with 1 the work runs in a background thread while the model computes, and the
share is what remains: taking a ready batch from a queue. Nothing here is asserted; CI does not
run it.

If the trainer in this checkout still builds its data with its own ``build_data`` (before the
wiring of `lathe.data.build_train_data`), the script substitutes `build_train_data` (same
signature), so the numbers are those of the new pipeline either way.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # works from a checkout without `pip install -e .`
    sys.path.insert(0, str(ROOT))

from lathe import data as lathe_data
from lathe import trainer
from lathe.config import load_config


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="data-loading share of step time (debug model, CPU)")
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--warmup", type=int, default=3, help="first steps left out of the statistics")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--workers", type=int, nargs="+", default=[0, 1], help="training.data_workers values")
    p.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch.set_num_threads")
    p.add_argument("--extra", nargs=argparse.REMAINDER, default=[], help="more trainer options, e.g. "
                   "--extra --training.dataset_path data/")
    return p.parse_args(argv)


def run_once(args, workers: int, folder: Path) -> list[dict]:
    cfg, _ = load_config([
        "--job.dump_folder", str(folder), "--model.flavor", "debugmodel", "--training.device", "cpu",
        "--training.steps", str(args.steps), "--training.batch_size", str(args.batch_size),
        "--training.seq_len", str(args.seq_len), "--training.data_workers", str(workers),
        "--metrics.log_freq", "1", "--lr_scheduler.warmup_steps", "2", *args.extra])
    trainer.train(cfg)
    records = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    return [r for r in records if "data_loading_pct" in r]


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.WARNING)
    if getattr(trainer, "build_data", None) is not None and trainer.build_data is not lathe_data.build_train_data:
        trainer.build_data = lathe_data.build_train_data
    print(f"debug model, CPU, {args.threads} torch threads, batch {args.batch_size} x seq {args.seq_len}, "
          f"{args.steps} steps (first {args.warmup} left out)")
    print(f"{'data_workers':>12}  {'median %':>9}  {'mean %':>7}  {'max %':>6}  {'median step (s)':>15}")
    with tempfile.TemporaryDirectory() as tmp:
        for workers in args.workers:
            recs = run_once(args, workers, Path(tmp) / f"w{workers}")[args.warmup:]
            pct = [r["data_loading_pct"] for r in recs]
            step = [r["step_time"] for r in recs]
            print(f"{workers:>12}  {statistics.median(pct):>9.3f}  {statistics.fmean(pct):>7.3f}  {max(pct):>6.2f}  "
                  f"{statistics.median(step):>15.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
