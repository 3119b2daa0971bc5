"""lathe vs an installed torchtitan on the same shape, precision and activation checkpointing (CPU).

    python bench/vs_torchtitan.py --torchtitan-python /path/to/tt-venv/bin/python
    python bench/vs_torchtitan.py --torchtitan-python ... --shapes seed --steps 12 --sessions 2

torchtitan is never a dependency of lathe. Install it for this benchmark only, in its own virtual
environment, with torch pinned to the CPU build so that its requirements cannot pull the CUDA
wheels (torchtitan's dependencies name ``torch`` unpinned)::

    python -m venv ~/tt-venv
    ~/tt-venv/bin/pip install torch==2.13.0                      # the CPU wheel this machine has
    echo "torch==2.13.0" > /tmp/tt-constraints.txt
    ~/tt-venv/bin/pip install -c /tmp/tt-constraints.txt torchtitan==0.3.0 triton
    ~/tt-venv/bin/pip list | grep -i -E "torch|triton"          # torch 2.13.0+cpu, torchtitan 0.3.0

(``triton``: torchtitan 0.3.0 imports it unconditionally, through its MoE token dispatcher, even
for Llama; CUDA builds of torch bring it along, the CPU build does not. It installs and imports on
a CPU-only machine; nothing here runs a Triton kernel.)

What runs
---------
Each side is a worker process: lathe's in this environment, torchtitan's under
``--torchtitan-python``. Both train the same shape on the same token batches (random ids from one
seed; every side sees identical tensors, so the tokenizer and corpus cannot differ), with the same
loop around the model: forward, cross-entropy in float32, backward, global-norm clipping at 1.0,
AdamW (lr 8e-4, betas 0.9/0.95, weight decay 0.1, foreach). What differs is everything the
frameworks own: the model code (embedding, RMSNorm, RoPE, attention, SwiGLU, output), weight layout
and activation checkpointing, each built with the framework's own classes and AC wrappers, and how
each framework sets up a CPU process: lathe's worker applies ``training.cpu_allocator`` as ``lathe
train`` does on a CPU (default ``retain``: glibc keeps freed tensor memory instead of page-faulting
it back every step, ``lathe/host_memory.py``); torchtitan's trainer sets nothing of the kind.
``--lathe-cpu-allocator system`` leaves lathe's malloc as it is, so the models alone are compared.

- lathe: ``lathe.models`` (ModelArgs of the llama3 ``debugmodel`` flavor with the shape's
  overrides, plus any ``--lathe-model-arg``), ``lathe.parallel.checkpointing.apply_ac``.
- torchtitan 0.3.x: ``torchtitan.models.llama3`` (``Llama3Model`` with the blocks its
  ``debugmodel`` uses, fused QKV as there), ``torchtitan.distributed.activation_checkpoint``
  (``SelectiveAC`` for op-level, ``FullAC``'s block wrapper for "every Nth block").

Why not the two trainers end to end: torchtitan's trainer cannot run on a CPU without patching it.
In 0.3.0 the device falls back to "cuda" when no accelerator is present
(``torchtitan.tools.utils.get_device_info``), and its language-model attention is flex attention
(training on CPU is refused by PyTorch) or varlen (CUDA only); the ``sdpa`` choice is rejected for
language models. Its model code, though, runs on CPU when built with its own
``ScaledDotProductAttention`` inner attention (a component of the release, used by its Flux
model), which is what this script does: no torchtitan file is changed. lathe's own trainer adds
about 0.1-1.3% over such a bare loop (``bench/overhead.py``), which this comparison does not charge
to lathe. torchtitan 0.0.2, the only PyPI release of the September 2024 code era, is an empty
placeholder package (no code), so the "seed" shape is run with the current release's model code.

Interleaving
------------
Both workers start and build their model, then the parent steps them in lockstep: one step of
one side, one step of the other, and so on; the one waiting sleeps on a pipe. Step k of both sides
therefore runs under the same machine load, and each such pair of steps is an interleaved pair
(the side that goes first alternates from pair to pair). The first ``--warmup`` pairs are not
measured. ``--sessions`` repeats the whole thing with fresh processes. Reported per side: the
median step time over all measured steps and tokens/s from it; the ratio lathe/torchtitan of
tokens/s, and the median of the per-pair ratios (least sensitive to load drift). Numbers are
printed, never asserted.

Shapes
------
- ``seed``: torchtitan's September 2024 ``train_configs/debug_model.toml``: llama3 debugmodel
  (dim 256, 8 blocks, 16 heads, FFN 768, RoPE theta 500000), vocabulary 2256 (its test
  tokenizer), batch 8 x seq 2048, float32, AC: every 2nd block fully checkpointed.
- ``head``: torchtitan 0.3.0's ``llama3_debugmodel``: the same block but 6 blocks, vocabulary 2048,
  Llama 3.1 RoPE scaling, batch 8 x seq 2048, op-level selective AC, bfloat16 autocast where the CPU
  multiplies bf16 natively (``lathe.precision``), else float32 (``--head-dtype`` overrides).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

ROOT = Path(__file__).resolve().parents[1]

_DEBUG_BLOCK = dict(dim=256, n_heads=16, n_kv_heads=None, ffn_mult=None, hidden=768)
SHAPES = {
    "seed": dict(n_layers=8, vocab=2256, batch=8, seq=2048, dtype="float32", ac="2", rope_scaling="none",
                 **_DEBUG_BLOCK),
    "head": dict(n_layers=6, vocab=2048, batch=8, seq=2048, dtype="auto", ac="op", rope_scaling="llama3.1",
                 **_DEBUG_BLOCK),
    # the GPU shape of bench/gpu_check.py: Llama 3.2 1B's block (GQA 32/8, SwiGLU 8192), 16 blocks,
    # Llama 3's vocabulary; about 1.5B parameters with the untied output layer
    "gpu1b": dict(n_layers=16, vocab=128256, batch=2, seq=8192, dtype="bfloat16", ac="op", rope_scaling="llama3.1",
                  dim=2048, n_heads=32, n_kv_heads=8, ffn_mult=1.5, hidden=8192),
}
THETA = 500000.0
LR, BETAS, WEIGHT_DECAY, MAX_NORM, SEED = 8e-4, (0.9, 0.95), 0.1, 1.0, 0


# ---------------------------------------------------------------------------------------------
# Workers (run in either environment: only torch and the framework's own modules are imported)


def build_lathe(shape: dict, extra: list[str], device: str = "cpu") -> nn.Module:
    sys.path.insert(0, str(ROOT))
    from lathe.models import MODELS
    from lathe.parallel.checkpointing import apply_ac

    changes = {"n_layers": shape["n_layers"], "vocab_size": shape["vocab"], "max_seq_len": shape["seq"],
               "rope_scaling": shape["rope_scaling"], "dim": shape["dim"], "n_heads": shape["n_heads"],
               "n_kv_heads": shape["n_kv_heads"], "ffn_dim_multiplier": shape["ffn_mult"]}
    for item in extra:
        key, _, raw = item.partition("=")
        changes[key] = raw.lower() == "true" if raw.lower() in ("true", "false") else type(
            getattr(MODELS["llama3"].flavors["debugmodel"], key))(raw)
    args = MODELS["llama3"].flavors["debugmodel"].with_(**changes)
    assert (args.ffn_hidden_dim, args.rope_theta) == (shape["hidden"], THETA)
    with torch.device("meta"):
        model = MODELS["llama3"].build(args)
    ac = shape["ac"]
    if ac != "none":
        apply_ac(model, "full" if ac == "full" else "selective", "" if ac == "full" else ac)
    model.to_empty(device=device)
    model.init_weights(buffer_device=device)
    return model


def build_torchtitan(shape: dict, device: str = "cpu") -> nn.Module:
    from functools import partial

    from torchtitan.distributed.activation_checkpoint import FullAC, SelectiveAC
    from torchtitan.models import llama3 as tt
    from torchtitan.models.common import ComplexRoPE, Embedding, Linear, RMSNorm, compute_ffn_hidden_dim
    from torchtitan.models.common.attention import ScaledDotProductAttention
    from torchtitan.models.common.config_utils import make_ffn_config, make_gqa_config

    vocab, DIM, N_HEADS = shape["vocab"], shape["dim"], shape["n_heads"]
    rope = ComplexRoPE.Config(dim=DIM // N_HEADS, max_seq_len=131072, theta=THETA,
                              scaling="llama" if shape["rope_scaling"] == "llama3.1" else "none")
    hidden = compute_ffn_hidden_dim(DIM, multiple_of=256, ffn_dim_multiplier=shape["ffn_mult"])
    assert hidden == shape["hidden"]
    layers = []
    for layer_id in range(shape["n_layers"]):  # as torchtitan's own debugmodel, with SDPA inside
        layers.append(tt.Llama3TransformerBlock.Config(
            attention_norm=RMSNorm.Config(normalized_shape=DIM, param_init=tt._NORM_INIT),
            ffn_norm=RMSNorm.Config(normalized_shape=DIM, param_init=tt._NORM_INIT),
            attention=make_gqa_config(dim=DIM, n_heads=N_HEADS, n_kv_heads=shape["n_kv_heads"], wqkv_param_init=tt._LINEAR_INIT,
                                      wo_param_init=tt._depth_init(layer_id),
                                      inner_attention=ScaledDotProductAttention.Config(), fuse_qkv=True, rope=rope),
            feed_forward=make_ffn_config(dim=DIM, hidden_dim=hidden, w1_param_init=tt._LINEAR_INIT,
                                         w2w3_param_init=tt._depth_init(layer_id)),
        ))
    config = tt.Llama3Model.Config(
        dim=DIM, vocab_size=vocab,
        tok_embeddings=Embedding.Config(num_embeddings=vocab, embedding_dim=DIM, param_init=tt._EMBEDDING_INIT),
        norm=RMSNorm.Config(normalized_shape=DIM, param_init=tt._NORM_INIT),
        lm_head=Linear.Config(in_features=DIM, out_features=vocab, param_init=tt._output_linear_init(DIM)),
        layers=layers)
    with torch.device("meta"):
        model = config.build()
    ac = shape["ac"]
    if ac == "op":
        SelectiveAC(SelectiveAC.Config()).apply(model)
    elif ac == "full":
        FullAC(FullAC.Config()).apply(model)
    elif ac != "none":  # every Nth block, fully (torchtitan 0.3 dropped this mode; its block wrapper does it)
        every = int(ac)
        wrapper = FullAC(FullAC.Config())
        for name, block in list(model.layers.named_children()):
            if (int(name) + 1) % every == 0:
                model.layers.register_module(name, wrapper._wrap_block(block, base_fqn=f"layers.{name}"))
    model.to_empty(device=device)
    with torch.no_grad():
        model.init_states(buffer_device=torch.device(device))
    return model


def worker(side: str, shape: dict, dtype: str, threads: int, extra: list[str], cpu_allocator: str,
           device: str = "cpu", compile_blocks: bool = False) -> None:
    """Build, warm up when told, then run one step per "step" line on stdin, answering its time."""
    torch.set_num_threads(threads)
    if side == "lathe" and device == "cpu":  # what lathe's trainer does on a CPU run, before it builds the model
        sys.path.insert(0, str(ROOT))
        from lathe import host_memory

        host_memory.configure(cpu_allocator, "cpu")
    torch.manual_seed(SEED)
    model = build_lathe(shape, extra, device) if side == "lathe" else build_torchtitan(shape, device)
    if compile_blocks:  # the same treatment for both: each block compiled on its own (as both trainers do)
        for name, block in list(model.layers.named_children()):
            model.layers.register_module(name, torch.compile(block))
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=LR, betas=BETAS, weight_decay=WEIGHT_DECAY, foreach=True)
    gen = torch.Generator().manual_seed(SEED)
    autocast = torch.autocast(device, dtype=torch.bfloat16, enabled=dtype == "bfloat16")
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    n = 0

    def step() -> float:
        nonlocal n
        tokens = torch.randint(0, shape["vocab"], (shape["batch"], shape["seq"] + 1), generator=gen).to(device)
        inputs, labels = tokens[:, :-1], tokens[:, 1:]
        sync()
        start = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        with autocast:
            logits = model(inputs)
        loss = F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(0, 1))
        del logits
        loss.backward()
        nn.utils.clip_grad_norm_(params, MAX_NORM, foreach=True)
        opt.step()
        sync()
        n += 1
        return time.perf_counter() - start, loss.item()

    info = {"side": side, "params": sum(p.numel() for p in params), "torch": torch.__version__,
            "threads": torch.get_num_threads(), "device": device, "compile": compile_blocks}
    if device == "cuda":
        info["gpu"] = torch.cuda.get_device_name()
    if side == "lathe":
        info["cpu_allocator"] = cpu_allocator
    if side == "torchtitan":
        import torchtitan
        info["version"] = getattr(torchtitan, "__version__", "?")
    print(json.dumps({"ready": info}), flush=True)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    for line in sys.stdin:
        if line.strip() != "step":
            break
        seconds, loss = step()
        peak = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else 0.0
        print(json.dumps({"step": n, "seconds": seconds, "loss": loss, "peak_gib": peak}), flush=True)


# ---------------------------------------------------------------------------------------------
# The parent: lockstep interleaving


class Side:
    def __init__(self, side: str, python: str, shape: dict, dtype: str, threads: int, extra: list[str],
                 cpu_allocator: str, device: str = "cpu", compile_blocks: bool = False):
        self.side = side
        cmd = [python, str(Path(__file__).resolve()), "--worker", side, "--shape-json", json.dumps(shape),
               "--dtype", dtype, "--threads", str(threads), "--lathe-cpu-allocator", cpu_allocator,
               "--device", device, *(["--compile"] if compile_blocks else []),
               *sum((["--lathe-model-arg", e] for e in extra), [])]
        env = {**os.environ, "PYTHONPATH": str(ROOT) if side == "lathe" else ""}
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
        self.info = self._read()["ready"]

    def _read(self) -> dict:
        while True:
            line = self.proc.stdout.readline()
            if not line:
                raise RuntimeError(f"{self.side} worker exited (code {self.proc.wait()}); see its stderr above")
            if line.startswith("{"):
                return json.loads(line)

    def step(self) -> tuple[float, float]:
        self.proc.stdin.write("step\n")
        self.proc.stdin.flush()
        r = self._read()
        self.peak_gib = r.get("peak_gib", 0.0)
        return r["seconds"], r["loss"]

    def close(self) -> None:
        try:
            self.proc.stdin.write("quit\n")
            self.proc.stdin.close()
        except OSError:
            pass
        self.proc.wait(timeout=60)


def resolve_shape(args: argparse.Namespace, name: str) -> dict:
    """The named shape with the command line's --seq, --batch and --ac applied."""
    shape = dict(SHAPES[name])
    for key in ("seq", "batch", "ac"):
        if getattr(args, key) is not None:
            shape[key] = getattr(args, key)
    return shape


def resolve_dtype(shape: str, override: str, device: str = "cpu") -> str:
    dtype = override if (override != "auto" and shape == "head") else SHAPES[shape]["dtype"]
    if dtype == "auto" and device == "cuda":
        dtype = "bfloat16"
    if dtype == "auto":
        sys.path.insert(0, str(ROOT))
        from lathe.precision import cpu_native_dtypes

        dtype = "bfloat16" if "bfloat16" in cpu_native_dtypes() else "float32"
    return dtype


def run_shape(args: argparse.Namespace, shape: str) -> dict:
    dtype = resolve_dtype(shape, args.head_dtype, args.device)
    s = resolve_shape(args, shape)
    tokens = s["batch"] * s["seq"]
    times: dict[str, list[float]] = {"lathe": [], "torchtitan": []}
    pair_ratios: list[float] = []
    infos = {}
    print(f"\n== shape {shape}: {s['n_layers']} blocks, dim {s['dim']}, {s['n_heads']} heads "
          f"({s['n_kv_heads'] or s['n_heads']} KV), FFN {s['hidden']}, vocab {s['vocab']}, batch "
          f"{s['batch']} x seq {s['seq']} ({tokens:,} tokens/step), {dtype}, AC {s['ac']}, {args.device}"
          f"{', compiled blocks' if args.compile else ''}", flush=True)
    for session in range(args.sessions):
        pythons = {"lathe": sys.executable, "torchtitan": args.torchtitan_python}
        sides = {name: Side(name, pythons[name], s, dtype, args.threads, args.lathe_model_arg,
                            args.lathe_cpu_allocator, args.device, args.compile)
                 for name in ("lathe", "torchtitan")}
        infos = {name: side.info for name, side in sides.items()}
        try:
            for k in range(args.warmup + args.steps):
                order = ["lathe", "torchtitan"] if (k + session) % 2 == 0 else ["torchtitan", "lathe"]
                step_times = {}
                for name in order:
                    step_times[name], loss = sides[name].step()
                if k >= args.warmup:
                    for name in order:
                        times[name].append(step_times[name])
                    pair_ratios.append(step_times["torchtitan"] / step_times["lathe"])  # = tokens/s ratio
                print(f"  session {session + 1} pair {k + 1}: " + ", ".join(
                    f"{n} {step_times[n]:.2f}s" for n in order) + (" (warm-up)" if k < args.warmup else ""),
                    flush=True)
        finally:
            peaks = {name: getattr(side, "peak_gib", 0.0) for name, side in sides.items()}
            for side in sides.values():
                side.close()
    med = {name: statistics.median(ts) for name, ts in times.items()}
    tps = {name: tokens / m for name, m in med.items()}
    return {"shape": shape, "dtype": dtype, "tokens_per_step": tokens, "median_step_s": med, "tokens_per_s": tps,
            "ratio": tps["lathe"] / tps["torchtitan"], "ratio_median_of_steps": statistics.median(pair_ratios),
            "device": args.device, "compile": args.compile, "seq": s["seq"], "batch": s["batch"], "ac": s["ac"],
            "peak_gib": peaks,
            "steps_per_side": len(times["lathe"]), "sessions": args.sessions, "infos": infos}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--torchtitan-python", help="python of the environment torchtitan is installed in")
    p.add_argument("--shapes", default="seed,head", help="comma-separated: seed, head, gpu1b")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"), help="where both models run (default cpu)")
    p.add_argument("--compile", action="store_true", help="torch.compile each block, in both models")
    p.add_argument("--seq", type=int, help="override the shape's sequence length")
    p.add_argument("--batch", type=int, help="override the shape's batch size")
    p.add_argument("--ac", help="override the shape's activation checkpointing: none, op, full, or N (every Nth block)")
    p.add_argument("--steps", type=int, default=8, help="measured interleaved step pairs per session (default 8)")
    p.add_argument("--warmup", type=int, default=1, help="unmeasured step pairs first (default 1)")
    p.add_argument("--sessions", type=int, default=1, help="fresh pairs of processes per shape (default 1)")
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--head-dtype", default="auto", choices=("auto", "float32", "bfloat16"),
                   help="precision of the head shape (auto: bf16 where the CPU has native bf16)")
    p.add_argument("--lathe-model-arg", action="append", default=[], metavar="KEY=VALUE",
                   help="a lathe ModelArgs field for the lathe side, e.g. fused_qkv=true (repeatable)")
    p.add_argument("--lathe-cpu-allocator", default="retain", choices=("retain", "system"),
                   help="the lathe side's training.cpu_allocator (default retain, as lathe train on a CPU)")
    p.add_argument("--json", metavar="FILE", help="also write the results here")
    p.add_argument("--worker", choices=("lathe", "torchtitan"), help=argparse.SUPPRESS)
    p.add_argument("--dtype", default="float32", help=argparse.SUPPRESS)
    p.add_argument("--shape-json", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        worker(args.worker, json.loads(args.shape_json), args.dtype, args.threads, args.lathe_model_arg,
               args.lathe_cpu_allocator, args.device, args.compile)
        return 0
    if not args.torchtitan_python:
        p.error("--torchtitan-python is required (see the docstring for installing torchtitan)")
    print(f"lathe vs torchtitan, {args.device}, {args.threads} threads, {args.sessions} session(s) x {args.steps} measured "
          f"interleaved step pairs (after {args.warmup} warm-up) per shape; lathe model args: "
          f"{args.lathe_model_arg or 'defaults'}; lathe training.cpu_allocator {args.lathe_cpu_allocator}", flush=True)
    results = [run_shape(args, shape) for shape in args.shapes.split(",")]
    print()
    for r in results:
        tt = r["infos"].get("torchtitan", {})
        print(f"{r['shape']:>5} ({r['dtype']}): lathe {r['tokens_per_s']['lathe']:,.0f} tokens/s "
              f"(median step {r['median_step_s']['lathe']:.2f} s), torchtitan {tt.get('version', '?')} "
              f"{r['tokens_per_s']['torchtitan']:,.0f} tokens/s (median step {r['median_step_s']['torchtitan']:.2f} s); "
              f"ratio lathe/torchtitan {r['ratio']:.3f} (median of per-step ratios {r['ratio_median_of_steps']:.3f}), "
              f"{r['steps_per_side']} interleaved step pairs from {r['sessions']} session(s); parameters lathe "
              f"{r['infos']['lathe']['params']:,}, torchtitan {tt.get('params', 0):,}")
    if args.json:
        Path(args.json).write_text(json.dumps({"date": time.strftime("%Y-%m-%d %H:%M"), "results": results}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
