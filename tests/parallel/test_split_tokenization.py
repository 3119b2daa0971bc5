"""Tokenizing on the fly in a multi-process job: each process tokenizes a share of the documents
(`lathe.data.split_tokenizer`), and every rank still gets exactly the batches of the stream that
one process computes alone; stopping the background workers does not hang on a collective."""

import json
import os
import subprocess
import sys
from pathlib import Path

from lathe.config import load_config
from lathe.data import build_train_data, load_tokenizer

HERE = Path(__file__).parent
DATA = HERE.parent / "assets" / "data" / "tiny"
ARGS = ["--training.dataset_path", str(DATA), "--training.seq_len", "16", "--training.batch_size", "2",
        "--training.shuffle_buffer", "8", "--training.document_ids"]


def test_split_tokenization_gives_the_single_process_batches(tmp_path):
    steps, nproc = 30, 2
    args = [*ARGS, "--training.data_workers", "1"]  # the background thread, stopped in lockstep
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--rdzv_backend=c10d",
           "--rdzv_endpoint=localhost:0", str(HERE / "split_tokenization_worker.py"), str(tmp_path), str(steps), *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    results = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(nproc)]
    cfg, _ = load_config(args)
    tok = load_tokenizer()
    for r, res in enumerate(results):
        assert res["tokenizer"] == "SplitTokenizer"
        alone = build_train_data(cfg, tok, r, nproc)  # no process group here: tokenizes everything
        expected = []
        for _ in range(steps):
            inputs, labels = next(alone)[:2]
            expected.append([row + [lab[-1]] for row, lab in zip(inputs.tolist(), labels.tolist())])
        alone.close()
        assert res["windows"] == expected, f"rank {r}"
    # each process tokenized about half of what it read (the tiny dataset is read in a few
    # chunks of 64 x 2 documents: allow for the balancing by characters)
    shares = [res["tokenized_here"] for res in results]
    assert sum(shares) >= results[0]["documents_read"] > 0
    assert all(0.35 * sum(shares) <= s <= 0.65 * sum(shares) for s in shares), shares
