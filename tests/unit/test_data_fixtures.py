"""Shared helpers for the data tests (no tests here): small tokenizer files and datasets made on
the fly in temporary folders, so the tests need no network and no large committed files."""

from __future__ import annotations

import base64
import collections
import json
import random
from pathlib import Path

import torch

from lathe.config import load_config

WORDS = ["the", "model", "learns", "to", "predict", "next", "token", "über", "数据", "🙂", "\n", "x=1;",
         "gradient", "batch", "sequence"]


def make_docs(n: int, seed: int = 0, max_words: int = 60, prefix: str = "doc") -> list[str]:
    """Synthetic documents of varied length (some shorter, many longer than a small window)."""
    rng = random.Random(seed)
    return [f"{prefix} {i}: " + " ".join(rng.choice(WORDS) for _ in range(rng.randint(0, max_words)))
            for i in range(n)]


def write_jsonl(path: Path, docs: list[str], field: str = "text", extra: dict | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        f.writelines(json.dumps({field: d, **(extra or {})}, ensure_ascii=False) + "\n" for d in docs)
    return path


def write_parquet(path: Path, docs: list[str], field: str = "text") -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({field: docs, "id": list(range(len(docs)))}), path, row_group_size=7)
    return path


def write_tiktoken_file(path: Path, texts: list[str], n_merges: int = 60) -> Path:
    """A tiny tiktoken BPE file in the Llama 3 format: all 256 bytes, then ``n_merges`` merges
    learned by plain byte-pair encoding on ``texts`` (pieces split on spaces)."""
    ranks = {bytes([i]): i for i in range(256)}
    words = [[bytes([b]) for b in w.encode("utf-8")] for t in texts for w in t.split(" ") if w]
    for _ in range(n_merges):
        pairs = collections.Counter(p for w in words for p in zip(w, w[1:]))
        if not pairs:
            break
        (a, b), _ = max(pairs.items(), key=lambda kv: (kv[1], kv[0]))
        ranks[a + b] = len(ranks)
        merged = []
        for w in words:
            out, i = [], 0
            while i < len(w):
                if i + 1 < len(w) and w[i] == a and w[i + 1] == b:
                    out.append(a + b)
                    i += 2
                else:
                    out.append(w[i])
                    i += 1
            merged.append(out)
        words = merged
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(f"{base64.b64encode(t).decode()} {r}\n" for t, r in ranks.items()))
    return path


def train_sentencepiece(prefix: Path, texts: list[str], vocab_size: int = 320) -> Path:
    """A tiny Llama-2-style SentencePiece BPE model (byte fallback, BOS 1, EOS 2, no pad)."""
    import sentencepiece as spm

    prefix.parent.mkdir(parents=True, exist_ok=True)
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(texts), model_prefix=str(prefix), vocab_size=vocab_size, model_type="bpe",
        byte_fallback=True, normalization_rule_name="identity", remove_extra_whitespaces=False,
        add_dummy_prefix=False, character_coverage=1.0, unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
        minloglevel=2, num_threads=1)
    return Path(f"{prefix}.model")


def cfg_for(*argv: str):
    cfg, _ = load_config(list(argv))
    return cfg


def windows_of(batch) -> list[list[int]]:
    """Rebuild each full window (seq_len + 1 tokens) from an (inputs, labels, ...) batch."""
    inputs, labels = batch[0], batch[1]
    assert torch.equal(inputs[:, 1:], labels[:, :-1])  # labels are inputs shifted by one
    return torch.cat([inputs, labels[:, -1:]], dim=1).tolist()
