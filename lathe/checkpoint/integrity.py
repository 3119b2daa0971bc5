"""What lathe trusts in a checkpoint folder, and how it checks the rest.

Two dangers, two defences:

- **Code execution.** DCP's ``FileSystemReader.read_metadata`` unpickles ``.metadata`` with plain
  ``pickle.load``: a crafted file runs any code it likes. ``SafeFileSystemReader`` reads it with a
  restricted unpickler that can build only DCP's own metadata types (dataclasses of sizes, dtypes,
  offsets and paths); any other global is refused with an error naming the file. Tensor payloads
  are read with ``torch.load(weights_only=True)`` by DCP itself, and the few non-tensor entries
  (optimizer hyperparameters) by ``SafeLoadPlanner`` (manager.py) the same way. The JSON sidecars
  are plain data.
- **Silent damage.** Every file of a checkpoint is listed in ``manifest.json`` with its size and
  CRC-32 checksums per 16 MiB chunk. Shard files (``*.distcp``) are checksummed while DCP writes
  them (a stream wrapper in ``ChecksummingFileSystem``: no second read); the small files are read
  back. ``verify`` checks a checkpoint before it is loaded: ``full`` reads every byte, ``sampled``
  checks every file's size, the small files fully and a fixed share of the shard chunks, ``off``
  only that the files exist.

The manifest itself is checked like any other file (``manifest_files``): a JSON object with
``"algorithm": "crc32"`` and, per file, ``size``, ``chunk`` and as many ``crc32`` values as the
file has chunks. Every name it holds, and every storage file ``.metadata`` names, must be a relative
path inside the checkpoint folder to a regular file (no ``..``, no absolute paths, no links out of
the folder, no devices or pipes: ``checkpoint_file``). Every file lathe loads (``.metadata``,
``train_state.json``, each storage file ``.metadata`` references, the rank's RNG file) must be
listed: nothing is loaded unverified from a checkpoint that has a manifest.

A checkpoint that fails is reported in one line naming the file and what is wrong
(``DamagedCheckpoint``); the manager then falls back to the newest earlier checkpoint that passes.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import random
import re
import stat
import zlib
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path, PosixPath, PurePosixPath
from typing import Any, Iterator

import torch
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint import metadata as dcp_metadata
from torch.distributed.checkpoint.filesystem import FileSystem, _StorageInfo

MANIFEST = "manifest.json"
RANK_MANIFESTS = "manifest.d"  # per-rank parts, merged into manifest.json at commit
CHUNK = 16 * 2**20
SAMPLE_EVERY = 8  # "sampled": one shard chunk in 8 (plus the first and last of each file)
MAX_MANIFEST_BYTES = 256 * 2**20  # a real one holds ~11 bytes per 16 MiB chunk: ~3 MB for 5 TB


class DamagedCheckpoint(Exception):
    """A checkpoint folder that must not be loaded: ``str(e)`` names the file and the problem."""

    def __init__(self, path: Path, problem: str):
        super().__init__(f"{path}: {problem}")
        self.path, self.problem = path, problem

    def __reduce__(self):  # DCP gathers a rank's exception to the others by pickling it
        return (type(self), (self.path, self.problem))


# ---------------------------------------------------------------------------------------------
# Which paths a checkpoint may name


def name_problem(name: Any) -> str | None:
    """Why ``name`` (from manifest.json or .metadata) is not a relative path inside the checkpoint
    folder, or None if it is one."""
    if not isinstance(name, str) or not name:
        return f"{name!r} is not a file name"
    if "\0" in name or name.startswith("/") or ".." in PurePosixPath(name).parts:
        return f"{name!r} is not a relative path inside the checkpoint folder"
    return None


def _kind(mode: int) -> str:
    for test, what in ((stat.S_ISDIR, "a folder"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device"), (stat.S_ISFIFO, "a pipe"), (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return what
    return "not a plain file"


def checkpoint_file(folder: Path, name: str) -> os.stat_result:
    """``folder / name`` is a regular file inside ``folder`` (links are followed, and must stay in
    it); returns its stat, else raises DamagedCheckpoint naming it. ``name`` passed name_problem."""
    path = folder / name
    try:
        real = path.resolve(strict=True)
        root = folder.resolve(strict=True)
        info = real.stat()
    except FileNotFoundError:
        raise DamagedCheckpoint(path, "missing") from None
    except (OSError, RuntimeError) as e:  # a link loop, no permission
        reason = getattr(e, "strerror", None) or e
        raise DamagedCheckpoint(path, f"cannot be read ({type(e).__name__}: {reason})") from None
    if not real.is_relative_to(root):
        raise DamagedCheckpoint(path, f"links to {real}, outside the checkpoint folder")
    if not stat.S_ISREG(info.st_mode):
        raise DamagedCheckpoint(path, f"not a regular file ({_kind(info.st_mode)})")
    return info


# ---------------------------------------------------------------------------------------------
# Reading .metadata without running code


_DCP_METADATA_TYPES = {name for name in dir(dcp_metadata) if isinstance(getattr(dcp_metadata, name), type)}
_ALLOWED = {
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"): _StorageInfo,
    ("torch", "Size"): torch.Size,
    ("torch.serialization", "_get_layout"): torch.serialization._get_layout,
    ("pathlib", "PosixPath"): PosixPath,
    ("pathlib", "PurePosixPath"): PurePosixPath,
    ("pathlib", "Path"): Path,
    ("collections", "OrderedDict"): __import__("collections").OrderedDict,
}


class _MetadataUnpickler(pickle.Unpickler):
    """Builds DCP metadata objects and nothing else."""

    def find_class(self, module: str, name: str) -> Any:
        if module == "torch.distributed.checkpoint.metadata" and name in _DCP_METADATA_TYPES:
            return getattr(dcp_metadata, name)
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        if (module, name) in _ALLOWED:
            return _ALLOWED[(module, name)]
        raise pickle.UnpicklingError(f"refused to load {module}.{name} (not a checkpoint metadata type)")


def read_metadata(path: Path) -> dcp_metadata.Metadata:
    """Parse a DCP ``.metadata`` file safely; raise DamagedCheckpoint if it is not one, or if it
    names a storage file outside the checkpoint folder."""
    checkpoint_file(path.parent, path.name)
    try:
        with open(path, "rb") as f:
            metadata = _MetadataUnpickler(f).load()
    except OSError as e:
        raise DamagedCheckpoint(path, f"cannot read: {e.strerror or e}") from None
    except Exception as e:  # UnpicklingError, EOFError, ValueError, ... from damaged bytes
        raise DamagedCheckpoint(path, f"not valid checkpoint metadata ({type(e).__name__}: {e})") from None
    if not isinstance(metadata, dcp_metadata.Metadata):
        raise DamagedCheckpoint(path, f"not valid checkpoint metadata (holds a {type(metadata).__name__})")
    storage = metadata.storage_data if metadata.storage_data is not None else {}
    if not isinstance(storage, dict):
        raise DamagedCheckpoint(path, "not valid checkpoint metadata (its storage table is not a mapping)")
    for index, info in storage.items():
        if not isinstance(info, _StorageInfo):
            raise DamagedCheckpoint(path, f"entry {_fqn(index)!r}: storage information of the wrong type")
        if name_problem(info.relative_path):
            raise DamagedCheckpoint(path, f"entry {_fqn(index)!r} names storage file {info.relative_path!r}, not a "
                                          "relative path inside the checkpoint folder")
    return metadata


def _fqn(index: Any) -> str:
    return str(getattr(index, "fqn", index))


def _reason(e: BaseException) -> str:
    """One short line for why an entry could not be loaded."""
    text = " ".join(str(e).split())
    refused = re.search(r"WeightsUnpickler error: (.*?)(?: Please use|$)", text)
    if refused:
        return f"refused by the safe loader: {refused.group(1)[:200]}"
    return f"cannot be loaded ({type(e).__name__}: {text[:200]})"


class SafeFileSystemReader(FileSystemReader):
    """DCP's file reader with the metadata read by ``read_metadata`` instead of ``pickle.load``
    (which also refuses storage files outside the folder), and an entry that cannot be read
    reported as DamagedCheckpoint naming its file and entry."""

    _reading: _StorageInfo | None = None

    def read_metadata(self, *args: Any, **kwargs: Any) -> dcp_metadata.Metadata:
        metadata = read_metadata(Path(self._get_metadata_path(kwargs.get("rank"))))
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = dcp_metadata.StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata

    def _slice_file(self, file, sinfo: _StorageInfo):
        self._reading = sinfo  # the entry being read, for the report if it fails
        return super()._slice_file(file, sinfo)

    def read_data(self, plan, planner):
        self._reading = None
        try:
            return super().read_data(plan, planner)
        except DamagedCheckpoint:
            raise
        except Exception as e:  # a payload torch.load refuses or cannot parse, a short file
            sinfo, folder = self._reading, Path(self.path)
            if sinfo is None or (isinstance(e, OSError) and e.filename):
                where = Path(e.filename) if isinstance(e, OSError) and e.filename else folder
                raise DamagedCheckpoint(where, _reason(e)) from None
            fqn = next((_fqn(k) for k, v in self.storage_data.items() if v is sinfo), "?")
            raise DamagedCheckpoint(folder / sinfo.relative_path, f"entry {fqn!r} (bytes {sinfo.offset:,}-"
                                    f"{sinfo.offset + sinfo.length - 1:,}) {_reason(e)}") from None


# ---------------------------------------------------------------------------------------------
# Checksums


class _ChunkCrc:
    """CRC-32 of each CHUNK-byte piece of a byte stream, fed in any pieces."""

    def __init__(self):
        self.size = 0
        self.crcs: list[int] = []
        self._crc = 0
        self._fill = 0

    def update(self, data) -> None:
        n = data.nbytes if isinstance(data, memoryview) else len(data)
        if self._fill + n < CHUNK:  # the common case: DCP writes in pieces far smaller than a chunk
            self._crc = zlib.crc32(data, self._crc)
            self._fill += n
            self.size += n
            return
        view = memoryview(data).cast("B")
        while len(view):
            take = min(len(view), CHUNK - self._fill)
            self._crc = zlib.crc32(view[:take], self._crc)
            self._fill += take
            self.size += take
            view = view[take:]
            if self._fill == CHUNK:
                self.crcs.append(self._crc)
                self._crc, self._fill = 0, 0

    def entry(self) -> dict[str, Any]:
        crcs = self.crcs + ([self._crc] if self._fill or not self.crcs else [])
        return {"size": self.size, "chunk": CHUNK, "crc32": crcs}


def file_entry(path: Path) -> dict[str, Any]:
    """Manifest entry of a file on disk (read back)."""
    crc = _ChunkCrc()
    with open(path, "rb") as f:
        while block := f.read(CHUNK):
            crc.update(block)
    return crc.entry()


class _ChecksummingStream(io.RawIOBase):
    """Write-through wrapper that checksums what DCP writes. A seek makes the running checksum
    meaningless; the file is then read back instead.

    Large writes (tensor storages) are checksummed on a background thread while the next write
    goes to disk (``zlib.crc32`` and file writes both release the GIL), so on two or more cores the
    checksum costs little save time. One worker keeps the pieces in order; a small write made while
    large ones are still queued is copied first (its buffer may be reused by the caller).
    ``finish()`` waits for the queue."""

    BACKGROUND = 16 << 20  # bytes: smaller writes are checksummed inline (a thread hand-off costs more)

    def __init__(self, inner, crc: _ChunkCrc):
        self.inner, self.crc, self.seeked = inner, crc, False
        self._pool: ThreadPoolExecutor | None = None
        self._pending: list[Future] = []

    def writable(self) -> bool:
        return True

    def write(self, data) -> int:
        n = self.inner.write(data)
        full = data.nbytes if isinstance(data, memoryview) else len(data)
        piece = data if n is None or n == full else memoryview(data).cast("B")[:n]
        size = full if n is None else n
        self._pending = [f for f in self._pending if not f.done()]
        if size >= self.BACKGROUND:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="lathe-crc")
            self._pending.append(self._pool.submit(self.crc.update, piece))
        elif self._pending:  # keep the order: behind the queued pieces, from a copy
            self._pending.append(self._pool.submit(self.crc.update, bytes(piece)))
        else:
            self.crc.update(piece)
        return n

    def finish(self) -> None:
        """Wait until every written byte is in the checksum (raises what a worker raised)."""
        for future in self._pending:
            future.result()
        self._pending = []
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None

    def tell(self) -> int:
        return self.inner.tell()

    def seek(self, offset, whence=0):
        self.seeked = True
        return self.inner.seek(offset, whence)

    def fileno(self) -> int:
        return self.inner.fileno()

    def flush(self) -> None:
        if not self.inner.closed:
            self.inner.flush()

    def close(self) -> None:
        self.finish()
        if not self.inner.closed:
            self.inner.close()
        super().close()


class ChecksummingFileSystem(FileSystem):
    """DCP's FileSystem, recording a checksum of every ``.distcp`` file this rank writes."""

    def __init__(self):
        super().__init__()
        self.entries: dict[str, dict[str, Any]] = {}

    @contextmanager
    def create_stream(self, path, mode: str) -> Iterator[io.IOBase]:
        path = Path(path)
        if "w" not in mode or path.suffix != ".distcp":
            with super().create_stream(path, mode) as stream:
                yield stream
            return
        crc = _ChunkCrc()
        with open(path, mode) as inner:
            stream = _ChecksummingStream(inner, crc)
            try:
                yield stream
            finally:
                stream.finish()
        self.entries[path.name] = file_entry(path) if stream.seeked else crc.entry()


def write_rank_manifest(folder: Path, rank: int, entries: dict[str, dict[str, Any]]) -> None:
    """Rank ``rank``'s part of the manifest: its shard files (and whatever else it names)."""
    part = folder / RANK_MANIFESTS
    part.mkdir(exist_ok=True)
    tmp = part / f"rank{rank}.json.tmp"
    tmp.write_text(json.dumps(entries))
    tmp.replace(part / f"rank{rank}.json")


def rank_manifests_present(folder: Path, world_size: int) -> bool:
    return all((folder / RANK_MANIFESTS / f"rank{r}.json").is_file() for r in range(world_size))


def write_manifest(folder: Path, world_size: int) -> None:
    """Merge the ranks' parts and checksum every other file: the last file before the commit."""
    files: dict[str, dict[str, Any]] = {}
    for r in range(world_size):  # world_size 0: no parts, every file is read back here
        files.update(json.loads((folder / RANK_MANIFESTS / f"rank{r}.json").read_text()))
    for path in sorted(folder.rglob("*")):
        rel = path.relative_to(folder).as_posix()
        if path.is_file() and rel not in files and not rel.startswith(RANK_MANIFESTS + "/") and rel != MANIFEST:
            files[rel] = file_entry(path)
    (folder / MANIFEST).write_text(json.dumps({"algorithm": "crc32", "files": files}, indent=0))
    if (folder / RANK_MANIFESTS).is_dir():
        for part in (folder / RANK_MANIFESTS).iterdir():
            part.unlink()
        (folder / RANK_MANIFESTS).rmdir()


def manifest_files(folder: Path) -> dict[str, dict[str, Any]]:
    """The ``files`` table of ``folder``'s manifest, checked against the schema: every entry a
    safe relative name with an integer ``size``, a positive ``chunk`` and one CRC-32 per chunk.
    Anything else raises DamagedCheckpoint naming manifest.json and the entry."""
    path = folder / MANIFEST
    if not path.exists() and not path.is_symlink():
        raise DamagedCheckpoint(path, "missing (every complete lathe checkpoint has one)")
    info = checkpoint_file(folder, MANIFEST)
    if info.st_size > MAX_MANIFEST_BYTES:
        raise DamagedCheckpoint(path, f"{info.st_size:,} bytes, more than any real manifest ({MAX_MANIFEST_BYTES:,})")
    try:
        data = json.loads(path.read_bytes())
    except (OSError, ValueError, RecursionError) as e:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise DamagedCheckpoint(path, f"unreadable ({type(e).__name__})") from None
    if not isinstance(data, dict):
        raise DamagedCheckpoint(path, f"not a JSON object (a {type(data).__name__})")
    if data.get("algorithm") != "crc32":
        raise DamagedCheckpoint(path, f"algorithm {data.get('algorithm')!r}, expected 'crc32'")
    files = data.get("files")
    if not isinstance(files, dict):
        raise DamagedCheckpoint(path, "has no 'files' object")
    for name, entry in files.items():
        problem = _entry_problem(name, entry)
        if problem:
            raise DamagedCheckpoint(path, f"entry {name!r}: {problem}")
    return files


def _whole(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _entry_problem(name: str, entry: Any) -> str | None:
    """What is wrong with one manifest entry, or None."""
    problem = name_problem(name)
    if problem:
        return problem.replace(f"{name!r} is", "is", 1)
    if name == MANIFEST:
        return "the manifest cannot list itself"
    if not isinstance(entry, dict):
        return f"a {type(entry).__name__}, not an object with size, chunk and crc32"
    missing = [k for k in ("size", "chunk", "crc32") if k not in entry]
    if missing:
        return f"missing key{'s' if len(missing) > 1 else ''} {', '.join(missing)}"
    size, chunk, crcs = entry["size"], entry["chunk"], entry["crc32"]
    if not _whole(size) or size < 0:
        return f"size {size!r} is not a number of bytes"
    if not _whole(chunk) or chunk <= 0:
        return f"chunk {chunk!r} is not a positive number of bytes"
    if not isinstance(crcs, list) or not all(_whole(c) and 0 <= c < 2**32 for c in crcs):
        return "crc32 is not a list of CRC-32 values"
    need = max(1, -(-size // chunk))
    if len(crcs) != need:
        return f"{len(crcs)} crc32 value{'s' if len(crcs) != 1 else ''} for {need} chunk{'s' if need != 1 else ''}"
    return None


def verify_files(folder: Path, names: list[str], files: dict[str, dict[str, Any]], mode: str) -> None:
    """Check the named files against their (schema-checked) manifest entries; raise
    DamagedCheckpoint on the first problem. ``mode``: full | sampled | off."""
    for name in names:
        path = folder / name
        entry = files[name]
        size = checkpoint_file(folder, name).st_size
        if mode == "off":
            continue
        if size != entry["size"]:
            raise DamagedCheckpoint(path, f"size {size:,} bytes, expected {entry['size']:,} (truncated or replaced)")
        chunks = range(len(entry["crc32"]))
        if mode == "sampled" and path.suffix == ".distcp" and len(chunks) > 2:
            rng = random.Random(name)  # the same sample every time: reproducible reports
            chunks = sorted({0, len(chunks) - 1, *rng.sample(list(chunks), max(1, len(chunks) // SAMPLE_EVERY))})
        with open(path, "rb") as f:
            for i in chunks:
                f.seek(i * entry["chunk"])
                if zlib.crc32(f.read(entry["chunk"])) != entry["crc32"][i]:
                    where = f"bytes {i * entry['chunk']:,}-{min(size, (i + 1) * entry['chunk']) - 1:,}"
                    raise DamagedCheckpoint(path, f"checksum mismatch in {where} (the file is damaged)")


def my_share(names: list[str], rank: int, world_size: int) -> list[str]:
    """The files this rank verifies: every world_size-th, largest files spread first."""
    return sorted(names)[rank::world_size]


def check_metadata(folder: Path, files: dict[str, dict[str, Any]] | None = None) -> None:
    """``.metadata`` parses safely and names only storage files that are regular files inside the
    folder, each entry's bytes within its file; with ``files`` (the manifest's table), every one of
    them must also be listed there (else it would be loaded unverified)."""
    metadata = read_metadata(folder / ".metadata")
    sizes: dict[str, int] = {}
    for index, info in (metadata.storage_data or {}).items():
        name = info.relative_path
        if name not in sizes:
            if files is not None and name not in files:
                raise DamagedCheckpoint(folder / name, f"named by .metadata but not listed in {MANIFEST} "
                                        "(it would be loaded unverified)")
            try:
                sizes[name] = checkpoint_file(folder, name).st_size
            except DamagedCheckpoint as e:
                raise DamagedCheckpoint(e.path, f"{e.problem} (named by .metadata)") from None
        offset, length = info.offset, info.length
        if not (_whole(offset) and _whole(length) and offset >= 0 and length >= 0 and offset + length <= sizes[name]):
            raise DamagedCheckpoint(folder / ".metadata", f"entry {_fqn(index)!r}: bytes {offset!r}+{length!r} of "
                                    f"{name} lie outside its {sizes[name]:,} bytes")


def fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
