"""Validation loss on held-out data during training.

`Validator.run` computes the mean next-token cross-entropy over ``validation.steps`` batches of
the validation data (``-1``: the whole split), the same batches every time (each run starts again
from the beginning of the validation data, without shuffling), and averages it over the
data-parallel ranks. It reads its own streams, so it never changes the training stream's state.

Which data: ``validation.dataset`` / ``validation.dataset_path`` if set, else the held-out split
of each training source (see `lathe.data.sources`), mixed with the training mix's weights.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Callable

import torch
import torch.nn.functional as F

from lathe.data import build_validation_data
from lathe.errors import ConfigError

logger = logging.getLogger("lathe")

# Validation batches are kept in memory after the first run (they are the same every time) as
# long as they take at most this many bytes; larger validation sets are re-read each run.
_CACHE_BYTES = 256 * 2**20


class Validator:
    """Validation loss and perplexity of a model on the validation data.

    Args:
        cfg: the run's config (``validation.*``, ``training.seq_len``/``seed``/data options).
        tokenizer: the training tokenizer.
        dp_rank, dp_degree: this rank's place among the data-parallel ranks; each reads its share
            of every validation batch, exactly as for training.
        device: where the model runs.
        dp_group: the process group the loss is summed over: data-parallel ranks, with context
            parallel also the CP ranks, which hold different tokens (None: one process).

    The validation data is opened and checked here (ConfigError if it is missing or too small),
    so a misconfigured run fails before its first training step.
    """

    def __init__(self, cfg, tokenizer, dp_rank: int, dp_degree: int, device, dp_group=None):
        self.steps = int(cfg.validation.steps)
        self.device = torch.device(device)
        self.dp_group = dp_group
        self._fresh = build_validation_data(cfg, tokenizer, dp_rank, dp_degree)
        self._attention = (cfg.model.attention_mask, cfg.model.document_positions)
        self._cache: list[tuple[torch.Tensor, ...]] | None = None
        # One batch now: proves the data is there and large enough, before training starts.
        probe = self._fresh()
        try:
            next(probe)
        except StopIteration:  # pragma: no cover - PackedStream raises ValueError first
            pass
        except ValueError as e:
            raise ConfigError("validation", f"validation data too small: {e}",
                              "use a smaller validation.batch_size or training.seq_len, or more validation data "
                              "(validation.dataset_path)") from None

    def _batches(self):
        if self._cache is not None:
            yield from self._cache
            return
        cache, size = [], 0
        stream = self._fresh()
        n = 0
        for batch in stream:
            batch = tuple(batch[:3])  # inputs, labels (, document ids)
            if cache is not None:
                size += sum(x.numel() * x.element_size() for x in batch)
                if size <= _CACHE_BYTES:
                    cache.append(batch)
                else:
                    cache = None
            yield batch
            n += 1
            if self.steps > 0 and n >= self.steps:
                break
        if self.steps > 0 and n < self.steps:
            logger.info("validation: the validation data holds %d batches, fewer than validation.steps=%d", n,
                        self.steps)
        if cache is not None:
            self._cache = cache

    def run(self, model: torch.nn.Module, loss_context: Callable[[], contextlib.AbstractContextManager]
            = contextlib.nullcontext, autocast: Callable[[], contextlib.AbstractContextManager] | None = None,
            batch_loss: Callable[..., torch.Tensor] | None = None, shard=None) -> dict:
        """``{"val_loss", "val_perplexity", "val_tokens"}`` over the validation batches.

        ``loss_context`` wraps forward + loss (loss parallel); ``autocast`` (optional) wraps the
        forward like the training step's autocast. ``batch_loss(inputs, labels)`` replaces the
        model call when the model is split into pipeline stages (it returns the batch's mean
        loss). ``shard(inputs, labels, model_kwargs)`` (context parallel) gives this rank's part of
        a batch; the loss and token count are then this rank's, summed over ``dp_group``. Restores
        the model's train/eval mode."""
        from lathe.models.attention import model_inputs

        shard = shard or (lambda *batch: contextlib.nullcontext(batch))
        was_training = model.training
        model.eval()
        autocast = autocast or contextlib.nullcontext
        total = torch.zeros((), dtype=torch.float64, device=self.device)
        count = 0
        try:
            with torch.no_grad():
                for batch in self._batches():
                    inputs, labels, *ids = (x.to(self.device, non_blocking=True) for x in batch)
                    kwargs = model_inputs(ids[0] if ids else None, *self._attention)
                    with shard(inputs, labels, kwargs) as (inputs, labels, kwargs):
                        if batch_loss is not None:
                            with loss_context(), autocast():
                                loss = batch_loss(inputs, labels, **kwargs) * labels.numel()
                        else:
                            with loss_context():
                                with autocast():
                                    logits = model(inputs, **kwargs)
                                loss = F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(0, 1),
                                                       reduction="sum")
                            del logits
                    if hasattr(loss, "full_tensor"):  # a DTensor under loss parallel
                        loss = loss.full_tensor()
                    total += loss.double()
                    count += labels.numel()
        finally:
            model.train(was_training)
        stats = torch.stack([total, torch.tensor(float(count), dtype=torch.float64, device=self.device)])
        if self.dp_group is not None:
            import torch.distributed as dist

            dist.all_reduce(stats, op=dist.ReduceOp.SUM, group=self.dp_group)
        total_loss, tokens = stats.tolist()
        val_loss = total_loss / tokens if tokens else float("nan")
        return {
            "val_loss": val_loss,
            "val_perplexity": math.exp(min(val_loss, 700.0)) if tokens else float("nan"),
            "val_tokens": int(tokens),
        }
