"""``lathe data prepare``: tokenize a corpus once, in parallel, into Megatron indexed shards.

    lathe data prepare SOURCES... --output DIR [--tokenizer T] [--workers N] [--shard i/n]
    lathe data info PATH

SOURCES are what training reads (`lathe.data.sources`): ``lathe_corpus``, local files, folders or
globs, ``c4``/``fineweb``/``fineweb_edu`` or any Hugging Face id (``org/name:config``). Together
they form one dataset, read in the order given. Both of its splits are written -- the records
training would train on and the held-out records validation would use -- each document as
``[BOS] tokens [EOS]``, exactly the token sequence training produces on the fly:

    DIR/prepare.json                    the plan (sources, tokenizer, dtype, shard size), written first
    DIR/train/shard-00000.{bin,idx}     Megatron indexed datasets, one sequence per document
    DIR/train/shard-00000.json          the shard's counts and sha256, written when it is complete
    DIR/validation/shard-00000.{...}
    DIR/manifest.json                   written last, when every shard exists: the folder is complete

Shard ``k`` of a split holds its records ``[k*R, (k+1)*R)`` (``R = --docs-per-shard``), so the
output does not depend on the number of workers or tasks, and a shard is the unit of resuming: a
run that is stopped continues with the first missing shard, and a finished shard is never written
again (its files are written under temporary names and renamed; its ``.json`` comes last).
Killing a prepare and running it again gives byte-identical files.

Parallelism: the main process reads raw records (lines of a file, without parsing them) and
hands them, a few hundred at a time, to ``--workers`` processes that decode, tokenize and send the
token ids back; the main process writes them in order. ``--shard i/n`` makes this task prepare
the shards ``k`` with ``k % n == i`` only (e.g. one per Slurm array task, all writing into the same
folder); every task still scans the records of the others without decoding them (for a Hugging
Face source that means streaming the whole split), and the task that completes the last shard
writes the manifest (or run the command once more without ``--shard``).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
import time
from collections import deque
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

import lathe
from lathe.data.indexed import CODE_OF, IndexedWriter, token_dtype_for
from lathe.data.sources import (
    HF_PRESETS,
    BadRecord,
    LocalSource,
    Source,
    SourceSpec,
    is_glob,
    open_source,
    resolve_spec,
)
from lathe.data.store import FORMAT_KEY, FORMAT_VERSION, MANIFEST, PLAN, SPLITS, file_sha256, read_manifest
from lathe.data.tokenizer import load_tokenizer, resolve_tokenizer_file
from lathe.errors import ConfigError

logger = logging.getLogger("lathe")

DEFAULT_DOCS_PER_SHARD = 1_000_000
# A unit of work handed to a worker: at most this many records or raw bytes.
_UNIT_RECORDS = 512
_UNIT_BYTES = 1 << 20
_WARN_FIRST, _WARN_EVERY = 10, 1000


# ---------------------------------------------------------------------------------------------
# Records: read raw in the main process, decoded in the workers
# ---------------------------------------------------------------------------------------------


def raw_records(src: Source) -> Iterator[tuple]:
    """Picklable raw records of ``src`` in order; `decode` turns each into text or a BadRecord.

    Local files yield their undecoded items (a line's bytes), so the parsing happens in the
    workers and skipping another task's records costs no parsing."""
    if isinstance(src, LocalSource):
        for key, _, raw in src._keyed():
            yield ("local", key, raw)
    else:
        for rec in src.records(0):
            yield ("rec", rec)


def _raw_size(item: tuple) -> int:
    if item[0] == "local":
        value = item[2][1]
        return len(value) if isinstance(value, (bytes, str)) else 64
    rec = item[1]
    return len(rec) if isinstance(rec, str) else 64


_DECODER = LocalSource([], "text")


def decode(item: tuple, text_field: str) -> str | BadRecord:
    if item[0] == "local":
        _DECODER.text_field = text_field
        return _DECODER._decode(item[2], item[1])
    return item[1]


# ---------------------------------------------------------------------------------------------
# Workers
# ---------------------------------------------------------------------------------------------

_WORKER: dict = {}


def _init_worker(tokenizer_path: str, tokenizer_type: str, text_field: str, dtype: str, threads: int) -> None:
    if threads == 1:
        # One core per worker process: the Rust tokenizers' own thread pool would oversubscribe.
        os.environ["TOKENIZERS_PARALLELISM"] = "false"
        os.environ["RAYON_NUM_THREADS"] = "1"
        from lathe.launch import die_with_parent

        die_with_parent()  # a killed prepare leaves no workers behind
    _WORKER.update(tokenizer=load_tokenizer(tokenizer_path, tokenizer_type, num_threads=threads),
                   text_field=text_field, dtype=np.dtype(dtype))


def _warm_up() -> int:
    return os.getpid()


def encode_unit(items: list[tuple]) -> tuple[np.ndarray, np.ndarray, list[tuple[str, str]]]:
    """Decode and tokenize raw records: (tokens, document lengths, [(where, reason) of bad ones])."""
    tok, field_, dtype = _WORKER["tokenizer"], _WORKER["text_field"], _WORKER["dtype"]
    texts, bad = [], []
    for item in items:
        rec = decode(item, field_)
        if isinstance(rec, BadRecord):
            bad.append((rec.where, rec.reason))
        else:
            texts.append(rec)
    ids = tok.encode_batch(texts, bos=True, eos=True) if texts else []
    lengths = np.fromiter((len(x) for x in ids), dtype=np.int64, count=len(ids))
    flat = np.fromiter((t for x in ids for t in x), dtype=np.int64, count=int(lengths.sum()))
    info = np.iinfo(dtype)
    if flat.size and (int(flat.max()) > info.max or int(flat.min()) < info.min):
        raise ValueError(f"token id {int(flat.max())} does not fit in {dtype}")
    return flat.astype(dtype), lengths, bad


# ---------------------------------------------------------------------------------------------
# The plan and its checks
# ---------------------------------------------------------------------------------------------


def parse_source(source: str, config: str | None) -> SourceSpec:
    """One SOURCES entry, like a ``training.dataset_mix`` source: a name, a path/glob, ``org/name[:config]``."""
    src = source.strip()
    if src.startswith(("/", "./", "../", "~")) and not is_glob(src) and not Path(src).expanduser().exists():
        raise ConfigError("SOURCES", "no such file or folder", "check the path (globs like 'data/*.jsonl' work too)",
                          src)
    if (not Path(src).expanduser().exists() and not is_glob(src) and ":" in src and src not in HF_PRESETS):
        src, _, cfg = src.partition(":")
        config = cfg or config
    return resolve_spec(src, None, config, "SOURCES")


def tokenizer_identity(path: Path, tokenizer) -> dict:
    return {"file": path.name, "sha256": file_sha256(path), "type": type(tokenizer).__name__,
            "vocab_size": int(tokenizer.vocab_size), "bos_id": int(tokenizer.bos_id), "eos_id": int(tokenizer.eos_id)}


def parse_shard(text: str | None) -> tuple[int, int]:
    if text is None:
        return 0, 1
    try:
        i, n = (int(x) for x in text.split("/"))
    except ValueError:
        raise ConfigError("--shard", "must be i/n (this task's number and the number of tasks)", "e.g. --shard 0/8",
                          text) from None
    if not (n >= 1 and 0 <= i < n):
        raise ConfigError("--shard", "needs 0 <= i < n", "e.g. --shard 0/8 ... --shard 7/8", text)
    return i, n


# ---------------------------------------------------------------------------------------------
# Progress
# ---------------------------------------------------------------------------------------------


class Progress:
    """One status line on stderr: redrawn in place on a terminal, else printed every ``every`` s."""

    def __init__(self, enabled: bool = True, every: float = 30.0):
        self.enabled = enabled
        self.tty = sys.stderr.isatty()
        self.every = 0.5 if self.tty else every
        self.start = time.perf_counter()
        self.last = self.start
        self.docs = self.tokens = self.records = 0
        self.split = ""

    def update(self, docs: int, tokens: int, force: bool = False) -> None:
        self.docs += docs
        self.tokens += tokens
        now = time.perf_counter()
        if self.enabled and (force or now - self.last >= self.every):
            self.last = now
            line = self.line(now)
            if self.tty:
                sys.stderr.write("\r" + line + "\x1b[K")
            else:
                sys.stderr.write(line + "\n")
            sys.stderr.flush()

    def line(self, now: float | None = None) -> str:
        dt = max((now or time.perf_counter()) - self.start, 1e-9)
        return (f"prepare {self.split}: {self.docs:,} documents ({self.docs / dt:,.0f}/s), "
                f"{_human(self.tokens)} tokens ({_human(self.tokens / dt)}/s), {dt:,.0f} s")

    def close(self) -> None:
        if self.enabled and self.tty:
            sys.stderr.write("\n")
            sys.stderr.flush()


def _human(x: float) -> str:
    for unit, div in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if x >= div:
            return f"{x / div:,.2f}{unit}"
    return f"{x:,.0f}"


# ---------------------------------------------------------------------------------------------
# Writing one split
# ---------------------------------------------------------------------------------------------


@dataclass
class SplitResult:
    records: int = 0
    shards: int = 0
    written: int = 0  # shards written by this run
    documents: int = 0  # documents tokenized by this run
    tokens: int = 0
    seconds: float = 0.0
    skipped: int = 0
    bad: list = field(default_factory=list)


def _shard_name(k: int) -> str:
    return f"shard-{k:05d}"


def _shard_done(folder: Path, k: int) -> bool:
    name = _shard_name(k)
    return all((folder / f"{name}{ext}").is_file() for ext in (".json", ".bin", ".idx"))


def _replace_durably(tmp: Path, final: Path) -> None:
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(tmp, final)


class _ShardWriter:
    def __init__(self, folder: Path, k: int, dtype: np.dtype):
        self.folder, self.name = folder, _shard_name(k)
        self.tmp_bin = folder / f"{self.name}.bin.tmp"
        self.tmp_idx = folder / f"{self.name}.idx.tmp"
        self.writer = IndexedWriter(self.tmp_bin, self.tmp_idx, dtype)
        self.skipped = 0

    def finish(self, records: int) -> dict:
        docs = self.writer.finish()
        final_bin, final_idx = self.folder / f"{self.name}.bin", self.folder / f"{self.name}.idx"
        _replace_durably(self.tmp_bin, final_bin)
        _replace_durably(self.tmp_idx, final_idx)
        info = {"records": records, "documents": docs, "tokens": self.writer.num_tokens,
                "skipped_records": self.skipped,
                "sha256": {"bin": file_sha256(final_bin), "idx": file_sha256(final_idx)}}
        _write_json(self.folder / f"{self.name}.json", info)  # last: the shard is complete
        return info


def prepare_split(sources: list[Source], folder: Path, run: dict, pool, progress: Progress) -> SplitResult:
    """Write the shards of one split that this task owns and that do not exist yet."""
    folder.mkdir(parents=True, exist_ok=True)
    R, (task, tasks), dtype = run["docs_per_shard"], run["shard"], np.dtype(run["dtype"])
    mine = lambda k: k % tasks == task  # noqa: E731
    for tmp in folder.glob("shard-*.tmp*"):  # leftovers of a stopped run (ours only)
        k = int(tmp.name.split("-")[1].split(".")[0])
        if mine(k):
            tmp.unlink(missing_ok=True)
    result = SplitResult()
    start = time.perf_counter()
    pending: deque = deque()  # ("unit", k, future) | ("end", k, records), in record order
    writers: dict[int, _ShardWriter] = {}
    limit = max(2, 2 * run["workers"])

    def consume_one() -> None:
        kind, k, payload = pending.popleft()
        if kind == "end":
            writers.pop(k).finish(payload)
            result.written += 1
            return
        tokens, lengths, bad = payload.result() if hasattr(payload, "result") else payload
        w = writers.get(k)
        if w is None:
            w = writers[k] = _ShardWriter(folder, k, dtype)
        w.writer.add(tokens, lengths)
        w.skipped += len(bad)
        for where, reason in bad:
            result.skipped += 1
            if result.skipped <= _WARN_FIRST:
                logger.warning("data: skipping undecodable record %s: %s (%d skipped so far)", where, reason,
                               result.skipped)
            elif result.skipped % _WARN_EVERY == 0:
                logger.warning("data: %d undecodable records skipped so far (latest: %s: %s)", result.skipped,
                               where, reason)
        result.documents += len(lengths)
        result.tokens += int(lengths.sum())
        progress.update(len(lengths), int(lengths.sum()))

    def submit(k: int, unit: list) -> None:
        while sum(1 for x in pending if x[0] == "unit") >= limit:
            consume_one()
        pending.append(("unit", k, pool.submit(encode_unit, unit) if pool is not None else encode_unit(unit)))

    record = 0
    unit: list = []
    unit_bytes = 0
    k = -1
    active = False
    for src in sources:
        for item in raw_records(src):
            if record % R == 0:  # a new shard begins
                if active:
                    if unit:
                        submit(k, unit)
                    pending.append(("end", k, R))
                k = record // R
                active = mine(k) and not _shard_done(folder, k)
                unit, unit_bytes = [], 0
            record += 1
            if not active:
                continue
            unit.append(item)
            unit_bytes += _raw_size(item)
            if len(unit) >= _UNIT_RECORDS or unit_bytes >= _UNIT_BYTES:
                submit(k, unit)
                unit, unit_bytes = [], 0
    if active:
        if unit:
            submit(k, unit)
        pending.append(("end", k, record - k * R))
    while pending:
        consume_one()
    result.records = record
    result.shards = math.ceil(record / R)
    result.seconds = time.perf_counter() - start
    return result


# ---------------------------------------------------------------------------------------------
# The command
# ---------------------------------------------------------------------------------------------


def _cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


def _config_for(text_field: str, split: str):
    from lathe.config import load_config

    cfg, _ = load_config(["--training.dataset_text_field", text_field, "--training.dataset_split", split])
    return cfg


def _check_output(out: Path, plan: dict) -> bool:
    """Refuse a foreign or differently planned output folder; True if it is already complete."""
    if out.exists() and not out.is_dir():
        raise ConfigError("--output", "is a file, not a folder", "name a new or empty folder to write the shards in",
                          str(out))
    plan_file = out / PLAN
    if plan_file.is_file():
        try:
            old = json.loads(plan_file.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            old = None
        if old != plan:
            diff = sorted(k for k in set(plan) | set(old or {}) if (old or {}).get(k) != plan.get(k))
            raise ConfigError("--output", f"was started with different settings ({', '.join(diff) or 'unreadable plan'})",
                              "rerun with the same sources and options to continue it, or choose a new folder",
                              str(out))
        return read_manifest(out) is not None
    # (Tasks started together may find each other's temporary plan file: that is fine.)
    if out.exists() and any(not p.name.startswith(f"{PLAN}.tmp") for p in out.iterdir()):
        raise ConfigError("--output", "folder exists and is not a lathe data prepare output",
                          "choose a new or empty folder", str(out))
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:  # a parent is a file, no permission, read-only file system
        raise ConfigError("--output", f"cannot create the folder: {e.strerror or e}",
                          "name a folder that can be created", str(out)) from None
    _write_json(plan_file, plan)
    return False


def _write_json(path: Path, data: dict) -> None:
    """Write ``path`` atomically (a temporary name of this process, fsync, rename)."""
    tmp = path.with_name(f"{path.name}.tmp.{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=1) + "\n", encoding="utf-8")
    _replace_durably(tmp, path)


def _write_manifest(out: Path, plan: dict) -> dict:
    splits = {}
    for split in SPLITS:
        folder = out / split
        shards, totals = [], {"records": 0, "documents": 0, "tokens": 0, "skipped_records": 0}
        for marker in sorted(folder.glob("shard-*.json"), key=lambda m: int(m.stem.split("-")[1])):
            info = json.loads(marker.read_text(encoding="utf-8"))
            shards.append({"prefix": f"{split}/{marker.stem}", **{k: info[k] for k in ("documents", "tokens")},
                           "sha256": info["sha256"]})
            for key in totals:
                totals[key] += info[key]
        splits[split] = {**totals, "shards": shards}
    manifest = {FORMAT_KEY: FORMAT_VERSION, "lathe_version": lathe.__version__, **plan, "splits": splits}
    _write_json(out / MANIFEST, manifest)
    return manifest


def prepare(sources: list[str], output: str, tokenizer: str | None = None, tokenizer_type: str = "auto",
            text_field: str = "text", config: str | None = None, split: str = "train", workers: int | None = None,
            shard: str | None = None, docs_per_shard: int = DEFAULT_DOCS_PER_SHARD, dtype: str = "auto",
            progress: bool = True) -> dict:
    """Prepare ``sources`` into ``output`` (see the module docstring). Returns a summary dict."""
    if not sources:
        raise ConfigError("SOURCES", "name at least one source", "e.g. lathe data prepare lathe_corpus --output data/prep")
    if docs_per_shard < 1:
        raise ConfigError("--docs-per-shard", "must be >= 1", "e.g. 1000000", docs_per_shard)
    workers = _cpu_count() if workers is None else int(workers)
    if workers < 0:
        raise ConfigError("--workers", "must be >= 0", "0 = tokenize in this process; default: one per CPU", workers)
    task, tasks = parse_shard(shard)
    specs = [parse_source(s, config) for s in sources]
    tok_path = resolve_tokenizer_file(tokenizer)
    try:
        tok = load_tokenizer(tok_path, tokenizer_type)
    except (FileNotFoundError, ValueError, ImportError) as e:
        raise ConfigError("--tokenizer", str(e), "point it at a tokenizer.json or tokenizer.model, or leave it out "
                          "for lathe's default tokenizer", str(tokenizer)) from None
    vocab = int(tok.vocab_size)
    if dtype == "auto":
        dt = token_dtype_for(vocab)
    else:
        dt = np.dtype(dtype)
        if np.iinfo(dt).max < vocab - 1:
            raise ConfigError("--dtype", f"{dt} cannot hold the tokenizer's {vocab:,} ids",
                              "use --dtype int32 (or auto)", dtype)
    out = Path(output).expanduser()
    plan = {
        "sources": [{"source": s, "kind": sp.kind, "path": sp.path, "config": sp.config} for s, sp in zip(sources, specs)],
        "text_field": text_field, "split": split,
        "tokenizer": tokenizer_identity(tok_path, tok),
        "dtype": dt.name, "megatron_dtype_code": CODE_OF[dt], "docs_per_shard": int(docs_per_shard),
    }
    complete = _check_output(out, plan)
    summary = {"output": str(out), "complete": complete, "splits": {}}
    if complete:
        summary["manifest"] = read_manifest(out)
        return summary
    cfg = _config_for(text_field, split)
    threads = 1 if workers > 0 else _cpu_count()
    run = {"docs_per_shard": int(docs_per_shard), "shard": (task, tasks), "dtype": dt.name, "workers": workers}
    bar = Progress(enabled=progress)
    pool = None
    try:
        if workers > 0:
            import multiprocessing as mp

            ctx = mp.get_context("fork" if sys.platform.startswith("linux") else "spawn")
            pool = ProcessPoolExecutor(workers, mp_context=ctx, initializer=_init_worker,
                                       initargs=(str(tok_path), tokenizer_type, text_field, dt.name, threads))
            # Start every worker now, before any reading thread exists in this process (fork).
            for f in [pool.submit(_warm_up) for _ in range(workers)]:
                f.result()
        else:
            _init_worker(str(tok_path), tokenizer_type, text_field, dt.name, threads)
        for sp_name in SPLITS:
            srcs = []
            for spec in specs:
                src = open_source(spec, sp_name, cfg)
                src.probe(spec.option)
                srcs.append(src)
            bar.split, bar.docs, bar.tokens, bar.start = sp_name, 0, 0, time.perf_counter()
            res = prepare_split(srcs, out / sp_name, run, pool, bar)
            bar.update(0, 0, force=True)
            summary["splits"][sp_name] = res
    finally:
        bar.close()
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
    missing = [(s, k) for s in SPLITS for k in range(summary["splits"][s].shards) if not _shard_done(out / s, k)]
    summary["missing_shards"] = len(missing)
    if not missing:
        summary["manifest"] = _write_manifest(out, plan)
        summary["complete"] = True
    return summary


def _report(summary: dict, workers: int) -> None:
    out = summary["output"]
    m = summary.get("manifest")
    for name, res in summary["splits"].items():
        if res.written:
            dt = max(res.seconds, 1e-9)
            print(f"{name}: wrote {res.written} shard(s): {res.documents:,} documents, {res.tokens:,} tokens in "
                  f"{res.seconds:.1f} s ({res.documents / dt:,.0f} documents/s, {res.tokens / dt:,.0f} tokens/s, "
                  f"{workers} worker(s))" + (f"; skipped {res.skipped} undecodable records" if res.skipped else ""))
    if m is not None:
        size = sum((Path(out) / f"{s['prefix']}{ext}").stat().st_size for sp in SPLITS
                   for s in m["splits"][sp]["shards"] for ext in (".bin", ".idx"))
        parts = [f"{sp} {m['splits'][sp]['documents']:,} documents / {m['splits'][sp]['tokens']:,} tokens "
                 f"in {len(m['splits'][sp]['shards'])} shard(s)" for sp in SPLITS]
        print(f"prepared {out}: {'; '.join(parts)}; {m['dtype']}, {size / 1e6:,.1f} MB on disk"
              + (" (already complete: nothing to do)" if not any(r.written for r in summary["splits"].values()) else ""))
        print(f"train with: --training.dataset_path {out}")
    else:
        print(f"{out}: this task's shards are written; {summary['missing_shards']} shard(s) of other tasks are still "
              "missing (the task that finishes last writes manifest.json; or rerun without --shard)")


def info(path: str) -> int:
    """``lathe data info PATH``: what a prepared folder, Megatron prefix or flat token file holds."""
    from lathe.data.store import open_store

    p = Path(path).expanduser()
    manifest = read_manifest(p) if p.is_dir() else None
    if manifest is not None:
        t = manifest["tokenizer"]
        print(f"{path}: prepared by lathe {manifest['lathe_version']} from "
              f"{', '.join(s['source'] for s in manifest['sources'])}")
        print(f"  tokenizer {t['file']} ({t['type']}, {t['vocab_size']:,} ids, sha256 {t['sha256'][:16]}...), "
              f"tokens {manifest['dtype']}")
        for sp in SPLITS:
            s = manifest["splits"][sp]
            print(f"  {sp}: {s['documents']:,} documents, {s['tokens']:,} tokens, {len(s['shards'])} shard(s)"
                  + (f", {s['skipped_records']} undecodable records skipped" if s["skipped_records"] else ""))
        blend = " ".join(f"{s['tokens']} {p / s['prefix']}" for s in manifest["splits"]["train"]["shards"])
        print(f"  Megatron: --data-path {blend}")
        return 0
    store = open_store(path, "train", "PATH", "auto", separate=True)
    print(f"{path}: {store.num_documents:,} documents, {store.num_tokens:,} tokens in {len(store.files)} file(s)")
    for f in store.all_files:
        print(f"  {f!r}")
    store.close()
    return 0


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="lathe data", description="tokenized datasets")
    sub = parser.add_subparsers(dest="action", required=True)
    p = sub.add_parser("prepare", help="tokenize sources once into Megatron .bin/.idx shards",
                       description="Tokenize SOURCES (as training reads them) into Megatron indexed shards in --output.")
    p.add_argument("sources", nargs="+", metavar="SOURCES",
                   help="lathe_corpus, files/folders/globs, c4, fineweb, fineweb_edu, or org/name[:config]")
    p.add_argument("--output", required=True, help="folder to write (created; a stopped run continues in it)")
    p.add_argument("--tokenizer", default=None, help="tokenizer file or folder (default: lathe's default tokenizer)")
    p.add_argument("--tokenizer-type", default="auto", choices=("auto", "huggingface", "tiktoken", "sentencepiece"))
    p.add_argument("--text-field", default="text", help="record field holding the text (as training.dataset_text_field)")
    p.add_argument("--config", default=None, help="Hugging Face dataset config (as training.dataset_config)")
    p.add_argument("--split", default="train", help="Hugging Face split to prepare (as training.dataset_split)")
    p.add_argument("--workers", type=int, default=None, help="tokenizing processes (default: one per CPU; 0: inline)")
    p.add_argument("--shard", default=None, help="i/n: prepare only this task's shards (Slurm arrays, several nodes)")
    p.add_argument("--docs-per-shard", type=int, default=DEFAULT_DOCS_PER_SHARD,
                   help="records per output shard (the unit of resuming and of --shard)")
    p.add_argument("--dtype", default="auto", choices=("auto", "uint16", "int32"),
                   help="token dtype (auto: uint16 if the vocabulary fits, else int32)")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress line on stderr")
    i = sub.add_parser("info", help="describe a prepared folder, Megatron prefix or flat token file")
    i.add_argument("path")
    args = parser.parse_args(argv)
    from lathe.cli import setup_logging

    setup_logging()
    if args.action == "info":
        return info(args.path)
    workers = _cpu_count() if args.workers is None else args.workers
    summary = prepare(args.sources, args.output, args.tokenizer, args.tokenizer_type, args.text_field, args.config,
                      args.split, workers, args.shard, args.docs_per_shard, args.dtype, args.progress)
    _report(summary, workers)
    return 0
