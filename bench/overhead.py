"""Framework overhead: lathe's training loop vs a bare hand-written PyTorch loop, on CPU.

    python bench/overhead.py                      # batch 8, seq 256, 60 measured steps
    python bench/overhead.py --steps 80 --threads 2 --batch-size 4 --seq-len 512

Both loops train the same model (llama3 ``debugmodel`` with the vocabulary of lathe's default
tokenizer, 4096; ``lathe.models.llama.Transformer`` built on the meta device, then ``to_empty``
and ``init_weights``; no activation checkpointing, no compile) with the same optimizer (AdamW,
lr 8e-4, betas (0.9, 0.95), eps 1e-8, weight decay 0.1, foreach), the same clipping (global grad
norm 1.0, foreach) and a linear-warmup ``LambdaLR``, on batches of the same shape. The bare loop
reads pre-generated random token batches from a list; lathe reads its real data stream (the
embedded corpus, tokenized and packed on the fly), since the data stream is part of lathe's cost.

How lathe's step time is measured
---------------------------------
The primary number is the one lathe records itself. The run uses ``metrics.log_freq 1``, so each
step writes a record to ``{dump_folder}/metrics.jsonl`` whose ``step_time`` is the wall time of a
logging window of exactly one step. The window opens when the previous log has been written and
closes right after this log's loss/grad-norm host sync, so it covers everything the loop does for
a step (GC schedule, zero_grad, data, forward, backward, clip, non-finite guard, optimizer and LR
step, metric accumulation, the sync) and leaves out only writing the log itself (console line,
metrics.jsonl, TensorBoard), a cost that a normal run pays every ``log_freq`` steps, not every step.
On CPU nothing runs asynchronously, so the window is exact. The same records give the data-loading
share (``data_loading_time`` / ``step_time``).

As a cross-check the script also timestamps every ``MetricsProcessor.step`` call; the gap between
consecutive calls is the full loop iteration *including* the per-step log, i.e. what lathe costs at
``log_freq 1``. Both are printed.

Interleaving
------------
On a small shared machine the load from other processes changes within seconds, so alternating
whole runs (bare, lathe, bare, lathe) still compares steps taken under different load. This script
interleaves per step instead: lathe's ``MetricsProcessor`` is replaced (in ``lathe.trainer``, for
the duration of the run) by a subclass that, right after each log has been written and *before*
the next logging window opens, runs one step of the bare loop. The bare step is therefore outside
lathe's recorded ``step_time``; it is subtracted from the full-iteration cross-check. Step ``k`` of
lathe and step ``k`` of the bare loop run back to back, and besides both medians the script reports
the median of the per-pair ratios, which is the least sensitive to load drift. Both loops run in
one process with one ``torch.set_num_threads`` setting; the first ``--warmup`` steps are dropped.
Because lathe disables automatic garbage collection during training (``training.gc_freq``), the
bare steps also run without automatic GC, which if anything favours the bare loop.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # works from a checkout without `pip install -e .`
    sys.path.insert(0, str(ROOT))

from lathe import trainer
from lathe.config import load_config
from lathe.data.tokenizer import DEFAULT_TOKENIZER_PATH, load_tokenizer
from lathe.metrics import MetricsProcessor
from lathe.models import MODELS

MODEL, FLAVOR = "llama3", "debugmodel"
LR, BETAS, EPS, WEIGHT_DECAY, MAX_NORM = 8e-4, (0.9, 0.95), 1e-8, 0.1, 1.0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="lathe's training loop vs a bare PyTorch loop (CPU)")
    p.add_argument("--steps", type=int, default=60, help="measured steps of each loop (default 60)")
    p.add_argument("--warmup", type=int, default=3, help="steps dropped at the start (default 3)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--threads", type=int, default=torch.get_num_threads(),
                   help=f"torch.set_num_threads for both loops (default here: {torch.get_num_threads()})")
    p.add_argument("--lr-warmup-steps", type=int, default=2, help="linear LR warm-up steps, both loops")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--keep", metavar="DIR", help="write lathe's run folder (metrics.jsonl, train.log) here")
    args = p.parse_args(argv)
    if args.steps < 1 or args.warmup < 1 or args.threads < 1:
        p.error("--steps, --warmup and --threads must be >= 1")
    return args


# ---------------------------------------------------------------------------------------------
# The bare loop


def lr_lambda(warmup: int, total: int):
    def factor(step: int) -> float:  # linear warm-up, then linear decay
        if step < warmup:
            return (step + 1) / (warmup + 1)
        return 1.0 - (step - warmup) / max(1, total - warmup)

    return factor


class BareLoop:
    """A plain PyTorch training loop, run one step at a time."""

    def __init__(self, args: argparse.Namespace, vocab_size: int):
        total = args.warmup + args.steps
        torch.manual_seed(args.seed)
        margs = MODELS[MODEL].flavors[FLAVOR].with_(vocab_size=vocab_size, max_seq_len=args.seq_len)
        with torch.device("meta"):
            model = MODELS[MODEL].build(margs)
        model.to_empty(device="cpu")
        model.init_weights(buffer_device="cpu")
        model.train()
        self.model = model
        self.params = list(model.parameters())
        windows = torch.randint(0, vocab_size, (total, args.batch_size, args.seq_len + 1))
        self.batches = [(w[:, :-1].contiguous(), w[:, 1:].contiguous()) for w in windows]
        self.opt = torch.optim.AdamW(self.params, lr=LR, betas=BETAS, eps=EPS,
                                     weight_decay=WEIGHT_DECAY, foreach=True)
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, lr_lambda(args.lr_warmup_steps, total))
        self.times: list[float] = []
        self.losses: list[torch.Tensor] = []

    def step(self) -> float:
        t0 = time.perf_counter()
        inputs, labels = self.batches[len(self.times)]
        self.opt.zero_grad(set_to_none=True)
        logits = self.model(inputs)
        loss = F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(0, 1))
        del logits
        loss.backward()
        nn.utils.clip_grad_norm_(self.params, MAX_NORM, foreach=True)
        self.opt.step()
        self.sched.step()
        self.losses.append(loss.detach())
        dt = time.perf_counter() - t0
        self.times.append(dt)
        return dt


# ---------------------------------------------------------------------------------------------
# lathe, with a bare step slipped in between its steps


class _InterleavingMetrics(MetricsProcessor):
    """Timestamps each ``step`` call and runs one bare step after each log, outside the window."""

    bare: ClassVar[BareLoop | None] = None
    stamps: ClassVar[list[float]] = []
    bare_between: ClassVar[list[float]] = []  # bare step time run between stamps[i] and stamps[i+1]

    def step(self, *args, **kwargs):
        _InterleavingMetrics.stamps.append(time.perf_counter())
        return super().step(*args, **kwargs)

    def _reset_window(self) -> None:
        # Called once from __init__ (no step yet: skip) and at the end of every log.
        if _InterleavingMetrics.stamps and self.bare is not None:
            _InterleavingMetrics.bare_between.append(self.bare.step())
        super()._reset_window()


def run_interleaved(args: argparse.Namespace, bare: BareLoop, dump_folder: Path) -> dict:
    total = args.warmup + args.steps
    cfg, _ = load_config([
        "--job.dump_folder", str(dump_folder),
        "--training.device", "cpu",
        "--training.steps", str(total),
        "--training.batch_size", str(args.batch_size),
        "--training.seq_len", str(args.seq_len),
        "--training.seed", str(args.seed),
        "--training.max_norm", str(MAX_NORM),
        "--metrics.log_freq", "1",
        "--lr_scheduler.warmup_steps", str(args.lr_warmup_steps),
        "--model.name", MODEL, "--model.flavor", FLAVOR,
        "--optimizer.name", "AdamW", "--optimizer.lr", str(LR),
        "--optimizer.beta1", str(BETAS[0]), "--optimizer.beta2", str(BETAS[1]),
        "--optimizer.eps", str(EPS), "--optimizer.weight_decay", str(WEIGHT_DECAY),
        "--activation_checkpoint.mode", "none",
    ])
    # lathe's console log goes to a file in the run folder: formatting and writing each line is
    # paid as in a real run, without flooding this script's output.
    log = logging.getLogger("lathe")
    handler = logging.FileHandler(dump_folder / "train.log")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    saved = log.level, log.propagate
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    log.propagate = False
    _InterleavingMetrics.bare, _InterleavingMetrics.stamps, _InterleavingMetrics.bare_between = bare, [], []
    trainer.MetricsProcessor = _InterleavingMetrics
    try:
        trainer.train(cfg)
    finally:
        trainer.MetricsProcessor = MetricsProcessor
        _InterleavingMetrics.bare = None
        log.removeHandler(handler)
        handler.close()
        log.setLevel(saved[0])
        log.propagate = saved[1]

    records = [json.loads(line) for line in (dump_folder / "metrics.jsonl").read_text().splitlines()]
    by_step = {r["step"]: r for r in records if "step_time" in r}
    assert sorted(by_step) == list(range(1, total + 1)), "expected one metrics record per step"
    assert len(bare.times) == total, (len(bare.times), total)
    stamps, between = _InterleavingMetrics.stamps, _InterleavingMetrics.bare_between
    # Step s (1-based) calls metrics.step at stamps[s-1]; its full iteration is the gap since the
    # previous call, minus the bare step that ran in between (after step s-1's log).
    full = {s: stamps[s - 1] - stamps[s - 2] - between[s - 2] for s in range(2, total + 1)}
    measured = range(args.warmup + 1, total + 1)
    return {
        "lathe": [by_step[s]["step_time"] for s in measured],
        "lathe_full": [full[s] for s in measured],
        "data": [by_step[s]["data_loading_time"] for s in measured],
        "bare": [bare.times[s - 1] for s in measured],
        "final_loss": by_step[total]["loss"],
        # the longest wait for a batch, warm-up included: the stream tokenizes documents in chunks
        "max_data": max((r["data_loading_time"], s) for s, r in by_step.items()),
    }


# ---------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    vocab_size = load_tokenizer(DEFAULT_TOKENIZER_PATH).vocab_size
    print(f"lathe framework overhead: {MODEL} {FLAVOR}, vocab {vocab_size}, batch {args.batch_size} x "
          f"seq {args.seq_len}, CPU, {args.threads} threads, torch {torch.__version__}")
    print(f"{args.steps} measured steps of each loop after {args.warmup} warm-up steps, "
          "interleaved step by step (lathe, bare, lathe, bare, ...)", flush=True)

    t_start = time.perf_counter()
    bare = BareLoop(args, vocab_size)
    with tempfile.TemporaryDirectory(prefix="lathe-overhead-") as tmp:
        folder = Path(args.keep) if args.keep else Path(tmp)
        folder.mkdir(parents=True, exist_ok=True)
        r = run_interleaved(args, bare, folder)
    assert torch.get_num_threads() == args.threads, "someone changed the thread count"
    bare_loss = bare.losses[-1].item()

    med = {k: statistics.median(r[k]) for k in ("bare", "lathe", "lathe_full")}
    pair = statistics.median(lt / b for lt, b in zip(r["lathe"], r["bare"]))
    pair_full = statistics.median(lt / b for lt, b in zip(r["lathe_full"], r["bare"]))
    data_share = 100.0 * sum(r["data"]) / sum(r["lathe"])

    def row(name: str, xs: list[float]) -> str:
        q1, q2, q3 = statistics.quantiles(xs, n=4) if len(xs) > 1 else [xs[0]] * 3
        return f"  {name:<44} {q2 * 1e3:8.1f} ms   (IQR {q1 * 1e3:.1f} - {q3 * 1e3:.1f} ms)"

    print()
    print("median step time:")
    print(row("bare PyTorch loop", r["bare"]))
    print(row("lathe (step_time from metrics.jsonl)", r["lathe"]))
    print(row("lathe full iteration incl. per-step log", r["lathe_full"]))
    print(f"ratio lathe / bare (medians):            {med['lathe'] / med['bare']:.3f}   (target <= 1.03)")
    print(f"ratio lathe / bare (median of pairs):    {pair:.3f}")
    print(f"  incl. the per-step log (log_freq 1):   {med['lathe_full'] / med['bare']:.3f} "
          f"(median of pairs {pair_full:.3f})")
    print(f"lathe data loading share:                {data_share:.2f}% of step time "
          f"(median {statistics.median(r['data']) * 1e3:.2f} ms per step, from metrics.jsonl)")
    wait_s, wait_step = r["max_data"]
    print(f"longest single data wait:                {wait_s * 1e3:.1f} ms at step {wait_step} "
          "(warm-up included; the stream tokenizes 64 documents at a time)")
    print(f"steps measured:                          {len(r['bare'])} bare, {len(r['lathe'])} lathe")
    print(f"threads:                                 {torch.get_num_threads()}")
    print(f"torch:                                   {torch.__version__}")
    print(f"final loss (sanity):                     lathe {r['final_loss']:.3f}, bare {bare_loss:.3f} "
          "(random tokens)")
    print(f"wall time:                               {time.perf_counter() - t_start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
