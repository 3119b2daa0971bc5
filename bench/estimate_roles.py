"""How long ``lathe estimate`` takes per role of a layout: wall and CPU seconds, and the process's RSS.

    python bench/estimate_roles.py --world-size 512 --config configs/llama3_405b.toml \
        --parallelism.pp 8 --training.batch_size 8 --model.vocab_size 128256 [--roles 3,7]

Takes lathe estimate's --config and --section.key overrides. ``--roles`` picks roles by index
(default: all; the list is printed first, so a long layout can be sampled a role at a time). CPU
seconds are the number to compare on a shared machine: wall time there depends on the other jobs.
"""

from __future__ import annotations

import argparse
import logging
import resource
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from lathe.config import load_config  # noqa: E402
from lathe.estimate import _estimate_rank, _lazy_fsdp_chunks, prepare, roles  # noqa: E402
from lathe.parallel.dims import ParallelDims  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--world-size", type=int, required=True)
    parser.add_argument("--roles", default="", help="comma-separated role indices (default: all)")
    ns, rest = parser.parse_known_args()
    logging.getLogger("torch.distributed.tensor._redistribute").setLevel(logging.ERROR)
    cfg, _ = load_config(rest)
    run_cfg, vocab, _ = prepare(cfg, ns.world_size)
    dims = ParallelDims.from_config(run_cfg.parallelism, ns.world_size)
    found = roles(run_cfg, dims, vocab)
    print(f"{len(found)} roles: " + ", ".join(f"[{i}] rank {r.rank} (pp {r.pp_rank}, {r.ranks} ranks)"
                                               for i, r in enumerate(found)), flush=True)
    chosen = [int(i) for i in ns.roles.split(",")] if ns.roles else range(len(found))
    total_wall = total_cpu = 0.0
    with _lazy_fsdp_chunks():
        for i in chosen:
            role = found[i]
            wall, cpu = time.perf_counter(), time.process_time()
            measured = _estimate_rank(run_cfg, dims, role.rank, role.pp_rank, vocab, 2)
            wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
            total_wall, total_cpu = total_wall + wall, total_cpu + cpu
            print(f"role {i}: rank {role.rank}, stages {measured.stages}, peak {measured.peak / 2**30:.2f} GiB; "
                  f"{wall:.1f} s wall, {cpu:.1f} s CPU", flush=True)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    print(f"{len(chosen)} of {len(found)} roles: {total_wall:.1f} s wall, {total_cpu:.1f} s CPU; max RSS {rss:.2f} GiB")


if __name__ == "__main__":
    main()
