"""Context parallel (CP): each sequence is split over the ``cp`` ranks; attention runs as a ring.

Long sequences stop fitting because activations grow with the sequence length (and attention's
work with its square). CP gives each of the cp ranks 1/cp of every sequence of the batch: every
layer except attention works on its own tokens, and attention, which needs all keys and values of
the sequence, gets them from the other ranks (ring attention). Memory for activations per rank
drops by cp; the weights are sharded with FSDP over dp_shard x cp ranks (``lathe.parallel.dims``).

It is PyTorch's machinery (``torch.distributed.tensor.experimental.context_parallel``):

- ``ContextParallel.shard`` shards a batch: inputs, labels and the RoPE positions of its tokens,
  along the sequence. With load balancing (``parallelism.cp_load_balance``, torch's head-tail
  balancer) the sequence is cut into 2 x cp chunks and rank r takes chunk r and chunk 2cp-1-r: under
  a causal mask late tokens attend to more keys than early ones, so pairing a head with a tail
  chunk gives every rank the same attention work. The model is told each token's position
  (``positions``), so RoPE needs no change.
- Inside the context ``F.scaled_dot_product_attention`` runs torch's ring attention: each rank
  keeps its queries and sees the other ranks' keys/values one shard at a time, merging the partial
  results with their log-sum-exp; backward sends the key/value gradients back to their owners.
  ``parallelism.cp_rotate_method``: ``allgather`` gathers all key/value shards once per attention
  call (more memory, one collective); ``alltoall`` passes one shard per ring step.
- Forward *and* backward run inside the context (activation checkpointing recomputes attention
  during backward).

The loss is correct across the CP group without extra work: each rank's loss is the mean over its
own tokens (all ranks hold equally many), FSDP averages gradients over dp_shard x cp ranks, so the
gradient is that of the mean over every token; the logged loss is averaged over ``dp_cp``.

The model knows none of this: it is called with its part of the sequence and the positions of
those tokens. Only plain causal attention is supported (``model.attention_mask causal``): torch's
SDPA ring takes no other mask, and the config refuses block-causal attention with CP.

CPU: torch maps only the CUDA SDPA kernels (flash, memory-efficient, cuDNN) to ring attention, so
on CPU the SDPA call would fail under CP. ``_install_cpu_ring_attention`` (the end of this file)
maps the CPU flash kernel too, onto torch's own ring templates: the CPU kernel returns
``(out, logsumexp)`` like the CUDA flash kernel, so the templates drive it unchanged. That is what
lets every CP layout be tested on gloo; on GPUs it is never used.
"""

from __future__ import annotations

import contextlib
import logging

import torch
from torch.distributed.device_mesh import DeviceMesh

logger = logging.getLogger("lathe")


def _torch_cp():
    """torch's context-parallel module (it moved in torch 2.13; private names inside)."""
    try:
        from torch.distributed.tensor.experimental._context_parallel import _attention
    except ImportError:  # pragma: no cover - torch < 2.13
        from torch.distributed.tensor.experimental import _attention
    return _attention


class ContextParallel:
    """Shards each batch over the CP mesh and turns attention into ring attention.

    With ``mesh=None`` (cp = 1) ``shard`` hands the batch back unchanged, so the training step
    reads the same either way.
    """

    def __init__(self, mesh: DeviceMesh | None, rotate_method: str = "allgather", load_balance: bool = True):
        self.mesh = mesh
        if mesh is None:
            return
        cp = _torch_cp()
        cp.set_rotate_method(rotate_method)
        # torch keeps this switch in a module-level options object; there is no public setter.
        cp._cp_options.enable_load_balance = load_balance
        if mesh.device_type == "cpu":
            _install_cpu_ring_attention()
        logger.info("context parallel over %d ranks: %s rotation, load balancing %s", mesh.size(), rotate_method,
                    "on" if load_balance else "off")

    @contextlib.contextmanager
    def shard(self, inputs: torch.Tensor, labels: torch.Tensor, model_kwargs: dict):
        """Within the context: this rank's ``(inputs, labels, model_kwargs)``, the last with the
        ``positions`` of its tokens, and attention running as a ring over the CP group.

        Forward and backward must both run inside. The caller's tensors are not modified.
        """
        if self.mesh is None:
            yield inputs, labels, model_kwargs
            return
        bs, seq = inputs.shape
        positions = model_kwargs.get("positions")
        if positions is None:
            positions = torch.arange(seq, device=inputs.device).expand(bs, seq)
        # torch shards the buffers in place (resize + copy): give it copies.
        buffers = [inputs.clone(), labels.clone(), positions.clone()]
        with _torch_cp().context_parallel(self.mesh, buffers=buffers, buffer_seq_dims=[1, 1, 1],
                                          no_restore_buffers=set(buffers)):
            yield buffers[0], buffers[1], {**model_kwargs, "positions": buffers[2]}


# ---------------------------------------------------------------------------------------------
# CPU: ring attention for the CPU flash kernel, through torch's own templates.
#
# Under CP, q/k/v become DTensors sharded on the sequence and SDPA dispatches to the kernel op;
# torch's CP handlers (``custom_ops``, installed into DTensor's dispatcher when the context opens)
# cover the CUDA kernels only. Adding the CPU kernel's forward and backward ops to that same table
# is all it takes. Private torch APIs (checked against torch 2.13): ``custom_ops``,
# ``_templated_ring_attention`` and ``_templated_ring_attention_backward``.

_SEQ_DIM = 2  # q, k, v are (bs, heads, seq, head_dim) when SDPA sees them


def _install_cpu_ring_attention() -> None:
    aten = torch.ops.aten
    table = _torch_cp().custom_ops
    table[aten._scaled_dot_product_flash_attention_for_cpu.default] = _cpu_ring_attention
    table[aten._scaled_dot_product_flash_attention_for_cpu_backward.default] = _cpu_ring_attention


def _cpu_ring_attention(op, args: tuple, kwargs: dict):
    """DTensor handler: run ``op`` (the CPU flash kernel, forward or backward) as ring attention
    over the CP mesh on the local shards; the results are sharded on the sequence like q."""
    from torch.distributed.tensor import DTensor, Shard

    mesh = args[0].device_mesh
    local = lambda x: x._local_tensor if isinstance(x, DTensor) else x  # noqa: E731  (below autograd)
    args, kwargs = tuple(map(local, args)), {k: local(v) for k, v in kwargs.items()}
    if op == torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default:
        results = _ring_forward(mesh, op, *args, **kwargs)[:2]  # out, logsumexp
    else:
        results = _ring_backward(mesh, op, *args, **kwargs)[:3]  # grad q, k, v
    return tuple(DTensor.from_local(t, mesh, [Shard(_SEQ_DIM)], run_check=False) for t in results)


def _ring_forward(mesh, op, query, key, value, dropout_p=0.0, is_causal=False, *, attn_mask=None, scale=None):
    if attn_mask is not None:
        raise NotImplementedError("context parallel attention takes no attn_mask (causal attention only)")
    return _torch_cp()._templated_ring_attention(mesh.get_group(), _SEQ_DIM, op, query=query, key=key, value=value,
                                                 is_causal=is_causal, dropout_p=dropout_p, scale=scale)


def _ring_backward(mesh, op, grad_out, query, key, value, out, logsumexp, dropout_p, is_causal, *, attn_mask=None,
                   scale=None):
    return _torch_cp()._templated_ring_attention_backward(
        mesh.get_group(), _SEQ_DIM, op, grad_out=grad_out, grad_out_name="grad_out", query=query, key=key,
        value=value, out=out, logsumexp=logsumexp, is_causal=is_causal, dropout_p=dropout_p, scale=scale)
