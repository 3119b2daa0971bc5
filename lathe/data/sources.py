"""Where documents come from: the embedded corpus, local files, Hugging Face datasets.

A *source* is one split of one dataset, read as a finite sequence of *records* in a fixed order:
``Source.records(start)`` yields the records from index ``start`` on, each either the document
text (a ``str``) or a `BadRecord` saying why that record could not be used. The order never
depends on the machine, the number of ranks or the time of day, which is what lets
`lathe.data.stream` define an exact, elastic global stream on top of it.

Sources
-------
``lathe_corpus``
    The embedded default corpus (`lathe.data.corpus`): ``train.jsonl`` / ``validation.jsonl``.
``c4_test``
    torchtitan's debug dataset name: 2,000 C4-format records cut from the embedded corpus
    (`lathe.data.c4_test`), read as local files.
Local files (`LocalSource`)
    A file, a folder (searched recursively, hidden entries skipped) or a glob, of ``.jsonl``,
    ``.json`` (JSON lines, or one JSON array of records), ``.parquet`` and ``.txt`` files, each
    optionally gzip-compressed (``.jsonl.gz`` ...). Files are read in sorted order of their path
    relative to the dataset root; inside a file, in file order. A ``.txt`` file is one document;
    for the others the document is the record's ``training.dataset_text_field``.
Hugging Face datasets (`HFSource`)
    ``datasets.load_dataset(path, name=config, split=split, streaming=True)``; the preset names
    ``c4`` (allenai/c4, config en), ``fineweb`` (HuggingFaceFW/fineweb) and ``fineweb_edu``
    (HuggingFaceFW/fineweb-edu), or any other Hub id / local dataset directory.

The held-out (validation) split of a source
-------------------------------------------
* ``lathe_corpus``: its ``validation.jsonl``.
* local files: the files whose path names them as validation data (a path component or file
  name word ``validation``, ``valid`` or ``val``, as in ``validation.jsonl``,
  ``val/part-0.parquet`` or ``c4-validation.00000-of-00008.json.gz``) when the dataset also has
  other files; otherwise a deterministic ~1% of the records chosen by a hash of (file path
  relative to the dataset root, record number). Training never sees held-out records, whether or
  not validation is enabled, so switching validation on or off never changes the training data.
* Hugging Face: the dataset's ``validation`` split if it has one (C4 does); otherwise (FineWeb)
  the same hash-based ~1% of its train split.

Problems that can be seen before training (missing files, unsupported files, an empty dataset,
a missing text field, text that is not UTF-8, an unreachable Hub) raise `ConfigError`;
`check_data_config` does the cheap ones (called from `lathe.config.validate`) and `probe` the
ones that need to read a few records (called when the data is built, before the first step).
"""

from __future__ import annotations

import glob
import gzip
import hashlib
import json
import logging
import math
import os
import re
import zlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import Any

from lathe.errors import ConfigError

logger = logging.getLogger("lathe")

# Hugging Face presets: name -> (hub path, default config, has a "validation" split).
HF_PRESETS: dict[str, tuple[str, str | None, bool]] = {
    "c4": ("allenai/c4", "en", True),
    "fineweb": ("HuggingFaceFW/fineweb", None, False),
    "fineweb_edu": ("HuggingFaceFW/fineweb-edu", None, False),
}
CORPUS_NAME = "lathe_corpus"
C4_TEST_NAME = "c4_test"
# Accepted values of training.dataset besides the presets; any other value is a local path if it
# exists, a Hugging Face Hub id if it contains a "/", and an error otherwise.
GENERIC_NAMES = ("local", "huggingface")

SUFFIXES = (".jsonl", ".json", ".parquet", ".txt")
_COMPRESSED = (".gz",)
HELDOUT_FRACTION = 0.01
_VALIDATION_WORDS = frozenset({"validation", "valid", "val"})
_GLOB_CHARS = re.compile(r"[*?\[]")
# How many records of each file `probe` reads, and how many files it looks at.
_PROBE_RECORDS = 4
_PROBE_FILES = 64


@dataclass(frozen=True)
class BadRecord:
    """A record that cannot be used as a document: where it is and why."""

    where: str
    reason: str


Record = "str | BadRecord"


class Source:
    """One split of one dataset: a finite, fixed-order sequence of records."""

    name: str = "source"

    def records(self, start: int = 0) -> Iterator[str | BadRecord]:
        """The records from index ``start`` on (skipping is cheaper than decoding)."""
        raise NotImplementedError

    def probe(self, option: str) -> None:
        """Raise ConfigError if the first records show the source cannot be used."""


class CallableSource(Source):
    """Adapter for a plain ``documents()`` callable returning a fresh iterable of texts."""

    def __init__(self, documents: Callable[[], Iterable[str]], name: str = "documents"):
        self.documents = documents
        self.name = name

    def records(self, start: int = 0) -> Iterator[str | BadRecord]:
        return islice(iter(self.documents()), start, None)


# ---------------------------------------------------------------------------------------------
# Held-out split
# ---------------------------------------------------------------------------------------------


def is_heldout(key: str, index: int) -> bool:
    """Whether record ``index`` of file ``key`` belongs to the ~1% hash-based held-out split."""
    digest = hashlib.blake2b(f"{key}\0{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") < HELDOUT_FRACTION * 2**64


def _is_validation_path(rel: str) -> bool:
    words = set()
    for part in Path(rel).parts:
        words.update(w for w in re.split(r"[^0-9a-zA-Z]+", part.lower()) if w)
    return bool(words & _VALIDATION_WORDS)


# ---------------------------------------------------------------------------------------------
# Local files
# ---------------------------------------------------------------------------------------------


def _base_suffix(path: Path | str) -> str:
    name = str(path).lower()
    for c in _COMPRESSED:
        name = name.removesuffix(c)
    return os.path.splitext(name)[1]


def is_supported_file(path: Path | str) -> bool:
    return _base_suffix(path) in SUFFIXES


def is_glob(path: str) -> bool:
    return bool(_GLOB_CHARS.search(path))


def list_local_files(path: str, option: str) -> list[tuple[Path, str]]:
    """(file, name relative to the dataset root) for every data file ``path`` denotes, sorted.

    Raises ConfigError when nothing usable is there.
    """
    p = Path(path).expanduser()
    if is_glob(path):
        root = Path(_glob_root(path)).expanduser()
        found = [Path(f) for f in glob.glob(str(p), recursive=True) if Path(f).is_file()]
        files = [(f, _rel(f, root)) for f in found if is_supported_file(f)]
        if not files:
            what = f"{len(found)} files, none of them " if found else "no files; "
            raise ConfigError(option, f"the pattern matches {what}with a supported extension",
                              f"use {', '.join(SUFFIXES)} files (optionally .gz)", path)
    elif p.is_file():
        if not is_supported_file(p):
            raise ConfigError(option, f"unsupported file type '{''.join(p.suffixes)}'",
                              f"use {', '.join(SUFFIXES)} (optionally .gz)", path)
        files = [(p, p.name)]
    elif p.is_dir():
        files = []
        for dirpath, dirnames, filenames in os.walk(p):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            for name in filenames:
                f = Path(dirpath) / name
                if not name.startswith(".") and is_supported_file(f):
                    files.append((f, _rel(f, p)))
        if not files:
            raise ConfigError(option, "folder holds no data files",
                              f"put {', '.join(SUFFIXES)} files (optionally .gz) in it, or point at them", path)
    else:
        raise ConfigError(option, "no such file or folder", "check the path (globs like data/*.jsonl work too)", path)
    return sorted(files, key=lambda x: x[1])


def _glob_root(pattern: str) -> str:
    parts = Path(pattern).parts
    fixed = []
    for part in parts:
        if is_glob(part):
            break
        fixed.append(part)
    return str(Path(*fixed)) if fixed else "."


def _rel(f: Path, root: Path) -> str:
    try:
        return f.resolve().relative_to(root.resolve()).as_posix()
    except ValueError:
        return f.as_posix()


def _open_binary(path: Path):
    if str(path).lower().endswith(".gz"):
        return gzip.open(path, "rb")
    return open(path, "rb")


class LocalSource(Source):
    """Local files, read in order; optionally only the records in (or not in) the held-out split.

    Args:
        files: (path, key) pairs, in reading order; the key (the path relative to the dataset
            root) names records in messages and seeds the held-out hash.
        text_field: the record field holding the text (not used for .txt files).
        heldout: None = every record; "exclude" = the records not in the hash held-out split;
            "only" = just those.
    """

    def __init__(self, files: Sequence[tuple[Path, str]], text_field: str = "text",
                 heldout: str | None = None, name: str = "local"):
        if heldout not in (None, "exclude", "only"):
            raise ValueError(f"heldout must be None, 'exclude' or 'only', got {heldout!r}")
        self.files = [(Path(f), k) for f, k in files]
        self.text_field = text_field
        self.heldout = heldout
        self.name = name

    # Each reader yields raw items cheaply; `_decode` turns one into a Record. Skipping on
    # resume only iterates raw items, it never parses them.
    def _raw(self, path: Path) -> Iterator[Any]:
        """Like ``_raw_items``; a file that cannot be read to its end (a truncated ``.gz``, a
        damaged compressed stream, an I/O error) ends with one bad item, so its remaining records
        are skipped with a warning like undecodable lines, at the same point on every rank."""
        try:
            yield from self._raw_items(path)
        except (EOFError, OSError, zlib.error) as e:
            yield ("bad", f"cannot read the file past this point ({type(e).__name__}: {e}); the rest of it is skipped")

    def _raw_items(self, path: Path) -> Iterator[Any]:
        kind = _base_suffix(path)
        if kind == ".txt":
            with _open_binary(path) as f:
                yield ("txt", f.read())
        elif kind == ".parquet":
            yield from self._parquet_values(path)
        elif kind == ".json" and self._is_json_array(path):
            with _open_binary(path) as f:
                data = f.read()
            try:
                items = json.loads(data.decode("utf-8"))
            except UnicodeDecodeError as e:
                yield ("bad", f"not valid UTF-8 (byte {e.start} of the file)")
                return
            except ValueError as e:
                yield ("bad", f"invalid JSON: {e}")
                return
            for item in items if isinstance(items, list) else [items]:
                yield ("obj", item)
        else:  # .jsonl, or .json holding JSON lines
            with _open_binary(path) as f:
                for lineno, line in enumerate(f, 1):
                    if line.strip():
                        yield ("line", line, lineno)

    @staticmethod
    def _is_json_array(path: Path) -> bool:
        with _open_binary(path) as f:
            head = f.read(1024).lstrip()
        return head.startswith(b"[")

    def _parquet_values(self, path: Path) -> Iterator[Any]:
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise ConfigError("training.dataset_path", f"reading {path.name} needs pyarrow",
                              "pip install 'lathe[hf]' (or: pip install pyarrow)") from None
        try:
            pf = pq.ParquetFile(path)
            names = pf.schema_arrow.names
        except Exception as e:  # pyarrow's ArrowInvalid & co: not a parquet file, or damaged
            yield ("bad", f"not a readable parquet file ({type(e).__name__}: {' '.join(str(e).split())[:200]})")
            return
        if self.text_field not in names:
            yield ("bad", f"no column '{self.text_field}' (columns: {', '.join(names)})")
            return
        try:
            for batch in pf.iter_batches(columns=[self.text_field], batch_size=1024):
                for value in batch.column(0).to_pylist():
                    yield ("obj_text", value)
        except (OSError, ValueError) as e:  # a damaged row group; ArrowInvalid is a ValueError
            yield ("bad", f"damaged parquet data ({type(e).__name__}: {' '.join(str(e).split())[:200]}); "
                          "the rest of the file is skipped")

    def _decode(self, raw: Any, where: str) -> str | BadRecord:
        kind = raw[0]
        if kind == "bad":
            return BadRecord(where, raw[1])
        if kind == "txt":
            try:
                return raw[1].decode("utf-8")
            except UnicodeDecodeError as e:
                return BadRecord(where, f"not valid UTF-8 (byte {e.start})")
        if kind == "line":
            where = f"{where}:{raw[2]}"
            try:
                text = raw[1].decode("utf-8")
            except UnicodeDecodeError as e:
                return BadRecord(where, f"not valid UTF-8 (byte {e.start} of the line)")
            try:
                obj = json.loads(text)
            except ValueError as e:
                return BadRecord(where, f"invalid JSON: {e}")
            return self._field(obj, where)
        if kind == "obj":
            return self._field(raw[1], where)
        value = raw[1]  # obj_text: a parquet cell
        if not isinstance(value, str):
            return BadRecord(where, f"field '{self.text_field}' is {type(value).__name__}, not text")
        return value

    def _field(self, obj: Any, where: str) -> str | BadRecord:
        if not isinstance(obj, dict):
            return BadRecord(where, f"record is a JSON {type(obj).__name__}, not an object")
        if self.text_field not in obj:
            fields = ", ".join(list(obj)[:12]) or "none"
            return BadRecord(where, f"no field '{self.text_field}' (fields: {fields})")
        value = obj[self.text_field]
        if not isinstance(value, str):
            return BadRecord(where, f"field '{self.text_field}' is {type(value).__name__}, not text")
        return value

    def _keyed(self) -> Iterator[tuple[str, int, Any]]:
        """(file key, record number in file, raw item) of every record, honouring `heldout`."""
        for path, key in self.files:
            for i, raw in enumerate(self._raw(path)):
                if self.heldout is not None and (is_heldout(key, i) == (self.heldout == "exclude")):
                    continue
                yield key, i, raw

    def records(self, start: int = 0) -> Iterator[str | BadRecord]:
        for key, i, raw in islice(self._keyed(), start, None):
            yield self._decode(raw, key)

    def probe(self, option: str) -> None:
        total, kept, whole = 0, 0, len(self.files) <= _PROBE_FILES
        for path, key in self.files[:_PROBE_FILES]:
            try:
                first = [self._decode(raw, key) for raw in islice(self._raw(path), _PROBE_RECORDS)]
            except OSError as e:
                raise ConfigError(option, f"cannot read {path}: {e}", "check the file and its permissions") from None
            total += len(first)
            whole = whole and len(first) < _PROBE_RECORDS  # the probe saw every record of the file
            kept += sum(self.heldout != "exclude" or not is_heldout(key, i) for i in range(len(first)))
            if first and all(isinstance(r, BadRecord) for r in first):
                raise _bad_record_error(option, first[0], self.text_field)
            _check_not_all_empty(first, option, key)
        if total == 0:
            if len(self.files) > _PROBE_FILES:
                return  # the first files are empty; later ones are checked while streaming
            names = ", ".join(k for _, k in self.files[:5])
            raise ConfigError(option, f"empty dataset: no records in {names}", "point it at files with documents")
        if whole and kept == 0:  # a tiny dataset whose every record is in the held-out split
            names = ", ".join(k for _, k in self.files[:5])
            raise ConfigError(option, f"no training documents: the {total} record(s) of {names} all fall in the ~1% "
                              "held out for validation (chosen by a hash of file name and record number)",
                              "add documents, or keep validation data in its own file next to the training files "
                              "(named like validation.jsonl): then nothing is held out")


def _bad_record_error(option: str, bad: BadRecord, text_field: str) -> ConfigError:
    if f"no field '{text_field}'" in bad.reason or f"no column '{text_field}'" in bad.reason:
        return ConfigError("training.dataset_text_field", f"{bad.where}: {bad.reason}",
                           "set --training.dataset_text_field to the field that holds the text", text_field)
    if "UTF-8" in bad.reason:
        return ConfigError(option, f"{bad.where}: {bad.reason}",
                           "convert the file to UTF-8 (e.g. iconv -f latin1 -t utf-8)")
    return ConfigError(option, f"{bad.where}: {bad.reason}", "fix or remove the file")


# ---------------------------------------------------------------------------------------------
# Hugging Face datasets
# ---------------------------------------------------------------------------------------------


def hub_error(option: str, path: str, config: str | None, split: str, e: BaseException) -> ConfigError:
    """A ConfigError for a dataset that could not be loaded from the Hub (offline, gated ...)."""
    what = f"Hugging Face dataset '{path}'" + (f" (config {config})" if config else "") + f" split '{split}'"
    text = f"{type(e).__name__}: {e}"
    low = text.lower()
    if "gated" in low or "401" in low or "403" in low or "unauthorized" in low:
        fix = "accept the dataset's terms on huggingface.co and log in (hf auth login) or set HF_TOKEN"
    elif "offline" in low or "connection" in low or "couldn't reach" in low or "resolve" in low:
        fix = ("needs internet access to huggingface.co (unset HF_HUB_OFFLINE); offline, use local files: "
               "--training.dataset_path /path/to/files")
    elif "split" in low:
        fix = "check --training.dataset_split (and validation.dataset for the held-out split)"
    elif "config" in low or "name" in low:
        fix = "check --training.dataset_config"
    else:
        fix = "check the dataset name, config and your connection"
    return ConfigError(option, f"cannot load {what}: {text[:300]}", fix)


class HFSource(Source):
    """A Hugging Face dataset split, streamed (``datasets.load_dataset(..., streaming=True)``).

    ``heldout`` works as in `LocalSource`, by a hash of the record number within the split.
    """

    def __init__(self, path: str, config: str | None, split: str, text_field: str = "text",
                 heldout: str | None = None, name: str | None = None, option: str = "training.dataset"):
        self.path, self.config, self.split = path, config, split
        self.text_field = text_field
        self.heldout = heldout
        self.name = name or path
        self.option = option

    def _load(self):
        try:
            import datasets
        except ImportError:
            raise ConfigError(self.option, "Hugging Face datasets need the datasets package",
                              "pip install 'lathe[hf]' (or: pip install datasets)") from None
        try:
            return datasets.load_dataset(self.path, name=self.config, split=self.split, streaming=True)
        except ConfigError:
            raise
        except Exception as e:  # network, auth, unknown config/split: all told the same way
            raise hub_error(self.option, self.path, self.config, self.split, e) from e

    def records(self, start: int = 0) -> Iterator[str | BadRecord]:
        ds = self._load()
        key = f"{self.path}/{self.config or ''}/{self.split}"
        if self.heldout is None:
            if start:
                ds = ds.skip(start)
            for i, row in enumerate(ds, start):
                yield self._text(row, f"{self.name}[{i}]")
            return
        drop = self.heldout == "exclude"  # drop the held-out records, or keep only them
        # Which raw record is kept record number `start` depends only on the hash of the record
        # numbers, so it is found without reading (streaming) the records before it.
        first, kept = 0, 0
        while kept < start:
            if is_heldout(key, first) != drop:
                kept += 1
            first += 1
        if first:
            ds = ds.skip(first)
        for i, row in enumerate(ds, first):
            if is_heldout(key, i) == drop:
                continue
            yield self._text(row, f"{self.name}[{i}]")

    def _text(self, row: Any, where: str) -> str | BadRecord:
        if not isinstance(row, dict) or self.text_field not in row:
            fields = ", ".join(list(row)[:12]) if isinstance(row, dict) else type(row).__name__
            return BadRecord(where, f"no field '{self.text_field}' (fields: {fields})")
        value = row[self.text_field]
        if not isinstance(value, str):
            return BadRecord(where, f"field '{self.text_field}' is {type(value).__name__}, not text")
        return value

    def probe(self, option: str) -> None:
        first = list(islice(self.records(0), _PROBE_RECORDS)) if self.heldout is None else \
            list(islice(HFSource(self.path, self.config, self.split, self.text_field, None, self.name,
                                 self.option).records(0), _PROBE_RECORDS))
        if not first:
            raise ConfigError(option, f"empty dataset: {self.name} split '{self.split}' has no records",
                              "check the dataset name, config and split")
        if all(isinstance(r, BadRecord) for r in first):
            raise _bad_record_error(option, first[0], self.text_field)
        _check_not_all_empty(first, option, self.name)


def _check_not_all_empty(first: list, option: str, where: str) -> None:
    """Documents that are all empty would train on BOS/EOS tokens alone."""
    texts = [r for r in first if isinstance(r, str)]
    if texts and not any(t.strip() for t in texts):
        raise ConfigError(option, f"the first {len(texts)} documents of {where} are all empty",
                          "check the files and training.dataset_text_field (it names the field holding the text)")


def hf_split_names(path: str, config: str | None, option: str) -> list[str]:
    try:
        import datasets
    except ImportError:
        raise ConfigError(option, "Hugging Face datasets need the datasets package",
                          "pip install 'lathe[hf]' (or: pip install datasets)") from None
    try:
        return list(datasets.get_dataset_split_names(path, config_name=config))
    except Exception as e:
        raise hub_error(option, path, config, "(split list)", e) from e


# ---------------------------------------------------------------------------------------------
# Source specifications (what the config names) and opening them
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SourceSpec:
    """One dataset named by the config, not yet opened.

    kind: "corpus" (path = cache folder or None), "local" (path = file/folder/glob), "tokens"
    (tokenized data, `lathe.data.store`) or "hf" (path = Hub id or dataset folder, config = its
    config name, has_validation known for presets).
    """

    kind: str
    path: str | None
    config: str | None = None
    label: str = ""
    option: str = "training.dataset"
    has_validation: bool | None = None


def _corpus_dir_is_cache(path: Path) -> bool:
    """A lathe corpus cache folder. An empty folder is not one: it is the user's (empty) data
    folder, an error, and lathe never writes into it."""
    if (path / "manifest.json").is_file():
        try:
            return "format_version" in json.loads((path / "manifest.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return False
    return False


def resolve_spec(name: str, path: str | None, config: str | None, option: str) -> SourceSpec:
    """What ``training.dataset`` = name (with dataset_path, dataset_config) means."""
    if name == CORPUS_NAME:
        if path is None:
            return SourceSpec("corpus", None, label=CORPUS_NAME, option=option)
        p = Path(path).expanduser()
        if p.is_dir() and _corpus_dir_is_cache(p):
            return SourceSpec("corpus", path, label=CORPUS_NAME, option=option)
        # Anything else given as a path is the user's own files (`--training.dataset_path data/`
        # works without also naming a dataset).
        return _path_spec(path, "training.dataset_path")
    if name in HF_PRESETS:
        hub, default_config, has_val = HF_PRESETS[name]
        return SourceSpec("hf", path or hub, config if config is not None else default_config, label=name,
                          option=option, has_validation=has_val if path is None else None)
    if name == C4_TEST_NAME:  # torchtitan's debug dataset: a local C4-format sample (lathe.data.c4_test)
        from lathe.data.c4_test import c4_test_path

        return SourceSpec("local", path if path is not None else str(c4_test_path()), label=name, option=option)
    if name == "local":
        if path is None:
            raise ConfigError("training.dataset_path", "local needs a path", "set --training.dataset_path", None)
        return _path_spec(path, "training.dataset_path")
    if name == "huggingface":
        if path is None:
            raise ConfigError("training.dataset_path", "huggingface needs the dataset's Hub id",
                              "e.g. --training.dataset_path allenai/c4 --training.dataset_config en", None)
        return SourceSpec("hf", path, config, label=path, option="training.dataset_path")
    if path is None and (Path(name).expanduser().exists() or is_glob(name)):
        return _path_spec(name, option)
    if "/" in name and path is None:
        return SourceSpec("hf", name, config, label=name, option=option)
    import difflib

    known = [CORPUS_NAME, C4_TEST_NAME, *HF_PRESETS, *GENERIC_NAMES]
    close = difflib.get_close_matches(name, known, n=1)
    fix = f"did you mean '{close[0]}'?" if close else (
        f"available: {', '.join(known)}, a local path, or a Hugging Face id like org/name")
    raise ConfigError(option, "unknown dataset", fix, name)


def _path_spec(path: str, option: str) -> SourceSpec:
    """Local text files, or tokenized data (`lathe.data.store`: prepared folder, Megatron, flat .bin)."""
    from lathe.data.store import is_token_path

    return SourceSpec("tokens" if is_token_path(path) else "local", path, label=path, option=option)


def parse_mix(entries: Sequence[str]) -> list[tuple[SourceSpec, float]]:
    """``training.dataset_mix`` entries ``source=weight`` -> (spec, weight).

    A source is a dataset name (lathe_corpus, c4, fineweb, fineweb_edu), a local path or glob, or
    a Hugging Face id with an optional config after a colon (``allenai/c4:en``).
    """
    out = []
    for entry in entries:
        source, eq, weight = str(entry).rpartition("=")
        if not eq or not source.strip():
            raise ConfigError("training.dataset_mix", f"entry '{entry}' is not source=weight",
                              "e.g. --training.dataset_mix c4=0.7,/data/mine=0.3")
        try:
            w = float(weight)
        except ValueError:
            raise ConfigError("training.dataset_mix", f"weight of '{source}' is not a number",
                              "e.g. c4=0.7", weight) from None
        if not (w > 0 and math.isfinite(w)):
            raise ConfigError("training.dataset_mix", f"weight of '{source}' must be a positive number",
                              "e.g. c4=0.7", weight)
        source = source.strip()
        config = None
        if (not Path(source).expanduser().exists() and not is_glob(source) and ":" in source
                and source not in HF_PRESETS):
            source, _, config = source.partition(":")
        spec = resolve_spec(source, None, config or None, "training.dataset_mix")
        out.append((spec, w))
    return out


def train_specs(cfg) -> list[tuple[SourceSpec, float]]:
    t = cfg.training
    if t.dataset_mix:
        if t.dataset_path is not None:
            raise ConfigError("training.dataset_path", "cannot be combined with training.dataset_mix",
                              "name every source (with its path) in the mix", t.dataset_path)
        return parse_mix(t.dataset_mix)
    return [(resolve_spec(t.dataset, t.dataset_path, t.dataset_config, "training.dataset"), 1.0)]


def validation_specs(cfg) -> tuple[list[tuple[SourceSpec, float]], bool]:
    """(specs with weights, separate) for validation: a separate validation dataset when
    ``validation.dataset``/``dataset_path`` is set (read whole), else the training sources'
    held-out splits (with the training mix weights)."""
    v = cfg.validation
    if v.dataset is not None or v.dataset_path is not None:
        name = v.dataset if v.dataset is not None else ("local" if not _looks_like_hub_id(v.dataset_path) else "huggingface")
        spec = resolve_spec(name, v.dataset_path, cfg.training.dataset_config if name in HF_PRESETS else None,
                            "validation.dataset")
        if spec.option == "training.dataset_path":
            spec = SourceSpec(spec.kind, spec.path, spec.config, spec.label, "validation.dataset_path",
                              spec.has_validation)
        return [(spec, 1.0)], True
    return train_specs(cfg), False


def _looks_like_hub_id(path: str) -> bool:
    return "/" in path and not Path(path).expanduser().exists() and not is_glob(path) and not path.startswith((".", "/", "~"))


def open_source(spec: SourceSpec, split: str, cfg, separate: bool = False) -> Source:
    """Open ``spec``'s training split (``split="train"``) or held-out split (``"validation"``).

    ``separate``: the spec is a dedicated validation dataset: read all of it (local files), its
    corpus validation file, or its Hub ``validation`` split.
    """
    text_field = cfg.training.dataset_text_field
    if spec.kind == "corpus":
        from lathe.data.corpus import build_corpus

        paths = build_corpus(spec.path)
        f = paths.train if split == "train" else paths.validation
        return LocalSource([(f, f.name)], "text", None, name=f"{CORPUS_NAME}/{f.stem}")
    if spec.kind == "local":
        files = list_local_files(spec.path, spec.option)
        if separate:
            return LocalSource(files, text_field, None, name=spec.label)
        val = [x for x in files if _is_validation_path(x[1])]
        train = [x for x in files if not _is_validation_path(x[1])]
        if val and train:
            return LocalSource(train if split == "train" else val, text_field, None,
                               name=f"{spec.label} ({split} files)")
        return LocalSource(files, text_field, "exclude" if split == "train" else "only",
                           name=f"{spec.label} ({split} split)")
    # Hugging Face
    train_split = cfg.training.dataset_split
    if split == "train":
        has_val = spec.has_validation
        if has_val is None and train_split == "train":
            # Hold out 1% of the train split only where no validation split exists.
            has_val = "validation" in hf_split_names(spec.path, spec.config, spec.option)
        heldout = None if (has_val or train_split != "train") else "exclude"
        return HFSource(spec.path, spec.config, train_split, text_field, heldout, name=spec.label, option=spec.option)
    has_val = spec.has_validation
    if has_val is None:
        has_val = "validation" in hf_split_names(spec.path, spec.config, spec.option)
    if has_val:
        return HFSource(spec.path, spec.config, "validation", text_field, None, name=spec.label, option=spec.option)
    if separate:
        raise ConfigError(spec.option, f"Hugging Face dataset '{spec.path}' has no validation split",
                          "leave validation.dataset unset to hold out 1% of the training data instead", spec.path)
    return HFSource(spec.path, spec.config, "train", text_field, "only", name=spec.label, option=spec.option)


# ---------------------------------------------------------------------------------------------
# Cheap checks for lathe.config.validate
# ---------------------------------------------------------------------------------------------


def check_data_config(cfg) -> None:
    """Everything about the data that can be checked without reading it; raises ConfigError."""
    t, v = cfg.training, cfg.validation
    specs = train_specs(cfg)
    for spec, _ in specs:
        _check_spec(spec, cfg)
    if len({spec.kind == "tokens" for spec, _ in specs}) > 1:
        raise ConfigError("training.dataset_mix", "mixes tokenized data (prepared, Megatron or .bin) with text sources",
                          "prepare the text sources too (lathe data prepare) and mix the prepared folders")
    if not t.dataset_mix and specs[0][0].kind in ("corpus", "local", "tokens") and t.dataset_split != "train":
        raise ConfigError("training.dataset_split", "only Hugging Face datasets have named splits",
                          "leave it at train (local files: the held-out split is described in docs/data.md)",
                          t.dataset_split)
    if not t.dataset_text_field:
        raise ConfigError("training.dataset_text_field", "must not be empty", "e.g. text", t.dataset_text_field)
    if t.shuffle_buffer < 0:
        raise ConfigError("training.shuffle_buffer", "must be >= 0", "0 keeps file order; e.g. 10000", t.shuffle_buffer)
    if not 0 <= t.data_workers <= 64:
        raise ConfigError("training.data_workers", "must be between 0 and 64", "0 = inline, 1 or 2 is plenty",
                          t.data_workers)
    if cfg.model.vocab_size < 0:
        raise ConfigError("model.vocab_size", "must be >= 0", "0 = the tokenizer's vocabulary size",
                          cfg.model.vocab_size)
    if v.enabled:
        if v.freq < 1:
            raise ConfigError("validation.freq", "must be >= 1", "e.g. 100", v.freq)
        if v.steps == 0 or v.steps < -1:
            raise ConfigError("validation.steps", "must be -1 (the whole split) or >= 1", "e.g. 10", v.steps)
        if v.batch_size < 0:
            raise ConfigError("validation.batch_size", "must be >= 0", "0 = training.batch_size", v.batch_size)
        vspecs, separate = validation_specs(cfg)
        if separate:
            for spec, _ in vspecs:
                _check_spec(spec, cfg)


def _need_package(package: str, option: str, what: str) -> None:
    """An optional package a source needs, checked before anything starts (pyproject's ``hf`` extra)."""
    import importlib.util

    if importlib.util.find_spec(package) is None:
        raise ConfigError(option, f"{what} need the {package} package, which is not installed",
                          f"pip install 'lathe[hf]' (or: pip install {package})")


def _check_spec(spec: SourceSpec, cfg) -> None:
    if spec.kind == "hf":
        _need_package("datasets", spec.option, "Hugging Face datasets")
    elif spec.kind == "local":
        files = list_local_files(spec.path, spec.option)
        if any(_base_suffix(f) == ".parquet" for f, _ in files):
            _need_package("pyarrow", spec.option, "parquet files")
    elif spec.kind == "tokens":
        from lathe.data.store import check_store_path

        check_store_path(spec.path, spec.option, cfg.training.dataset_token_dtype)
    elif spec.kind == "corpus" and spec.path is not None:
        p = Path(spec.path).expanduser()
        if not p.is_dir():
            raise ConfigError("training.dataset_path", "folder not found",
                              "for lathe_corpus it is the corpus cache folder; leave unset for the default",
                              spec.path)
