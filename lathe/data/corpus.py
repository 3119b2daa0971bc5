"""An embedded default corpus that needs no download.

Every machine that can run lathe has a Python installation, and every Python installation ships
its standard library as source: a few MB of English prose (docstrings) mixed with well-written
code. That is enough text to train a small tokenizer and a tiny model end to end, offline, which
is exactly what a first run, a CI job or a classroom needs.

`build_corpus()` turns the standard library into two JSON-lines files, one document per module::

    {"text": "Module json.decoder\n\nImplementation of JSONDecoder\n\nclass JSONDecoder ..."}

The build is deterministic: the same Python version yields byte-identical files (recorded, with a
content hash, in ``manifest.json``). Modules are parsed with `ast`, never imported, so building
the corpus runs no standard-library code and has no side effects.
"""

from __future__ import annotations

import ast
import hashlib
import importlib.util
import json
import os
import shutil
import sys
import sysconfig
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

# Bump when the text format changes so that caches built by an older lathe are rebuilt.
CORPUS_FORMAT_VERSION = 1

# Directories (any path component) that are skipped: test suites (huge, repetitive, and full of
# deliberately odd code), bundled applications, third-party packages, and byte-code caches.
_EXCLUDED_DIRS = frozenset(
    {
        "test",
        "tests",
        "idle_test",
        "idlelib",
        "lib2to3",
        "turtledemo",
        "site-packages",
        "dist-packages",
        "__pycache__",
        # The codec modules are mostly 256-entry character tables: noise, not language.
        "encodings",
    }
)

# Files whose content depends on the machine that built Python (compiler flags, install paths),
# not only on the Python version: including them would break "same version -> same corpus".
_EXCLUDED_FILE_PREFIXES = ("_sysconfigdata",)

# Validation split: about 1% of the modules, but never fewer than this many documents, so that
# validation loss is not dominated by one or two modules.
_VALIDATION_FRACTION = 0.01
_MIN_VALIDATION_DOCS = 20


@dataclass(frozen=True)
class CorpusPaths:
    """Where a built corpus lives."""

    train: Path
    validation: Path
    root: Path

    @property
    def manifest(self) -> Path:
        return self.root / "manifest.json"


def default_cache_dir() -> Path:
    """The directory the default corpus is cached in.

    ``$LATHE_CACHE_DIR`` (the root of all of lathe's caches) if set, else ``$XDG_CACHE_HOME/lathe``
    or ``~/.cache/lathe``; the corpus goes into ``corpus/py{major}.{minor}`` below it, because a
    different Python version has a different standard library and so a different corpus.
    """
    if os.environ.get("LATHE_CACHE_DIR"):
        base = Path(os.environ["LATHE_CACHE_DIR"]).expanduser()
    else:
        xdg = os.environ.get("XDG_CACHE_HOME")
        base = (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "lathe"
    return base / "corpus" / f"py{sys.version_info.major}.{sys.version_info.minor}"


def build_corpus(cache_dir: str | Path | None = None, max_files: int | None = None) -> CorpusPaths:
    """Build (or reuse) the standard-library corpus and return the paths of its splits.

    Args:
        cache_dir: the directory that will hold ``train.jsonl``, ``validation.jsonl`` and
            ``manifest.json``. Defaults to `default_cache_dir()`.
        max_files: only use the first N source files (in sorted order); for fast tests.

    A complete corpus is recognised by its manifest; anything else in the directory is rebuilt.
    Files are written to a temporary directory first and moved into place with `os.replace`,
    manifest last, so a crash mid-build never leaves something that looks complete. Because the
    output is deterministic, several processes (e.g. the ranks of one machine) may build into the
    same directory at the same time: they write identical bytes.
    """
    root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    paths = CorpusPaths(train=root / "train.jsonl", validation=root / "validation.jsonl", root=root)
    expected = _manifest_key(max_files)
    if _is_complete(paths, expected):
        return paths

    root.mkdir(parents=True, exist_ok=True)
    # A stale or foreign manifest must disappear *before* the data files change underneath it.
    paths.manifest.unlink(missing_ok=True)

    stdlib = Path(sysconfig.get_paths()["stdlib"])
    files = _list_source_files(stdlib)
    if max_files is not None:
        files = files[:max_files]

    docs: list[tuple[str, str]] = []  # (relative path, document text)
    from lathe.metrics.progress import Progress  # late import: the corpus module stays light

    with Progress("building the lathe_corpus from the Python standard library", len(files), "files") as progress:
        for rel in files:
            text = _module_document(stdlib, rel)
            if text is not None:
                docs.append((rel, text))
            progress.update()
    if not docs:
        raise RuntimeError(f"no usable Python source files found under {stdlib}")
    train_docs, val_docs = _split(docs)

    tmp = Path(tempfile.mkdtemp(prefix=".build-", dir=root))
    try:
        train_bytes = _write_jsonl(tmp / "train.jsonl", train_docs)
        val_bytes = _write_jsonl(tmp / "validation.jsonl", val_docs)
        digest = hashlib.sha256()
        digest.update(train_bytes)
        digest.update(val_bytes)
        manifest = {
            **expected,
            "python_version_full": sys.version,
            "stdlib": str(stdlib),
            "num_source_files": len(files),
            "num_documents": {"train": len(train_docs), "validation": len(val_docs)},
            "num_bytes": {"train": len(train_bytes), "validation": len(val_bytes)},
            "sha256": digest.hexdigest(),
        }
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
        os.replace(tmp / "train.jsonl", paths.train)
        os.replace(tmp / "validation.jsonl", paths.validation)
        os.replace(tmp / "manifest.json", paths.manifest)  # last: marks the corpus complete
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return paths


def iter_documents(path: str | Path) -> Iterator[str]:
    """Yield the ``text`` field of every line of a JSON-lines file, in file order."""
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                yield json.loads(line)["text"]


# --------------------------------------------------------------------------------------------
# Internals
# --------------------------------------------------------------------------------------------


def _manifest_key(max_files: int | None) -> dict:
    """The manifest fields that must match for a cached corpus to be reused."""
    return {
        "format_version": CORPUS_FORMAT_VERSION,
        "python_version": ".".join(map(str, sys.version_info[:3])),
        "max_files": max_files,
    }


def _is_complete(paths: CorpusPaths, expected: dict) -> bool:
    try:
        manifest = json.loads(paths.manifest.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    if any(manifest.get(k) != v for k, v in expected.items()):
        return False
    # A cheap integrity check (sizes, not the hash: hashing is left to anyone who wants it).
    try:
        return (
            paths.train.stat().st_size == manifest["num_bytes"]["train"]
            and paths.validation.stat().st_size == manifest["num_bytes"]["validation"]
        )
    except (OSError, KeyError, TypeError):
        return False


def _list_source_files(stdlib: Path) -> list[str]:
    """All ``.py`` files of the standard library, as sorted POSIX-style relative paths."""
    found = []
    # os.walk lets us prune excluded directories (site-packages can be huge) instead of
    # walking them and filtering afterwards.
    for dirpath, dirnames, filenames in os.walk(stdlib):
        dirnames[:] = [d for d in dirnames if d not in _EXCLUDED_DIRS]
        for name in filenames:
            if name.endswith(".py") and not name.startswith(_EXCLUDED_FILE_PREFIXES):
                found.append((Path(dirpath) / name).relative_to(stdlib).as_posix())
    # Sorting makes the corpus independent of the directory order the file system returns.
    return sorted(found)


def _module_name(rel: str) -> str:
    parts = rel[: -len(".py")].split("/")
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts) or rel


def _module_document(stdlib: Path, rel: str) -> str | None:
    """One document for one module: its docstrings as prose, then its source.

    The docstrings come first, gathered into a readable summary (the kind of text you would see
    in ``help(module)``); the full source follows so the model also sees real code.
    """
    try:
        # decode_source honours PEP 263 coding cookies and normalises newlines, like import does.
        source = importlib.util.decode_source((stdlib / rel).read_bytes())
        tree = ast.parse(source, filename=rel)
    except (SyntaxError, UnicodeDecodeError, ValueError, OSError):
        return None  # e.g. deliberately broken files; skipping them keeps the build robust

    lines = [f"Module {_module_name(rel)}"]
    module_doc = ast.get_docstring(tree)
    if module_doc:
        lines += ["", module_doc]
    for qualname, node in _definitions(tree):
        doc = ast.get_docstring(node)
        if not doc:
            continue
        if isinstance(node, ast.ClassDef):
            header = f"class {qualname}"
        else:
            prefix = "async def" if isinstance(node, ast.AsyncFunctionDef) else "def"
            header = f"{prefix} {qualname}({ast.unparse(node.args)})"
        lines += ["", header, _indent(doc)]
    lines += ["", f"Source of {rel}:", "", source.rstrip("\n")]
    return "\n".join(lines) + "\n"


def _definitions(tree: ast.AST, prefix: str = "") -> Iterator[tuple[str, ast.AST]]:
    """Classes and functions in source order, with dotted names (``Class.method``).

    Functions nested inside functions are skipped: they are implementation details, rarely
    documented, and their dotted names would be misleading.
    """
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            qualname = f"{prefix}{node.name}"
            yield qualname, node
            if isinstance(node, ast.ClassDef):
                yield from _definitions(node, prefix=f"{qualname}.")


def _indent(text: str) -> str:
    return "\n".join(("    " + line) if line else "" for line in text.splitlines())


def _path_hash(rel: str) -> str:
    return hashlib.sha256(rel.encode("utf-8")).hexdigest()


def _split(docs: list[tuple[str, str]]) -> tuple[list[str], list[str]]:
    """Deterministically split documents into (train, validation) by a hash of their path.

    The documents with the smallest path hashes go to validation. Hashing the *path* (not the
    text) keeps a module on the same side of the split across small edits to its content.

    Both splits are written in hash order rather than path order: a deterministic shuffle, so
    that a training run does not read, say, all of ``email/`` in one long stretch.
    """
    shuffled = sorted(docs, key=lambda d: _path_hash(d[0]))
    n_val = max(_MIN_VALIDATION_DOCS, round(_VALIDATION_FRACTION * len(docs)))
    n_val = min(n_val, len(docs) // 2)  # tiny corpora (max_files) keep at least half for training
    val = [text for _, text in shuffled[:n_val]]
    train = [text for _, text in shuffled[n_val:]]
    return train, val


def _write_jsonl(path: Path, texts: list[str]) -> bytes:
    """Write one ``{"text": ...}`` object per line and return the bytes written."""
    # json.dumps escapes every control character (including "\n" and "\r"), so a document can
    # never span two lines. ensure_ascii=False keeps non-ASCII text readable in the file.
    data = "".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in texts).encode("utf-8")
    path.write_bytes(data)
    return data
