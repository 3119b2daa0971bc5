"""One training run, top to bottom.

Read ``train`` first: each stage is one call into the module that does the work.

    config -> validate -> device, seed -> tokenizer -> data stream -> model on meta
      -> parallelize (TP, AC, compile, FSDP/DDP) -> materialize + init -> optimizer + LR schedule
      -> loop: micro-batches (forward, backward) -> clip -> step -> metrics -> validation
               -> checkpoint -> profiler
      -> close
"""

from __future__ import annotations

import contextlib
import copy
import gc
import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed.tensor import DTensor
from torch.distributed.tensor.parallel import loss_parallel

from lathe import config as config_lib
from lathe.checkpoint.manager import CheckpointManager, TrainState
from lathe.checkpoint import preemption
from lathe.checkpoint.preemption import Preempted
from lathe.config import Config
from lathe.data import build_tokenizer, build_train_data, resolve_vocab_size
from lathe.evaluation import Validator
from lathe import host_memory
from lathe.guard import StepGuard, TrainingError  # noqa: F401 (lathe.trainer.TrainingError for callers)
from lathe.manifest import RunManifest, exit_status
from lathe.memcheck import MemoryCheck
from lathe.memory_model import layout_from_config
from lathe.metrics import MetricsProcessor, make_dist_reduce_fn
from lathe.metrics.processor import new_id
from lathe.metrics.wandb_sink import optional_sinks
from lathe import precision
from lathe.models import MODELS, model_args_from_config, model_overrides
from lathe.models.attention import model_inputs
from lathe.models.llama import ModelArgs, flops_per_token, num_params
from lathe.optim import LRSchedules, build_optimizers
from lathe.parallel import async_tp, distributed
from lathe.parallel.checkpointing import apply_ac
from lathe.parallel.compile import apply_compile, compiled_autograd
from lathe.parallel.context import ContextParallel
from lathe.parallel.dims import Meshes, ParallelDims
from lathe.parallel.fsdp import apply_ddp, apply_fsdp, set_gradient_sync
from lathe.parallel.init import init_model_parts
from lathe.parallel.pipeline import (
    PipelinePlan,
    PipelineRunner,
    StageTimer,
    balanced_layer_ranges,
    build_stage_module,
    is_v_shaped,
    layer_ranges_from_split_points,
    read_schedule_csv,
    schedule_class,
    stage_ids,
    stages_per_rank,
)
from lathe.parallel.tensor import apply_tp
from lathe.parallel.watchdog import Watchdog
from lathe.profiling import maybe_memory_snapshot, maybe_profile
from lathe.quant import float8
from lathe.runlock import RunLock, check_writable

logger = logging.getLogger("lathe")

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class TrainResult:
    losses: dict[int, float] = field(default_factory=dict)  # step -> loss, every step
    steps: int = 0
    tokens: int = 0
    dump_folder: Path = Path(".")
    model_parts: list[nn.Module] = field(default_factory=list)  # trained (parallelized) parts
    memory: dict = field(default_factory=dict)  # the memory check: predicted and measured peak (bytes)

    @property
    def model(self) -> nn.Module:
        """The model, when it is one part (no pipeline parallelism)."""
        return self.model_parts[0]


# ---------------------------------------------------------------------------------------------
# Stages of the run


def pick_device(cfg: Config) -> torch.device:
    if cfg.training.device == "cuda" or (cfg.training.device == "auto" and torch.cuda.is_available()):
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def seed_everything(seed: int, deterministic: bool) -> None:
    torch.manual_seed(seed)  # seeds CPU and every CUDA device
    if deterministic:
        torch.use_deterministic_algorithms(True)
        # MKL's float32 kernels may round differently with memory alignment, which differs between
        # processes; strict CNR mode removes that (read when MKL first runs, so set it early).
        os.environ.setdefault("MKL_CBWR", "AUTO,STRICT")
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.backends.cudnn.benchmark = False


def model_args(cfg: Config, vocab_size: int) -> ModelArgs:
    """The flavor's shape with the ``model.*`` overrides (lathe.models.model_args_from_config)."""
    return model_args_from_config(cfg, vocab_size)


def compute_dtype(cfg: Config, device: torch.device, dims: ParallelDims) -> torch.dtype:
    """The dtype this run's matmuls compute in (for MFU and logs): see lathe/precision.py."""
    return precision.compute_dtype(cfg.training.mixed_precision_param, cfg.training.autocast_dtype, device,
                                   dims.fsdp_enabled)


def parallelize(model: nn.Module, cfg: Config, dims: ParallelDims, meshes: Meshes,
                first_block_index: int = 0) -> nn.Module:
    """Apply, in order, every technique the config asks for: TP -> AC -> compile -> FSDP/DDP.

    ``model`` is the whole model, or one pipeline stage whose first block is the
    ``first_block_index``-th block of the model."""
    if dims.tp_enabled:
        apply_tp(model, meshes.tp, loss_parallel=dims.loss_parallel,
                 float8_styles=float8.tp_styles(cfg, meshes.tp.device_type))
        if cfg.experimental.enable_async_tensor_parallel:
            async_tp.enable()
        if cfg.training.compile or cfg.model.norm_type == "fused_rmsnorm":
            _wait_for_async_embedding_output(model)  # the first block's first op is compiled code
    ac = cfg.activation_checkpoint
    apply_ac(model, ac.mode, ac.selective_ac_option, first_block_index)
    if cfg.training.compile:
        apply_compile(model, backend=cfg.training.compile_backend)
    if dims.fsdp_enabled:
        param_dtype, _ = precision.param_dtype(cfg.training.mixed_precision_param,
                                               torch.device(meshes.data_parallel.device_type))
        apply_fsdp(model, meshes.data_parallel, param_dtype,
                   DTYPES[cfg.training.mixed_precision_reduce], pipeline_parallel=dims.pp > 1,
                   cpu_offload=cfg.training.enable_cpu_offload)
    elif dims.ddp_only:
        apply_ddp(model, meshes.data_parallel)
    return model


def build_model_parts(cfg: Config, model: nn.Module, reference: nn.Module, plan: PipelinePlan | None,
                      dims: ParallelDims, meshes: Meshes) -> list[nn.Module]:
    """This rank's model parts, parallelized, still on the meta device: the whole model, or (with
    pipeline parallelism) one copy per stage this rank runs, holding only that stage's blocks."""
    if plan is None:
        parts, first_blocks = [model], [0]
    else:
        parts = [build_stage_module(reference, *plan.ranges[s], plan.num_stages, s) for s in plan.my_stages]
        first_blocks = [plan.ranges[s][0] for s in plan.my_stages]
    return [parallelize(part, cfg, dims, meshes, first) for part, first in zip(parts, first_blocks)]


def _wait_for_async_embedding_output(model: nn.Module) -> None:
    """TP + compiled code (a compiled block, or the fused RMSNorm) on torch 2.11-2.13: the TP
    embedding hands the first block an AsyncCollectiveTensor, which compiled code cannot take
    (pytorch#180614).
    Materializing it in eager with an identity op that keeps autograd (``* 1``; ``.wait()`` would
    detach the embedding's gradient) avoids that."""
    from torch.distributed._functional_collectives import AsyncCollectiveTensor

    if model.tok_embeddings is not None:
        model.tok_embeddings.register_forward_hook(
            lambda mod, inp, out: out * 1 if isinstance(out, AsyncCollectiveTensor) else out)


def clip_grad_norm(parts: list[nn.Module], max_norm: float, pp_group=None) -> torch.Tensor:
    """Clip to ``max_norm`` and return the total gradient norm over all parameters and shards.

    With DTensor parameters (FSDP, TP) the norm is reduced over their mesh (``full_tensor``);
    pipeline stages on other ranks hold the other parameters, so the squared norms are also summed
    over the pipeline group. Clipping then uses that one global norm on every rank.
    """
    params = [p for part in parts for p in part.parameters() if p.grad is not None]
    norm = nn.utils.get_total_norm([p.grad for p in params], norm_type=2.0, foreach=True)
    if isinstance(norm, DTensor):
        norm = norm.full_tensor()
    if pp_group is not None:
        squared = norm ** 2
        torch.distributed.all_reduce(squared, group=pp_group)
        norm = squared.sqrt()
    nn.utils.clip_grads_with_norm_(params, max_norm, norm, foreach=True)
    return norm


def cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token loss over every position of the batch.

    The per-token losses are summed in float64: a float32 sum of many terms depends on memory
    alignment on CPU (vectorized head/tail handling), so the same batch could report a loss that
    differs in the last bit after a restart. The gradient (1/N per token) is unaffected either way.
    """
    per_token = F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(0, 1), reduction="none")
    return (per_token.double().sum() / per_token.numel()).float()


def last_logged_step(dump_folder: Path) -> int:
    """The last step an earlier run in this folder logged (0 if none): how far it really got."""
    path = dump_folder / "metrics.jsonl"
    try:
        with open(path, "rb") as f:
            f.seek(max(0, path.stat().st_size - 65536))
            tail = f.read().decode("utf-8", "replace").splitlines()
    except OSError:
        return 0
    for line in reversed(tail):
        try:
            return int(json.loads(line).get("step", 0))
        except (ValueError, AttributeError, TypeError):
            continue
    return 0


def log_restart(resumed_step: int, last_logged: int) -> None:
    """Say which restart this is (Slurm requeue, torchrun restart) and how much work was lost."""
    slurm = int(os.environ.get("SLURM_RESTART_COUNT", 0) or 0)
    elastic = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", 0) or 0)
    if slurm or elastic:
        logger.info("restart: Slurm job %s restart %d, torchrun restart %d; resuming at step %d",
                    os.environ.get("SLURM_JOB_ID", "-"), slurm, elastic, resumed_step)
    if last_logged > resumed_step:
        logger.warning("the previous run reached step %d, its last complete checkpoint is step %d: %d step%s of "
                       "work lost", last_logged, resumed_step, last_logged - resumed_step,
                       "" if last_logged - resumed_step == 1 else "s")


def check_activation_floor(cfg: Config) -> None:
    """Refuse a micro-batch that cannot fit however the run is laid out: its activations need at
    least one value per model dimension per layer per token (the real need is many times that),
    divided over the ranks that shard the sequence or the hidden dimension."""
    import psutil

    t, p = cfg.training, cfg.parallelism
    shape = model_args_from_config(cfg)
    floor = t.batch_size * t.seq_len * shape.dim * (shape.n_layers + 1) * 2 / max(1, p.tp * p.cp)
    if torch.cuda.is_available() and t.device != "cpu":
        available, where = torch.cuda.get_device_properties(0).total_memory, "GPU memory"
    else:
        available, where = psutil.virtual_memory().total, "host memory"
    if floor > available:
        raise config_lib.ConfigError(
            "training.seq_len", f"a micro-batch of {t.batch_size} x {t.seq_len:,} tokens needs more than "
            f"{floor / 2**30:,.0f} GiB of activations per rank; this machine has {available / 2**30:,.0f} GiB of {where}",
            "lower training.seq_len or training.batch_size, or shard the sequence over more ranks", t.seq_len)


def write_run_config(cfg: Config, dump_folder: Path) -> None:
    dump_folder.mkdir(parents=True, exist_ok=True)
    (dump_folder / "config.toml").write_text(config_lib.to_toml(cfg))


# ---------------------------------------------------------------------------------------------
# The run


def train(cfg: Config) -> TrainResult:
    world_size = distributed.world_size()
    config_lib.validate(cfg, world_size=world_size, cuda_available=torch.cuda.is_available())
    check_activation_floor(cfg)
    dump_folder = Path(cfg.job.dump_folder)
    check_writable(dump_folder, "job.dump_folder")
    if cfg.checkpoint.enable_checkpoint:
        check_writable(dump_folder / cfg.checkpoint.folder, "checkpoint.folder")
    # SIGTERM/SIGUSR1 are recorded from here on (lathe train installed this handler already)
    owns_handler = preemption.install()
    # One run per folder: rank 0 holds the lock from before anything is written until the end.
    lock = RunLock(dump_folder).acquire() if distributed.rank() == 0 else None
    # outputs/run.json: what ran, on what, with which data, and how it ended (lathe replay reads it)
    manifest = RunManifest.start(cfg, dump_folder, world_size) if distributed.rank() == 0 else None
    try:
        result = _train(cfg, dump_folder)
        if manifest is not None:
            status = exit_status(None)
            if preemption.requested() is not None:  # after the last step: complete, and still exits 75
                status["exit_code"] = preemption.EXIT_PREEMPTED
            manifest.finish(status, steps=result.steps, tokens=result.tokens)
        return result
    except BaseException as e:
        if manifest is not None:
            manifest.finish(exit_status(e))
        raise
    finally:
        if lock is not None:
            lock.release()
        if owns_handler:
            preemption.uninstall()


def _train(cfg: Config, dump_folder: Path) -> TrainResult:
    t = cfg.training
    is_logging_rank = distributed.rank() == 0
    if is_logging_rank:
        write_run_config(cfg, dump_folder)
        if cfg.job.print_args:
            logger.info("resolved config:\n%s", config_lib.to_toml(cfg))
    logger.info("starting job: %s", cfg.job.description)
    if t.gc_freq:
        gc.disable()  # collect on our schedule, the same step on every rank

    device = pick_device(cfg)
    host_memory.configure(t.cpu_allocator, device.type)  # before the first large allocation
    ck = cfg.checkpoint
    if device.type == "cuda":
        distributed.set_nccl_defaults(cfg.comm.trace_buf_size, dump_folder)
    own_group = distributed.init(device, cfg.comm.init_timeout_seconds,
                                 single_process_group=ck.enable_checkpoint and ck.async_mode == "async_with_pinned_mem")
    preemption.pause_point("build")
    dims = ParallelDims.from_config(cfg.parallelism, distributed.world_size())
    meshes = dims.build_meshes(device.type)
    dp_rank = meshes.dp.get_local_rank() if meshes.dp is not None else 0
    dp_degree = dims.dp
    # the loss is averaged over every rank holding different tokens: data parallel x context parallel
    loss_group = meshes.dp_cp.get_group() if meshes.dp_cp is not None else None
    cp = ContextParallel(meshes.cp, cfg.parallelism.cp_rotate_method, cfg.parallelism.cp_load_balance)
    seed_everything(t.seed, t.deterministic)

    tokenizer = build_tokenizer(cfg)
    data = build_train_data(cfg, tokenizer, dp_rank, dp_degree)
    validator = None
    if cfg.validation.enabled:  # built now: its data is checked before training starts
        validator = Validator(cfg, tokenizer, dp_rank, dp_degree, device, dp_group=loss_group)

    args = model_args(cfg, resolve_vocab_size(cfg, tokenizer))
    with torch.device("meta"):
        model = MODELS[cfg.model.name].build(args)
    model = float8.convert(model, cfg, tp=dims.tp, fsdp_enabled=dims.fsdp_enabled)  # converters: before parallelizing
    reference = copy.deepcopy(model)  # unparallelized, on meta: the source of initial weights
    n_params = num_params(model)
    flops = flops_per_token(args, num_params(model, exclude_embedding=True), t.seq_len)
    changed = model_overrides(args, cfg)
    logger.info("model %s %s%s: %s parameters, %.3e training FLOPs per token", cfg.model.name, cfg.model.flavor,
                f" ({changed})" if changed else "", f"{n_params:,}", flops)
    precision.log_choice(t.mixed_precision_param, device, dims.fsdp_enabled)

    accum = config_lib.accumulation_steps(cfg, dp_degree)
    plan = pipeline_plan(cfg, args, dims, meshes, reference) if dims.pp > 1 else None
    parts = build_model_parts(cfg, model, reference, plan, dims, meshes)
    for part in parts:  # FSDP CPU offload: the (sharded) parameters live in host memory
        part.to_empty(device="cpu" if t.enable_cpu_offload else device)
    init_model_parts(parts, reference, device, t.seed)
    pipeline = stage_timer = None
    if plan is not None:
        pipeline = PipelineRunner(plan, parts, device, meshes.pp.get_group(), loss_fn=cross_entropy,
                                  accumulation=accum)
        if cfg.parallelism.pp_stage_timing:
            stage_timer = StageTimer(parts, device)

    optimizers = build_optimizers(parts, cfg.optimizer)
    float8.register_precompute(optimizers, parts, cfg, dims.fsdp_enabled)
    schedules = LRSchedules(optimizers, t.steps, cfg.lr_scheduler)
    train_state = TrainState()
    checkpointer = CheckpointManager(cfg.checkpoint, dump_folder, parts, optimizers, schedules, data,
                                     train_state, args)
    if cfg.checkpoint.create_seed_checkpoint:
        checkpointer.save(0, last_step=True, weights_only=True)
        logger.info("seed checkpoint written to %s", checkpointer.folder / "step-0")
        return TrainResult(dump_folder=dump_folder, model_parts=parts)

    def stop_if_preempted() -> None:
        """Before the loop: every rank stops alike if any was signalled (nothing new to save)."""
        if preemption.agree(preemption.requested() is not None, checkpointer.control, device):
            if hasattr(data, "close"):
                data.close()
            if own_group:
                torch.distributed.destroy_process_group()
            raise Preempted(train_state.step, saved=False)

    stop_if_preempted()  # signalled during start-up or the model build
    last_logged = last_logged_step(dump_folder) if is_logging_rank else 0
    preemption.pause_point("load")
    checkpointer.load()
    stop_if_preempted()  # signalled during the checkpoint load
    if is_logging_rank:
        log_restart(train_state.step, last_logged)
    resumed_from = train_state.step
    if not train_state.run_id:  # a fresh run (or a checkpoint from before run ids): a new run id
        train_state.run_id = new_id()
    if train_state.step > t.steps:
        raise config_lib.ConfigError(
            "training.steps", f"the checkpoint this run resumes from is at step {train_state.step}, beyond it",
            f"set training.steps above {train_state.step} to train on, or use another job.dump_folder", t.steps)
    if train_state.step == t.steps and t.steps > 0:
        logger.info("nothing to train: the run is complete at step %d (raise training.steps to continue)",
                    train_state.step)
        if hasattr(data, "close"):
            data.close()
        return TrainResult(steps=train_state.step, tokens=train_state.tokens_seen, dump_folder=dump_folder,
                           model_parts=parts)

    metrics = MetricsProcessor(
        log_freq=cfg.metrics.log_freq, device=device, flops_per_token=flops, dump_folder=dump_folder,
        color=cfg.metrics.enable_color_printing, enable_tensorboard=cfg.metrics.enable_tensorboard,
        tb_folder=cfg.metrics.save_tb_folder, is_logging_rank=is_logging_rank,
        model_parallel_size=dims.model_parallel_size,
        reduce_fn=make_dist_reduce_fn(loss_group) if loss_group is not None else None,
        compute_dtype=compute_dtype(cfg, device, dims), attention_flops_per_token=flops_per_token(args, 0, t.seq_len),
        dp_degree=dp_degree, total_steps=t.steps,
        sinks=optional_sinks(cfg, dump_folder, train_state) if is_logging_rank else (),
        run_id=train_state.run_id, resumed_from=resumed_from)
    metrics.tokens_seen = train_state.tokens_seen // dp_degree
    guard = StepGuard(t, device, train_state, windows_per_step=t.batch_size * accum * dp_degree,
                      log_event=metrics.log_event)
    memory_check = MemoryCheck(cfg, dims, parts, optimizers, device, meshes.pp.get_local_rank() if meshes.pp else 0,
                               args.vocab_size, t.steps, enabled=cfg.memory_estimation.check)
    grad_sync = accumulation_sync(cfg, dims, args.vocab_size, device)
    if accum > 1 and dims.fsdp_enabled and dims.pp == 1:
        logger.info("gradient accumulation: %s (training.gradient_accumulation_sync %s)", {
            "every_microbatch": "gradients reduce-scattered every micro-batch (sharded)",
            "last_microbatch": "gradients kept unsharded until the last micro-batch"}[grad_sync],
            t.gradient_accumulation_sync)
    step_fn = StepRunner(parts, pipeline, optimizers, schedules, data, metrics, device, accum, cfg, dims, cp,
                         pp_group=meshes.pp.get_group() if meshes.pp is not None else None, guard=guard,
                         grad_sync=grad_sync)
    result = TrainResult(dump_folder=dump_folder, model_parts=parts)
    tokens_per_step = t.batch_size * t.seq_len * accum * dp_degree
    logger.info("training steps %d to %d: batch %d x accumulation %d x DP %d = %d sequences of %d tokens "
                "(%s tokens per step), warmup %d, on %s", train_state.step + 1, t.steps, t.batch_size, accum,
                dp_degree, t.batch_size * accum * dp_degree, t.seq_len, f"{tokens_per_step:,}",
                cfg.lr_scheduler.warmup_steps, device)

    prof = cfg.profiling
    step_losses: dict[int, torch.Tensor] = {}
    first_step = train_state.step + 1  # collective timeouts tighten once it is done
    watchdog = None  # started after the first step (compilation, lazy init)
    failed = True
    try:
        with maybe_profile(prof.enable_profiling, dump_folder / prof.save_traces_folder,
                           prof.profile_freq, global_step=train_state.step) as profiler, \
             maybe_memory_snapshot(prof.enable_memory_snapshot, dump_folder / prof.save_memory_snapshot_folder,
                                   prof.profile_freq, global_step=train_state.step) as snapshotter:
            step = first_step - 1
            while step < t.steps:
                step += 1
                if t.gc_freq and step % t.gc_freq == 0:
                    gc.collect(1)
                if step == first_step:
                    preemption.pause_point("step")  # the first step compiles
                with memory_check.measuring(step):
                    loss = step_fn.run(step)
                if step_fn.verdict.rollback:  # reload the last checkpoint; its step is where we continue
                    with suspended(watchdog):
                        step = guard.rollback(checkpointer, step)
                    metrics.tokens_seen = train_state.tokens_seen // dp_degree
                    continue
                step_losses[step] = loss
                train_state.step = step
                train_state.tokens_seen += tokens_per_step
                logged = metrics.step(step, loss, step_fn.ntokens, step_fn.lr, step_fn.grad_norm,
                                      skipped=step_fn.verdict.skipped, counters=guard.counters)
                if logged is not None:
                    train_state.loss_log.append([step, logged["loss"]])
                    if stage_timer is not None:  # every rank reports its own stages
                        logger.info(stage_timer.report(meshes.pp.get_local_rank(), plan.my_stages))
                if logged is not None or step == t.steps:
                    guard.check()
                if step == first_step and watchdog is None:
                    distributed.set_train_timeout(cfg.comm.train_timeout_seconds)
                    watchdog = Watchdog.maybe_start(cfg.comm.watchdog_timeout_seconds)
                if watchdog is not None:
                    watchdog.progress(step)

                last = step == t.steps
                if validator is not None and (step % cfg.validation.freq == 0 or last):
                    with suspended(watchdog):
                        metrics.log_validation(step, step_fn.validate(validator))
                # every rank stops at the same step if any was signalled (checkpointing off: the
                # default group agrees; one tiny all-reduce per step)
                preempted = preemption.agree(preemption.requested() is not None, checkpointer.control, device)
                if (preempted and checkpointer.enabled) or checkpointer.should_save(step, last):
                    guard.check()  # never checkpoint a diverged model
                    preemption.pause_point("save")
                    with suspended(watchdog):
                        checkpointer.save(step, last_step=last or preempted,
                                          weights_only=last and cfg.checkpoint.model_weights_only)
                if preempted:
                    raise Preempted(step, saved=checkpointer.enabled)
                if profiler is not None:
                    profiler.step()
                if snapshotter is not None:
                    snapshotter.step()
        preemption.pause_point("end")
        checkpointer.close()
        failed = False
    except BaseException:
        # Commit an async save still in flight (it passed the finite check when it started). Only
        # on one process: with several, the other ranks may not reach this point, and committing
        # needs all of them; the partial folder is then discarded at the next start.
        if distributed.world_size() == 1:
            checkpointer.close()
        raise
    finally:
        if watchdog is not None:
            watchdog.close()
        metrics.close(exit_code=int(failed))
        close = getattr(data, "close", None)
        if close is not None:
            close()
        if t.gc_freq:
            gc.enable()
        if own_group:
            torch.distributed.destroy_process_group()

    result.memory = memory_check.result
    result.losses = dict(zip(step_losses, torch.stack(list(step_losses.values())).tolist())) if step_losses else {}
    result.steps = train_state.step
    result.tokens = train_state.tokens_seen
    logger.info("training completed: %d steps, %s tokens (global), metrics in %s", result.steps,
                f"{result.tokens:,}", dump_folder / "metrics.jsonl")
    if cfg.metrics.plot_at_end and is_logging_rank:
        from lathe.metrics.plot import plot_at_end

        plot_at_end(dump_folder)
    return result


def suspended(watchdog: Watchdog | None):
    return watchdog.suspend() if watchdog is not None else contextlib.nullcontext()


def accumulation_sync(cfg: Config, dims: ParallelDims, vocab_size: int, device: torch.device) -> str:
    """``training.gradient_accumulation_sync`` for this run; ``auto`` asks the analytic memory model
    whether unsharded gradients fit this GPU (memory_model.resolve_grad_sync). A layout the model
    fails on gets the memory-safe every_microbatch."""
    mode = cfg.training.gradient_accumulation_sync
    if mode != "auto":
        return mode
    try:
        return layout_from_config(cfg, dims, vocab_size, device).grad_sync
    except Exception as e:  # a layout the model does not cover must not stop training
        logger.warning("training.gradient_accumulation_sync auto: the analytic model failed for this layout "
                       "(%s: %s); reducing gradients every micro-batch", type(e).__name__, e)
        return "every_microbatch"


class StepRunner:
    """One optimizer step: micro-batches (forward, loss, backward), clipping, optimizer, schedule."""

    def __init__(self, parts, pipeline, optimizers, schedules, data, metrics, device, accum, cfg: Config,
                 dims: ParallelDims, cp: ContextParallel, pp_group=None, guard: StepGuard | None = None,
                 grad_sync: str | None = None):
        self.parts, self.pipeline, self.pp_group, self.cp = parts, pipeline, pp_group, cp
        self.attention = (cfg.model.attention_mask, cfg.model.document_positions)
        self.optimizers, self.schedules = optimizers, schedules
        self.data_iter = iter(data)
        self.guard, self.verdict = guard, None
        self.metrics, self.device, self.accum = metrics, device, accum
        self.max_norm = cfg.training.max_norm if cfg.training.max_norm > 0 else float("inf")
        dtype = cfg.training.autocast_dtype
        self.autocast = (lambda: torch.autocast(device.type, dtype=DTYPES[dtype])) if dtype != "none" \
            else contextlib.nullcontext
        # Loss parallel: cross-entropy on vocabulary-sharded logits; forward and backward inside it.
        self.loss_context = loss_parallel if dims.loss_parallel else contextlib.nullcontext
        self.backward_context = lambda: compiled_autograd(cfg.experimental.enable_compiled_autograd,
                                                          cfg.training.compile_backend)
        self.ntokens, self.lr, self.grad_norm = 0, 0.0, None
        # training.gradient_accumulation_sync, resolved (memory_model.resolve_grad_sync; "auto"
        # without a device to decide on = every_microbatch): FSDP reduce-scatters every micro-batch
        # (HSDP's all-reduce across replicas still once, at the last), or only the last one.
        if grad_sync is None:
            mode = cfg.training.gradient_accumulation_sync
            grad_sync = "every_microbatch" if mode == "auto" else mode
        # (Under PP torch's pipeline stage decides when FSDP reduces: at the end of each batch.)
        self.sync_every = grad_sync == "every_microbatch" and dims.fsdp_enabled and pipeline is None
        self.hsdp = dims.fsdp_enabled and dims.dp_replicate > 1 and pipeline is None

    def run(self, step: int) -> torch.Tensor:
        self.optimizers.zero_grad()
        loss = torch.zeros((), device=self.device)
        self.ntokens = 0
        if self.guard is not None:
            self.guard.drop_skipped_windows(self.data_iter)
        first_window = self.data_iter.position
        for micro in range(self.accum):
            last = micro == self.accum - 1
            for part in self.parts:
                set_gradient_sync(part, last or self.sync_every, all_reduce=last if self.hsdp else None)
            start = time.perf_counter()
            batch = next(self.data_iter)
            self.metrics.data_loading_time(time.perf_counter() - start)
            inputs, labels, *ids = (x.to(self.device, non_blocking=True) for x in batch[:3])
            self.ntokens += labels.numel()
            loss += self.forward_backward(inputs, labels, model_inputs(ids[0] if ids else None, *self.attention))
        if self.optimizers.steps_in_backward:  # already stepped; nothing to clip
            self.grad_norm = self.optimizers.take_grad_norm().to(self.device)
        else:
            self.grad_norm = clip_grad_norm(self.parts, self.max_norm, self.pp_group)
        self.lr = self.optimizers.lr
        # Every rank agrees whether this update happens (non-finite and spike policies, guard.py).
        self.verdict = self.guard.judge(step, loss, self.grad_norm, (first_window, self.data_iter.position)) \
            if self.guard is not None else None
        if self.verdict is None or self.verdict.apply:
            self.optimizers.step()
            self.schedules.step()
        return loss

    def validate(self, validator: Validator) -> dict:
        batch_loss = self.pipeline.evaluate if self.pipeline is not None else None
        return validator.run(self.parts[0], self.loss_context, self.autocast, batch_loss=batch_loss,
                             shard=self.cp.shard)

    def forward_backward(self, inputs: torch.Tensor, labels: torch.Tensor, model_kwargs: dict) -> torch.Tensor:
        """One micro-batch's forward and backward; returns its (detached) loss / accumulation.

        ``model_kwargs``: the model's per-token inputs besides the tokens (document ids for
        block-causal attention, positions). Under context parallel all of them, inputs and labels
        are this rank's part of the sequence, and forward and backward run inside the context."""
        with self.cp.shard(inputs, labels, model_kwargs) as (inputs, labels, model_kwargs):
            if self.pipeline is not None:
                # the schedule runs forward and backward of every pipeline micro-batch of this batch
                with self.loss_context(), self.autocast():
                    return self.pipeline.step(inputs, labels, **model_kwargs)
            with self.loss_context(), self.backward_context():
                with self.autocast():
                    logits = self.parts[0](inputs, **model_kwargs)
                    loss = cross_entropy(logits, labels) / self.accum
                del logits  # free the largest activation before backward allocates gradients
                loss.backward()
        loss = loss.detach()
        # under loss parallel the loss is a replicated DTensor: every rank has it whole
        return loss.full_tensor() if isinstance(loss, DTensor) else loss


def pipeline_plan(cfg: Config, args: ModelArgs, dims: ParallelDims, meshes: Meshes,
                  reference: nn.Module) -> PipelinePlan:
    """Which stages exist, which blocks each holds, which this rank runs, how many micro-batches."""
    p = cfg.parallelism
    from_csv = read_schedule_csv(p.pp_schedule_csv, dims.pp) if p.pp_schedule_csv else None
    if from_csv is not None:  # the file decides the stages, their ranks and the micro-batches
        cls, num_stages = from_csv.schedule_cls, from_csv.num_stages
    else:
        cls = schedule_class(p.pp_schedule)
        num_stages = ((len(p.pp_split_points) + 1) if p.pp_split_points
                      else dims.pp * stages_per_rank(cls, p.pp_stages_per_rank))
    if p.pp_split_points:
        ranges = layer_ranges_from_split_points(p.pp_split_points, args.n_layers, num_stages)
    else:
        # Training FLOPs per token: a block's weights (6 per parameter) plus its attention scores;
        # the output projection is a matmul too (6 per weight); the embedding is a lookup, charged
        # 2 per weight for its gradient and optimizer update.
        block_params = num_params(reference.layers["0"])
        block = 6 * block_params + flops_per_token(args, 0, cfg.training.seq_len) / args.n_layers
        table = args.vocab_size * args.dim
        ranges = balanced_layer_ranges(block, args.n_layers, num_stages, first_extra=2 * table, last_extra=6 * table)
    if from_csv is not None:
        mine = from_csv.stages_by_rank[meshes.pp.get_local_rank()]
        microbatches = from_csv.microbatches
    else:
        mine = stage_ids(meshes.pp.get_local_rank(), dims.pp, num_stages, is_v_shaped(cls))
        microbatches = p.pp_microbatches or num_stages
    logger.info("pipeline: %s, %d stages (blocks %s), this rank runs stages %s, %d micro-batches",
                cls.__name__, num_stages, ", ".join(f"{a}-{b - 1}" for a, b in ranges), mine, microbatches)
    return PipelinePlan(cls, num_stages, mine, ranges, microbatches, p.pp_schedule_csv)
