"""Optimizers and learning-rate schedules.

One optimizer (and one schedule) per model part: a pipeline stage is a model part, and with
several stages per rank there are several parts. ``Optimizers`` and ``LRSchedules`` hide that
case from the trainer and are Stateful (state_dict / load_state_dict) for checkpoints.

``OptimizersInBackward`` (``optimizer.early_step_in_backward``) steps each parameter during the
backward pass instead, as soon as its gradient is complete, and frees that gradient at once.
"""

from __future__ import annotations

import logging
import math

import torch
from torch import nn

from lathe.config import Config
from lathe.config import LRScheduler as LRConfig
from lathe.config import Optimizer as OptConfig


def param_groups(model: nn.Module, cfg: OptConfig) -> list[dict]:
    """One group, or two when norms, biases and embeddings are exempt from weight decay."""
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if not cfg.no_decay_norms_and_embeddings:
        return [{"params": [p for _, p in params]}]
    no_decay_ids = set()
    for module in model.modules():
        if isinstance(module, nn.Embedding) or "norm" in type(module).__name__.lower():
            no_decay_ids.update(id(p) for p in module.parameters(recurse=False))
    no_decay_ids.update(id(p) for n, p in params if n.endswith("bias"))
    decay = [p for _, p in params if id(p) not in no_decay_ids]
    no_decay = [p for _, p in params if id(p) in no_decay_ids]
    return [{"params": decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(model: nn.Module, cfg: OptConfig) -> torch.optim.Optimizer:
    return _optimizer(param_groups(model, cfg), cfg)


def _optimizer(groups: list[dict], cfg: OptConfig) -> torch.optim.Optimizer:
    cls = {"Adam": torch.optim.Adam, "AdamW": torch.optim.AdamW}[cfg.name]
    kwargs = dict(lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, weight_decay=cfg.weight_decay)
    if cfg.fused:
        kwargs["fused"] = True
    else:
        kwargs["foreach"] = cfg.foreach
    return cls(groups, **kwargs)


def lr_factor(step: int, total_steps: int, cfg: LRConfig) -> float:
    """Multiplier of the peak LR for the optimizer step with 0-based index ``step``.

    Warmup rises linearly to 1 over ``warmup_steps`` (step 0 gets 1/(warmup+1), never 0, so the
    first step is not wasted). The decay then runs over the remaining steps, ending at
    ``min_lr_ratio`` one step after the last one (the last step still learns).
    - linear / cosine: decay from 1 to min_lr_ratio over all post-warmup steps;
    - wsd (warmup-stable-decay): constant 1, then a linear decay over the last ``decay_ratio``
      fraction of the post-warmup steps;
    - constant: 1 after warmup.
    """
    warmup = cfg.warmup_steps
    if step < warmup:
        return (step + 1) / (warmup + 1)
    decay_steps = max(1, total_steps - warmup)
    progress = (step - warmup) / decay_steps  # 0 at the first post-warmup step, < 1 at the last
    floor = cfg.min_lr_ratio
    if cfg.decay_type == "constant":
        return 1.0
    if cfg.decay_type == "linear":
        return floor + (1 - floor) * (1 - progress)
    if cfg.decay_type == "cosine":
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))
    if cfg.decay_type == "wsd":
        stable_end = 1 - cfg.decay_ratio
        if progress < stable_end:
            return 1.0
        return floor + (1 - floor) * (1 - (progress - stable_end) / cfg.decay_ratio)
    raise ValueError(f"unknown decay_type {cfg.decay_type!r}")


def build_lr_schedule(optimizer: torch.optim.Optimizer, total_steps: int, cfg: LRConfig):
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, total_steps, cfg))


class Optimizers:
    """The optimizers of all model parts, stepped together."""

    steps_in_backward = False

    def __init__(self, model_parts: list[nn.Module], cfg: OptConfig):
        self.optimizers = [build_optimizer(m, cfg) for m in model_parts]
        self._post_step_hooks: list = []

    def register_step_post_hook(self, hook) -> None:
        """``hook()`` runs after every step of all the optimizers (e.g. float8 scale precompute)."""
        self._post_step_hooks.append(hook)

    def step(self) -> None:
        for o in self.optimizers:
            o.step()
        for hook in self._post_step_hooks:
            hook()

    def zero_grad(self) -> None:
        for o in self.optimizers:
            o.zero_grad(set_to_none=True)

    def torch_optimizers(self) -> list[torch.optim.Optimizer]:
        """Every torch optimizer, flat (what holds optimizer states)."""
        return list(self.optimizers)

    @property
    def lr(self) -> float:
        return self.optimizers[0].param_groups[0]["lr"]


class OptimizersInBackward(Optimizers):
    """Optimizer step in backward: one optimizer per parameter, stepped by a hook the moment the
    parameter's gradient is complete (under FSDP: reduce-scattered into its shard), after which the
    gradient is freed. No full set of gradients ever exists, which lowers peak memory by up to the
    size of the gradients.

    The price: nothing can look at all gradients before the update, so there is no gradient
    clipping (it needs the global norm first), no gradient accumulation and no pipeline parallel
    (torchtitan's restrictions, checked by ``check_config``). The gradient norm is still measured:
    each hook records its gradient's norm (a lazy partial norm for sharded gradients) and
    ``take_grad_norm`` combines them, with one reduction, after backward.

    ``optimizers[i]`` is the list of per-parameter optimizers of model part i; DCP's optimizer state
    dict accepts such a list, and its flattened form is keyed by parameter name, so checkpoints are
    interchangeable with the ordinary optimizer's.
    """

    steps_in_backward = True

    def __init__(self, model_parts: list[nn.Module], cfg: OptConfig):
        self.optimizers = []
        self._post_step_hooks = []
        self._norms: list[torch.Tensor] = []
        for part in model_parts:
            per_param = []
            for group in param_groups(part, cfg):
                extra = {k: v for k, v in group.items() if k != "params"}
                for param in group["params"]:
                    opt = _optimizer([{"params": [param], **extra}], cfg)
                    param.register_post_accumulate_grad_hook(self._hook(opt))
                    per_param.append(opt)
            self.optimizers.append(per_param)

    def _hook(self, opt: torch.optim.Optimizer):
        def step_now(param: torch.Tensor) -> None:
            self._norms.append(torch.linalg.vector_norm(param.grad.detach()))
            opt.step()
            opt.zero_grad(set_to_none=True)
        return step_now

    def step(self) -> None:
        """The parameters were updated during backward; only the post-step hooks are left."""
        for hook in self._post_step_hooks:
            hook()

    def zero_grad(self) -> None:
        pass  # every gradient was freed right after its update

    def torch_optimizers(self) -> list[torch.optim.Optimizer]:
        return [o for per_param in self.optimizers for o in per_param]

    def take_grad_norm(self) -> torch.Tensor:
        """The global gradient norm of the backward passes since the last call."""
        norms, self._norms = self._norms, []
        if not norms:
            return torch.zeros(())
        total = nn.utils.get_total_norm(norms, norm_type=2.0, foreach=True)
        return total.full_tensor() if hasattr(total, "full_tensor") else total

    @property
    def lr(self) -> float:
        return self.optimizers[0][0].param_groups[0]["lr"]


def build_optimizers(model_parts: list[nn.Module], cfg: OptConfig) -> Optimizers:
    return (OptimizersInBackward if cfg.early_step_in_backward else Optimizers)(model_parts, cfg)


def check_config(cfg: Config, accumulation: int) -> None:
    """optimizer.early_step_in_backward's restrictions, before any process group starts."""
    from lathe.errors import ConfigError

    if not cfg.optimizer.early_step_in_backward:
        return
    p, key = cfg.parallelism, "optimizer.early_step_in_backward"
    if p.pp > 1:
        raise ConfigError(key, "does not work with pipeline parallel (the schedule runs several backward "
                          "passes per step)", "use parallelism.pp 1, or turn it off", True)
    if accumulation > 1:
        raise ConfigError(key, "does not work with gradient accumulation (it would update after every "
                          "micro-batch)", "set training.gradient_accumulation_steps 1 / a smaller "
                          "training.global_batch_size, or turn it off", True)
    if p.dp_replicate > 1 and p.dp_shard == 1:
        raise ConfigError(key, "does not work with DDP (gradients are averaged across ranks only after the "
                          "hooks that would step them)", "use FSDP or HSDP (parallelism.dp_shard > 1)", True)
    if cfg.experimental.enable_compiled_autograd:
        raise ConfigError(key, "does not work with compiled autograd", "turn one of them off", True)
    t = cfg.training
    for option, policy in (("training.on_nonfinite", t.on_nonfinite),
                           ("training.on_loss_spike", t.on_loss_spike if t.loss_spike_factor else "")):
        if policy == "skip":
            raise ConfigError(key, f"cannot be combined with {option} skip: the update is applied during "
                              "backward, before the step can be judged", f"use {option} rollback or stop, or turn "
                              "early_step_in_backward off", True)
    if cfg.training.max_norm > 0:
        logging.getLogger("lathe").warning(
            "optimizer.early_step_in_backward: gradients are not clipped (training.max_norm=%g is ignored): each "
            "parameter is updated as soon as its gradient exists, before the global norm is known",
            cfg.training.max_norm)


class LRSchedules:
    def __init__(self, optimizers: Optimizers, total_steps: int, cfg: LRConfig):
        flat = [o for entry in optimizers.optimizers for o in (entry if isinstance(entry, list) else [entry])]
        self.schedules = [build_lr_schedule(o, total_steps, cfg) for o in flat]

    def step(self) -> None:
        for s in self.schedules:
            s.step()

    def state_dict(self) -> dict:
        # Every part's schedule has stepped the same number of times: one state serves all, and
        # a checkpoint written with N parts loads into any number of parts.
        return self.schedules[0].state_dict()

    def load_state_dict(self, state: dict) -> None:
        for s in self.schedules:
            s.load_state_dict(state)
