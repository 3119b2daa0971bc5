"""What checkpoint checksums cost: save time with and without them, and verification time on load.

    python bench/checksums.py                       # debug model + AdamW state, and a 1B-parameter fake
    python bench/checksums.py --sizes debug --repeats 5
    python bench/checksums.py --sizes 1b --dir /scratch/ckbench   # put the 4 GB fake on a fast disk

lathe writes every checkpoint through ``integrity.ChecksummingFileSystem``: a stream wrapper that
feeds each shard file's bytes to CRC-32 while DCP writes them (no second read), then a manifest
(``manifest.json``). Loading first verifies the files against it (``checkpoint.verify``: ``full``
reads every byte, ``sampled`` the small files and one 16 MiB chunk in 8 of each shard).

For each size the script saves the same state dict with ``dcp.save`` through DCP's plain
``FileSystemWriter`` and through lathe's checksumming one, alternating (A B A B ...) so that a
change in the machine's load hits both, and reports the median save time of each, the ratio, and
then the median time of ``verify full`` and ``verify sampled`` on the written checkpoint (read
from the page cache: the files were just written; a cold read from disk is slower by the disk's
read time for ``full``). Sizes:

- ``debug``: lathe's llama3 debugmodel (8.9M parameters) with its AdamW state, fp32: ~109 MB;
- ``1b``: 1,000,000,000 fp32 parameters in 16 tensors (no optimizer state): 4.0 GB.

Numbers go to docs/performance.md ("Checkpoint integrity").
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp

from lathe.checkpoint import integrity


def debug_state() -> dict:
    from lathe.models import MODELS

    args = MODELS["llama3"].flavors["debugmodel"].with_(vocab_size=4096, max_seq_len=256)
    model = MODELS["llama3"].build(args)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randint(0, 4096, (2, 64))).float().mean().backward()
    opt.step()  # materializes exp_avg / exp_avg_sq
    return {"model": model.state_dict(), "optimizer": opt.state_dict()}


def fake_1b_state() -> dict:
    n, parts = 1_000_000_000, 16
    return {"model": {f"w{i}": torch.randn(n // parts) for i in range(parts)}}


def state_bytes(state) -> int:
    total = 0
    for v in state.values():
        if isinstance(v, dict):
            total += state_bytes(v)
        elif isinstance(v, torch.Tensor):
            total += v.numel() * v.element_size()
    return total


def save(state: dict, folder: Path, checksums: bool) -> float:
    shutil.rmtree(folder, ignore_errors=True)
    writer = dcp.FileSystemWriter(str(folder))
    fs = None
    if checksums:
        fs = integrity.ChecksummingFileSystem()
        writer.fs = fs
    start = time.perf_counter()
    dcp.save(state, storage_writer=writer, no_dist=True)
    if checksums:  # what lathe adds at the commit: this rank's part, then the merged manifest
        integrity.write_rank_manifest(folder, 0, dict(fs.entries))
        integrity.write_manifest(folder, world_size=1)
    return time.perf_counter() - start


def verify(folder: Path, mode: str) -> float:
    start = time.perf_counter()
    files = integrity.manifest_files(folder)
    integrity.verify_files(folder, list(files), files, mode)
    integrity.check_metadata(folder)
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", default="debug,1b", help="comma-separated: debug, 1b (default both)")
    p.add_argument("--repeats", type=int, default=3, help="saves of each kind per size (default 3)")
    p.add_argument("--dir", default=None, help="where to write (default: a temporary folder)")
    args = p.parse_args(argv)
    torch.manual_seed(0)
    root = Path(args.dir or tempfile.mkdtemp(prefix="lathe-checksums-"))
    root.mkdir(parents=True, exist_ok=True)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, writing under {root}")
    print(f"{'size':>6} {'GB':>6} {'plain save s':>13} {'checksummed s':>14} {'ratio':>6} "
          f"{'verify full s':>14} {'GB/s':>6} {'verify sampled s':>17}")
    try:
        for size in args.sizes.split(","):
            state = {"debug": debug_state, "1b": fake_1b_state}[size]()
            plain, summed = [], []
            for _ in range(args.repeats):
                plain.append(save(state, root / "plain", checksums=False))
                summed.append(save(state, root / "summed", checksums=True))
            full = [verify(root / "summed", "full") for _ in range(args.repeats)]
            sampled = [verify(root / "summed", "sampled") for _ in range(args.repeats)]
            gb = state_bytes(state) / 1e9
            a, b = statistics.median(plain), statistics.median(summed)
            print(f"{size:>6} {gb:6.2f} {a:13.2f} {b:14.2f} {b / a:6.3f} {statistics.median(full):14.2f} "
                  f"{gb / statistics.median(full):6.2f} {statistics.median(sampled):17.3f}")
            del state
    finally:
        if not args.dir:
            shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
