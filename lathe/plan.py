"""``lathe plan``: which layout trains a model fastest on a given cluster, and with what overrides.

For a config (model, sequence length, global batch), a cluster (nodes x GPUs per node) and a GPU
kind (``lathe.devices``), it enumerates the layouts lathe can run (dp_replicate x dp_shard x tp x pp,
pipeline schedule and micro-batches, activation checkpointing, micro-batch and accumulation), keeps
those whose memory fits (``lathe.memory_model``, with ``MODEL_MARGIN`` for the model's error, plus
the device overheads ``lathe estimate`` adds), and ranks them by the step time of the cost model
below. docs/planning.md explains the model and its limits; ``lathe estimate`` checks one layout's
memory exactly.

Cost of one optimizer step on one GPU (seconds):

- compute: training FLOPs of its tokens (``flops_per_token``, plus the forward recomputed by
  activation checkpointing) / (peak FLOP/s x ``COMPUTE_EFFICIENCY``), stretched by the pipeline
  bubble: (pp-1)/m of the compute for GPipe/1F1B, (pp-1)/(m v) for interleaved schedules with v
  stages per rank;
- FSDP: all-gather of the bf16 parameters in forward and again in backward for every micro-batch
  (once per step under PP, which keeps them gathered), reduce-scatter of float32 gradients once per
  step, each moving (n-1)/n of the shard group's bytes per GPU; HSDP adds an all-reduce of the
  gradient shard across replicas, DDP an all-reduce of all gradients. Overlapped with compute: the
  step takes the longer of the two;
- TP (sequence parallel): per block and micro-batch, two all-gathers and two reduce-scatters of the
  activations forward and the same backward, not overlapped;
- PP: each micro-batch's activations forward and gradients backward across each stage boundary.

Each collective runs over the slowest link its group spans: inside a node when the group's ranks
share one (the mesh puts tp innermost, then dp_shard, dp_replicate, pp), else between nodes; at
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
from lathe.memory_model import Layout, block_params, root_params, local_numel, rank_memory, stage_layout
from lathe.models.llama import flops_per_token

GIB = 2**30
COMPUTE_EFFICIENCY = 0.55  # achieved fraction of peak FLOP/s in large bf16 matmuls
COMM_EFFICIENCY = 0.7  # achieved fraction of a link's bandwidth in NCCL collectives
MODEL_MARGIN = 0.10  # memory: a layout must fit with the analytic model's peak 10% higher
AC_CHOICES = (("none", "2"), ("selective", "op"), ("full", "2"))
SCHEDULES = ("1F1B", "Interleaved1F1B")


@dataclass
class Candidate:
    layout: Layout
    global_batch: int
    memory: int  # bytes the most loaded rank needs: analytic peak + device overheads
    step_time: float
    tokens_per_gpu: float  # tokens per second per GPU
    mfu: float  # percent
    parts: dict[str, float]  # seconds: compute, bubble, fsdp, tp, pp

    @property
    def name(self) -> str:
        lay = self.layout
        parts = []
        if lay.dp_replicate > 1:
            parts.append(f"{'DDP' if lay.dp_shard == 1 else 'replicate'} {lay.dp_replicate}")
        if lay.dp_shard > 1:
            parts.append(f"FSDP {lay.dp_shard}")
        if lay.tp > 1:
            parts.append(f"TP {lay.tp}")
        if lay.pp > 1:
            parts.append(f"PP {lay.pp} {lay.pp_schedule} m{lay.pp_microbatches}")
        return " x ".join(parts) or "1 GPU"

    @property
    def ac(self) -> str:
        lay = self.layout
        return lay.ac_mode if lay.ac_mode != "selective" else f"sel {lay.ac_option}"

    def overrides(self) -> list[str]:
        lay = self.layout
        out = ["--parallelism.dp_replicate", str(lay.dp_replicate), "--parallelism.dp_shard", str(lay.dp_shard),
               "--parallelism.tp", str(lay.tp), "--parallelism.pp", str(lay.pp)]
        if lay.pp > 1:
            out += ["--parallelism.pp_schedule", lay.pp_schedule, "--parallelism.pp_microbatches",
                    str(lay.pp_microbatches)]
        out += ["--activation_checkpoint.mode", lay.ac_mode]
        if lay.ac_mode == "selective":
            out += ["--activation_checkpoint.selective_ac_option", lay.ac_option]
        out += ["--training.batch_size", str(lay.batch_size), "--training.global_batch_size", str(self.global_batch)]
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


def step_cost(lay: Layout, global_batch: int, gpus_per_node: int, device) -> dict[str, float]:
    """Seconds of one optimizer step per GPU, by part (see the module doc)."""
    a = lay.args
    world = lay.world_size
    non_embedding = sum(math.prod(s) for s, _ in block_params(a)) * a.n_layers + a.dim + a.vocab_size * a.dim
    fpt = flops_per_token(a, non_embedding, lay.seq_len)
    tokens = global_batch * lay.seq_len
    compute = fpt * tokens * (1 + recompute_fraction(lay)) / world / (device.peak_flops * COMPUTE_EFFICIENCY)
    num_stages, per_rank, micro = stage_layout(lay)
    bubble = 0.0
    if lay.pp > 1:
        v = num_stages // lay.pp
        bubble = compute * (lay.pp - 1) / (micro * (v if v > 1 else 1))
    # bytes of this rank's parameters, TP-sharded (what an FSDP group gathers)
    stages = per_rank[0]
    numel = sum(local_numel(s, r, lay.tp, 1) * st.blocks for st in stages for s, r in block_params(a))
    numel += sum(local_numel(s, r, lay.tp, 1) for st in stages for s, r, _ in root_params(a, st.first, st.last))
    micro_per_step = lay.accumulation  # data-parallel micro-batches (each split again by PP)
    fsdp = 0.0
    if lay.dp_shard > 1:
        link = _link(lay.dp_shard, lay.tp, gpus_per_node, device)
        gathers = 1 if lay.pp > 1 else 2 * micro_per_step
        fsdp = gathers * _collective_time(numel * 2, lay.dp_shard, link) + _collective_time(numel * 4, lay.dp_shard, link)
    if lay.dp_replicate > 1:
        link = _link(lay.dp_replicate, lay.tp * lay.dp_shard, gpus_per_node, device)
        shard = numel * 4 / lay.dp_shard
        fsdp += 2 * _collective_time(shard, lay.dp_replicate, link)  # all-reduce = reduce-scatter + all-gather
    tp = 0.0
    micro_tokens = lay.batch_size * lay.seq_len // (micro if lay.pp > 1 else 1)
    micro_count = micro_per_step * (micro if lay.pp > 1 else 1)
    if lay.tp > 1:
        link = _link(lay.tp, 1, gpus_per_node, device)
        blocks = sum(st.blocks for st in stages)
        per_block = 8 * _collective_time(micro_tokens * a.dim * lay.compute_bytes, lay.tp, link)
        tp = per_block * blocks * micro_count
    pp = 0.0
    if lay.pp > 1:
        link = _link(lay.pp, world // lay.pp, gpus_per_node, device)
        hidden = micro_tokens * a.dim / lay.tp * lay.compute_bytes
        pp = 2 * micro_count * hidden * len(stages) / (link * 1e9 * COMM_EFFICIENCY)
    return {"compute": compute, "bubble": bubble, "fsdp": fsdp, "tp": tp, "pp": pp,
            "step": max(compute + bubble, fsdp) + tp + pp}


def layout_memory(lay: Layout) -> int:
    """Bytes the most loaded rank needs on the device: the analytic peak with ``MODEL_MARGIN``,
    plus the overheads ``lathe estimate`` adds (allocator fragmentation, CUDA context, NCCL)."""
    from lathe.estimate import device_overheads

    degrees = {"dp_replicate": lay.dp_replicate, "dp_shard": lay.dp_shard, "tp": lay.tp, "pp": lay.pp}
    worst = 0
    for r in range(lay.pp):
        peak = int(rank_memory(lay, r).peak * (1 + MODEL_MARGIN))
        worst = max(worst, peak + sum(device_overheads(peak, degrees).values()))
    return worst


def enumerate_layouts(base: Layout, nodes: int, gpus_per_node: int, global_batch: int):
    """Every layout lathe can run for ``base``'s model on the cluster (before the memory check)."""
    a = base.args
    world = nodes * gpus_per_node
    for tp in _divisors(gpus_per_node):  # TP inside a node
        if a.n_heads % tp or a.kv_heads % tp or base.seq_len % tp:
            continue
        for pp in _divisors(world // tp):
            if pp > a.n_layers:
                continue
            dp = world // (tp * pp)
            if global_batch % dp:
                continue
            for replicate, shard in _dp_splits(dp, tp, pp, gpus_per_node):
                per_rank = global_batch // dp
                for batch in _divisors(per_rank):
                    for schedule, micro in _pipeline_choices(pp, batch, a.n_layers):
                        for ac_mode, ac_option in AC_CHOICES:
                            yield dataclasses.replace(
                                base, dp_replicate=replicate, dp_shard=shard, tp=tp, pp=pp, pp_schedule=schedule,
                                pp_microbatches=micro, pp_stages_per_rank=0, pp_split_points=(),
                                ac_mode=ac_mode, ac_option=ac_option, batch_size=batch,
                                accumulation=per_rank // batch)


def _dp_splits(dp: int, tp: int, pp: int, gpus_per_node: int):
    """FSDP over all DP ranks; HSDP sharding inside a node and replicating across; DDP alone."""
    if dp == 1:
        yield 1, 1
        return
    yield 1, dp
    in_node = gpus_per_node // tp
    if 1 < in_node < dp and dp % in_node == 0:
        yield dp // in_node, in_node
    if tp == 1 and pp == 1:
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


def plan(cfg: Config, nodes: int, gpus_per_node: int, device, global_batch: int, vocab: int) -> list[Candidate]:
    """Layouts that fit, fastest first."""
    from lathe.memory_model import layout_from_config
    from lathe.parallel.dims import ParallelDims

    world = nodes * gpus_per_node
    one = dataclasses.replace(cfg.parallelism, dp_replicate=1, dp_shard=1, tp=1, pp=1, cp=1)
    base = layout_from_config(dataclasses.replace(cfg, parallelism=one), ParallelDims.from_config(one, 1), vocab)
    a = base.args
    non_embedding = sum(math.prod(s) for s, _ in block_params(a)) * a.n_layers + a.dim + vocab * a.dim
    fpt = flops_per_token(a, non_embedding, base.seq_len)
    budget = device.usable_bytes
    out = []
    for lay in enumerate_layouts(base, nodes, gpus_per_node, global_batch):
        memory = layout_memory(lay)
        if memory > budget:
            continue
        cost = step_cost(lay, global_batch, gpus_per_node, device)
        tps = global_batch * lay.seq_len / cost["step"] / world
        out.append(Candidate(lay, global_batch, memory, cost["step"], tps, 100 * fpt * tps / device.peak_flops, cost))
    out.sort(key=lambda c: (-c.tokens_per_gpu, c.memory))
    return out


def format_table(cands: list[Candidate], top: int, cfg: Config, nodes: int, gpus_per_node: int, device,
                 global_batch: int, train_args: list[str] = ()) -> str:
    lines = [f"lathe plan: {cfg.model.name} {cfg.model.flavor} on {nodes} x {gpus_per_node} {device.name} "
             f"({device.memory_gib:g} GiB, {device.peak_flops / 1e12:.0f} TFLOP/s bf16), seq {cfg.training.seq_len}, "
             f"global batch {global_batch} sequences", f"{len(cands)} layouts fit; the fastest {min(top, len(cands))}:", ""]
    width = max([len("layout")] + [len(c.name) for c in cands[:top]])
    head = (f"{'#':>3}  {'layout':<{width}}  {'AC':<7} {'micro x acc':<11} {'GiB/rank':>8} {'tok/s/GPU':>10} "
            f"{'MFU':>6} {'step s':>8}")
    lines += [head, "-" * len(head)]
    for i, c in enumerate(cands[:top], 1):
        lay = c.layout
        lines.append(f"{i:>3}  {c.name:<{width}}  {c.ac:<7} {f'{lay.batch_size} x {lay.accumulation}':<11} "
                     f"{c.memory / GIB:>8.1f} {c.tokens_per_gpu:>10,.0f} {c.mfu:>5.1f}% {c.step_time:>8.3f}")
    lines += ["", "GiB/rank: what the device needs (analytic peak +10% model margin, allocator, CUDA context, NCCL)"]
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
    parser.add_argument("--json", action="store_true", help="print every fitting layout as JSON")
    if "-h" in argv or "--help" in argv:
        parser.print_help()
        return 0
    ns, rest = parser.parse_known_args(argv)
    for option, value in (("--nodes", ns.nodes), ("--gpus-per-node", ns.gpus_per_node), ("--top", ns.top)):
        if value < 1:
            raise ConfigError(option, "must be >= 1", f"e.g. {option} 1", value)
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
    cands = plan(run_cfg, ns.nodes, ns.gpus_per_node, device, global_batch, vocab)
    if ns.json:
        print(json.dumps({"nodes": ns.nodes, "gpus_per_node": ns.gpus_per_node, "device": device.name,
                          "global_batch": global_batch, "seq_len": cfg.training.seq_len, "layouts": [
                              {"layout": c.name, "overrides": c.overrides(), "train_args": [*rest, *c.overrides()],
                               "memory": c.memory,
                               "step_time": c.step_time, "tokens_per_second_per_gpu": c.tokens_per_gpu, "mfu": c.mfu,
                               "cost": c.parts} for c in cands]}, indent=1))
    else:
        print(format_table(cands, ns.top, cfg, ns.nodes, ns.gpus_per_node, device, global_batch, rest))
    if not cands:
        print("no layout fits: more GPUs, a smaller global batch or sequence, or a larger device", flush=True)
        return 1
    return 0
