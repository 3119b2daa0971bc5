"""Where one training step's time goes: torch.profiler on lathe's model, ops grouped by kind.

    python bench/profile_step.py                          # torchtitan's Sept 2024 debug shape
    python bench/profile_step.py --n-layers 6 --vocab 2048 --ac op --batch-size 8 --seq-len 2048
    python bench/profile_step.py --model-arg fused_qkv=true --model-arg fused_w13=true

One step is forward, backward, gradient clipping and the AdamW step of lathe's ``Transformer``
(``lathe.models``; built on the meta device, ``to_empty``, ``init_weights``), with lathe's own
activation checkpointing wrapper (``lathe.parallel.checkpointing.apply_ac``), on random tokens, in
one process on CPU. The default shape is torchtitan's September 2024 ``debug_model.toml``: llama3
``debugmodel`` (dim 256, 8 layers, 16 heads), vocabulary 2256 (its test tokenizer), batch 8 x seq
2048, fp32, selective AC of every 2nd block.

After ``--warmup`` unprofiled steps, ``--steps`` steps run under ``torch.profiler`` (CPU
activities). The table groups the *self* CPU time of every ``aten::`` op (time inside the op, not
in ops it calls) into kinds:

- matmul: ``mm``/``addmm``/``bmm`` and the matmul-based kernels (oneDNN linear);
- attention: the fused scaled-dot-product attention kernels, forward and backward;
- elementwise: pointwise arithmetic and activations (``mul``, ``add``, ``rsqrt``, ``silu``, ...),
  normalization kernels and their backward, and small reductions (``mean``, ``sum``);
- copy/layout: copies, dtype casts, ``cat``/``stack``, ``clone``, ``contiguous``, indexing;
- optimizer: the ``_foreach_*`` kernels of AdamW and clipping;
- other: the rest (embedding, loss, allocation, ...).

The "elementwise share" is the elementwise kind over all ``aten::`` self time. Numbers are
printed, never asserted.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # works from a checkout without `pip install -e .`
    sys.path.insert(0, str(ROOT))

from lathe.models import MODELS  # noqa: E402
from lathe.parallel.checkpointing import apply_ac  # noqa: E402

MATMUL = {"mm", "addmm", "bmm", "baddbmm", "mkldnn_linear", "_mkldnn_linear", "mkldnn_matmul"}
ATTENTION_PREFIX = "_scaled_dot_product"
ELEMENTWISE = {
    "mul", "mul_", "add", "add_", "sub", "sub_", "div", "div_", "neg", "rsqrt", "pow", "sqrt",
    "silu", "silu_", "silu_backward", "sigmoid", "exp", "mean", "sum", "where", "addcmul", "addcmul_",
    "addcdiv", "addcdiv_", "lerp_", "maximum", "clamp", "clamp_", "_fused_rms_norm", "_fused_rms_norm_backward",
    "native_layer_norm", "native_layer_norm_backward", "threshold_backward", "_softmax", "_softmax_backward_data",
    "fill_", "zero_",
}
COPY = {"copy_", "_to_copy", "to", "clone", "cat", "stack", "contiguous", "index", "index_select", "_unsafe_view",
        "_reshape_alias", "reshape", "flatten", "unflatten", "transpose", "view", "as_strided", "select",
        "slice", "split", "split_with_sizes", "narrow", "expand", "repeat_interleave", "index_add_",
        "view_as_complex", "view_as_real", "_efficientzerotensor", "t", "permute", "squeeze", "unsqueeze",
        "detach", "alias", "type_as", "_unsafe_split", "unbind", "chunk"}


def kind(name: str) -> str:
    op = name.removeprefix("aten::")
    if op in MATMUL:
        return "matmul"
    if op.startswith(ATTENTION_PREFIX):
        return "attention"
    if op.startswith("_foreach") or op in ("_fused_adamw_", "_fused_adam_"):
        return "optimizer"
    if op in ELEMENTWISE:
        return "elementwise"
    if op in COPY:
        return "copy/layout"
    return "other"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="profile one training step of lathe's model on CPU")
    p.add_argument("--model", default="llama3")
    p.add_argument("--flavor", default="debugmodel")
    p.add_argument("--n-layers", type=int, default=0, help="override the flavor's number of blocks")
    p.add_argument("--vocab", type=int, default=2256, help="vocabulary size (default: torchtitan's test tokenizer)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--ac", default="2", help="activation checkpointing: none, full, op, or N (every Nth block)")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"),
                   help="parameter and compute dtype")
    p.add_argument("--model-arg", action="append", default=[], metavar="KEY=VALUE",
                   help="set a ModelArgs field, e.g. fused_qkv=true (repeatable)")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--steps", type=int, default=1)
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--top", type=int, default=15, help="also list the N ops with the most self time")
    p.add_argument("--trace", metavar="FILE", help="write a Chrome trace of the profiled steps")
    return p.parse_args(argv)


def _value(raw: str):
    low = raw.lower()
    if low in ("true", "false"):
        return low == "true"
    for cast in (int, float):
        try:
            return cast(raw)
        except ValueError:
            pass
    return raw


def build(args: argparse.Namespace) -> nn.Module:
    margs = MODELS[args.model].flavors[args.flavor].with_(vocab_size=args.vocab, max_seq_len=args.seq_len)
    changes = dict(item.split("=", 1) for item in args.model_arg)
    if args.n_layers:
        changes["n_layers"] = str(args.n_layers)
    margs = margs.with_(**{k: _value(v) for k, v in changes.items()})
    torch.manual_seed(0)
    with torch.device("meta"):
        model = MODELS[args.model].build(margs)
    if args.ac != "none":
        mode, option = ("full", "") if args.ac == "full" else ("selective", args.ac)
        apply_ac(model, mode, option)
    model.to_empty(device="cpu")
    model.init_weights(buffer_device="cpu")
    model.to(getattr(torch, args.dtype))
    model.init_rope("cpu")  # the RoPE tables stay float32
    return model.train()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    model = build(args)
    params = list(model.parameters())
    opt = torch.optim.AdamW(params, lr=8e-4, betas=(0.9, 0.95), weight_decay=0.1, foreach=True)
    tokens = torch.randint(0, args.vocab, (args.batch_size, args.seq_len + 1))
    inputs, labels = tokens[:, :-1], tokens[:, 1:]

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        logits = model(inputs)
        loss = F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(0, 1))
        del logits
        loss.backward()
        nn.utils.clip_grad_norm_(params, 1.0, foreach=True)
        opt.step()

    for _ in range(args.warmup):
        step()
    start = time.perf_counter()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        for _ in range(args.steps):
            step()
    wall = (time.perf_counter() - start) / args.steps

    per_kind: dict[str, float] = defaultdict(float)
    calls: dict[str, int] = defaultdict(int)
    rows = []
    for ev in prof.key_averages():
        if not ev.key.startswith("aten::"):
            continue
        per_kind[kind(ev.key)] += ev.self_cpu_time_total
        calls[kind(ev.key)] += ev.count
        rows.append((ev.self_cpu_time_total, ev.key, ev.count))
    total = sum(per_kind.values())
    print(f"lathe {args.model} {args.flavor}, {sum(p.numel() for p in params):,} parameters, vocab {args.vocab}, "
          f"batch {args.batch_size} x seq {args.seq_len}, {args.dtype}, AC {args.ac}, "
          f"model args {args.model_arg or '-'}, {args.n_layers or 'flavor'} layers")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; {args.steps} profiled step(s) after "
          f"{args.warmup} warm-up; profiled step wall time {wall:.2f} s (profiler overhead included)")
    print(f"\n{'kind':<14}{'self time/step':>16}{'share':>9}{'calls/step':>12}")
    for k in ("matmul", "attention", "elementwise", "copy/layout", "optimizer", "other"):
        print(f"{k:<14}{per_kind[k] / args.steps / 1e3:>13.1f} ms{100 * per_kind[k] / total:>8.1f}%"
              f"{calls[k] / args.steps:>12.0f}")
    print(f"{'all aten ops':<14}{total / args.steps / 1e3:>13.1f} ms")
    print(f"\nelementwise share: {100 * per_kind['elementwise'] / total:.1f}%")
    print(f"\ntop {args.top} ops by self time:")
    for t, name, count in sorted(rows, reverse=True)[: args.top]:
        print(f"  {name:<48}{t / args.steps / 1e3:>10.1f} ms{100 * t / total:>7.1f}%{count / args.steps:>8.0f} calls"
              f"  [{kind(name)}]")
    if args.trace:
        prof.export_chrome_trace(args.trace)
        print(f"\ntrace written to {args.trace}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
