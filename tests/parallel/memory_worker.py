"""torchrun entry point for the memory-estimate accuracy test: train several layouts, one after the
other, in one launched job (starting Python and torch once instead of once per layout).

``memory_worker.py LAYOUTS_JSON OUT_FOLDER``: LAYOUTS_JSON lists ``[name, nproc, [overrides...]]``.
For each layout, ranks below ``nproc`` form a fresh gloo process group of that size (on the job's
store, under a prefix of its own) and run ``lathe.trainer.train``; each writes
``OUT_FOLDER/{name}_rank{R}.json`` with the trainer's memory check (predicted and measured peak
bytes over the first two steps). The other ranks wait at a store barrier.
"""

import gc
import json
import os
import sys
import time
from datetime import timedelta
from pathlib import Path

import torch.distributed as dist

from lathe.config import load_config
from lathe.trainer import train


def store_barrier(store, key: str, world: int) -> None:
    store.add(key, 1)
    while int(store.add(key, 0)) < world:
        time.sleep(0.05)


def main() -> None:
    layouts = json.loads(Path(sys.argv[1]).read_text())
    out = Path(sys.argv[2])
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False,
                          timeout=timedelta(seconds=300))
    for i, (name, nproc, overrides) in enumerate(layouts):
        start = time.perf_counter()
        if rank < nproc:
            os.environ.update(WORLD_SIZE=str(nproc), RANK=str(rank), LOCAL_RANK=str(rank),
                              LOCAL_WORLD_SIZE=str(nproc))
            dist.init_process_group("gloo", store=dist.PrefixStore(f"layout{i}", store), rank=rank,
                                    world_size=nproc, timeout=timedelta(seconds=300))
            cfg, _ = load_config([*overrides, "--job.dump_folder", str(out / name)])
            result = train(cfg)
            (out / f"{name}_rank{rank}.json").write_text(json.dumps(result.memory))
            del result
            gc.collect()
            dist.barrier()
            dist.destroy_process_group()
        store_barrier(store, f"lathe/memory_worker/{i}", world)
        if rank == 0:
            print(f"memory_worker: {name} took {time.perf_counter() - start:.1f} s", flush=True)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
