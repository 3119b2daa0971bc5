"""The configuration: one typed tree of dataclasses, loaded from TOML and the command line.

Every option is one dataclass field with its default and a one-line help (``opt``). ``--help``,
``--print-config``, docs/config.md and validation all read that single place.

Precedence: field default < TOML file < command line. Command-line forms:
``--section.key value``, ``--section.key=value``, bare ``--section.flag`` (sets a boolean true) and
``--no-section.flag`` / ``--section.flag false`` (sets it false). Lists are comma-separated.

Config files written for torchtitan's late-2024 schema load unchanged: its keys that live under a
different name here are listed in ``ALIASES``. Options for features that are not built yet are part
of the tree (so such files parse), but switching one on fails with "not supported yet" instead of
being silently ignored (``NOT_SUPPORTED_YET``).
"""

from __future__ import annotations

import dataclasses
import math
import difflib
import sys
import types
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Optional

from lathe.errors import ConfigError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on 3.10 only
    import tomli as tomllib

DTYPES = ("float32", "bfloat16", "float16")


def opt(default: Any, help: str, choices: tuple | None = None) -> Any:
    """A config field: its default, one line of help, and the allowed values (for enums)."""
    meta = {"help": help, "choices": choices}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: type(d)(d), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class Job:
    config_file: Optional[str] = opt(None, "TOML file to load before command-line overrides")
    dump_folder: str = opt("./outputs", "root folder for everything a run writes")
    description: str = opt("lathe training run", "free text logged at the start of the run")
    use_for_integration_test: bool = opt(
        False, "torchtitan compatibility: marks configs its integration runner uses; no effect")
    print_args: bool = opt(False, "log the resolved config (as TOML) at the start of the run")


@dataclass
class Model:
    name: str = opt("llama3", "model family", ("llama2", "llama3"))
    flavor: str = opt("debugmodel", "size preset of the family (see docs/models.md)")
    norm_type: str = opt("rmsnorm", "normalization layer",
                         ("rmsnorm", "layernorm", "np_layernorm", "fused_rmsnorm"))
    tokenizer_path: str = opt("", "tokenizer file; empty = lathe's bundled default tokenizer")
    tokenizer_type: str = opt("auto", "tokenizer format; auto = inferred from the file",
                              ("auto", "huggingface", "tiktoken", "sentencepiece"))
    vocab_size: int = opt(0, "embedding rows; 0 = the tokenizer's vocabulary, larger pads it")
    rope_scaling: str = opt("none", "RoPE frequency scaling; llama3.1 = Llama 3.1 long-context scaling",
                            ("none", "llama3.1"))
    # The shape, on top of the flavor: 0 keeps the flavor's value (lathe.models.model_args_from_config).
    dim: int = opt(0, "model width (hidden size); 0 = the flavor's")
    n_layers: int = opt(0, "transformer blocks; 0 = the flavor's")
    n_heads: int = opt(0, "attention heads (dim must be a multiple); 0 = the flavor's")
    n_kv_heads: int = opt(0, "key/value heads, dividing n_heads (grouped-query attention); 0 = the flavor's")
    ffn_dim_multiplier: float = opt(0.0, "scales the SwiGLU hidden size 8/3 x dim (1 = unscaled); 0 = the flavor's")
    multiple_of: int = opt(0, "the SwiGLU hidden size is rounded up to a multiple of this; 0 = the flavor's")
    norm_eps: float = opt(0.0, "epsilon of the normalization layers; 0 = the flavor's (1e-5)")
    rope_theta: float = opt(0.0, "RoPE base period; 0 = the flavor's (10000 for llama2, 500000 for llama3)")
    depth_init: bool = opt(True, "output projections' init std shrinks with the block's depth (every flavor)")
    fused_qkv: bool = opt(False, "one matmul for Q, K and V; checkpoints keep the unfused names")
    fused_w13: bool = opt(False, "one matmul for the FFN's w1 and w3; checkpoints keep the unfused names")
    attention_mask: str = opt("causal", "causal = a token sees every earlier token of its window; block_causal = "
                              "only earlier tokens of its own document (packed documents never see each other)",
                              ("causal", "block_causal"))
    document_positions: bool = opt(False, "with block_causal: RoPE positions restart at 0 where each document "
                                   "starts in the window")


@dataclass
class Optimizer:
    name: str = opt("AdamW", "optimizer", ("Adam", "AdamW"))
    lr: float = opt(8e-4, "peak learning rate")
    beta1: float = opt(0.9, "Adam beta1")
    beta2: float = opt(0.95, "Adam beta2")
    eps: float = opt(1e-8, "Adam epsilon")
    weight_decay: float = opt(0.1, "weight decay (decoupled for AdamW, L2 for Adam)")
    no_decay_norms_and_embeddings: bool = opt(
        False, "exempt norm weights, biases and embeddings from weight decay")
    fused: bool = opt(False, "use the fused implementation (CUDA only)")
    foreach: bool = opt(True, "use the multi-tensor (foreach) implementation when not fused")
    early_step_in_backward: bool = opt(
        False, "update each parameter during backward as soon as its gradient is ready, then free the "
               "gradient (less memory; no gradient clipping, no accumulation, no pipeline parallel)")


@dataclass
class LRScheduler:
    warmup_steps: int = opt(20, "linear warmup steps from ~0 to optimizer.lr")
    decay_type: str = opt("linear", "shape of the decay after warmup; wsd = warmup-stable-decay",
                          ("linear", "cosine", "wsd", "constant"))
    decay_ratio: float = opt(0.2, "wsd only: fraction of the post-warmup steps spent decaying")
    min_lr_ratio: float = opt(0.0, "floor of the decay as a fraction of optimizer.lr")


@dataclass
class Training:
    dataset: str = opt("lathe_corpus", "dataset name; lathe_corpus = the embedded default corpus")
    dataset_path: Optional[str] = opt(None, "local files/folder/glob or Hugging Face dataset path")
    dataset_config: Optional[str] = opt(None, "Hugging Face dataset config name (e.g. en for C4)")
    dataset_split: str = opt("train", "split to train on")
    dataset_text_field: str = opt("text", "record field holding the document text")
    dataset_mix: list = opt([], "weighted mix of sources, e.g. c4=0.7,/data/mine=0.3")
    dataset_token_dtype: str = opt("auto", "dtype of a flat token .bin (nanoGPT); auto = llm.c's header",
                                   ("auto", "uint16", "int32", "uint32"))
    shuffle_buffer: int = opt(0, "shuffle documents within a buffer of this many; 0 = file order")
    data_workers: int = opt(1, "background threads tokenizing and packing ahead; 0 = inline")
    split_tokenization: bool = opt(True, "processes share tokenizing text on the fly, each 1/N (same batches)")
    document_ids: bool = opt(False, "also emit per-token document ids and positions (always on with "
                             "model.attention_mask block_causal)")
    batch_size: int = opt(8, "sequences per micro-batch per data-parallel rank")
    seq_len: int = opt(256, "tokens per sequence")
    steps: int = opt(300, "optimizer steps to train")
    gradient_accumulation_steps: int = opt(1, "micro-batches accumulated per optimizer step")
    gradient_accumulation_sync: str = opt(
        "auto", "FSDP with accumulation: every_microbatch = reduce-scatter each micro-batch's gradients (sharded "
        "gradients, least memory); last_microbatch = keep them unsharded until the last (less communication); "
        "auto = last_microbatch when the memory model says it fits the GPU, else every_microbatch "
        "(docs/planning.md)", ("auto", "every_microbatch", "last_microbatch"))
    global_batch_size: int = opt(
        0, "sequences per optimizer step over all ranks; 0 = batch_size x accumulation x DP")
    max_norm: float = opt(1.0, "clip the global gradient norm to this value; 0 disables clipping")
    seed: int = opt(42, "seed for weight init, data order and dropout-free RNG use")
    deterministic: bool = opt(False, "use deterministic algorithms (slower on GPU)")
    device: str = opt("auto", "auto = CUDA when available, else CPU", ("auto", "cpu", "cuda"))
    autocast_dtype: str = opt("none", "autocast compute dtype without FSDP (one device)",
                              ("none", "bfloat16", "float16"))
    mixed_precision_param: str = opt(
        "auto", "FSDP parameter dtype for compute; auto = bfloat16 on GPUs and on CPUs with native bf16 "
        "matmuls, else float32 (lathe/precision.py)", ("auto", *DTYPES[:2]))
    mixed_precision_reduce: str = opt("float32", "FSDP gradient reduction dtype", DTYPES[:2])
    enable_cpu_offload: bool = opt(False, "FSDP keeps parameters, gradients and the optimizer step on the CPU")
    compile: bool = opt(False, "torch.compile each transformer block")
    compile_backend: str = opt("inductor", "torch.compile backend (aot_eager: fast to compile, for debugging)",
                               ("inductor", "aot_eager", "eager"))
    gc_freq: int = opt(50, "run Python's garbage collector every N steps (0 = automatic GC)")
    cpu_allocator: str = opt("retain", "CPU runs: retain = glibc malloc keeps freed tensor memory for reuse (no page "
                             "faults each step; resident memory stays at its peak); system = malloc as it is "
                             "(lathe/host_memory.py)", ("retain", "system"))
    # What a bad step does (lathe/guard.py, docs/observability.md)
    on_nonfinite: str = opt("stop", "a step whose loss or gradient norm is NaN/inf: stop the run; skip its update on "
                            "every rank; or rollback to the last checkpoint and skip that step's data",
                            ("stop", "skip", "rollback"))
    loss_spike_factor: float = opt(0.0, "a loss above this many times the median of the recent losses is a spike; "
                                   "0 = no spike detection")
    loss_spike_window: int = opt(50, "accepted steps in the running median the spike detector compares with")
    on_loss_spike: str = opt("skip", "what a loss spike does (with loss_spike_factor > 0)", ("stop", "skip", "rollback"))
    max_consecutive_skips: int = opt(5, "stop the run after this many bad steps in a row (skipped or rolled back)")
    skip_batches: list = opt([], "global batches to drop unread, numbered by the step that would train on them, "
                             "e.g. 1200-1300,1500 (as after a loss spike)")


@dataclass
class Validation:
    enabled: bool = opt(False, "compute a validation loss during training")
    freq: int = opt(100, "validate every N steps (and at the last step)")
    steps: int = opt(10, "validation batches per run; -1 = the whole validation split")
    dataset: Optional[str] = opt(None, "validation dataset; unset = the training dataset's held-out split")
    dataset_path: Optional[str] = opt(None, "path of the validation dataset")
    batch_size: int = opt(0, "validation batch per DP rank; 0 = training.batch_size")


@dataclass
class Parallelism:
    dp_replicate: int = opt(1, "data-parallel replicas (DDP, or HSDP's replicate dimension)")
    dp_shard: int = opt(-1, "FSDP shard degree; -1 = all ranks left after the other degrees")
    tp: int = opt(1, "tensor-parallel degree")
    pp: int = opt(1, "pipeline-parallel degree")
    cp: int = opt(1, "context-parallel degree: shard each sequence over this many ranks (ring attention)")
    cp_rotate_method: str = opt("allgather", "how context-parallel attention passes keys/values around the ring: "
                                "allgather (gather all shards once) or alltoall (one shard per ring step)",
                                ("allgather", "alltoall"))
    cp_load_balance: bool = opt(True, "with cp > 1: give each rank a head and a tail chunk of the sequence, so "
                                "causal attention costs every rank the same (seq_len must divide by 2 x cp)")
    loss_parallel: bool = opt(True, "with tp > 1, compute the loss on vocab-sharded logits")
    pp_split_points: list = opt([], "module names that start each pipeline stage, e.g. layers.4")
    pp_schedule: str = opt("1f1b", "pipeline schedule: GPipe, 1F1B, Interleaved1F1B, LoopedBFS, "
                           "InterleavedZeroBubble, ZBVZeroBubble, DualPipeV (or torchtitan's names)")
    pp_stages_per_rank: int = opt(0, "pipeline stages per rank without split points; 0 = 1, or 2 for multi-stage schedules")
    pp_microbatches: int = opt(0, "pipeline micro-batches per batch; 0 = the number of stages")
    pp_stage_timing: bool = opt(False, "log how much of each step this rank's stages compute (shows the bubble)")
    pp_schedule_csv: Optional[str] = opt(
        None, "a pipeline schedule read from a CSV file (one row per rank of actions like 0F1, 1B0); "
              "replaces pp_schedule, sets the stages per rank")


@dataclass
class ActivationCheckpoint:
    mode: str = opt("none", "activation checkpointing", ("none", "full", "selective"))
    selective_ac_option: str = opt(
        "2", "selective mode: N = checkpoint every Nth block, op = save matmul/attention outputs")


@dataclass
class Checkpoint:
    enable_checkpoint: bool = opt(False, "save and resume distributed checkpoints")
    folder: str = opt("checkpoint", "checkpoint folder under job.dump_folder")
    interval_type: str = opt("steps", "unit of checkpoint.interval", ("steps", "seconds"))
    interval: int = opt(500, "save every this many steps or seconds")
    model_weights_only: bool = opt(False, "final save holds model weights only")
    export_dtype: str = opt("float32", "dtype of a weights-only final save", DTYPES)
    create_seed_checkpoint: bool = opt(False, "write a step-0 checkpoint on one process and exit")
    async_mode: str = opt("disabled", "checkpoint saving mode",
                          ("disabled", "async", "async_with_pinned_mem"))
    keep_latest_k: int = opt(0, "keep only the newest k checkpoints; 0 keeps all")
    load_step: int = opt(-1, "step to resume from; -1 = the latest complete checkpoint")
    initial_load_path: Optional[str] = opt(
        None, "a step-N folder to start from when this run has no checkpoint yet (e.g. another run's)")
    initial_load_model_only: bool = opt(True, "from initial_load_path, load model weights only (not optimizer, data, step)")
    initial_load_allow_model_change: bool = opt(
        False, "load initial_load_path into a model whose config differs (norm, RoPE...): warn instead of refusing")
    verify: str = opt("full", "before loading, check every file against the checkpoint's checksum manifest: "
                      "full (every byte), sampled (sizes, small files, 1 shard chunk in 8), off (files exist)",
                      ("full", "sampled", "off"))
    on_damaged: str = opt("fallback", "a damaged latest checkpoint: fallback = warn and load the newest earlier "
                          "one that verifies; error = stop", ("fallback", "error"))


@dataclass
class Float8:
    enable_float8_linear: bool = opt(False, "train nn.Linear layers in float8 (torchao; see docs/float8.md)")
    recipe_name: str = opt("tensorwise", "float8 scaling recipe: one scale per tensor, per row, or per row with "
                           "the weight gradient in high precision", ("tensorwise", "rowwise", "rowwise_with_gw_hp"))
    filter_fqns: list = opt(["output"], "linear layers kept in high precision: names or name parts "
                            "(e.g. output, layers.0, w2); layers with a dimension not divisible by 16 always are")
    enable_fsdp_float8_all_gather: bool = opt(False, "FSDP all-gathers weights in float8 (tensorwise recipe)")
    precompute_float8_dynamic_scale_for_fsdp: bool = opt(
        False, "with float8 all-gather: compute all weight scales in one all-reduce after the optimizer step")
    scaling_type_input: str = opt("dynamic", "float8 scaling of inputs (delayed: removed from torchao)",
                                  ("dynamic", "delayed"))
    scaling_type_weight: str = opt("dynamic", "float8 scaling of weights", ("dynamic", "delayed"))
    scaling_type_grad_output: str = opt("dynamic", "float8 scaling of output gradients",
                                        ("dynamic", "delayed"))


@dataclass
class Experimental:
    enable_async_tensor_parallel: bool = opt(
        False, "overlap TP communication with compute (CUDA only; needs training.compile and tp > 1)")
    enable_compiled_autograd: bool = opt(
        False, "capture and compile the whole backward pass (compiled autograd; uses training.compile_backend)")


@dataclass
class Metrics:
    log_freq: int = opt(10, "log metrics every N steps (and at step 1)")
    enable_color_printing: bool = opt(False, "color the console metrics line")
    enable_tensorboard: bool = opt(False, "write TensorBoard event files")
    save_tb_folder: str = opt("tb", "TensorBoard folder under job.dump_folder")
    rank_0_only: bool = opt(True, "only the metrics rank writes TensorBoard files")
    enable_wandb: bool = opt(False, "log to Weights & Biases")
    wandb_project: str = opt("", "W&B project; empty = $WANDB_PROJECT, else lathe")
    wandb_entity: str = opt("", "W&B team or user; empty = $WANDB_ENTITY, else your default entity")
    wandb_run_name: str = opt("", "W&B run name; empty = $WANDB_NAME, else W&B picks one")
    wandb_tags: list = opt([], "W&B tags, comma-separated; empty = $WANDB_TAGS")
    wandb_mode: str = opt("auto", "auto = W&B's own choice ($WANDB_MODE, else online); online; or offline: "
                          "write the W&B run to disk only (upload it later with wandb sync)",
                          ("auto", "online", "offline"))
    plot_at_end: bool = opt(False, "at the end of training write {dump_folder}/metrics.png, as lathe plot "
                            "does (needs matplotlib: pip install 'lathe[plot]')")


@dataclass
class Profiling:
    enable_profiling: bool = opt(False, "write torch.profiler traces")
    save_traces_folder: str = opt("profile_traces", "trace folder under job.dump_folder")
    profile_freq: int = opt(10, "profile one step every N steps; also the memory-snapshot period")
    enable_memory_snapshot: bool = opt(False, "dump CUDA memory snapshots")
    save_memory_snapshot_folder: str = opt("memory_snapshot", "snapshot folder under job.dump_folder")


@dataclass
class Comm:
    init_timeout_seconds: int = opt(300, "collective timeout during init and the first step")
    train_timeout_seconds: int = opt(100, "collective timeout after the first step")
    trace_buf_size: int = opt(20000, "NCCL flight-recorder entries; 0 disables")
    watchdog_timeout_seconds: int = opt(
        90, "a rank that finishes no step for this long (saves and validation excepted) ends the job, naming "
            "the ranks that stopped; 0 disables (keep it below train_timeout_seconds)")


@dataclass
class MemoryEstimation:
    enabled: bool = opt(False, "estimate memory per rank instead of training (what `lathe estimate` does)")
    disable_fake_mode: bool = opt(False, "estimate with real tensors instead of fake ones (needs the memory)")
    check: bool = opt(True, "log the analytic memory estimate at the start of training and the measured "
                      "peak after step 2 (CPU: tracked tensors, CUDA: max_memory_allocated)")


@dataclass
class Config:
    job: Job = field(default_factory=Job)
    model: Model = field(default_factory=Model)
    optimizer: Optimizer = field(default_factory=Optimizer)
    lr_scheduler: LRScheduler = field(default_factory=LRScheduler)
    training: Training = field(default_factory=Training)
    validation: Validation = field(default_factory=Validation)
    parallelism: Parallelism = field(default_factory=Parallelism)
    activation_checkpoint: ActivationCheckpoint = field(default_factory=ActivationCheckpoint)
    checkpoint: Checkpoint = field(default_factory=Checkpoint)
    float8: Float8 = field(default_factory=Float8)
    experimental: Experimental = field(default_factory=Experimental)
    metrics: Metrics = field(default_factory=Metrics)
    profiling: Profiling = field(default_factory=Profiling)
    comm: Comm = field(default_factory=Comm)
    memory_estimation: MemoryEstimation = field(default_factory=MemoryEstimation)

    def to_dict(self) -> dict[str, dict[str, Any]]:
        return dataclasses.asdict(self)


# torchtitan (late 2024) key -> lathe key, for options that moved.
ALIASES: dict[str, str] = {
    "training.warmup_steps": "lr_scheduler.warmup_steps",
    "training.data_parallel_replicate_degree": "parallelism.dp_replicate",
    "training.data_parallel_shard_degree": "parallelism.dp_shard",
    "training.tensor_parallel_degree": "parallelism.tp",
    "training.enable_loss_parallel": "parallelism.loss_parallel",
    "experimental.pipeline_parallel_degree": "parallelism.pp",
    "experimental.pipeline_parallel_split_points": "parallelism.pp_split_points",
    "experimental.pipeline_parallel_schedule": "parallelism.pp_schedule",
    "experimental.pipeline_parallel_microbatches": "parallelism.pp_microbatches",
    "experimental.context_parallel_degree": "parallelism.cp",
    "experimental.context_parallel_rotate_method": "parallelism.cp_rotate_method",
    "experimental.pipeline_parallel_schedule_csv": "parallelism.pp_schedule_csv",
}

# torchtitan's other eras: keys renamed (same meaning, same value) into lathe options.
ALIASES.update({
    # Before September 2024 (before HSDP renamed data_parallel_degree, and float8 got its section).
    "training.data_parallel_degree": "parallelism.dp_shard",
    "training.sequence_parallel_degree": "parallelism.tp",
    "training.pipeline_parallel_degree": "parallelism.pp",
    "training.compiled_autograd": "experimental.enable_compiled_autograd",
    "training.enable_fp8_linear": "float8.enable_float8_linear",
    "training.enable_float8_linear": "float8.enable_float8_linear",
    "training.enable_fsdp_fp8_all_gather": "float8.enable_fsdp_float8_all_gather",
    "training.enable_fsdp_float8_all_gather": "float8.enable_fsdp_float8_all_gather",
    "training.precompute_float8_dynamic_scale_for_fsdp": "float8.precompute_float8_dynamic_scale_for_fsdp",
    "training.checkpoint_interval": "checkpoint.interval",
    "training.checkpoint_interval_type": "checkpoint.interval_type",
    "profiling.run_profiler": "profiling.enable_profiling",
    "profiling.profile_every_x_iter": "profiling.profile_freq",
    # 2025 to February 2026 (dataclass JobConfig: [parallelism], [compile], [validation], ...).
    "job.print_config": "job.print_args",
    "model.hf_assets_path": "model.tokenizer_path",  # the folder holding tokenizer.json
    "training.local_batch_size": "training.batch_size",  # per data-parallel rank, as lathe's
    "parallelism.data_parallel_replicate_degree": "parallelism.dp_replicate",
    "parallelism.data_parallel_shard_degree": "parallelism.dp_shard",
    "parallelism.tensor_parallel_degree": "parallelism.tp",
    "parallelism.enable_async_tensor_parallel": "experimental.enable_async_tensor_parallel",
    "parallelism.enable_compiled_autograd": "experimental.enable_compiled_autograd",
    "parallelism.pipeline_parallel_degree": "parallelism.pp",
    "parallelism.pipeline_parallel_split_points": "parallelism.pp_split_points",
    "parallelism.pipeline_parallel_schedule": "parallelism.pp_schedule",
    "parallelism.pipeline_parallel_schedule_csv": "parallelism.pp_schedule_csv",
    "parallelism.context_parallel_degree": "parallelism.cp",
    "parallelism.context_parallel_rotate_method": "parallelism.cp_rotate_method",
    "checkpoint.enable": "checkpoint.enable_checkpoint",
    "checkpoint.last_save_model_only": "checkpoint.model_weights_only",
    "lr_scheduler.lr_min": "lr_scheduler.min_lr_ratio",
    "lr_scheduler.min_lr_factor": "lr_scheduler.min_lr_ratio",
    "compile.enable": "training.compile",
    "compile.backend": "training.compile_backend",
    "validation.enable": "validation.enabled",
    "validation.local_batch_size": "validation.batch_size",
    "debug.seed": "training.seed",
    "debug.deterministic": "training.deterministic",
    **{f"quantize.linear.{q}.{k}": f"float8.{k}" for q in ("float8", "fp8") for k in (
        "enable_fsdp_float8_all_gather", "precompute_float8_dynamic_scale_for_fsdp", "recipe_name", "filter_fqns")},
})

# torchtitan (late 2024 and 2025) boolean keys that are the negation of a lathe option.
INVERTED_ALIASES: dict[str, str] = {
    "metrics.disable_color_printing": "metrics.enable_color_printing",
    "training.disable_loss_parallel": "parallelism.loss_parallel",
    "parallelism.disable_loss_parallel": "parallelism.loss_parallel",
    "metrics.save_for_all_ranks": "metrics.rank_0_only",
}


def _float8_converters(names: list) -> list[tuple[str, Any]]:
    bad = [n for n in names if n not in ("float8", "quantize.linear.float8")]
    if bad:
        raise ConfigError("model.converters", f"{', '.join(bad)} has no lathe equivalent (lathe converts "
                          "linear layers to float8 only)", "keep only float8, or remove the key", names)
    return [("float8.enable_float8_linear", bool(names))]


def _implementation(value: str) -> list[tuple[str, Any]]:
    table = {"fused": [("optimizer.fused", True)],
             "foreach": [("optimizer.fused", False), ("optimizer.foreach", True)],
             "for-loop": [("optimizer.fused", False), ("optimizer.foreach", False)]}
    if value not in table:
        raise ConfigError("optimizer.implementation", "must be one of fused, foreach, for-loop", "", value)
    return table[value]


def _fp8_linear(key: str):
    def convert(value: str) -> list[tuple[str, Any]]:
        if value not in ("", "dynamic"):
            raise ConfigError(key, "must be dynamic or empty", "dynamic = float8 training with dynamic scaling", value)
        return [("float8.enable_float8_linear", value == "dynamic")]
    return convert


def _checkpoint_folder(value: str) -> list[tuple[str, Any]]:
    # torchtitan before April 2024: an empty folder meant no checkpoints.
    return [("checkpoint.enable_checkpoint", False)] if not value else [
        ("checkpoint.enable_checkpoint", True), ("checkpoint.folder", value)]


_SAME_AS_LATHE: dict[str, tuple[tuple, str]] = {}


def _same_as_lathe(key: str, allowed: tuple, why: str):
    """A torchtitan option whose only lathe meaning is the behaviour lathe always has: accepted
    with that value, refused with any other (never silently ignored)."""
    _SAME_AS_LATHE[key] = (allowed, why)

    def convert(value: Any) -> list[tuple[str, Any]]:
        if value not in allowed:
            raise ConfigError(key, f"only {' or '.join(map(repr, allowed))} is supported: {why}",
                              "remove the key or set it to that", value)
        return []
    return convert


# torchtitan keys whose value converts into lathe options: key -> (its type, converter to
# [(lathe key, value)]). Read from TOML files and the command line, like ALIASES.
CONVERTED: dict[str, tuple[type, Any]] = {
    # before September 2024
    "training.fp8_linear": (str, _fp8_linear("training.fp8_linear")),
    "training.fp8_linear_type": (str, _fp8_linear("training.fp8_linear_type")),
    "training.enable_selective_ac": (bool, lambda v: [("activation_checkpoint.mode", "selective" if v else "none")]),
    "training.checkpoint_folder": (str, _checkpoint_folder),
    "experimental.pipeline_parallel_split_mode": (str, _same_as_lathe(
        "experimental.pipeline_parallel_split_mode", ("manual",), "lathe splits the model at the split points")),
    # 2025 to February 2026
    "training.global_batch_size": (int, lambda v: [("training.global_batch_size", 0 if v == -1 else v)]),
    "model.converters": (list, _float8_converters),
    "optimizer.implementation": (str, _implementation),
    "training.dtype": (str, _same_as_lathe("training.dtype", ("float32",),
                                           "lathe keeps float32 parameters (see training.mixed_precision_param)")),
    "training.gc_debug": (bool, _same_as_lathe("training.gc_debug", (False,), "no GC debugging mode in lathe")),
    "model.print_after_conversion": (bool, _same_as_lathe("model.print_after_conversion", (False,),
                                                          "lathe does not print the model")),
    "compile.components": (list, _same_as_lathe(
        "compile.components", (["model"], ["model", "loss"], ["loss", "model"]),
        "lathe compiles each transformer block (the model); the loss runs uncompiled")),
    "parallelism.fsdp_reshard_after_forward": (str, _same_as_lathe(
        "parallelism.fsdp_reshard_after_forward", ("default",),
        "lathe reshards every block but the last after forward (none under pipeline parallel)")),
    "parallelism.expert_parallel_degree": (int, _same_as_lathe("parallelism.expert_parallel_degree", (1,),
                                                               "lathe's models have no experts")),
    "parallelism.expert_tensor_parallel_degree": (int, _same_as_lathe(
        "parallelism.expert_tensor_parallel_degree", (1,), "lathe's models have no experts")),
    "activation_checkpoint.per_op_sac_force_recompute_mm_shapes_by_fqns": (list, _same_as_lathe(
        "activation_checkpoint.per_op_sac_force_recompute_mm_shapes_by_fqns", (["moe.router.gate"],),
        "lathe's models have no MoE router, the default names no module")),
    "checkpoint.initial_load_in_hf": (bool, _same_as_lathe(
        "checkpoint.initial_load_in_hf", (False,), "convert the Hugging Face weights first: lathe convert")),
    "checkpoint.last_save_in_hf": (bool, _same_as_lathe(
        "checkpoint.last_save_in_hf", (False,), "convert the last checkpoint afterwards: lathe convert")),
    "checkpoint.exclude_from_loading": (list, _same_as_lathe(
        "checkpoint.exclude_from_loading", ([],), "lathe loads a whole checkpoint (see initial_load_model_only)")),
    "checkpoint.enable_first_step_checkpoint": (bool, _same_as_lathe(
        "checkpoint.enable_first_step_checkpoint", (False,), "lathe saves at checkpoint.interval")),
    "checkpoint.load_only": (bool, _same_as_lathe("checkpoint.load_only", (False,), "lathe saves what it loads")),
    "comm.save_traces_folder": (str, _same_as_lathe(
        "comm.save_traces_folder", ("comm_traces",), "lathe writes flight-recorder dumps to {dump_folder}/comm_traces")),
    "float8.emulate": (bool, _same_as_lathe("float8.emulate", (False,), "lathe has no float8 emulation switch")),
    "float8.force_recompute_fp8_weight_in_bwd": (bool, _same_as_lathe(
        "float8.force_recompute_fp8_weight_in_bwd", (False,), "not built in lathe")),
    "float8.moe_fqns_prototype": (list, _same_as_lathe("float8.moe_fqns_prototype", ([],),
                                                       "lathe's models have no experts")),
    "debug.deterministic_warn_only": (bool, _same_as_lathe("debug.deterministic_warn_only", (False,),
                                                           "lathe's training.deterministic is strict")),
    "debug.moe_force_load_balance": (bool, _same_as_lathe("debug.moe_force_load_balance", (False,),
                                                          "lathe's models have no experts")),
    **{f"{s}.{k}": (str, _same_as_lathe(f"{s}.{k}", ("",), "lathe imports no user modules"))
       for s, k in (("experimental", "custom_import"), ("experimental", "custom_args_module"),
                    ("job", "custom_config_module"))},
}

# What each converted key means here (docs/config.md).
_COMPAT_DOC = {
    "training.fp8_linear": "`dynamic` -> `float8.enable_float8_linear` true, empty -> false",
    "training.fp8_linear_type": "`dynamic` -> `float8.enable_float8_linear` true, empty -> false",
    "training.enable_selective_ac": "true -> `activation_checkpoint.mode` selective, false -> none",
    "training.checkpoint_folder": "empty -> no checkpoints; a folder -> `checkpoint.enable_checkpoint` and `checkpoint.folder`",
    "training.global_batch_size": "the same option; torchtitan's -1 (derived) is lathe's 0",
    "model.converters": "`[\"float8\"]` -> `float8.enable_float8_linear`; other converters are refused",
    "optimizer.implementation": "fused -> `optimizer.fused`; foreach -> `optimizer.foreach`; for-loop -> neither",
    "parallelism.pipeline_parallel_microbatch_size": "`parallelism.pp_microbatches` = `training.batch_size` / this",
    "validation.seq_len": "must equal `training.seq_len` (lathe validates at the training length)",
}


def _compat_doc(key: str) -> str:
    if key in _SAME_AS_LATHE:
        allowed, why = _SAME_AS_LATHE[key]
        return f"accepted only as {' or '.join(_toml_value(v) for v in allowed)}: {why}"
    return _COMPAT_DOC[key]


# torchtitan keys that need the rest of the config: applied after every other key of the file
# (and the command line), in load_config.
DEFERRED = ("parallelism.pipeline_parallel_microbatch_size", "validation.seq_len")

# torchtitan options (of any era) that have no lathe meaning: refused, named as such, never
# offered a look-alike lathe key.
TORCHTITAN_WITHOUT_EQUIVALENT = {
    "parallelism.pipeline_parallel_layers_per_stage", "parallelism.module_fqns_per_model_part",
    "parallelism.pipeline_parallel_first_stage_less_layers", "parallelism.pipeline_parallel_last_stage_less_layers",
    "profiling.profiler_active", "profiling.profiler_warmup", "activation_checkpoint.early_stop",
    "activation_checkpoint.memory_budget", "activation_checkpoint.visualize_memory_budget_pareto",
}
TORCHTITAN_SECTIONS_WITHOUT_EQUIVALENT = {"mx", "fault_tolerance", "liger_kernel", "quantize"}

# Keys that only a torchtitan 2025+ file holds: such a file means its lr_scheduler.decay_ratio
# torchtitan's way (a stable phase, then the decay over that fraction of all steps).
_TT2025 = {k for k in list(ALIASES) + list(CONVERTED) + list(INVERTED_ALIASES) + list(DEFERRED)
           if k.split(".")[0] in ("parallelism", "compile", "debug", "quantize")
           or k in ("job.print_config", "model.hf_assets_path", "model.converters", "training.local_batch_size",
                    "checkpoint.enable", "checkpoint.last_save_model_only", "lr_scheduler.min_lr_factor",
                    "lr_scheduler.lr_min", "optimizer.implementation", "validation.enable", "training.dtype",
                    "validation.local_batch_size", "metrics.save_for_all_ranks")}

# Options whose feature is not built yet: a non-default value is refused, never ignored.
# Each entry says which lathe issue brings it.
NOT_SUPPORTED_YET: dict[str, str] = {
}


# ---------------------------------------------------------------------------------------------
# Introspection of the tree: every option as "section.key" with its field.


def options() -> dict[str, tuple[type, dataclasses.Field]]:
    """Every option key -> (its Python type, its dataclass field), in declaration order."""
    out = {}
    for sec_name, sec_cls in typing.get_type_hints(Config).items():
        hints = typing.get_type_hints(sec_cls)
        for f in fields(sec_cls):
            out[f"{sec_name}.{f.name}"] = (hints[f.name], f)
    return out


_OPTIONS = options()


def _base_type(tp: Any) -> Any:
    """Optional[X] -> X; list[...] -> list."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return _base_type(args[0])
    if origin is list or tp is list:
        return list
    return tp


def _suggestion(key: str) -> str | None:
    # The same name in another section first (training.lr or lr -> optimizer.lr), then spelling.
    # torchtitan's options without a lathe meaning get no look-alike (gc_debug is not gc_freq).
    if key in TORCHTITAN_WITHOUT_EQUIVALENT or key.split(".")[0] in TORCHTITAN_SECTIONS_WITHOUT_EQUIVALENT:
        return None
    name = key.split(".", 1)[-1]
    close = [k for k in _OPTIONS if k.split(".", 1)[1] == name][:1]
    if not close:
        close = difflib.get_close_matches(key, list(_OPTIONS) + list(ALIASES) + list(INVERTED_ALIASES)
                                          + list(CONVERTED) + list(DEFERRED), n=1, cutoff=0.6)
    return close[0] if close else None


def _unknown_key(key: str, where: str) -> ConfigError:
    close = _suggestion(key)
    if key in TORCHTITAN_WITHOUT_EQUIVALENT or key.split(".")[0] in TORCHTITAN_SECTIONS_WITHOUT_EQUIVALENT:
        return ConfigError(key, f"torchtitan option with no lathe equivalent, in {where}", "remove it")
    fix = f"did you mean '{close}'?" if close else "see `lathe train --help` for every option"
    return ConfigError(key, f"unknown option in {where}", fix)


def _unknown_keys(keys: list[str], where: str, sections: list[str] = ()) -> ConfigError:
    """Every unknown key (and section) of a file, in one line."""
    if len(keys) == 1 and not sections:
        return _unknown_key(keys[0], where)
    parts = list(sections)
    for key in keys:
        if key in TORCHTITAN_WITHOUT_EQUIVALENT or key.split(".")[0] in TORCHTITAN_SECTIONS_WITHOUT_EQUIVALENT:
            parts.append(f"{key} (torchtitan's, no lathe equivalent)")
        else:
            close = _suggestion(key)
            parts.append(f"{key} (did you mean '{close}'?)" if close else key)
    what = f"{len(keys)} unknown options" + (f" and {len(sections)} unknown sections" if sections else "")
    return ConfigError(where, what + ": " + ", ".join(parts),
                       "remove or rename them; `lathe train --help` lists every option")


def _coerce(key: str, raw: Any, from_cli: bool, spec: tuple | None = None) -> Any:
    """Convert a TOML or command-line value to the option's type, or explain why not."""
    tp, f = spec or _OPTIONS[key]
    base = _base_type(tp)
    optional = base is not tp and typing.get_origin(tp) in (typing.Union, types.UnionType)
    if from_cli and optional and isinstance(raw, str) and raw.lower() in ("none", "null", ""):
        return None
    if raw is None and optional:
        return None
    try:
        if base is bool:
            if isinstance(raw, bool):
                value = raw
            elif isinstance(raw, str) and raw.lower() in ("true", "1", "yes", "on"):
                value = True
            elif isinstance(raw, str) and raw.lower() in ("false", "0", "no", "off"):
                value = False
            else:
                raise ValueError
        elif base is int:
            if isinstance(raw, bool) or (isinstance(raw, float) and not raw.is_integer()):
                raise ValueError
            value = int(raw)
        elif base is float:
            if isinstance(raw, bool):
                raise ValueError
            value = float(raw)
        elif base is list:
            if isinstance(raw, str):
                value = [s.strip() for s in raw.split(",") if s.strip()]
            elif isinstance(raw, list):
                value = [str(v) for v in raw]
            else:
                raise ValueError
        else:
            if not isinstance(raw, (str, int, float)) or isinstance(raw, bool):
                raise ValueError
            value = str(raw)
    except (TypeError, ValueError):
        kind = {bool: "true or false", int: "an integer", float: "a number",
                list: "a comma-separated list"}.get(base, "a string")
        raise ConfigError(key, f"expected {kind}", f"e.g. --{key} {_example(base, f)}", raw) from None
    choices = f.metadata.get("choices")
    if choices and value is not None:
        match = next((c for c in choices if str(c).lower() == str(value).lower()), None)
        if match is None:
            raise ConfigError(key, f"must be one of {', '.join(map(str, choices))}", "", raw)
        value = match
    return value


def _example(base: Any, f: dataclasses.Field) -> str:
    choices = f.metadata.get("choices")
    if choices:
        return str(choices[0])
    return {bool: "true", int: "8", float: "0.001", list: "a,b"}.get(base, "value")


def _canonical(key: str) -> str:
    return ALIASES.get(key, key)


def _known(key: str) -> bool:
    return key in _OPTIONS or key in INVERTED_ALIASES or key in CONVERTED or key in DEFERRED


_UNTYPED = field(default=None, metadata={"help": "", "choices": None})


def _compat_type(key: str) -> type:
    return CONVERTED[key][0] if key in CONVERTED else int  # DEFERRED keys are whole numbers


def _set_value(cfg: Config, key: str, raw: Any, from_cli: bool, deferred: dict | None = None) -> None:
    """Coerce ``raw`` for ``key`` and set it; an inverted torchtitan key sets its lathe option to
    the opposite (``training.disable_loss_parallel = true`` -> ``parallelism.loss_parallel = false``)."""
    if key in INVERTED_ALIASES:
        target = INVERTED_ALIASES[key]
        try:
            value = _coerce(target, raw, from_cli)
        except ConfigError:
            raise ConfigError(key, "expected true or false", f"e.g. --{key} true", raw) from None
        _set(cfg, target, not value)
        return
    if key in CONVERTED:
        tp, convert = CONVERTED[key]
        for target, value in convert(_coerce(key, raw, from_cli, (tp, _UNTYPED))):
            _set(cfg, target, _coerce(target, value, False))
        return
    if key in DEFERRED:
        deferred[key] = _coerce(key, raw, from_cli, (int, _UNTYPED))
        return
    _set(cfg, key, _coerce(key, raw, from_cli))


def _apply_deferred(cfg: Config, deferred: dict[str, Any], tt2025_decay_ratio: Optional[float]) -> None:
    """The torchtitan keys whose lathe meaning needs the rest of the config."""
    t = cfg.training
    if "parallelism.pipeline_parallel_microbatch_size" in deferred:
        size = deferred["parallelism.pipeline_parallel_microbatch_size"]
        _require(size >= 1 and t.batch_size % size == 0, "parallelism.pipeline_parallel_microbatch_size", size,
                 f"must divide training.batch_size ({t.batch_size}) into micro-batches",
                 "use a divisor of the batch size, or parallelism.pp_microbatches")
        cfg.parallelism.pp_microbatches = t.batch_size // size
    if "validation.seq_len" in deferred:
        _require(deferred["validation.seq_len"] == t.seq_len, "validation.seq_len", deferred["validation.seq_len"],
                 f"lathe validates at training.seq_len ({t.seq_len})", "remove the key or set it to that")
    if tt2025_decay_ratio is not None:
        # torchtitan: a stable phase, then decay_type's decay over the last decay_ratio of *all* steps.
        s = cfg.lr_scheduler
        _require(s.decay_type in ("linear", "wsd"), "lr_scheduler.decay_ratio", tt2025_decay_ratio,
                 f"torchtitan's stable phase before a {s.decay_type} decay has no lathe equivalent",
                 "use decay_type linear (lathe's wsd) or remove decay_ratio")
        post_warmup = max(1, t.steps - s.warmup_steps)
        s.decay_type, s.decay_ratio = "wsd", min(1.0, round(t.steps * tt2025_decay_ratio) / post_warmup)


# ---------------------------------------------------------------------------------------------
# Loading


def _set(cfg: Config, key: str, value: Any) -> None:
    section, name = key.split(".", 1)
    setattr(getattr(cfg, section), name, value)


def _read_toml(path: str) -> dict[str, dict[str, Any]]:
    p = Path(path)
    if not p.is_file():
        raise ConfigError("job.config_file", "file not found", "check the path", path)
    try:
        with p.open("rb") as fh:
            data = tomllib.load(fh)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError("job.config_file", f"not valid TOML: {e}", "fix the file", path) from None
    except UnicodeDecodeError as e:
        raise ConfigError("job.config_file", f"not UTF-8 text (byte {e.object[e.start]:#04x} at offset {e.start}); "
                          "TOML files are UTF-8", "save it as UTF-8, e.g. with iconv -f latin1 -t utf-8", path) from None
    except OSError as e:
        raise ConfigError("job.config_file", f"cannot read it: {e.strerror or e}", "check the file", path) from None
    return data


def _flat(table: dict[str, Any], prefix: str) -> list[tuple[str, Any]]:
    """A section's keys; a nested table (torchtitan's [quantize.linear.float8]) gives dotted keys."""
    out = []
    for name, value in table.items():
        if isinstance(value, dict):
            out += _flat(value, f"{prefix}{name}.")
        else:
            out.append((f"{prefix}{name}", value))
    return out


def _toml_items(data: dict[str, Any], path: str) -> list[tuple[str, Any]]:
    items, unknown, unknown_sections = [], [], []
    section_names = {f.name for f in fields(Config)}
    compat_sections = {k.split(".")[0] for k in list(ALIASES) + list(CONVERTED) + list(INVERTED_ALIASES)}
    for section, table in data.items():
        if not isinstance(table, dict):
            raise _unknown_key(section, f"{path} (top-level keys must be [sections])")
        if (section not in section_names and section not in compat_sections
                and section not in TORCHTITAN_SECTIONS_WITHOUT_EQUIVALENT):
            close = difflib.get_close_matches(section, section_names, n=1)
            fix = f"did you mean [{close[0]}]?" if close else f"sections: {', '.join(sorted(section_names))}"
            unknown_sections.append((section, fix))
            continue
        for key, value in _flat(table, f"{section}."):
            if _known(_canonical(key)):
                items.append((_canonical(key), value))
            else:
                unknown.append(key)
    if len(unknown_sections) == 1 and not unknown:
        section, fix = unknown_sections[0]
        raise ConfigError(f"[{section}]", f"unknown section in {path}", fix)
    if unknown or unknown_sections:
        raise _unknown_keys(unknown, path, [f"[{s}] ({fix})" for s, fix in unknown_sections])
    return items


def _parse_cli(argv: list[str]) -> tuple[list[tuple[str, str | bool]], Optional[str], bool]:
    """Split argv into (key, raw value) overrides, the config file, and --print-config."""
    overrides: list[tuple[str, str | bool]] = []
    config_file = None
    print_config = False
    i = 0
    while i < len(argv):
        arg = argv[i]
        i += 1
        if arg == "--print-config":
            print_config = True
            continue
        if not arg.startswith("--"):
            raise ConfigError(arg, "unexpected argument", "options look like --section.key value")
        body = arg[2:]
        negated = body.startswith("no-")
        if negated:
            body = body[3:]
        key, eq, raw = body.partition("=")
        if key == "config":
            key = "job.config_file"
        if "." not in key:
            raise _unknown_key(key, "the command line")
        canonical = _canonical(key)
        if not _known(canonical):
            raise _unknown_key(key, "the command line")
        is_bool = canonical in INVERTED_ALIASES or _base_type(
            _OPTIONS[canonical][0] if canonical in _OPTIONS else _compat_type(canonical)) is bool
        if negated:
            if not is_bool or eq:
                raise ConfigError(arg, "--no- works only with boolean options", f"use --{key} VALUE")
            overrides.append((canonical, False))
            continue
        if not eq:
            nxt = argv[i] if i < len(argv) else None
            if is_bool and (nxt is None or nxt.lower() not in ("true", "false", "1", "0", "yes", "no", "on", "off")):
                overrides.append((canonical, True))
                continue
            if nxt is None or (nxt.startswith("--") and not _looks_numeric(nxt)):
                raise ConfigError(key, "missing value", f"write --{key} VALUE")
            raw = nxt
            i += 1
        if canonical == "job.config_file":
            config_file = raw
        overrides.append((canonical, raw))
    return overrides, config_file, print_config


def _looks_numeric(s: str) -> bool:
    try:
        float(s)
        return True
    except ValueError:
        return False


def load_config(argv: list[str] | None = None) -> tuple[Config, bool]:
    """Build the config from defaults, an optional TOML file and CLI overrides.

    Returns (config, print_config_requested). Raises ConfigError for bad input.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    overrides, config_file, print_config = _parse_cli(argv)
    cfg = Config()
    deferred: dict[str, Any] = {}
    tt2025_decay_ratio = None
    if config_file:
        data = _read_toml(config_file)
        for key, value in _toml_items(data, config_file):
            _set_value(cfg, key, value, False, deferred)
        file_keys = {k for sec, table in data.items() for k, _ in _flat(table, f"{sec}.")}
        if "lr_scheduler.decay_ratio" in file_keys and file_keys & _TT2025:
            tt2025_decay_ratio = cfg.lr_scheduler.decay_ratio
    for key, raw in overrides:
        _set_value(cfg, key, raw, True, deferred)
    _apply_deferred(cfg, deferred, tt2025_decay_ratio)
    check_not_supported(cfg)
    return cfg, print_config


def check_not_supported(cfg: Config) -> None:
    defaults = Config()
    for spec, why in NOT_SUPPORTED_YET.items():
        key, _, bad_value = spec.partition("=")
        section, name = key.split(".", 1)
        value = getattr(getattr(cfg, section), name)
        default = getattr(getattr(defaults, section), name)
        hit = (str(value) == bad_value) if bad_value else value != default
        if hit:
            raise ConfigError(key, "not supported yet", why, value)


# ---------------------------------------------------------------------------------------------
# Output: TOML and help text, generated from the tree


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, list):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    s = str(v).replace("\\", "\\\\").replace('"', '\\"')
    return f'"{s}"'


def to_toml(cfg: Config | dict) -> str:
    """The resolved config (or its ``to_dict()``) as TOML; loading it back gives the same config."""
    lines = []
    for section, values in (cfg if isinstance(cfg, dict) else cfg.to_dict()).items():
        lines.append(f"[{section}]")
        for name, value in values.items():
            if value is None:
                continue  # TOML has no null: an absent key means the default (None)
            lines.append(f"{name} = {_toml_value(value)}")
        lines.append("")
    return "\n".join(lines)


def help_text() -> str:
    out = ["Options (--section.key VALUE or --section.key=VALUE; booleans: --key / --no-key):", ""]
    current = None
    for key, (tp, f) in _OPTIONS.items():
        section = key.split(".")[0]
        if section != current:
            out.append(f"[{section}]")
            current = section
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        choices = f.metadata.get("choices")
        extra = f" {{{','.join(map(str, choices))}}}" if choices else ""
        out.append(f"  --{key}{extra}  (default: {default!r})")
        out.append(f"        {f.metadata['help']}")
    out += ["", "torchtitan names also accepted: " + ", ".join(f"{a} -> {c}" for a, c in ALIASES.items())
            + ", " + ", ".join(f"{a} -> not {c}" for a, c in INVERTED_ALIASES.items())
            + "; converted: " + ", ".join(list(CONVERTED) + list(DEFERRED)) + " (docs/config.md)"]
    return "\n".join(out)


def markdown_reference() -> str:
    """docs/config.md, generated from the tree (``lathe config-docs``)."""
    out = ["# Configuration reference", "",
           "Generated from `lathe/config.py` by `lathe config-docs > docs/config.md`; do not edit by hand.",
           "", "Set options in a TOML file (`[section]` tables) or on the command line as",
           "`--section.key value`. Command line beats file beats default.", ""]
    current = None
    for key, (tp, f) in _OPTIONS.items():
        section = key.split(".")[0]
        if section != current:
            out += ["", f"## [{section}]", "", "| option | default | choices | meaning |", "|---|---|---|---|"]
            current = section
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        choices = ", ".join(map(str, f.metadata.get("choices") or ()))
        out.append(f"| `{key}` | `{default!r}` | {choices} | {f.metadata['help']} |")
    out += ["", "## torchtitan names", "", "Config files written for torchtitan's TOML schemas (early 2024 to February 2026)",
            "load unchanged; these keys are read as their lathe equivalents:", "", "| torchtitan | lathe |", "|---|---|"]
    out += [f"| `{a}` | `{c}` |" for a, c in ALIASES.items()]
    out += [f"| `{a}` | the opposite of `{c}` |" for a, c in INVERTED_ALIASES.items()]
    out += [f"| `{a}` | {_compat_doc(a)} |" for a in list(CONVERTED) + list(DEFERRED)]
    out += ["", "A torchtitan file of 2025 or later that sets `lr_scheduler.decay_ratio` means a stable phase, then a",
            "linear decay over that fraction of all steps: lathe's `wsd`, its ratio rescaled to the post-warmup steps.",
            "torchtitan options with no lathe meaning (`[mx]`, `[fault_tolerance]`, `[liger_kernel]`, other",
            "`[quantize.*]` tables, " + ", ".join(f"`{k}`" for k in sorted(TORCHTITAN_WITHOUT_EQUIVALENT)) + ")",
            "are refused: the run stops with one line listing every unknown key of the file."]
    out += ["", "## Not supported yet", "", "These options exist so that such files parse, but setting them",
            "to a non-default value stops the run with a clear message:", ""]
    out += [f"- `{k}`: {v}" for k, v in NOT_SUPPORTED_YET.items()]
    return "\n".join(out) + "\n"


# ---------------------------------------------------------------------------------------------
# Validation: everything that can be checked before a process group or a model exists.

# Dataset names (training.dataset). Besides these, a local path or a Hugging Face id ("org/name")
# works; see lathe/data/sources.py and docs/data.md.
DATASETS = ("lathe_corpus", "c4_test", "c4", "fineweb", "fineweb_edu", "local", "huggingface")


def default_tokenizer_path() -> Path:
    return Path(__file__).parent / "assets" / "tokenizer.json"


def tokenizer_path(cfg: Config) -> Path:
    return Path(cfg.model.tokenizer_path) if cfg.model.tokenizer_path else default_tokenizer_path()


def _require(ok: bool, key: str, value: Any, problem: str, fix: str) -> None:
    if not ok:
        raise ConfigError(key, problem, fix, value)


def validate(cfg: Config, world_size: int = 1, cuda_available: bool = False) -> None:
    """Raise ConfigError for the first problem found; returns None when the config can run."""
    from lathe.models import MODELS  # late import: the config module stays light

    check_not_supported(cfg)
    m, t, o, s, p = cfg.model, cfg.training, cfg.optimizer, cfg.lr_scheduler, cfg.parallelism
    spec = MODELS[m.name]
    if m.flavor not in spec.flavors:
        close = difflib.get_close_matches(m.flavor, spec.flavors, n=1)
        fix = f"did you mean '{close[0]}'?" if close else f"{m.name} flavors: {', '.join(spec.flavors)}"
        raise ConfigError("model.flavor", f"no such {m.name} flavor", fix, m.flavor)
    tok = tokenizer_path(cfg)
    _require(tok.is_file() or (tok.is_dir() and any((tok / n).is_file() for n in (
             "tokenizer.json", "tokenizer.model", "original/tokenizer.model"))), "model.tokenizer_path", str(tok),
             "file not found", "point it at a tokenizer.json or tokenizer.model (`lathe tokenizer download` "
             "fetches one), or leave it empty for lathe's default tokenizer")
    # Dataset names, paths, mix entries, validation options: everything checkable without reading
    # the data (reading a few records happens when the data is built, still before training).
    from lathe.data.sources import check_data_config  # late import: the config module stays light

    check_data_config(cfg)
    for key, value, low in (("training.batch_size", t.batch_size, 1), ("training.steps", t.steps, 1),
                            ("training.seq_len", t.seq_len, 2), ("metrics.log_freq", cfg.metrics.log_freq, 1),
                            ("training.gradient_accumulation_steps", t.gradient_accumulation_steps, 1),
                            ("training.gc_freq", t.gc_freq, 0), ("lr_scheduler.warmup_steps", s.warmup_steps, 0),
                            ("training.global_batch_size", t.global_batch_size, 0),
                            ("profiling.profile_freq", cfg.profiling.profile_freq, 1)):
        _require(value >= low, key, value, f"must be >= {low}", f"set --{key} to {max(low, 1)} or more")
    _require(o.lr > 0 and math.isfinite(o.lr), "optimizer.lr", o.lr, "must be a positive number", "e.g. 3e-4")
    _require(0 <= o.beta1 < 1, "optimizer.beta1", o.beta1, "must be in [0, 1)", "typical: 0.9")
    _require(0 <= o.beta2 < 1, "optimizer.beta2", o.beta2, "must be in [0, 1)", "typical: 0.95")
    _require(o.eps > 0, "optimizer.eps", o.eps, "must be positive", "typical: 1e-8")
    _require(o.weight_decay >= 0, "optimizer.weight_decay", o.weight_decay, "must be >= 0", "typical: 0.1")
    _require(t.max_norm >= 0, "training.max_norm", t.max_norm, "must be >= 0", "0 disables clipping")
    _require(0 <= s.min_lr_ratio <= 1, "lr_scheduler.min_lr_ratio", s.min_lr_ratio, "must be in [0, 1]", "e.g. 0.1")
    _require(0 < s.decay_ratio <= 1, "lr_scheduler.decay_ratio", s.decay_ratio, "must be in (0, 1]", "e.g. 0.2")
    ac = cfg.activation_checkpoint
    if ac.mode == "selective":
        opt_ok = ac.selective_ac_option == "op" or (ac.selective_ac_option.isdigit() and int(ac.selective_ac_option) >= 1)
        _require(opt_ok, "activation_checkpoint.selective_ac_option", ac.selective_ac_option,
                 "must be 'op' or a positive whole number N (checkpoint every Nth block)", "e.g. 2 or op")
    wants_cuda = t.device == "cuda" or o.fused
    if wants_cuda and not cuda_available:
        key = "training.device" if t.device == "cuda" else "optimizer.fused"
        value = t.device if key == "training.device" else o.fused
        raise ConfigError(key, "needs CUDA, and no CUDA device is available",
                          "use --training.device cpu / --no-optimizer.fused", value)
    # Parallel degrees: their product is the number of processes, and the model must split.
    degrees = {"parallelism.dp_replicate": p.dp_replicate, "parallelism.tp": p.tp, "parallelism.pp": p.pp,
               "parallelism.cp": p.cp}
    for key, value in degrees.items():
        _require(value >= 1, key, value, "must be >= 1", "1 disables it")
    _require(p.dp_shard == -1 or p.dp_shard >= 1, "parallelism.dp_shard", p.dp_shard,
             "must be -1 (all remaining ranks) or >= 1", "e.g. -1")
    others = p.dp_replicate * p.tp * p.pp * p.cp
    dp_shard = p.dp_shard if p.dp_shard != -1 else max(world_size // others, 1)
    product = others * dp_shard
    _require(product == world_size, "parallelism", f"dp_replicate {p.dp_replicate} x dp_shard {dp_shard} x "
             f"tp {p.tp} x pp {p.pp} x cp {p.cp} = {product}", f"must equal the number of processes ({world_size})",
             "change the degrees or the launch size")
    from lathe.models import model_args_from_config  # late import: the config module stays light

    margs = model_args_from_config(cfg)  # the flavor with the model.* shape overrides; checks them
    if p.pp > 1:
        _check_pipeline(cfg, margs.n_layers, dp_shard * p.cp)
    _check_attention(cfg)
    if p.tp > 1:
        _require(p.dp_replicate == 1 or dp_shard * p.cp > 1, "parallelism.dp_replicate", p.dp_replicate,
                 "DDP (replicate without shard) does not compose with tensor parallel",
                 "use HSDP: set parallelism.dp_shard > 1 too, or put those ranks in dp_shard")
        for what, n in (("attention heads", margs.n_heads), ("key/value heads", margs.kv_heads)):
            _require(n % p.tp == 0, "parallelism.tp", p.tp,
                     f"{m.name} {m.flavor} has {n} {what}, not divisible by tp", "pick a tp that divides it")
        if margs.fused_w13:
            from lathe.models.llama import w13_block  # late import: torch

            blocks = margs.ffn_hidden_dim // w13_block(margs.ffn_hidden_dim)
            _require(blocks % p.tp == 0, "model.fused_w13", True,
                     f"the fused w1/w3 rows come in {blocks} blocks, which tp={p.tp} ranks cannot split evenly",
                     "use --no-model.fused_w13 with this tp, or a tp that divides it")
        _require(t.seq_len % (p.tp * p.cp) == 0, "training.seq_len", t.seq_len,
                 f"not divisible by parallelism.tp={p.tp}" + (f" x cp={p.cp}" if p.cp > 1 else "") +
                 " (sequence parallel splits each rank's part of the sequence)", f"use a multiple of {p.tp * p.cp}")
    _check_policies_and_sinks(cfg)
    ck = cfg.checkpoint
    _require(ck.interval >= 1, "checkpoint.interval", ck.interval, "must be >= 1", "e.g. 500")
    _require(ck.keep_latest_k >= 0, "checkpoint.keep_latest_k", ck.keep_latest_k, "must be >= 0", "0 keeps all")
    _require(ck.load_step >= -1, "checkpoint.load_step", ck.load_step, "must be -1 (latest) or a step", "e.g. -1")
    if ck.create_seed_checkpoint:
        _require(ck.enable_checkpoint, "checkpoint.create_seed_checkpoint", True,
                 "needs checkpoint.enable_checkpoint", "add --checkpoint.enable_checkpoint")
        _require(world_size == 1, "checkpoint.create_seed_checkpoint", True,
                 f"must run on one process (got {world_size})", "launch with NGPU=1 and no parallel degrees")
    if ck.initial_load_path is not None:
        _require(Path(ck.initial_load_path, ".metadata").is_file(), "checkpoint.initial_load_path",
                 ck.initial_load_path, "not a checkpoint folder (no .metadata inside)", "point it at a step-N folder")
    accum = t.gradient_accumulation_steps
    if t.global_batch_size:
        dp = p.dp_replicate * dp_shard
        per_step = t.batch_size * dp
        _require(t.global_batch_size % per_step == 0, "training.global_batch_size", t.global_batch_size,
                 f"not divisible by batch_size x data-parallel degree = {per_step}",
                 f"use a multiple of {per_step}")
        derived = t.global_batch_size // per_step
        _require(accum in (1, derived), "training.gradient_accumulation_steps", accum,
                 f"contradicts training.global_batch_size (which implies {derived})", "set only one of the two")
    _check_techniques(cfg, world_size, dp_shard, cuda_available)


def _check_techniques(cfg: Config, world_size: int, dp_shard: int, cuda_available: bool) -> None:
    """Options of techniques applied from outside the model; each module checks its own."""
    from lathe import optim
    from lathe.parallel import async_tp
    from lathe.quant import float8

    float8.check_config(cfg, cuda_available)
    async_tp.check_config(cfg, cuda_available)
    p = cfg.parallelism
    optim.check_config(cfg, accumulation_steps(cfg, p.dp_replicate * dp_shard))
    _require(not cfg.training.enable_cpu_offload or dp_shard > 1, "training.enable_cpu_offload", True,
             "needs FSDP: it offloads FSDP's parameter shards",
             "set parallelism.dp_shard > 1 (launch several processes)")
    _require(not (cfg.experimental.enable_compiled_autograd and world_size > 1),
             "experimental.enable_compiled_autograd", True,
             "works on one process only (torch 2.13's compiled autograd cannot trace FSDP2's gradient hooks "
             "and recompiles every step under tensor parallel)", "turn it off for parallel runs")
    _require(not p.pp_schedule_csv or p.pp > 1, "parallelism.pp_schedule_csv", p.pp_schedule_csv,
             "needs pipeline parallel", "set parallelism.pp > 1, or remove it")


def _check_policies_and_sinks(cfg: Config) -> None:
    """The non-finite and loss-spike policies (lathe/guard.py), training.skip_batches, and the
    optional packages of the metrics sinks."""
    import importlib.util

    from lathe.guard import parse_batch_ranges  # late import: the config module stays light

    for key, on, package, extra in (("metrics.enable_wandb", cfg.metrics.enable_wandb, "wandb", "wandb"),
                                    ("metrics.enable_tensorboard", cfg.metrics.enable_tensorboard, "tensorboard",
                                     "tensorboard"),
                                    ("metrics.plot_at_end", cfg.metrics.plot_at_end, "matplotlib", "plot")):
        _require(not on or importlib.util.find_spec(package) is not None, key, on,
                 f"needs the {package} package, which is not installed", f"pip install 'lathe[{extra}]'")
    if cfg.metrics.enable_wandb:  # online needs an API key: one line now, not a prompt or a traceback later
        from lathe.metrics.wandb_sink import check_config as check_wandb

        check_wandb(cfg)

    t = cfg.training
    spike = t.loss_spike_factor
    _require(spike == 0 or (spike > 1 and math.isfinite(spike)), "training.loss_spike_factor", spike,
             "must be 0 (off) or a number above 1", "e.g. 3 (a loss 3x the recent median is a spike)")
    _require(t.loss_spike_window >= 1, "training.loss_spike_window", t.loss_spike_window, "must be >= 1", "e.g. 50")
    _require(t.max_consecutive_skips >= 1, "training.max_consecutive_skips", t.max_consecutive_skips,
             "must be >= 1", "e.g. 5")
    for key, policy in (("training.on_nonfinite", t.on_nonfinite), ("training.on_loss_spike", t.on_loss_spike)):
        if policy == "rollback" and (key == "training.on_nonfinite" or spike > 0):
            _require(cfg.checkpoint.enable_checkpoint, key, policy, "needs checkpoints to roll back to",
                     "add --checkpoint.enable_checkpoint (and a checkpoint.interval), or use skip")
    parse_batch_ranges(t.skip_batches)


def _check_attention(cfg: Config) -> None:
    """Document masking and context parallel: the combinations lathe can run."""
    m, t, p = cfg.model, cfg.training, cfg.parallelism
    _require(not m.document_positions or m.attention_mask == "block_causal", "model.document_positions", True,
             "restarts positions per document, which only makes sense when documents cannot see each other",
             "set model.attention_mask block_causal, or --no-model.document_positions")
    if p.cp == 1:
        return
    _require(m.attention_mask == "causal", "model.attention_mask", m.attention_mask,
             f"not supported with parallelism.cp={p.cp}: context-parallel ring attention computes plain causal "
             "attention only", "use model.attention_mask causal with context parallel, or parallelism.cp 1")
    chunks = 2 * p.cp if p.cp_load_balance else p.cp
    _require(t.seq_len % chunks == 0, "training.seq_len", t.seq_len,
             f"not divisible by {'2 x ' if p.cp_load_balance else ''}parallelism.cp = {chunks}" +
             (": load balancing gives each rank a head and a tail chunk" if p.cp_load_balance else ""),
             f"use a multiple of {chunks}" + (" or --no-parallelism.cp_load_balance" if p.cp_load_balance else ""))


def _check_pipeline(cfg: Config, n_layers: int, dp_shard: int) -> None:
    from lathe.parallel import pipeline as pl  # late import: torch.distributed.pipelining

    p, t = cfg.parallelism, cfg.training
    _require(not (p.dp_replicate > 1 and dp_shard == 1), "parallelism.dp_replicate", p.dp_replicate,
             "DDP (replicate without shard) does not compose with pipeline parallel", "use FSDP or HSDP")
    if p.pp_schedule_csv:
        _check_pipeline_csv(cfg, n_layers)
        return
    cls = pl.schedule_class(p.pp_schedule)
    if p.pp_split_points:
        num_stages = len(p.pp_split_points) + 1
        pl.layer_ranges_from_split_points(p.pp_split_points, n_layers, num_stages)
    else:
        num_stages = p.pp * pl.stages_per_rank(cls, p.pp_stages_per_rank)
    _require(num_stages % p.pp == 0, "parallelism.pp_split_points", p.pp_split_points,
             f"{num_stages} stages cannot be spread evenly over pp={p.pp} ranks", "use a multiple of pp stages")
    per_rank = num_stages // p.pp
    if pl.is_multi_stage(cls):
        _require(per_rank >= 2 if pl.is_v_shaped(cls) else per_rank >= 1, "parallelism.pp_schedule", p.pp_schedule,
                 "needs 2 stages per rank", "add split points or set parallelism.pp_stages_per_rank 2")
        if pl.is_v_shaped(cls):
            _require(per_rank == 2, "parallelism.pp_schedule", p.pp_schedule,
                     f"V-shaped schedules take exactly 2 stages per rank (got {per_rank})", "use 2 stages per rank")
    else:
        _require(per_rank == 1, "parallelism.pp_schedule", p.pp_schedule,
                 f"runs one stage per rank, but there are {per_rank}",
                 "pick a multi-stage schedule (Interleaved1F1B, LoopedBFS, ...) or fewer stages")
    _require(num_stages <= n_layers, "parallelism.pp", p.pp, f"{num_stages} stages for {n_layers} blocks",
             "use fewer stages than blocks")
    _require(not (pl.is_v_shaped(cls) and cfg.validation.enabled), "validation.enabled", True,
             f"not supported with {p.pp_schedule}: torch cannot run V-shaped schedules forward-only",
             "use another pipeline schedule (e.g. Interleaved1F1B) or --no-validation.enabled")
    micro = p.pp_microbatches or num_stages
    if cls.__name__ in ("Schedule1F1B", "ScheduleDualPipeV"):
        _require(micro >= num_stages, "parallelism.pp_microbatches", micro,
                 f"{p.pp_schedule} needs at least as many micro-batches as stages ({num_stages})",
                 f"set it to {num_stages} or more (and training.batch_size a multiple of it)")
    _require(t.batch_size % micro == 0, "parallelism.pp_microbatches", micro,
             f"training.batch_size {t.batch_size} does not split into {micro} micro-batches",
             "make batch_size a multiple of the micro-batch count")


def _check_pipeline_csv(cfg: Config, n_layers: int) -> None:
    from lathe.parallel import pipeline as pl

    p, key = cfg.parallelism, "parallelism.pp_schedule_csv"
    schedule = pl.read_schedule_csv(p.pp_schedule_csv, p.pp)
    if p.pp_split_points:
        pl.layer_ranges_from_split_points(p.pp_split_points, n_layers, schedule.num_stages)
    _require(schedule.num_stages <= n_layers, key, p.pp_schedule_csv,
             f"{schedule.num_stages} stages for {n_layers} blocks", "use fewer stages than blocks")
    _require(p.pp_microbatches in (0, schedule.microbatches), "parallelism.pp_microbatches", p.pp_microbatches,
             f"the schedule file uses {schedule.microbatches} micro-batches", "leave it at 0 (taken from the file)")
    _require(cfg.training.batch_size % schedule.microbatches == 0, key, p.pp_schedule_csv,
             f"training.batch_size {cfg.training.batch_size} does not split into its {schedule.microbatches} "
             "micro-batches", "make batch_size a multiple of them")


def accumulation_steps(cfg: Config, dp_degree: int) -> int:
    t = cfg.training
    if t.global_batch_size:
        return t.global_batch_size // (t.batch_size * dp_degree)
    return t.gradient_accumulation_steps
