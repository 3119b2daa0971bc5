"""Long context: tokens/s and memory per rank with context parallel (CP) and document masking.

    python bench/long_context.py                      # all three sweeps, debugmodel, CPU + gloo
    python bench/long_context.py --sweeps seq --seq-lens 1024,2048,4096,8192 --cp 2
    python bench/long_context.py --sweeps cp --per-rank 2048 --cps 1,2,4
    python bench/long_context.py --sweeps mask --mask-seq-len 4096
    python bench/long_context.py --sweeps kernel          # the attention call alone, in this process
    python bench/long_context.py --device cuda ...    # on a GPU machine (NCCL, one GPU per rank)

Each point is a real ``lathe train`` run of the llama3 ``debugmodel`` (batch 1 per data-parallel
rank, fp32, AdamW) launched with ``torchrun`` on ``--cp`` ranks (``--parallelism.cp N``; with CP,
FSDP shards the weights over the CP ranks), ``--steps`` steps of which the first ``--warmup`` are
dropped. Sweeps:

- ``seq``: the sequence grows at a fixed CP degree (``--seq-lens``, ``--cp``);
- ``cp``: CP grows at a fixed length per rank (``--per-rank`` x ``--cps``): the global sequence
  grows with the number of ranks, the work per rank stays comparable;
- ``mask``: one process, ``causal`` vs ``block_causal`` (``--mask-seq-len``), on the embedded
  corpus' real document boundaries.
- ``kernel``: the attention call alone (forward + backward, in this process, all threads): causal
  SDPA vs the block-causal kernels of ``lathe.models.attention`` (per-document SDPA; the dense mask
  used under compile; FlexAttention on CUDA), 2 x 8 heads x ``--mask-seq-len`` x 64, 7 documents
  per row at random boundaries.

Numbers, per point, from what lathe records itself:

- ``tokens/s``: global tokens per step (seq_len x batch) / median ``step_time`` of the measured
  steps (``metrics.jsonl``); ``per rank``: that divided by the ranks (lathe's ``wps``);
- ``memory``: on CPU the peak resident set (``ru_maxrss``) of each rank over the whole run (model,
  optimizer, activations, and ~0.4 GiB of Python + torch), the largest over the ranks; on CUDA the
  peak allocated by the caching allocator (``torch.cuda.max_memory_allocated``).

On a CPU machine with fewer cores than ranks, the ranks share the cores (each rank runs one
thread, ``OMP_NUM_THREADS=1``): tokens/s then shows the cost of the ring and the sharding, not
the speed-up that CP gives on separate devices. The memory per rank is the point of CP and is
meaningful anywhere. Results of a run: docs/performance.md ("Long context").
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # works from a checkout without `pip install -e .`
    sys.path.insert(0, str(ROOT))


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="tokens/s and memory per rank with context parallel and document masking",
                                allow_abbrev=False)
    p.add_argument("--sweeps", default="seq,cp,mask,kernel", help="which sweeps: seq, cp, mask, kernel")
    p.add_argument("--model", default="llama3", help="model family (default llama3)")
    p.add_argument("--flavor", default="debugmodel", help="flavor (default debugmodel)")
    p.add_argument("--param-dtype", default="float32", help="FSDP parameter dtype (default float32)")
    p.add_argument("--seq-lens", default="1024,2048,4096", help="seq sweep: global sequence lengths")
    p.add_argument("--cp", type=int, default=2, help="seq sweep: CP degree (default 2)")
    p.add_argument("--per-rank", type=int, default=1024, help="cp sweep: tokens per rank (default 1024)")
    p.add_argument("--cps", default="1,2,4", help="cp sweep: CP degrees (default 1,2,4)")
    p.add_argument("--mask-seq-len", type=int, default=2048, help="mask sweep: sequence length (default 2048)")
    p.add_argument("--steps", type=int, default=5, help="steps per run (default 5)")
    p.add_argument("--warmup", type=int, default=2, help="first steps dropped (default 2)")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--rotate", default="allgather", choices=("allgather", "alltoall"))
    p.add_argument("--json", help="also write the results to this file")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)  # inside torchrun
    return p.parse_known_args(argv)


def worker(lathe_args: list[str]) -> None:
    """One rank of a run: train, then write this rank's peak memory next to metrics.jsonl."""
    import torch

    from lathe.config import load_config
    from lathe.parallel import distributed
    from lathe.trainer import train

    cfg, _ = load_config(lathe_args)
    train(cfg)
    if torch.cuda.is_available() and cfg.training.device != "cpu":
        peak = torch.cuda.max_memory_allocated()
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # kB on Linux
    Path(cfg.job.dump_folder, f"peak_rank{distributed.rank()}.json").write_text(json.dumps(peak))
    distributed.finish(0)


def run(args, folder: Path, seq_len: int, cp: int, extra: list[str] = ()) -> dict:
    lathe_args = ["--model.name", args.model, "--model.flavor", args.flavor, "--training.seq_len", str(seq_len), "--training.batch_size", "1",
                  "--training.steps", str(args.steps), "--metrics.log_freq", "1", "--lr_scheduler.warmup_steps", "1",
                  "--training.device", args.device, "--training.mixed_precision_param", args.param_dtype,
                  "--job.dump_folder", str(folder), *extra]
    if cp > 1:
        lathe_args += ["--parallelism.cp", str(cp), "--parallelism.cp_rotate_method", args.rotate]
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={cp}", "--rdzv_backend=c10d",
           "--rdzv_endpoint=localhost:0", __file__, "--worker", *lathe_args]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    if args.device == "cpu":
        env["OMP_NUM_THREADS"] = "1"
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise SystemExit(f"run failed ({' '.join(lathe_args)}):\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    records = [json.loads(x) for x in (folder / "metrics.jsonl").read_text().splitlines()]
    times = [r["step_time"] for r in records if "step_time" in r and r["step"] > args.warmup]
    step_time = statistics.median(times)
    peaks = [json.loads(f.read_text()) for f in folder.glob("peak_rank*.json")]
    return {"seq_len": seq_len, "cp": cp, "step_time_s": step_time, "tokens_per_s": seq_len / step_time,
            "tokens_per_s_per_rank": seq_len / step_time / cp, "memory_gib": max(peaks) / 2**30,
            "loss_last": records[-1].get("loss")}


def kernel_sweep(args) -> list[dict]:
    import time

    import torch
    import torch.nn.functional as F

    from lathe.models.attention import attention, block_mask, dense_block_causal, per_document_attention

    device = torch.device(args.device)
    bs, heads, seq, dim = 2, 8, args.mask_seq_len, 64
    torch.manual_seed(0)
    q, k, v = (torch.randn(bs, heads, seq, dim, device=device, requires_grad=True) for _ in range(3))
    ids = torch.zeros(bs, seq, dtype=torch.long, device=device)
    for b in range(bs):
        for cut in torch.randint(1, seq, (6,)).tolist():
            ids[b, cut:] += 1
    kernels = {"causal SDPA": lambda: attention(q, k, v),
               "block-causal, per-document SDPA": lambda: per_document_attention(q, k, v, ids),
               "block-causal, dense-mask SDPA": lambda: F.scaled_dot_product_attention(
                   q, k, v, attn_mask=dense_block_causal(ids))}
    if device.type == "cuda":
        mask = block_mask(ids)
        kernels["block-causal, FlexAttention"] = lambda: attention(q, k, v, mask)
    rows = []
    for name, fn in kernels.items():
        times = []
        for i in range(5):
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            fn().sum().backward()
            if device.type == "cuda":
                torch.cuda.synchronize()
            if i >= 2:  # warm-up (compilation on CUDA)
                times.append(time.perf_counter() - start)
        rows.append({"kernel": name, "fwd_bwd_s": statistics.median(times)})
    print(f"\nattention call alone, fwd + bwd, {bs} x {heads} heads x {seq:,} x {dim}, 7 documents per row "
          f"({args.device}, {torch.get_num_threads()} threads)")
    for r in rows:
        print(f"  {r['kernel']:<34} {r['fwd_bwd_s']:8.3f} s")
    return rows


def show(title: str, rows: list[dict], label) -> None:
    print(f"\n{title}")
    print(f"  {'':<22} {'step s':>8} {'tokens/s':>10} {'per rank':>10} {'memory/rank GiB':>16}")
    for r in rows:
        print(f"  {label(r):<22} {r['step_time_s']:8.2f} {r['tokens_per_s']:10,.0f} "
              f"{r['tokens_per_s_per_rank']:10,.0f} {r['memory_gib']:16.2f}")


def main(argv=None) -> None:
    args, rest = parse_args(argv)
    if args.worker:
        worker(rest)
        return
    sweeps = args.sweeps.split(",")
    results: dict[str, list[dict]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        n = iter(range(1000))
        if "seq" in sweeps:
            results["seq"] = [run(args, Path(tmp, f"r{next(n)}"), s, args.cp)
                              for s in map(int, args.seq_lens.split(","))]
            show(f"sequence grows, CP {args.cp} ({args.flavor}, batch 1, {args.device})", results["seq"],
                 lambda r: f"seq {r['seq_len']:,}")
        if "cp" in sweeps:
            results["cp"] = [run(args, Path(tmp, f"r{next(n)}"), args.per_rank * c, c)
                             for c in map(int, args.cps.split(","))]
            show(f"CP grows, {args.per_rank:,} tokens per rank ({args.flavor}, batch 1, {args.device})",
                 results["cp"], lambda r: f"cp {r['cp']} (seq {r['seq_len']:,})")
        if "mask" in sweeps:
            results["mask"] = [dict(run(args, Path(tmp, f"r{next(n)}"), args.mask_seq_len, 1,
                                        ["--model.attention_mask", m]), mask=m) for m in ("causal", "block_causal")]
            show(f"attention mask, one process, seq {args.mask_seq_len:,} ({args.flavor}, batch 1, {args.device})",
                 results["mask"], lambda r: r["mask"])
    if "kernel" in sweeps:
        results["kernel"] = kernel_sweep(args)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
