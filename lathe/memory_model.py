"""The analytic memory model: closed-form bytes per rank for any layout, in microseconds.

``lathe plan`` scores hundreds of layouts with it, ``lathe train`` logs it for its own layout, and
tests hold it against ``lathe estimate`` (the fake-tensor measurement). It counts what
``lathe.memtrack`` counts (live tensor storages) at the moments a training step peaks:

- **backward start**: parameters, optimizer states, every saved activation of the micro-batches in
  flight, the loss's temporaries, FSDP's unsharded last block, pipeline buffers (and gradients when
  earlier micro-batches already produced them);
- **recompute** (activation checkpointing): the same with one block's activations recomputed;
- **optimizer step**: parameters, gradients, states and the step's largest temporary.

The formulas follow what lathe's Llama computes and autograd saves; docs/planning.md derives them
and lists what is approximated (pipeline schedules beyond GPipe/1F1B/interleaved, op-level selective
AC under TP). ``lathe estimate`` measures instead of modelling; use it when the two disagree.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

from lathe.models.llama import ModelArgs

FP32 = 4
BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


@dataclass(frozen=True)
class Layout:
    """Everything the memory of one rank depends on (what a config and a world size decide)."""

    args: ModelArgs  # with vocab_size and max_seq_len set
    seq_len: int
    batch_size: int  # sequences per data-parallel rank per micro-batch (split further by PP)
    accumulation: int = 1
    dp_replicate: int = 1
    dp_shard: int = 1  # FSDP's sharding degree (under context parallel: dp_shard x cp)
    tp: int = 1
    pp: int = 1
    pp_schedule: str = "1F1B"
    pp_microbatches: int = 0  # 0 = number of stages
    pp_stages_per_rank: int = 0
    pp_split_points: tuple = ()
    ac_mode: str = "none"
    ac_option: str = "2"
    param_dtype: str = "bfloat16"  # FSDP's compute dtype
    reduce_dtype: str = "float32"
    loss_parallel: bool = True
    cp: int = 1  # context parallel: each rank holds seq_len / cp tokens of every sequence
    optimizer_states: int = 2  # Adam and AdamW keep two per parameter
    # FSDP with gradient accumulation (training.gradient_accumulation_sync, resolved: never "auto"):
    # "every_microbatch" reduce-scatters each micro-batch's gradients into the sharded gradients;
    # "last_microbatch" keeps them unsharded (reduce dtype) until the last micro-batch
    grad_sync: str = "last_microbatch"
    cpu_offload: bool = False  # FSDP CPU offload: parameters, gradients, optimizer live in host memory

    @property
    def fsdp(self) -> bool:
        return self.dp_shard > 1

    @property
    def ddp(self) -> bool:
        return self.dp_replicate > 1 and self.dp_shard == 1

    @property
    def compute_bytes(self) -> int:
        """Bytes per activation value: FSDP computes in its parameter dtype, otherwise float32."""
        return BYTES[self.param_dtype] if self.fsdp else FP32

    @property
    def world_size(self) -> int:
        return self.dp_replicate * self.dp_shard * self.tp * self.pp


@dataclass
class RankMemory:
    """Bytes on one rank (the first of its pipeline rank)."""

    pp_rank: int
    params: int
    grads: int
    optimizer: int
    buffers: int
    activations: int  # saved activations at the backward-start peak (all micro-batches in flight)
    activations_per_block: int  # one micro-batch, one block without checkpointing
    loss: int  # the loss's temporaries at the start of backward (last stage)
    unsharded: int  # FSDP's all-gathered parameters alive at the peak
    communication: int  # pipeline send/receive buffers, DDP buckets
    phases: dict[str, int] = field(default_factory=dict)
    host: int = 0  # bytes in host memory instead (FSDP CPU offload: parameters, gradients, optimizer)

    @property
    def peak(self) -> int:
        return max(self.phases.values())

    @property
    def peak_phase(self) -> str:
        return max(self.phases, key=self.phases.get)


# ---------------------------------------------------------------------------------------------
# Parameters


def block_params(a: ModelArgs) -> list[tuple[tuple[int, ...], str]]:
    """(shape, TP rule) of one block's parameters: col = split output features (dim 0),
    row = split input features (dim 1), rep = replicated."""
    q, kv = a.n_heads * a.head_dim, a.kv_heads * a.head_dim
    out = [((q, a.dim), "col"), ((kv, a.dim), "col"), ((kv, a.dim), "col"), ((a.dim, q), "row"),
           ((a.ffn_hidden_dim, a.dim), "col"), ((a.dim, a.ffn_hidden_dim), "row"), ((a.ffn_hidden_dim, a.dim), "col")]
    if a.norm_type != "np_layernorm":
        out += [((a.dim,), "rep"), ((a.dim,), "rep")]
    return out


def root_params(a: ModelArgs, first: bool, last: bool) -> list[tuple[tuple[int, ...], str, str]]:
    out = []
    if first:
        out.append(((a.vocab_size, a.dim), "col", "embedding"))  # vocabulary-sharded (dim 0)
    if last:
        if a.norm_type != "np_layernorm":
            out.append(((a.dim,), "rep", "norm"))
        out.append(((a.vocab_size, a.dim), "col", "output"))
    return out


def local_numel(shape: tuple[int, ...], rule: str, tp: int, dp_shard: int) -> int:
    """Elements rank 0 holds of a parameter: TP splits like ``torch.chunk`` (rank 0 gets the
    rounded-up share), then FSDP splits dim 0 of that, padding every shard to the same size."""
    shape = list(shape)
    if tp > 1 and rule == "col":
        shape[0] = math.ceil(shape[0] / tp)
    elif tp > 1 and rule == "row":
        shape[1] = math.ceil(shape[1] / tp)
    if dp_shard > 1:
        shape[0] = math.ceil(shape[0] / dp_shard)
    return math.prod(shape)


@dataclass
class _Stage:
    blocks: int
    first: bool
    last: bool


def stage_layout(lay: Layout) -> tuple[int, list[list[_Stage]], int]:
    """(number of stages, each pipeline rank's stages, micro-batches), as ``trainer.pipeline_plan``
    splits the blocks."""
    a = lay.args
    if lay.pp == 1:
        return 1, [[_Stage(a.n_layers, True, True)]], 1
    from lathe.models.llama import flops_per_token
    from lathe.parallel import pipeline as pl

    cls = pl.schedule_class(lay.pp_schedule)
    if lay.pp_split_points:
        num_stages = len(lay.pp_split_points) + 1
        ranges = pl.layer_ranges_from_split_points(list(lay.pp_split_points), a.n_layers, num_stages)
    else:
        num_stages = lay.pp * pl.stages_per_rank(cls, lay.pp_stages_per_rank)
        block_numel = sum(math.prod(s) for s, _ in block_params(a))
        block = 6 * block_numel + flops_per_token(a, 0, lay.seq_len) / a.n_layers
        table = a.vocab_size * a.dim
        ranges = pl.balanced_layer_ranges(block, a.n_layers, num_stages, first_extra=2 * table, last_extra=6 * table)
    v_shaped = pl.is_v_shaped(cls)
    per_rank = []
    for r in range(lay.pp):
        ids = pl.stage_ids(r, lay.pp, num_stages, v_shaped)
        per_rank.append([_Stage(ranges[s][1] - ranges[s][0], s == 0, s == num_stages - 1) for s in ids])
    return num_stages, per_rank, lay.pp_microbatches or num_stages


def param_bytes(lay: Layout, stages: list[_Stage]) -> tuple[int, int, int, int]:
    """(parameters, gradients, optimizer states, parameter tensors) of rank 0 of a pipeline rank,
    bytes; float32 master weights."""
    a, t, s = lay.args, lay.tp, lay.dp_shard
    numel = grads = tensors = 0
    for st in stages:
        for shape, rule in block_params(a):
            n = local_numel(shape, rule, t, s) * st.blocks
            numel, grads, tensors = numel + n, grads + n, tensors + st.blocks
        for shape, rule, what in root_params(a, st.first, st.last):
            n = local_numel(shape, rule, t, s)
            numel, tensors = numel + n, tensors + 1
            # torch 2.13: the vocabulary-sharded embedding's gradient comes back replicated (whole
            # table) under plain TP; FSDP reduce-scatters it into a shard.
            grads += math.prod(shape) if (what == "embedding" and t > 1 and s == 1) else n
    # Adam/AdamW: exp_avg and exp_avg_sq like each parameter, plus a float32 step count per tensor
    return FP32 * numel, FP32 * grads, lay.optimizer_states * FP32 * numel + FP32 * tensors, tensors


# ---------------------------------------------------------------------------------------------
# Activations (bytes per token of a micro-batch)


def block_activations(lay: Layout) -> int:
    """Bytes per token one block saves for backward without checkpointing.

    Each norm keeps a float32 copy of its input (the input itself when computing in float32), its
    normalized output in the compute dtype and the product with the weight, which sequence
    parallelism all-gathers to the full sequence before the projections save it. Attention keeps
    the rotated queries and keys (keys and values repeated to all query heads), the values and
    SDPA's output, plus its float32 log-sum-exp per head; the SwiGLU FFN keeps w1's and w3's
    outputs, the SiLU and the product. Tensor-parallel shards divide everything but the gathered
    norm outputs. Under context parallel, torch's ring attention keeps about two more copies of
    this rank's keys and values per block (as measured on fake tensors, at cp 2 and 4; the
    buffers the ring passes on are freed as it goes)."""
    a, t, c = lay.args, lay.tp, lay.compute_bytes
    d, q, f = a.dim, a.n_heads * a.head_dim, a.ffn_hidden_dim
    norm = FP32 * d / t + c * d / t + c * d + FP32 / t
    attention = 4 * c * q / t + FP32 * a.n_heads / t
    if lay.cp > 1:
        attention += 2 * 2 * c * a.kv_heads * a.head_dim / t
    ffn = 4 * c * f / t
    return int(2 * norm + attention + ffn)


def op_sac_activations(lay: Layout) -> int:
    """Op-level selective AC: every other matmul's output (wq, wv, w1, w2), SDPA's outputs, under
    TP the reduce-scattered outputs, and the block's output (the next block's saved input)."""
    a, t, c = lay.args, lay.tp, lay.compute_bytes
    d, q, kv, f = a.dim, a.n_heads * a.head_dim, a.kv_heads * a.head_dim, a.ffn_hidden_dim
    saved = c * (q / t + kv / t + f / t + d) + c * q / t + FP32 * a.n_heads / t
    if t > 1:
        saved += 2 * c * d / t
    return int(saved + c * d / t)


def checkpointed_block(lay: Layout) -> int:
    """A fully checkpointed block keeps its output (the next block's input), a sequence shard."""
    return int(lay.compute_bytes * lay.args.dim / lay.tp)


def _kept_blocks(lay: Layout, n_blocks: int) -> tuple[int, int]:
    """(blocks saving everything, blocks checkpointed) among ``n_blocks`` (AC mode "selective N"
    checkpoints every Nth block)."""
    if lay.ac_mode == "full":
        return 0, n_blocks
    if lay.ac_mode == "selective" and lay.ac_option != "op":
        every = int(lay.ac_option)
        return n_blocks - n_blocks // every, n_blocks // every
    return n_blocks, 0


def stage_activations(lay: Layout, st: _Stage) -> int:
    """Bytes per token one micro-batch leaves saved in a stage at the end of its forward."""
    a, t, c = lay.args, lay.tp, lay.compute_bytes
    if lay.ac_mode == "selective" and lay.ac_option == "op":
        total = st.blocks * op_sac_activations(lay)
    else:
        kept, ckpt = _kept_blocks(lay, st.blocks)
        total = kept * block_activations(lay) + ckpt * checkpointed_block(lay)
    if st.last:  # final norm (like a block's) and the saved log-softmax
        total += FP32 * a.dim / t + c * a.dim / t + c * a.dim + FP32 / t
        total += FP32 * _vocab_shard(lay)
    return int(total)


def _vocab_shard(lay: Layout) -> float:
    """Logit columns this rank computes the loss on: a vocabulary shard under loss parallelism."""
    return lay.args.vocab_size / lay.tp if (lay.tp > 1 and lay.loss_parallel) else lay.args.vocab_size


def loss_temporaries(lay: Layout) -> int:
    """Bytes per token at the start of backward besides the saved log-softmax: the gradients of
    the log-softmax and of the logits (float32), three vocabulary shards under loss parallelism;
    without it under TP, the all-gathered logits too."""
    v = lay.args.vocab_size
    if lay.tp > 1 and lay.loss_parallel:
        return int(3 * FP32 * v / lay.tp)
    if lay.tp > 1:
        return int(2 * FP32 * v + FP32 * v / lay.tp)
    return 2 * FP32 * v


# ---------------------------------------------------------------------------------------------
# Pipeline schedules: how many micro-batches each local stage holds at once


def inflight(lay: Layout, pp_rank: int, n_local: int, microbatches: int) -> list[int]:
    """Micro-batches whose activations each local stage holds when the first backward starts."""
    from lathe.parallel import pipeline as pl

    if lay.pp == 1:
        return [1]
    name = pl.schedule_class(lay.pp_schedule).__name__
    if name in ("ScheduleGPipe", "ScheduleLoopedBFS"):
        return [microbatches] * n_local
    if name == "Schedule1F1B":
        return [min(microbatches, lay.pp - pp_rank)]
    if name == "ScheduleDualPipeV":  # torch's steps 1-4: forwards of each stage before its first backward
        return [min(microbatches, 2 * lay.pp - pp_rank), min(microbatches, lay.pp)]
    # Interleaved schedules (torch's warm-up): forwards go round-robin over the local stages,
    # ``per_round`` micro-batches at a time, until the first backward.
    rounds = max(1, microbatches // lay.pp)
    per_round = microbatches // rounds
    warmup = min((n_local - 1) * per_round + 2 * (lay.pp - 1 - pp_rank), microbatches * n_local)
    counts = [0] * n_local
    for k in range(warmup + 1):
        counts[(k // per_round) % n_local] += 1
    return [min(x, microbatches) for x in counts]


# ---------------------------------------------------------------------------------------------
# The model


def rank_memory(lay: Layout, pp_rank: int = 0) -> RankMemory:
    a, t, c = lay.args, lay.tp, lay.compute_bytes
    num_stages, per_rank, micro = stage_layout(lay)
    stages = per_rank[pp_rank]
    params, grads, optim, _ = param_bytes(lay, stages)
    buffers = 2 * FP32 * a.max_seq_len * (a.head_dim // 2)  # RoPE cos and sin tables, per part
    buffers *= len(stages)
    tokens = lay.batch_size * lay.seq_len // lay.cp // (micro if lay.pp > 1 else 1)  # one micro-batch
    counts = inflight(lay, pp_rank, len(stages), micro)
    acts = sum(n * stage_activations(lay, st) for n, st in zip(counts, stages)) * tokens
    last = next((st for st in stages if st.last), None)
    loss = loss_temporaries(lay) * tokens if last is not None else 0
    if last is not None and lay.pp > 1:  # the schedule keeps every micro-batch's logits (float32)
        loss += micro * tokens * FP32 * _vocab_shard(lay)
    # FSDP: the last block is not resharded after forward, so it is still gathered at backward
    # start; under PP no block is resharded after forward.
    block_numel = sum(local_numel(s, r, t, 1) for s, r in block_params(a))
    root_numel = sum(local_numel(s, r, t, 1) for st in stages for s, r, _ in root_params(a, st.first, st.last))
    param_bytes_compute = BYTES[lay.param_dtype]
    unsharded = 0
    if lay.fsdp:
        local_blocks = sum(st.blocks for st in stages)
        unsharded = block_numel * param_bytes_compute * (local_blocks if lay.pp > 1 else 1)
        if lay.pp > 1:
            unsharded += root_numel * param_bytes_compute
    communication = 0
    if lay.pp > 1:
        hidden = tokens * a.dim // t * c
        for st in stages:
            communication += hidden * ((0 if st.first else micro) + (0 if st.last else micro) + 1)
    if lay.ddp:  # DDP's reducer keeps a flat copy of every gradient (buckets)
        communication += grads
    # Gradients exist during forward/backward when an earlier micro-batch produced them. FSDP
    # accumulates them unsharded (in the reduce dtype) until the last micro-batch reduce-scatters
    # (pipeline micro-batches; gradient accumulation with grad_sync "last_microbatch"); with
    # "every_microbatch" each micro-batch's backward reduce-scatters into the sharded gradients.
    grads_in_flight = grads if (lay.accumulation > 1 or _overlapping_schedule(lay)) else 0
    sharded_accumulation = lay.pp == 1 and lay.grad_sync == "every_microbatch"
    if lay.fsdp and grads_in_flight and not sharded_accumulation:
        local = sum(st.blocks for st in stages) * block_numel + root_numel
        grads_in_flight = local * BYTES[lay.reduce_dtype]
    host = 0
    if lay.cpu_offload and lay.fsdp:
        # The sharded parameters, their gradients and the optimizer step live in host memory; the
        # device holds what FSDP copies over for the unit it gathers (counted with the unsharded).
        host = params + grads + optim
        if sharded_accumulation or not lay.accumulation > 1:
            grads_in_flight = 0
        params = grads = optim = 0
    static = params + optim + buffers + communication + unsharded
    phases = {"backward start": static + grads_in_flight + acts + loss}
    if lay.ac_mode == "full" or (lay.ac_mode == "selective" and lay.ac_option != "op"):
        # A checkpointed block recomputes its activations once the loss's tensors are freed, and
        # its backward makes gradients of them (together ~1.6x the activations, measured). FSDP then
        # holds the block gathered, the next one prefetched with its flat all-gather buffer, and
        # the block's unsharded gradients for the reduce-scatter.
        freed = FP32 * _vocab_shard(lay) * tokens if last is not None else 0
        fsdp_backward = block_numel * (3 * param_bytes_compute + BYTES[lay.reduce_dtype]) if lay.fsdp and lay.pp == 1 else 0
        phases["recompute"] = (static + grads_in_flight + acts - freed + fsdp_backward
                               + int(1.6 * block_activations(lay) * tokens))
    if lay.fsdp and lay.pp == 1 and root_numel:
        # Backward reaches the output layer: FSDP gathers the root unit (embedding, norm, output)
        # again; its flat all-gather buffer and the unsharded copies coexist, next to the logits'
        # float32 gradient (the saved log-softmax is freed by then).
        phases["root gather"] = static + grads_in_flight + acts + 2 * root_numel * param_bytes_compute
    if lay.fsdp and t > 1 and stages[0].first:
        # The embedding's backward under TP returns the whole table's gradient (replicated; see
        # param_bytes), which FSDP then shards, at the very end of backward.
        table = a.vocab_size * a.dim * param_bytes_compute
        if lay.pp > 1:
            phases["embedding gradient"] = static + grads_in_flight + table + table // t
        else:  # the root unit is gathered again, with its unsharded gradients
            root_sharded = FP32 * sum(local_numel(s, r, t, lay.dp_shard) for s, r, _ in root_params(a, True, stages[0].last))
            phases["embedding gradient"] = (params + optim + buffers + communication + grads - root_sharded
                                            + root_numel * (param_bytes_compute + BYTES[lay.reduce_dtype]) + table)
    phases["optimizer step"] = params + grads + optim + buffers + communication + params
    return RankMemory(pp_rank, params, grads, optim, buffers, acts, block_activations(lay) * tokens, loss,
                      unsharded, communication, phases, host)


FIT_MARGIN = 0.10  # a layout fits when the analytic peak 10% higher (the model's error) still fits


# What a CUDA device needs beyond the tensors (docs/planning.md, "Overheads"); ``lathe estimate``
# adds the same to what it measures.
FRAGMENTATION = 0.10  # the caching allocator reserves ~5-15% more than it hands out to tensors
CUDA_CONTEXT = int(0.6 * 2**30)  # the context and kernel images (CUDA 12 lazy loading), cuBLAS workspaces
NCCL_PER_GROUP = int(0.25 * 2**30)  # NCCL's channel buffers per communicator this rank belongs to


def device_overheads(peak: int, degrees: dict[str, int]) -> dict[str, int]:
    """Bytes a CUDA device needs beyond ``peak`` tensor bytes (see the constants above)."""
    groups = sum(1 for name in ("dp_replicate", "dp_shard", "tp", "pp", "cp") if degrees.get(name, 1) > 1)
    return {"fragmentation": int(FRAGMENTATION * peak), "cuda_context": CUDA_CONTEXT,
            "nccl": NCCL_PER_GROUP * groups}


def device_need(lay: Layout) -> int:
    """Bytes the most loaded rank needs on a CUDA device: the analytic peak with ``FIT_MARGIN``,
    plus the overheads ``lathe estimate`` adds (allocator fragmentation, CUDA context, NCCL)."""
    degrees = {"dp_replicate": lay.dp_replicate, "dp_shard": lay.dp_shard, "tp": lay.tp, "pp": lay.pp}
    worst = 0
    for r in range(lay.pp):
        peak = int(rank_memory(lay, r).peak * (1 + FIT_MARGIN))
        worst = max(worst, peak + sum(device_overheads(peak, degrees).values()))
    return worst


def resolve_grad_sync(mode: str, lay: Layout, device_bytes: int | None = None) -> str:
    """``training.gradient_accumulation_sync`` for a layout. ``auto``: "last_microbatch" (one
    reduce-scatter per step) when the layout fits ``device_bytes`` with unsharded gradients, by
    ``device_need``; else, or when the device's memory is unknown (CPU runs, ``lathe estimate``
    without a device), "every_microbatch". Without FSDP sharding or accumulation the two are the
    same; under PP torch's schedule reduce-scatters at the end of every batch whatever is asked."""
    if mode != "auto":
        return mode
    if not lay.fsdp or lay.accumulation == 1 or lay.pp > 1:
        return "last_microbatch" if lay.pp == 1 else "every_microbatch"
    if device_bytes is None:
        return "every_microbatch"
    from dataclasses import replace

    return "last_microbatch" if device_need(replace(lay, grad_sync="last_microbatch")) <= device_bytes \
        else "every_microbatch"


def _overlapping_schedule(lay: Layout) -> bool:
    """Pipeline schedules whose backward of an early micro-batch precedes later forwards."""
    if lay.pp == 1:
        return False
    from lathe.parallel import pipeline as pl

    return pl.schedule_class(lay.pp_schedule).__name__ not in ("ScheduleGPipe", "ScheduleLoopedBFS")


def layout_from_config(cfg, dims, vocab_size: int, device=None) -> Layout:
    """The layout of ``cfg`` on ``dims``. ``device``: where the run computes, which decides what
    ``training.mixed_precision_param auto`` means (lathe.precision); None = a GPU (bfloat16)."""
    from lathe import config as config_lib
    from lathe import precision
    from lathe.models import model_args_from_config

    t, p, ac = cfg.training, cfg.parallelism, cfg.activation_checkpoint
    args = model_args_from_config(cfg, vocab_size)  # the flavor with the model.* shape options
    param_dtype = t.mixed_precision_param
    if param_dtype == "auto":
        param_dtype = "bfloat16" if device is None else str(precision.param_dtype("auto", device)[0]).split(".")[-1]
    on_gpu = device is None or device.type == "cuda"
    lay = Layout(args=args, seq_len=t.seq_len, batch_size=t.batch_size,
                  accumulation=config_lib.accumulation_steps(cfg, dims.dp), dp_replicate=dims.dp_replicate,
                  dp_shard=dims.dp_shard * dims.cp, cp=dims.cp, tp=dims.tp, pp=dims.pp, pp_schedule=p.pp_schedule,
                  pp_microbatches=p.pp_microbatches, pp_stages_per_rank=p.pp_stages_per_rank,
                  pp_split_points=tuple(p.pp_split_points), ac_mode=ac.mode, ac_option=ac.selective_ac_option,
                  param_dtype=param_dtype, reduce_dtype=t.mixed_precision_reduce,
                  loss_parallel=p.loss_parallel, cpu_offload=t.enable_cpu_offload and on_gpu)
    return replace(lay, grad_sync=resolve_grad_sync(t.gradient_accumulation_sync, lay, device_memory(device)))


def device_memory(device) -> int | None:
    """Usable bytes of a CUDA ``device`` (what decides ``gradient_accumulation_sync auto``); None
    for anything else."""
    if device is None or getattr(device, "type", None) != "cuda":
        return None
    import torch

    from lathe.devices import USABLE_FRACTION

    return int(torch.cuda.get_device_properties(device).total_memory * USABLE_FRACTION)


def estimate_rank(cfg, dims, vocab_size: int, pp_rank: int = 0, device=None) -> RankMemory:
    return rank_memory(layout_from_config(cfg, dims, vocab_size, device), pp_rank)
