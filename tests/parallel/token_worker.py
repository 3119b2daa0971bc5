"""torchrun entry point like worker.py, that also records the token windows of every batch each
rank trains on: one line per batch in {dump_folder}/tokens/dp{D}_rank{R}.jsonl (``Recorder``)."""

import hashlib
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import worker  # noqa: E402

import lathe.trainer  # noqa: E402
from lathe.data import build_train_data  # noqa: E402


class Recorder:
    """Wraps a data loader; writes the sha256 of each window (inputs + last label) of each batch."""

    def __init__(self, loader, path: Path):
        self.loader, self.path = loader, path
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("")

    def __iter__(self):
        return self

    def __next__(self):
        batch = next(self.loader)
        windows = torch.cat([batch[0], batch[1][:, -1:]], dim=1)
        digests = [hashlib.sha256(row.numpy().tobytes()).hexdigest()[:16] for row in windows]
        with open(self.path, "a") as f:
            f.write(json.dumps(digests) + "\n")
        return batch

    def __getattr__(self, name):
        return getattr(self.loader, name)


def recording_build_train_data(cfg, tokenizer, dp_rank, dp_degree):
    loader = build_train_data(cfg, tokenizer, dp_rank, dp_degree)
    return Recorder(loader, Path(cfg.job.dump_folder) / "tokens" / f"dp{dp_degree}_rank{dp_rank}.jsonl")


def read_windows(folder: Path, dp: int) -> list[list[str]]:
    """Per global batch, the window digests of all ranks in rank order."""
    ranks = [[json.loads(x) for x in (folder / "tokens" / f"dp{dp}_rank{r}.jsonl").read_text().splitlines()]
             for r in range(dp)]
    return [sum((rank[i] for rank in ranks), []) for i in range(len(ranks[0]))]


if __name__ == "__main__":
    lathe.trainer.build_train_data = recording_build_train_data
    worker.main()
