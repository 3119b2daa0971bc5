"""Optimizers and learning-rate schedules.

One optimizer (and one schedule) per model part: a pipeline stage is a model part, and with
several stages per rank there are several parts. ``Optimizers`` and ``LRSchedules`` hide that
case from the trainer and are Stateful (state_dict / load_state_dict) for checkpoints.
"""

from __future__ import annotations

import math

import torch
from torch import nn

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
    cls = {"Adam": torch.optim.Adam, "AdamW": torch.optim.AdamW}[cfg.name]
    kwargs = dict(lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, weight_decay=cfg.weight_decay)
    if cfg.fused:
        kwargs["fused"] = True
    else:
        kwargs["foreach"] = cfg.foreach
    return cls(param_groups(model, cfg), **kwargs)


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

    def __init__(self, model_parts: list[nn.Module], cfg: OptConfig):
        self.optimizers = [build_optimizer(m, cfg) for m in model_parts]

    def step(self) -> None:
        for o in self.optimizers:
            o.step()

    def zero_grad(self) -> None:
        for o in self.optimizers:
            o.zero_grad(set_to_none=True)

    @property
    def lr(self) -> float:
        return self.optimizers[0].param_groups[0]["lr"]


class LRSchedules:
    def __init__(self, optimizers: Optimizers, total_steps: int, cfg: LRConfig):
        self.schedules = [build_lr_schedule(o, total_steps, cfg) for o in optimizers.optimizers]

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
