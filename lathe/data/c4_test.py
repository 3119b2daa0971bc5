"""``c4_test``: a small local sample in C4's record format, for configs that name it.

torchtitan's debug configs train on ``c4_test``, the first 2,000 records of C4 shipped in its
repository. lathe does not ship C4 text; the name resolves instead to the first 2,000 records cut
from lathe's embedded corpus (`lathe.data.corpus`, built from the Python standard library, so it
exists on every machine), written as C4 writes its JSON lines: ``{"text", "timestamp", "url"}``.
A debug config naming ``c4_test`` therefore trains offline, unchanged, as it did in torchtitan.

Records are about the size of a C4 web page: each corpus document is cut at blank lines into
pieces of at least ``RECORD_CHARS`` characters. The file is deterministic for a given Python
version and is built once into the corpus cache (``c4_test/c4_test.jsonl`` next to it).
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

NUM_RECORDS = 2000
RECORD_CHARS = 2000
TIMESTAMP = "2019-04-25T12:00:00Z"  # C4's records carry their crawl time; a fixed one here


def _records(documents) -> list[dict]:
    out = []
    for doc_index, text in enumerate(documents):
        piece: list[str] = []
        for paragraph in text.split("\n\n"):
            piece.append(paragraph)
            if sum(len(p) for p in piece) >= RECORD_CHARS:
                out.append("\n\n".join(piece))
                piece = []
        if piece:
            out.append("\n\n".join(piece))
        if len(out) >= NUM_RECORDS:
            break
    return [{"text": t, "timestamp": TIMESTAMP, "url": f"lathe-corpus://train/{i}"}
            for i, t in enumerate(out[:NUM_RECORDS])]


def c4_test_path(cache_dir: str | Path | None = None) -> Path:
    """The c4_test folder (built on first use); a local dataset folder holding one JSON-lines file."""
    from lathe.data.corpus import build_corpus, iter_documents

    corpus = build_corpus(cache_dir)
    folder = corpus.root / "c4_test"
    target = folder / "c4_test.jsonl"
    if target.is_file():
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    lines = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in _records(iter_documents(corpus.train)))
    # written whole, then renamed: ranks building it at the same time write identical bytes
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".c4_test.", suffix=".tmp")
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(lines)
    os.replace(tmp, target)
    return folder
