"""torchrun entry point: build this rank's training stream (text on the fly; split tokenization
on), take some batches, close it, and write what it saw to {out}/rank{R}.json."""

import json
import sys
from pathlib import Path

import torch.distributed as dist

from lathe.config import load_config
from lathe.data import build_train_data, load_tokenizer


def main() -> None:
    out, steps, argv = Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3:]
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    cfg, _ = load_config(argv)
    data = build_train_data(cfg, load_tokenizer(), rank, world)
    windows = []
    for _ in range(steps):
        inputs, labels = next(data)[:2]
        windows.append([row + [lab[-1]] for row, lab in zip(inputs.tolist(), labels.tolist())])
    data.close()  # must not hang on a collective of the shared tokenizer
    tok = data.stream.tokenizer
    out.mkdir(parents=True, exist_ok=True)
    (out / f"rank{rank}.json").write_text(json.dumps({
        "windows": windows[:steps], "tokenizer": type(tok).__name__,
        "tokenized_here": getattr(tok, "tokenized_here", None), "documents_read": data.stream.docs.position}))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
