"""``lathe plan``: which layout trains a model fastest on a given cluster, and with what overrides.

For a config (model, sequence length, global batch), a cluster (nodes x GPUs per node) and a GPU
kind (``lathe.devices``), it enumerates the layouts lathe can run (dp_replicate x dp_shard x cp x tp
x pp, pipeline schedule and micro-batches, activation checkpointing, micro-batch and accumulation,
how FSDP syncs gradients under accumulation, float8 linears), keeps those whose memory fits
(``lathe.memory_model.device_need``: the analytic peak +10% for the model's error, plus the device
overheads ``lathe estimate`` adds) with ``HEADROOM`` of the device left free, and ranks them by the
step time of the cost model below. docs/planning.md explains the model, its calibration against
published torchtitan measurements, and its limits; ``lathe estimate`` checks one layout's memory.

Cost of one optimizer step on one GPU (seconds), each part reported:

- compute: training FLOPs of its tokens (``flops_per_token``) at ``EFFICIENCY`` of the peak (eager
  or compiled, calibrated), stretched for small micro-batches by ``1 + SMALL_MICRO_TOKENS / m`` (m:
  tokens of one micro-batch on a rank, the rows of its GEMMs) plus a fixed ``LAUNCH`` cost per
  block and micro-batch (kernel launches, FSDP and autograd bookkeeping); float8 linears run ``FLOAT8_LINEAR_SPEEDUP``
  faster (compiled only);
- recompute: the forward FLOPs activation checkpointing repeats, at the same rate;
- bubble: the pipeline's idle share, (pp-1)/m of the compute for GPipe/1F1B, (pp-1)/(m v) for
  interleaved schedules with v stages per rank;
- FSDP: all-gathers of the parameters in forward and backward for every micro-batch (once per
  step under PP, which keeps them gathered), reduce-scatters of the float32 gradients once per step
  or once per micro-batch (``grad_sync`` "every_microbatch"); HSDP adds an all-reduce of the gradient
  shard across replicas, DDP an all-reduce of all gradients. Overlapped with compute except the
  first unit's all-gather of each micro-batch and the last unit's reduce-scatter (nothing to hide
  them behind), and except what exceeds the compute;
- TP (sequence parallel): per block and micro-batch, two all-gathers and two reduce-scatters of the
  activations forward and the same backward, not overlapped;
- CP: the ring passes each rank's keys and values on, cp-1 times per block forward, keys, values
  and their gradients backward; exposed beyond the attention compute it overlaps with; and ring
  attention computes ``CP_ATTENTION_OVERHEAD`` slower per doubling of cp;
- PP: each micro-batch's activations forward and gradients backward across each stage boundary;
- offload (FSDP CPU offload): the optimizer step on the CPU (``CPU_ADAM_PARAMS_PER_S``), exposed;
  the host-device copies of shards overlap like FSDP's collectives.

Each collective runs over the slowest link its group spans: inside a node when the group's ranks
share one (the mesh puts tp innermost, then cp, dp_shard, dp_replicate, pp), else between nodes; at
``COMM_EFFICIENCY`` of the link's bandwidth.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
from dataclasses import dataclass

from lathe import config as config_lib
from lathe.config import Config
from lathe.errors import ConfigError
from lathe.memory_model import (FIT_MARGIN, Layout, block_params, device_need, local_numel, root_params,
                                stage_layout)
from lathe.models.llama import flops_per_token

GIB = 2**30
# Calibrated on torchtitan's Llama 3.1 8B, FSDP 8 on one node of 500 W H100s, selective AC, local
# batch 2 x 8192 (benchmarks/llama3_h100_202412_torchtitan.md): 5,762 tok/s/GPU eager, 6,667
# compiled, 8,532 compiled with float8 (docs/planning.md, "Calibration").
# Achieved fraction of the datasheet peak FLOP/s on large micro-batches, eager and compiled: Hopper
# and newer (and any GPU without its own entry) from that H100 run; A100s from torchtitan's April
# 2024 A100 runs (Llama 3 8B and 70B, FSDP 64, 1 x 8192, eager), compiled scaled like the H100's.
EFFICIENCY = {"H100": {"eager": 0.424, "compiled": 0.49}, "A100": {"eager": 0.78, "compiled": 0.90}}
SMALL_MICRO_TOKENS = 1024  # tokens at which a micro-batch's GEMMs lose half their efficiency
LAUNCH = {"eager": 4e-4, "compiled": 1.5e-4}  # seconds per block and micro-batch (forward + backward)
# Context parallel: ring attention runs slower than one attention call per doubling of cp (smaller
# chunks, a synchronization per rotation); fitted to torchtitan's 8B CP 1/2/4/8 table (same file).
CP_ATTENTION_OVERHEAD = 0.17
FLOAT8_LINEAR_SPEEDUP = 1.4  # float8 linears vs bf16, compiled (torchao tensorwise, casts included)
COMM_EFFICIENCY = 0.7  # achieved fraction of a link's bandwidth in NCCL collectives
HOST_LINK_GBPS = 25  # FSDP CPU offload: host <-> device copies, pinned memory, per GPU
CPU_ADAM_PARAMS_PER_S = 1e9  # FSDP CPU offload: AdamW parameters updated per second on the host
HEADROOM = 0.05  # fraction of device memory a layout must leave free beyond device_need
MODEL_MARGIN = FIT_MARGIN
AC_CHOICES = (("none", "2"), ("selective", "op"), ("full", "2"))
SCHEDULES = ("1F1B", "Interleaved1F1B")
GRAD_SYNCS = ("last_microbatch", "every_microbatch")
FLOAT8_GPUS = ("H100", "H200", "GH200", "B200", "L40", "L4")  # compute capability 8.9 or newer
LIMITS = {"recompute": "recompute", "small_batch": "small micro-batch", "bubble": "pipeline bubble",
          "fsdp": "FSDP communication", "tp": "TP communication", "cp": "CP ring attention",
          "pp": "PP communication", "offload": "CPU offload"}


@dataclass
class Candidate:
    layout: Layout
    global_batch: int
    memory: int  # bytes the most loaded rank needs on the device: analytic peak + margin + overheads
    step_time: float
    tokens_per_gpu: float  # tokens per second per GPU
    mfu: float  # percent
    parts: dict[str, float]  # seconds by part (see the module doc); "step" is their total
    float8: bool = False
    budget: int = 0  # bytes a layout may need on this device (usable memory less the headroom)

    @property
    def name(self) -> str:
        lay = self.layout
        parts = []
        shard = lay.dp_shard // lay.cp
        if lay.dp_replicate > 1:
            parts.append(f"{'DDP' if shard == 1 and lay.cp == 1 else 'replicate'} {lay.dp_replicate}")
        if shard > 1:
            parts.append(f"FSDP {shard}")
        if lay.cp > 1:
            parts.append(f"CP {lay.cp}")
        if lay.tp > 1:
            parts.append(f"TP {lay.tp}")
        if lay.pp > 1:
            parts.append(f"PP {lay.pp} {lay.pp_schedule} m{lay.pp_microbatches}")
        if lay.cpu_offload:
            parts.append("offload")
        if self.float8:
            parts.append("fp8")
        return " x ".join(parts) or "1 GPU"

    @property
    def ac(self) -> str:
        lay = self.layout
        return lay.ac_mode if lay.ac_mode != "selective" else f"sel {lay.ac_option}"

    @property
    def grad_sync(self) -> str:
        """How gradients accumulate: "-" when there is no choice (no FSDP, no accumulation, PP)."""
        lay = self.layout
        if not (lay.fsdp and lay.accumulation > 1 and lay.pp == 1):
            return "-"
        return "every" if lay.grad_sync == "every_microbatch" else "last"

    @property
    def limit(self) -> str:
        """What limits this layout: the largest cost besides the model's own compute, with its share
        of the step ("compute" when none reaches 5%), and ", memory" when it needs more than 90% of
        the memory budget (a larger micro-batch or lighter checkpointing would not fit)."""
        costs = {k: v for k, v in self.parts.items() if k in LIMITS}
        worst = max(costs, key=costs.get)
        share = costs[worst] / self.step_time
        out = f"{LIMITS[worst]} {100 * share:.0f}%" if share >= 0.05 else "compute"
        if self.budget and self.memory > 0.9 * self.budget:
            out += ", memory"
        return out

    def overrides(self) -> list[str]:
        lay = self.layout
        out = ["--parallelism.dp_replicate", str(lay.dp_replicate),
               "--parallelism.dp_shard", str(lay.dp_shard // lay.cp), "--parallelism.cp", str(lay.cp),
               "--parallelism.tp", str(lay.tp), "--parallelism.pp", str(lay.pp)]
        if lay.pp > 1:
            out += ["--parallelism.pp_schedule", lay.pp_schedule, "--parallelism.pp_microbatches",
                    str(lay.pp_microbatches)]
        out += ["--activation_checkpoint.mode", lay.ac_mode]
        if lay.ac_mode == "selective":
            out += ["--activation_checkpoint.selective_ac_option", lay.ac_option]
        out += ["--training.batch_size", str(lay.batch_size), "--training.global_batch_size", str(self.global_batch)]
        if self.grad_sync != "-":
            out += ["--training.gradient_accumulation_sync", lay.grad_sync]
        if self.float8:
            out += ["--float8.enable_float8_linear"]
            if lay.fsdp:
                out += ["--float8.enable_fsdp_float8_all_gather", "--float8.precompute_float8_dynamic_scale_for_fsdp"]
        return out


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def _link(group: int, stride: int, gpus_per_node: int, device) -> float:
    """GB/s of the slowest link a group of ``group`` ranks ``stride`` apart crosses."""
    if group <= 1:
        return float("inf")
    return device.intra_node_gbps if group * stride <= gpus_per_node else device.inter_node_gbps


def _collective_time(nbytes: float, group: int, gbps: float) -> float:
    """All-gather / reduce-scatter: each GPU moves (n-1)/n of the full buffer."""
    if group <= 1 or nbytes == 0:
        return 0.0
    return nbytes * (group - 1) / group / (gbps * 1e9 * COMM_EFFICIENCY)


def recompute_fraction(lay: Layout) -> float:
    """Extra training FLOPs of activation checkpointing, as a fraction: the forward is a third of
    forward + backward; full AC repeats it; op-level selective AC repeats every other matmul (about
    half of it); "selective N" repeats it for one block in N."""
    if lay.ac_mode == "full":
        return 1 / 3
    if lay.ac_mode == "selective":
        return 1 / 6 if lay.ac_option == "op" else 1 / 3 / int(lay.ac_option)
    return 0.0


def efficiency(device) -> dict[str, float]:
    """The calibration that applies to ``device``: A100 parts their own, every other GPU the H100's."""
    return EFFICIENCY["A100" if device.name.startswith("A100") else "H100"]


def float8_capable(device) -> bool:
    return any(device.name.startswith(name) for name in FLOAT8_GPUS)


def step_cost(lay: Layout, global_batch: int, gpus_per_node: int, device, compiled: bool = False,
              float8: bool = False) -> dict[str, float]:
    """Seconds of one optimizer step per GPU, by part (see the module doc)."""
    a = lay.args
    world = lay.world_size
    mode = "compiled" if compiled else "eager"
    non_embedding = sum(math.prod(s) for s, _ in block_params(a)) * a.n_layers + a.dim + a.vocab_size * a.dim
    fpt = flops_per_token(a, non_embedding, lay.seq_len)
    attention_fpt = flops_per_token(a, 0, lay.seq_len)
    tokens = global_batch * lay.seq_len / world  # per GPU (TP, PP and CP ranks share theirs)
    num_stages, per_rank, micro = stage_layout(lay)
    stages = per_rank[0]
    blocks = sum(st.blocks for st in stages)
    micro_tokens = lay.batch_size * lay.seq_len // lay.cp // (micro if lay.pp > 1 else 1)
    micro_count = lay.accumulation * (micro if lay.pp > 1 else 1)  # micro-batches per step through a stage
    rate = device.peak_flops * efficiency(device)[mode]
    linear_speedup = FLOAT8_LINEAR_SPEEDUP if (float8 and compiled) else 1.0
    dense = ((fpt - attention_fpt) / linear_speedup + attention_fpt) * tokens / rate
    attention = attention_fpt * tokens / rate
    small = dense * SMALL_MICRO_TOKENS / micro_tokens + LAUNCH[mode] * blocks * micro_count
    recompute = (dense + small) * recompute_fraction(lay)
    compute = dense + small + recompute
    bubble = 0.0
    if lay.pp > 1:
        v = num_stages // lay.pp
        bubble = compute * (lay.pp - 1) / (micro * (v if v > 1 else 1))
    # elements of this rank's parameters, TP-sharded (what an FSDP group gathers)
    block_numel = sum(local_numel(s, r, lay.tp, 1) for s, r in block_params(a))
    root_numel = sum(local_numel(s, r, lay.tp, 1) for st in stages for s, r, _ in root_params(a, st.first, st.last))
    numel = block_numel * blocks + root_numel
    gather_bytes = 1 if (float8 and lay.fsdp) else 2  # float8 all-gather of the linear weights
    overlapped = exposed = 0.0
    if lay.dp_shard > 1:
        link = _link(lay.dp_shard, lay.tp, gpus_per_node, device)
        gathers = 1 if lay.pp > 1 else 2 * lay.accumulation
        reduces = lay.accumulation if (lay.pp == 1 and lay.grad_sync == "every_microbatch") else 1
        gather = _collective_time(numel * gather_bytes, lay.dp_shard, link)
        reduce = _collective_time(numel * 4, lay.dp_shard, link)
        overlapped += gathers * gather + reduces * reduce
        first = (block_numel + root_numel) / numel  # the unit nothing precedes, the one nothing follows
        exposed += first * (gather * (1 if lay.pp > 1 else lay.accumulation) + reduce * reduces)
    if lay.dp_replicate > 1:
        link = _link(lay.dp_replicate, lay.tp * lay.dp_shard, gpus_per_node, device)
        shard = numel * 4 / lay.dp_shard
        overlapped += 2 * _collective_time(shard, lay.dp_replicate, link)  # all-reduce = reduce-scatter + all-gather
    offload = 0.0
    if lay.cpu_offload and lay.fsdp:
        shard_bytes = numel * 4 / lay.dp_shard
        overlapped += shard_bytes * (2 * lay.accumulation + 1) / (HOST_LINK_GBPS * 1e9)
        offload = numel / lay.dp_shard / CPU_ADAM_PARAMS_PER_S
    fsdp = exposed + max(0.0, overlapped - compute)
    tp = 0.0
    if lay.tp > 1:
        link = _link(lay.tp, 1, gpus_per_node, device)
        per_block = 8 * _collective_time(micro_tokens * a.dim * lay.compute_bytes, lay.tp, link)
        tp = per_block * blocks * micro_count
    cp = 0.0
    if lay.cp > 1:
        link = _link(lay.cp, lay.tp, gpus_per_node, device)
        kv = micro_tokens * 2 * a.kv_heads * a.head_dim / lay.tp * lay.compute_bytes
        ring = 3 * (lay.cp - 1) * kv / (link * 1e9 * COMM_EFFICIENCY) * blocks * micro_count
        cp = max(0.0, ring - attention) + attention * CP_ATTENTION_OVERHEAD * math.log2(lay.cp)
    pp = 0.0
    if lay.pp > 1:
        link = _link(lay.pp, world // lay.pp, gpus_per_node, device)
        hidden = micro_tokens * a.dim / lay.tp * lay.compute_bytes
        pp = 2 * micro_count * hidden * len(stages) / (link * 1e9 * COMM_EFFICIENCY)
    parts = {"compute": dense, "small_batch": small, "recompute": recompute, "bubble": bubble, "fsdp": fsdp,
             "tp": tp, "cp": cp, "pp": pp, "offload": offload}
    parts["step"] = sum(parts.values())
    return parts


def layout_memory(lay: Layout) -> int:
    """Bytes the most loaded rank needs on the device (``memory_model.device_need``)."""
    return device_need(lay)


def enumerate_layouts(base: Layout, nodes: int, gpus_per_node: int, global_batch: int, cp_ok: bool = True):
    """Every layout lathe can run for ``base``'s model on the cluster (before the memory check).
    Context parallel (inside a node, next to TP) when ``cp_ok`` (causal attention)."""
    a = base.args
    world = nodes * gpus_per_node
    for tp in _divisors(gpus_per_node):  # TP inside a node
        if a.n_heads % tp or a.kv_heads % tp or base.seq_len % tp:
            continue
        for cp in _divisors(gpus_per_node // tp) if cp_ok else [1]:
            if cp > 1 and base.seq_len % (2 * cp * tp):
                continue
            for pp in _divisors(world // (tp * cp)):
                if pp > a.n_layers:
                    continue
                dp = world // (tp * pp * cp)
                if global_batch % dp:
                    continue
                for replicate, shard in _dp_splits(dp, tp * cp, pp, gpus_per_node):
                    if cp > 1 and replicate > 1 and shard == 1:
                        continue  # CP shards over dp_shard x cp: no plain DDP
                    per_rank = global_batch // dp
                    for batch in _divisors(per_rank):
                        for schedule, micro in _pipeline_choices(pp, batch, a.n_layers):
                            for ac_mode, ac_option in AC_CHOICES:
                                lay = dataclasses.replace(
                                    base, dp_replicate=replicate, dp_shard=shard * cp, cp=cp, tp=tp, pp=pp,
                                    pp_schedule=schedule, pp_microbatches=micro, pp_stages_per_rank=0,
                                    pp_split_points=(), ac_mode=ac_mode, ac_option=ac_option, batch_size=batch,
                                    accumulation=per_rank // batch)
                                if lay.cpu_offload and not lay.fsdp:
                                    continue
                                syncs = GRAD_SYNCS if (lay.fsdp and lay.accumulation > 1 and pp == 1) else \
                                    (GRAD_SYNCS[0],)
                                for sync in syncs:
                                    yield dataclasses.replace(lay, grad_sync=sync)


def _dp_splits(dp: int, inner: int, pp: int, gpus_per_node: int):
    """FSDP over all DP ranks; HSDP sharding inside a node and replicating across; DDP alone."""
    if dp == 1:
        yield 1, 1
        return
    yield 1, dp
    in_node = gpus_per_node // inner
    if 1 < in_node < dp and dp % in_node == 0:
        yield dp // in_node, in_node
    if inner == 1 and pp == 1:
        yield dp, 1


def _pipeline_choices(pp: int, batch: int, n_layers: int):
    if pp == 1:
        yield "1F1B", 0
        return
    for schedule in SCHEDULES:
        stages = pp * (2 if schedule == "Interleaved1F1B" else 1)
        if stages > n_layers or batch < stages:
            continue
        micro = batch  # one sequence per micro-batch: the smallest bubble and activations
        if schedule == "Interleaved1F1B" and micro % pp:
            continue
        yield schedule, micro


def plan(cfg: Config, nodes: int, gpus_per_node: int, device, global_batch: int, vocab: int,
         headroom: float = HEADROOM) -> list[Candidate]:
    """Layouts that fit, fastest first."""
    from lathe.memory_model import layout_from_config
    from lathe.parallel.dims import ParallelDims

    world = nodes * gpus_per_node
    one = dataclasses.replace(cfg.parallelism, dp_replicate=1, dp_shard=1, tp=1, pp=1, cp=1)
    base = layout_from_config(dataclasses.replace(cfg, parallelism=one), ParallelDims.from_config(one, 1), vocab)
    a = base.args
    non_embedding = sum(math.prod(s) for s, _ in block_params(a)) * a.n_layers + a.dim + vocab * a.dim
    fpt = flops_per_token(a, non_embedding, base.seq_len)
    budget = int(device.usable_bytes - headroom * device.memory_bytes)
    compiled = cfg.training.compile
    # float8 linears pay off compiled (torchao's casts fused), on GPUs with float8 tensor cores
    float8_choices = (False, True) if (compiled and float8_capable(device)) else (False,)
    cp_ok = cfg.model.attention_mask == "causal"
    out = []
    for lay in enumerate_layouts(base, nodes, gpus_per_node, global_batch, cp_ok):
        memory = layout_memory(lay)  # float8 changes it little (docs/planning.md): the bf16 model
        if memory > budget:
            continue
        for float8 in float8_choices:
            cost = step_cost(lay, global_batch, gpus_per_node, device, compiled, float8)
            tps = global_batch * lay.seq_len / cost["step"] / world
            out.append(Candidate(lay, global_batch, memory, cost["step"], tps, 100 * fpt * tps / device.peak_flops,
                                 cost, float8, budget))
    out.sort(key=lambda c: (-c.tokens_per_gpu, c.memory))
    return out


def format_table(cands: list[Candidate], top: int, cfg: Config, nodes: int, gpus_per_node: int, device,
                 global_batch: int, train_args: list[str] = (), headroom: float = HEADROOM) -> str:
    mode = "compiled" if cfg.training.compile else "eager"
    lines = [f"lathe plan: {cfg.model.name} {cfg.model.flavor} on {nodes} x {gpus_per_node} {device.name} "
             f"({device.memory_gib:g} GiB, {device.peak_flops / 1e12:.0f} TFLOP/s bf16), seq {cfg.training.seq_len}, "
             f"global batch {global_batch} sequences, {mode}",
             f"{len(cands)} layouts fit; the fastest {min(top, len(cands))}:", ""]
    width = max([len("layout")] + [len(c.name) for c in cands[:top]])
    head = (f"{'#':>3}  {'layout':<{width}}  {'AC':<7} {'micro x acc':<11} {'sync':<5} {'GiB/rank':>8} {'free':>5} "
            f"{'tok/s/GPU':>10} {'MFU':>6} {'step s':>8}  limited by")
    lines += [head, "-" * len(head)]
    for i, c in enumerate(cands[:top], 1):
        lay = c.layout
        lines.append(f"{i:>3}  {c.name:<{width}}  {c.ac:<7} {f'{lay.batch_size} x {lay.accumulation}':<11} "
                     f"{c.grad_sync:<5} {c.memory / GIB:>8.1f} {(device.usable_bytes - c.memory) / GIB:>5.1f} "
                     f"{c.tokens_per_gpu:>10,.0f} {c.mfu:>5.1f}% {c.step_time:>8.3f}  {c.limit}")
    lines += ["", f"GiB/rank: what the device needs (analytic peak +{100 * FIT_MARGIN:.0f}% model margin, allocator, "
              f"CUDA context, NCCL); free: what is left of the {device.usable_bytes / GIB:.1f} usable GiB, at least "
              f"{100 * headroom:g}% of the device ({headroom * device.memory_gib:.1f} GiB); sync: FSDP gradients under "
              "accumulation, reduce-scattered every micro-batch or kept unsharded until the last"]
    if cands:
        import shlex

        lines += ["", "best: lathe train " + " ".join(shlex.quote(x) for x in [*train_args, *cands[0].overrides()])]
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    from lathe.devices import resolve_device
    from lathe.estimate import estimation_config, vocab_size_for

    parser = argparse.ArgumentParser(prog="lathe plan", allow_abbrev=False, description=(
        "Rank the layouts of a training config for a cluster by predicted tokens/s. "
        "Takes lathe train's --config and --section.key overrides."))
    parser.add_argument("--nodes", type=int, default=1)
    parser.add_argument("--gpus-per-node", type=int, default=8)
    parser.add_argument("--device", default=None, help="GPU kind (e.g. H100, A100 40GB, L40S)")
    parser.add_argument("--device-memory", type=float, default=None, help="GiB per GPU (overrides the table)")
    parser.add_argument("--peak-tflops", type=float, default=None, help="bf16 dense TFLOP/s (overrides the table)")
    parser.add_argument("--intra-node-bw", type=float, default=None, help="GB/s per GPU inside a node")
    parser.add_argument("--inter-node-bw", type=float, default=None, help="GB/s per GPU between nodes")
    parser.add_argument("--global-batch", type=int, default=None,
                        help="sequences per step (default training.global_batch_size, else batch_size x GPUs)")
    parser.add_argument("--top", type=int, default=10, help="rows to print")
    parser.add_argument("--headroom", type=float, default=HEADROOM,
                        help=f"fraction of device memory every layout leaves free (default {HEADROOM})")
    parser.add_argument("--json", action="store_true", help="print every fitting layout as JSON")
    if "-h" in argv or "--help" in argv:
        parser.print_help()
        return 0
    ns, rest = parser.parse_known_args(argv)
    for option, value in (("--nodes", ns.nodes), ("--gpus-per-node", ns.gpus_per_node), ("--top", ns.top)):
        if value < 1:
            raise ConfigError(option, "must be >= 1", f"e.g. {option} 1", value)
    if not 0 <= ns.headroom < 1:
        raise ConfigError("--headroom", "must be a fraction in [0, 1)", "e.g. --headroom 0.05", ns.headroom)
    cfg, _ = config_lib.load_config(rest)
    device = resolve_device(ns.device, ns.device_memory, ns.peak_tflops, ns.intra_node_bw, ns.inter_node_bw)
    if device is None or device.peak_flops is None:
        raise ConfigError("--device", "lathe plan needs the GPU kind (or --device-memory and --peak-tflops)",
                          "e.g. --device H100", ns.device)
    world = ns.nodes * ns.gpus_per_node
    global_batch = ns.global_batch or cfg.training.global_batch_size or cfg.training.batch_size * world
    if global_batch < 1:
        raise ConfigError("--global-batch", "must be >= 1", "e.g. --global-batch 256", global_batch)
    vocab, _ = vocab_size_for(cfg)
    run_cfg = estimation_config(cfg)
    config_lib.validate(dataclasses.replace(run_cfg, parallelism=dataclasses.replace(
        run_cfg.parallelism, dp_replicate=1, dp_shard=1, tp=1, pp=1, cp=1)), world_size=1, cuda_available=True)
    cands = plan(run_cfg, ns.nodes, ns.gpus_per_node, device, global_batch, vocab, ns.headroom)
    if ns.json:
        print(json.dumps({"nodes": ns.nodes, "gpus_per_node": ns.gpus_per_node, "device": device.name,
                          "global_batch": global_batch, "seq_len": cfg.training.seq_len, "layouts": [
                              {"layout": c.name, "overrides": c.overrides(), "train_args": [*rest, *c.overrides()],
                               "memory": c.memory,
                               "gpu_memory": c.memory, "host_memory": _host_memory(c.layout),
                               "step_time": c.step_time, "tokens_per_second_per_gpu": c.tokens_per_gpu, "mfu": c.mfu,
                               "limited_by": c.limit, "gradient_accumulation_sync": c.layout.grad_sync,
                               "float8": c.float8, "cost": c.parts} for c in cands]}, indent=1))
    else:
        print(format_table(cands, ns.top, cfg, ns.nodes, ns.gpus_per_node, device, global_batch, rest, ns.headroom))
    if not cands:
        print("no layout fits: more GPUs, a smaller global batch or sequence, or a larger device", flush=True)
        return 1
    return 0


def _host_memory(lay: Layout) -> int:
    """Bytes a rank keeps in host memory (FSDP CPU offload), the most loaded pipeline rank."""
    from lathe.memory_model import rank_memory

    return max(rank_memory(lay, r).host for r in range(lay.pp))
