"""Tensor memory of one rank, tracked op by op: live bytes, their peak, and what they were at the peak.

The same tracker measures a fake-tensor run (``lathe estimate``) and a real CPU run (``lathe train``
checking its estimate), so both report the same quantity: the bytes of every tensor storage alive on
this rank, whatever created it, from the moment tracking starts. It is a ``TorchDispatchMode``:
every op's outputs pass through it; each new storage is recorded with a weak reference whose
callback subtracts its bytes when the storage is freed. ``UntypedStorage.resize_`` (FSDP frees and
re-allocates unsharded parameters that way) is patched while tracking.

Why not ``torch.distributed._tools.MemTracker`` / ``FSDPMemTracker`` (torch 2.13): they refuse a
module called twice in one step (pipeline micro-batches, gradient accumulation), walk every module
on every op (an 8B model's two fake steps took 149 s instead of 23 s untracked), and count the fake
tensors DTensor builds to propagate shapes as allocations (AdamW's foreach step on an 8B FSDP model
showed 101 GiB of "optimizer state" instead of 7.5). Their ``ModTracker`` registers gradient hooks
on every module's inputs, which ``torch.distributed.pipelining``'s shape inference
(``autograd.grad`` on leaf inputs) rejects. This tracker uses plain global module hooks and does
O(1) work per new storage.

Each storage gets a kind when it appears and may be relabelled when its role becomes known:
parameters and buffers (registered when tracking starts), gradients (``.grad`` of a parameter),
optimizer states (``optimizer.state`` after a step), unsharded parameters (FSDP's all-gathered
copies, seen when a leaf module runs), communication buffers (arguments and outputs of collectives),
activations (allocated in forward or in activation-checkpoint recomputation, attributed to the
block that made them), temporaries (allocated in backward) and optimizer temporaries (inside
``optimizer.step``). The breakdown of the peak reads the final kind of each storage that was alive
at the peak (a backward temporary that became a gradient counts as a gradient).
"""

from __future__ import annotations

import weakref
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from functools import wraps

import torch
from torch import nn
from torch.nn.modules.module import register_module_forward_hook, register_module_forward_pre_hook
from torch._guards import active_fake_mode
from torch.distributed._tools.common_utils import get_untyped_storages
from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

try:  # the set of collective ops torch knows about (registers nothing we rely on otherwise)
    from torch.distributed._tools.fake_collectives import collective_ops as _COLLECTIVES
except ImportError:  # pragma: no cover - older torch
    _COLLECTIVES = set()

PARAMS, BUFFERS, GRADS, OPTIM = "parameters", "buffers", "gradients", "optimizer_states"
UNSHARDED, COMM, ACT, TEMP, OPT_TEMP = ("unsharded_parameters", "communication", "activations",
                                       "temporaries", "optimizer_temporaries")
KINDS = (PARAMS, GRADS, OPTIM, UNSHARDED, ACT, TEMP, OPT_TEMP, COMM, BUFFERS)
# Kinds a later, more specific role may replace (a backward temporary that becomes a gradient).
_TRANSIENT = {ACT, TEMP, OPT_TEMP, COMM, UNSHARDED}


class _Record:
    __slots__ = ("nbytes", "kind", "owner")

    def __init__(self, nbytes: int, kind: str, owner: str):
        self.nbytes, self.kind, self.owner = nbytes, kind, owner


@dataclass
class MemoryReport:
    """Peak tensor bytes of one rank and what they were."""

    peak: int  # bytes, exact
    at_peak: dict[str, int]  # kind -> bytes alive at (within ``resolution`` of) the peak
    activations_by_module: dict[str, int]  # block -> activation bytes alive at the peak
    steady: dict[str, int] = field(default_factory=dict)  # parameters/gradients/optimizer states at the end
    peak_by_step: list[int] = field(default_factory=list)


class MemoryTracker(TorchDispatchMode):
    """Track tensor memory while active; enter it once per step (state persists between entries).

    ``parts`` are the model parts (their parameters and buffers are registered at the first entry),
    ``optimizers`` the torch optimizers stepping them. ``resolution``: the breakdown is captured
    whenever the live total exceeds the last captured total by this fraction, so it describes a
    moment within that fraction of the exact peak (the peak itself is exact).
    """

    def __init__(self, parts: list[nn.Module], optimizers: list[torch.optim.Optimizer] = (),
                 resolution: float = 0.002):
        super().__init__()
        self.parts, self.optimizers = parts, list(optimizers)
        self.resolution = resolution
        self.live: dict[int, tuple[_Record, weakref.ref]] = {}
        self.total = 0
        self.peak = 0
        self.step_peak = 0
        self.peak_by_step: list[int] = []
        self._snapshot: list[tuple[_Record, int]] = []
        self._snapshot_total = 0
        self._started = False
        self._in_optimizer = False
        self._recompute_module: nn.Module | None = None
        self._propagating = 0
        self._owners: dict[int, str] = {}  # id(module) -> the block or top-level module it belongs to
        self._stack: list[str] = []  # owners of the modules whose forward is running
        self._param_ids: set[int] = set()
        self._hooks: list = []
        self._orig_resize = None

    # --- recording --------------------------------------------------------------------------

    def _add(self, storage: torch.UntypedStorage, kind: str, owner: str = "") -> _Record | None:
        key = id(storage)
        entry = self.live.get(key)
        if entry is not None:
            return entry[0]
        rec = _Record(storage.nbytes(), kind, owner)
        self.live[key] = (rec, weakref.ref(storage, lambda _, key=key: self._freed(key)))
        self._grow(rec.nbytes)
        return rec

    def _freed(self, key: int) -> None:
        entry = self.live.pop(key, None)
        if entry is not None:
            self.total -= entry[0].nbytes

    def _grow(self, nbytes: int) -> None:
        self.total += nbytes
        if self.total > self.step_peak:
            self.step_peak = self.total
        if self.total > self.peak:
            self.peak = self.total
            if self.total > self._snapshot_total * (1 + self.resolution):
                self._snapshot = [(rec, rec.nbytes) for rec, _ in self.live.values()]
                self._snapshot_total = self.total

    def _relabel(self, t: torch.Tensor, kind: str, only_transient: bool = True) -> None:
        for st in get_untyped_storages(t):
            entry = self.live.get(id(st))
            if entry is None:
                self._add(st, kind)
            elif not only_transient or entry[0].kind in _TRANSIENT:
                entry[0].kind = kind

    def _resize(self, storage: torch.UntypedStorage, size: int):
        out = self._orig_resize(storage, size)
        entry = self.live.get(id(storage))
        if entry is not None:
            rec = entry[0]
            new = storage.nbytes()
            delta, rec.nbytes = new - rec.nbytes, new
            if delta > 0:
                self._grow(delta)
            else:
                self.total += delta
        return out

    # --- context ----------------------------------------------------------------------------

    def _owner(self) -> str:
        """The block (or top-level module) running now: ``layers.3``, ``output``, ... or ``-``."""
        return self._stack[-1] if self._stack else "-"

    def _register_state(self) -> None:
        for part in self.parts:
            for name, child in part.named_modules():
                if not name:
                    continue
                parts = _clean(name).split(".")
                self._owners[id(child)] = ".".join(parts[:2]) if parts[0] == "layers" else parts[0]
            for p in part.parameters():
                self._param_ids.add(id(p))
                self._relabel(p, PARAMS, only_transient=False)
            for b in part.buffers():
                self._relabel(b, BUFFERS, only_transient=False)
        for opt in self.optimizers:
            self._relabel_optimizer(opt)

    def _relabel_optimizer(self, opt: torch.optim.Optimizer) -> None:
        for state in opt.state.values():
            for value in state.values():
                if isinstance(value, torch.Tensor):
                    self._relabel(value, OPTIM, only_transient=False)

    def _relabel_grads(self) -> None:
        for part in self.parts:
            for p in part.parameters():
                if p.grad is not None:
                    self._relabel(p.grad, GRADS)

    def _pre_forward(self, module: nn.Module, inputs) -> None:
        owner = self._owners.get(id(module))
        if owner is not None:
            self._stack.append(owner)
        # A forward inside backward is activation-checkpoint recomputation (until that module ends).
        if _in_backward() and self._recompute_module is None:
            self._recompute_module = module
        # A module's own parameters during forward are FSDP's unsharded copies when FSDP is on.
        for p in module._parameters.values():
            if p is not None and id(p) not in self._param_ids:
                self._relabel(p, UNSHARDED)

    def _post_forward(self, module: nn.Module, inputs, outputs) -> None:
        if id(module) in self._owners and self._stack:
            self._stack.pop()
        if module is self._recompute_module:
            self._recompute_module = None

    def __enter__(self):
        if not self._started:
            self._started = True
            self._fake_mode = active_fake_mode()  # None in a real run
            self._register_state()
        self.step_peak = self.total
        self._orig_resize = torch.UntypedStorage.resize_
        tracker = self

        @wraps(self._orig_resize)
        def resize_(storage, size):
            return tracker._resize(storage, size)

        torch.UntypedStorage.resize_ = resize_
        self._watch_dtensor_propagation()
        self._hooks = [
            register_module_forward_pre_hook(self._pre_forward),
            register_module_forward_hook(self._post_forward, always_call=True),
            register_optimizer_step_pre_hook(self._optimizer_pre),
            register_optimizer_step_post_hook(self._optimizer_post),
        ]
        return super().__enter__()

    def __exit__(self, *exc):
        try:
            super().__exit__(*exc)
        finally:
            for h in self._hooks:
                h.remove()
            self._stack.clear()
            torch.UntypedStorage.resize_ = self._orig_resize
            self._unwatch_dtensor_propagation()
            self._relabel_grads()
            for opt in self.optimizers:
                self._relabel_optimizer(opt)
            self.peak_by_step.append(self.step_peak)

    def _watch_dtensor_propagation(self) -> None:
        """DTensor computes an op's output shapes by running it on fake tensors it builds from the
        inputs' metadata; under a fake run those use this run's fake mode and would look like real
        allocations (a foreach optimizer op builds one per parameter at once). Flag that section.
        (Private API of torch.distributed.tensor, 2.11-2.13; without it nothing is flagged.)"""
        from torch.distributed.tensor import DTensor

        prop = getattr(getattr(DTensor, "_op_dispatcher", None), "sharding_propagator", None)
        original = getattr(prop, "_propagate_tensor_meta_non_cached", None)
        if original is None:
            return
        tracker = self

        @wraps(original)
        def propagate(*args, **kwargs):
            tracker._propagating += 1
            try:
                return original(*args, **kwargs)
            finally:
                tracker._propagating -= 1

        prop._propagate_tensor_meta_non_cached = propagate
        self._unwatch_dtensor_propagation = lambda: delattr(prop, "_propagate_tensor_meta_non_cached")

    def _unwatch_dtensor_propagation(self) -> None:
        pass

    def _optimizer_pre(self, opt, args, kwargs) -> None:
        self._relabel_grads()
        self._in_optimizer = True

    def _optimizer_post(self, opt, args, kwargs) -> None:
        self._in_optimizer = False
        self._relabel_optimizer(opt)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        from torch.distributed.tensor import DTensor

        if any(t is DTensor or issubclass(t, DTensor) for t in types):
            return NotImplemented  # let DTensor run its local ops, which come back through here
        out = func(*args, **(kwargs or {}))
        if self._propagating or active_fake_mode() is not self._fake_mode:
            return out  # DTensor's sharding propagation computing output shapes on fake tensors
        if func in _COLLECTIVES:
            flat, _ = tree_flatten((args, kwargs, out))
            for t in flat:
                if isinstance(t, torch.Tensor):
                    self._relabel(t, COMM)
            return out
        if self._in_optimizer:
            kind = OPT_TEMP
        elif _in_backward() and self._recompute_module is None:
            kind = TEMP
        else:
            kind = ACT
        flat, _ = tree_flatten(out)
        owner = None
        for t in flat:
            # Meta tensors hold no memory: fake mode's own bookkeeping (the fake tensors it hands
            # out report their fake device instead).
            if isinstance(t, torch.Tensor) and t.device.type != "meta":
                for st in get_untyped_storages(t):
                    if id(st) not in self.live:
                        if owner is None:
                            owner = self._owner() if kind == ACT else ""
                        self._add(st, kind, owner)
        return out

    # --- results ----------------------------------------------------------------------------

    def report(self) -> MemoryReport:
        at_peak: Counter = Counter({k: 0 for k in KINDS})
        by_module: dict[str, int] = defaultdict(int)
        for rec, nbytes in self._snapshot:
            at_peak[rec.kind] += nbytes
            if rec.kind == ACT:
                by_module[rec.owner or "-"] += nbytes
        steady: Counter = Counter({PARAMS: 0, GRADS: 0, OPTIM: 0})
        for rec, _ in self.live.values():
            if rec.kind in steady:
                steady[rec.kind] += rec.nbytes
        return MemoryReport(peak=self.peak, at_peak=dict(at_peak), activations_by_module=dict(by_module),
                            steady=dict(steady), peak_by_step=list(self.peak_by_step))


def _in_backward() -> bool:
    return torch._C._current_graph_task_id() != -1


def _clean(name: str) -> str:
    from lathe.parallel import clean_name

    return clean_name(name)
