"""Throughput of `lathe data prepare`, and the per-step cost of training from a prepared store.

    python bench/data_prepare.py                      # everything below, on the embedded corpus
    python bench/data_prepare.py --skip-train         # only the tokenization numbers
    python bench/data_prepare.py --tiktoken-file tokenizers/original/tokenizer.model   # the real Llama 3 file

1. Tokenizing (documents/s, tokens/s) the embedded corpus's training split, for lathe's default
   tokenizer (a 4,096-token ``tokenizers`` BPE) and for a tiktoken tokenizer in Llama 3's format:
   - ``encode_batch``: one process tokenizing the whole list with the library's own batch call
     (``tokenizers``' Rust thread pool on all cores; tiktoken's ``encode_ordinary_batch`` with one
     thread per core). No reading, no writing: the practical limit of this machine.
   - ``prepare, N workers``: `lathe.data.prepare.prepare` as ``lathe data prepare`` runs it (reading
     the jsonl, N tokenizing processes, writing the Megatron shards, sha256 of every shard),
     into a fresh folder each time. The time is that of the split (worker start-up excluded; it is
     printed separately).
   Without access to the Hub the real Llama 3 ``tokenizer.model`` is not available; the script
   then builds a file in its format: the merges of a byte-level BPE trained (``tokenizers``) on
   the corpus itself (about 56,000: the corpus runs out of merges), padded to 128,000 ranks with
   byte strings that cannot occur in UTF-8 text, plus Llama 3's 256 special tokens -- so the
   vocabulary (128,256 ids) and the token dtype (int32) are Llama 3's -- read by lathe's
   `TikTokenizer` with Llama 3's split pattern. It is cached under ``$LATHE_CACHE_DIR/bench``
   (default ``~/.cache/lathe/bench``).
2. The prepared reader's cost per training step at the debug model on CPU (``training.data_workers
   0``: the reading happens inline, so the ``data_loading_pct`` the trainer logs is its full cost),
   for the prepared corpus and for a corpus 10x larger (the same shards listed ten times: ten times
   the documents and tokens), with a shuffle buffer of 10,000 documents; plus the time of one
   ``next()`` of the reader alone.

Nothing is asserted; CI does not run this. Results: docs/performance.md.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # works from a checkout without `pip install -e .`
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from lathe import trainer  # noqa: E402
from lathe.config import load_config  # noqa: E402
from lathe.data.corpus import build_corpus, default_cache_dir, iter_documents  # noqa: E402
from lathe.data.prepare import _cpu_count, prepare  # noqa: E402
from lathe.data.tokenizer import DEFAULT_TOKENIZER_PATH, load_tokenizer  # noqa: E402


def llama3_format_file(texts: list[str], ranks: int) -> Path:
    """A tiktoken BPE file in Llama 3's format with ``ranks`` ranks, trained on ``texts`` (cached)."""
    folder = default_cache_dir().parent.parent / "bench"
    path = folder / f"tiktoken-bpe-{ranks}.model"
    if path.is_file():
        return path
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer_ = trainers.BpeTrainer(vocab_size=ranks, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                   show_progress=False, min_frequency=1)
    tok.train_from_iterator(texts, trainer=trainer_)
    # byte-level symbols -> bytes (the printable stand-ins of GPT-2's byte-level BPE)
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    stand_in = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in stand_in:
            stand_in[b] = chr(256 + extra)
            extra += 1
    to_byte = {c: b for b, c in stand_in.items()}
    model = json.loads(tok.to_str())["model"]
    table = {bytes([b]): b for b in range(256)}
    for merge in model["merges"]:
        a, b = merge.split(" ") if isinstance(merge, str) else merge
        token = bytes(to_byte[c] for c in a + b)
        table.setdefault(token, len(table))
    # A 10 MB corpus yields fewer merges than Llama 3 has; pad to ``ranks`` with byte strings that
    # cannot occur in UTF-8 text (0xFF 0xFE ...), so vocabulary size and token dtype are Llama 3's.
    for i in range(ranks - len(table)):
        table[b"\xff\xfe" + i.to_bytes(3, "big")] = len(table)
    import base64

    folder.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(f"{base64.b64encode(t).decode()} {r}\n" for t, r in table.items()))
    os.replace(tmp, path)
    return path


def baseline(tokenizer_path: Path, texts: list[str]) -> tuple[float, int]:
    """(seconds, tokens) of the library's batch call on all cores, in this process."""
    tok = load_tokenizer(tokenizer_path, num_threads=_cpu_count())
    tok.encode_batch(texts[:8], bos=True, eos=True)  # warm-up (thread pools, caches)
    start = time.perf_counter()
    ids = tok.encode_batch(texts, bos=True, eos=True)
    return time.perf_counter() - start, sum(map(len, ids))


def bench_prepare(tokenizer_path: Path, workers: int, out: Path) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    start = time.perf_counter()
    summary = prepare(["lathe_corpus"], str(out), tokenizer=str(tokenizer_path), workers=workers, progress=False)
    wall = time.perf_counter() - start
    train = summary["splits"]["train"]
    size = sum(f.stat().st_size for f in (out / "train").iterdir() if f.suffix in (".bin", ".idx"))
    return {"seconds": train.seconds, "documents": train.documents, "tokens": train.tokens, "wall": wall,
            "dtype": summary["manifest"]["dtype"], "mb": size / 1e6}


def row(name: str, docs: int, tokens: int, seconds: float, note: str = "") -> None:
    print(f"  {name:<28} {docs / seconds:>11,.1f} {tokens / seconds:>13,.0f} {seconds:>9.2f}  {note}")


def reader_cost(store: Path, batch: int, seq: int, shuffle: int, steps: int = 200) -> float:
    """Median seconds of one ``next()`` of the prepared reader (one process, DP 1)."""
    from lathe.data import build_train_data

    cfg, _ = load_config(["--training.dataset_path", str(store), "--training.batch_size", str(batch),
                          "--training.seq_len", str(seq), "--training.shuffle_buffer", str(shuffle),
                          "--training.data_workers", "0"])
    data = build_train_data(cfg, load_tokenizer(), 0, 1)
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        next(data)
        times.append(time.perf_counter() - t)
    return statistics.median(times[10:])


def train_share(store: Path, folder: Path, args) -> tuple[float, float]:
    """(median data_loading_pct, median step time) of the debug model trained from ``store``."""
    cfg, _ = load_config([
        "--job.dump_folder", str(folder), "--model.flavor", "debugmodel", "--training.device", "cpu",
        "--training.steps", str(args.steps), "--training.batch_size", str(args.batch_size),
        "--training.seq_len", str(args.seq_len), "--training.data_workers", "0", "--training.shuffle_buffer", "10000",
        "--metrics.log_freq", "1", "--lr_scheduler.warmup_steps", "2", "--training.dataset_path", str(store)])
    trainer.train(cfg)
    recs = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    recs = [r for r in recs if "data_loading_pct" in r][3:]
    return statistics.median(r["data_loading_pct"] for r in recs), statistics.median(r["step_time"] for r in recs)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="lathe data prepare throughput and prepared-reader cost")
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    p.add_argument("--tiktoken-file", default=None, help="a Llama 3 tokenizer.model (default: one built locally)")
    p.add_argument("--tiktoken-ranks", type=int, default=128_000)
    p.add_argument("--skip-train", action="store_true", help="only the tokenization numbers")
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=256)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    corpus = build_corpus()
    texts = list(iter_documents(corpus.train))
    chars = sum(map(len, texts))
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"embedded corpus (train split): {len(texts):,} documents, {chars / 1e6:.1f}M characters "
          f"({corpus.train.stat().st_size / 1e6:.1f} MB of JSON lines); {_cpu_count()} CPUs, load average {load:.1f}")
    tik = Path(args.tiktoken_file) if args.tiktoken_file else llama3_format_file(texts, args.tiktoken_ranks)
    tokenizers_ = [("lathe default (tokenizers BPE, 4,096)", DEFAULT_TOKENIZER_PATH),
                   (f"tiktoken, Llama 3 format ({load_tokenizer(tik).vocab_size:,})", tik)]
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for label, path in tokenizers_:
            print(f"\n{label}: {path}")
            print(f"  {'':<28} {'documents/s':>11} {'tokens/s':>13} {'seconds':>9}")
            seconds, tokens = baseline(path, texts)
            row("encode_batch, 1 process", len(texts), tokens, seconds, f"(all {_cpu_count()} cores)")
            for w in args.workers:
                r = bench_prepare(path, w, tmp / f"prep-{w}")
                row(f"prepare, {w} worker(s)", r["documents"], r["tokens"], r["seconds"],
                    f"{r['tokens']:,} {r['dtype']} tokens, {r['mb']:.1f} MB; whole command {r['wall']:.1f} s")
        if args.skip_train:
            return 0
        store = tmp / "prep-default"
        prepare(["lathe_corpus"], str(store), workers=max(args.workers), progress=False)
        big = tmp / "prep-10x"  # the training shards listed ten times: a 10x corpus, no re-tokenizing
        big.mkdir()
        shard = store / "train" / "shard-00000"
        for i in range(10):
            for ext in (".bin", ".idx"):
                os.symlink(f"{shard}{ext}", big / f"copy-{i}{ext}")
        print(f"\nprepared reader, debug model (batch {args.batch_size} x seq {args.seq_len}), CPU, "
              f"{torch.get_num_threads()} torch threads, data_workers 0, shuffle buffer 10,000")
        print(f"  {'corpus':<10} {'next() ms':>10} {'data % of step':>15} {'step s':>8}")
        for name, path in (("1x", store), ("10x", big)):
            per = reader_cost(path, args.batch_size, args.seq_len, 10_000)
            share, step = train_share(path, tmp / f"train-{name}", args)
            print(f"  {name:<10} {per * 1e3:>10.3f} {share:>15.3f} {step:>8.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
