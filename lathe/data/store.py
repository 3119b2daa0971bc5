"""Tokenized datasets as training sources: prepared folders, Megatron prefixes, flat token files.

A *token store* is one source of already tokenized documents, in a fixed order: the
concatenation of one or more `lathe.data.indexed.TokenFile`. ``training.dataset_path`` (or an
entry of ``training.dataset_mix``) names one as:

* a folder written by ``lathe data prepare`` (it holds ``manifest.json``): its ``train`` split for
  training, its ``validation`` split as the held-out data; as ``validation.dataset_path`` both
  splits are read (a separate validation dataset is read whole);
* a folder of Megatron ``.bin``/``.idx`` pairs (read in sorted order of their names);
* one Megatron prefix (``data/c4_text_document``, or either of its two files);
* a flat token file (``.bin`` without an ``.idx``): nanoGPT's bare array, whose dtype
  ``training.dataset_token_dtype`` must state, or llm.c's file with a header.

What is checked, each failure one line naming the option or file and the fix: an index that
does not match its ``.bin`` (`lathe.data.indexed`), a folder whose preparation did not finish, a
run tokenizer different from the one the folder was prepared with (sha256 of the tokenizer file),
token files whose dtype cannot hold the tokenizer's ids (uint16 for a 128,256-id vocabulary), and,
while training, any token id outside the tokenizer's vocabulary.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np

from lathe.data.indexed import FlatTokenFile, IndexedFile, TokenFile, TokenFileError, is_indexed_prefix, prefix_of
from lathe.errors import ConfigError

MANIFEST = "manifest.json"
PLAN = "prepare.json"
FORMAT_KEY = "lathe_prepared_data"  # the manifest's marker and layout version
FORMAT_VERSION = 1
SPLITS = ("train", "validation")


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def read_manifest(folder: Path) -> dict | None:
    try:
        data = json.loads((folder / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and FORMAT_KEY in data else None


def is_token_path(path: str | Path) -> bool:
    """Whether ``path`` names tokenized data (cheap: looks at names, not contents)."""
    p = Path(path).expanduser()
    if p.is_dir():
        if (p / PLAN).is_file() or read_manifest(p) is not None:
            return True
        try:
            return any(c.suffix == ".idx" and c.is_file() for c in p.iterdir())
        except OSError:
            return False
    if p.suffix in (".bin", ".idx") and p.is_file():
        return True
    return is_indexed_prefix(p)


class TokenStore:
    """One source of tokenized documents: ``files`` read one after the other.

    ``locate(docs)`` gives where documents are, ``read(file, start, stop)`` their tokens. The
    store never reads tokens on its own; ``bytes_read`` sums what was read through it.
    """

    def __init__(self, name: str, files: list[TokenFile], manifest: dict | None = None,
                 folder: Path | None = None):
        self.name = name
        self.manifest = manifest
        self.folder = folder
        self.all_files = files
        self.files = [f for f in files if f.num_documents > 0]
        self.num_documents = sum(f.num_documents for f in self.files)
        self.num_tokens = sum(f.num_tokens for f in self.files)
        self._doc_offsets = np.cumsum([0] + [f.num_documents for f in self.files], dtype=np.int64)
        self.has_document_boundaries = all(f.has_document_boundaries for f in self.files)

    @property
    def bytes_read(self) -> int:
        return sum(f.bytes_read for f in self.files)

    def locate(self, docs: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(file number, first token in that file, token count) of each document in ``docs``."""
        docs = np.asarray(docs, dtype=np.int64)
        which = np.searchsorted(self._doc_offsets, docs, side="right") - 1
        start = np.empty(len(docs), np.int64)
        length = np.empty(len(docs), np.int64)
        for f in np.unique(which):
            mask = which == f
            start[mask], length[mask] = self.files[f].document_starts(docs[mask] - self._doc_offsets[f])
        return which, start, length

    def read(self, file: int, start: int, stop: int) -> np.ndarray:
        return self.files[file].read(start, stop)

    def close(self) -> None:
        for f in self.all_files:
            f.close()

    def __repr__(self) -> str:
        return f"TokenStore({self.name!r}, {self.num_documents} documents, {self.num_tokens} tokens)"


def _prefixes_in(folder: Path) -> list[Path]:
    return sorted(p.with_suffix("") for p in folder.iterdir() if p.suffix == ".idx" and p.is_file())


def open_store(path: str, split: str, option: str, token_dtype: str = "auto", separate: bool = False) -> TokenStore:
    """The token store ``path`` names, for ``split`` ("train" or "validation").

    ``separate``: the store is a dedicated validation dataset (read whole). Raises ConfigError.
    """
    p = Path(path).expanduser()
    try:
        if p.is_dir():
            manifest = read_manifest(p)
            if manifest is not None:
                splits = SPLITS if separate else (split,)
                files = [IndexedFile(p / s["prefix"]) for sp in splits for s in manifest["splits"][sp]["shards"]]
                label = path if separate else f"{path} ({split})"
                return TokenStore(label, files, manifest, p)
            if (p / PLAN).is_file():
                raise ConfigError(option, "the folder's preparation has not finished (no manifest.json)",
                                  "run the same `lathe data prepare` command again: it continues where it stopped",
                                  path)
            if split == "validation" and not separate:
                raise _no_heldout(option, path)
            return TokenStore(path, [IndexedFile(x) for x in _prefixes_in(p)])
        if split == "validation" and not separate:
            raise _no_heldout(option, path)
        if is_indexed_prefix(p):
            return TokenStore(path, [IndexedFile(prefix_of(p))])
        if p.suffix == ".idx":
            raise ConfigError(option, f"no {prefix_of(p)}.bin next to the index",
                              "a Megatron dataset is a PREFIX.bin + PREFIX.idx pair", path)
        try:
            return TokenStore(path, [FlatTokenFile(p, token_dtype)])
        except TokenFileError as e:
            if token_dtype == "auto" and "must be stated" in str(e):
                raise ConfigError("training.dataset_token_dtype", f"{p.name} is a flat token file without a header",
                                  "state its dtype: uint16 for nanoGPT's GPT-2 files, int32/uint32 for larger "
                                  "vocabularies", token_dtype) from None
            raise
    except TokenFileError as e:
        raise ConfigError(option, str(e), "prepare the data again (lathe data prepare), or point at the intended "
                          "files", path) from None


def _no_heldout(option: str, path: str) -> ConfigError:
    return ConfigError(option, "a Megatron or flat token file has no held-out split for validation",
                       "set validation.dataset_path to separate validation tokens, or train from a folder "
                       "written by `lathe data prepare` (it has a validation split)", path)


def check_tokenizer(store: TokenStore, tokenizer, option: str) -> None:
    """ConfigError if ``tokenizer`` cannot be the one ``store`` was tokenized with."""
    m = store.manifest
    path = getattr(tokenizer, "path", None)
    if m is not None and path is not None:
        want = m["tokenizer"]
        have = file_sha256(path)
        if have != want["sha256"]:
            raise ConfigError("model.tokenizer_path", f"{store.folder} was prepared with the tokenizer "
                              f"{want['file']} (sha256 {want['sha256'][:12]}...), this run's tokenizer differs "
                              f"(sha256 {have[:12]}...)", "use the tokenizer it was prepared with, or prepare "
                              "the data again with this one", str(path))
    vocab = int(tokenizer.vocab_size)
    for f in store.files:
        if np.iinfo(f.dtype).max < vocab - 1:
            flat = isinstance(f, FlatTokenFile)
            raise ConfigError("training.dataset_token_dtype" if flat else option,
                              f"{f.path.name} holds {f.dtype} token ids, which cannot represent this tokenizer's "
                              f"{vocab:,} ids: it was tokenized with another tokenizer"
                              + (", or its dtype is stated wrongly" if flat else ""),
                              "state the file's real dtype (int32/uint32)" if flat else
                              "use the tokenizer the data was made with, or prepare it again",
                              f.dtype.name if flat else str(f.path))


def check_store_path(path: str, option: str, token_dtype: str) -> None:
    """Cheap checks for lathe.config.validate: the files exist and their headers/sizes agree."""
    open_store(path, "train", option, token_dtype).close()
