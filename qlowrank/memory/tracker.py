"""Tensor-level memory tracking: every storage an op allocates, by category, live until freed.

A `TorchDispatchMode` sees the output of every aten (and bitsandbytes) op. Each new
storage is recorded with its size and a category and a finalizer removes it when the
storage dies (PyTorch preserves a storage's Python object while C++ holds it, so the
finalizer fires when the bytes are really released, not when Python forgets them).

Categories are decided by what the tensor *is*, learned from hooks rather than guessed
from sizes:

- parameters, buffers and quantized weight storages are known by identity at the start;
- a gradient is what a trainable parameter's `.grad` holds after accumulation;
- optimizer state is what `optimizer.state` holds after a step;
- activations are what the forward pass leaves alive for backward: tensors handed to
  autograd's saved-tensor hooks, everything else still alive when the forward ends
  (checkpoint boundaries, tensors bitsandbytes keeps on `ctx`), and what a checkpointed
  block recomputes during backward;
- temporaries are the rest: dequantized weights in flight, gradients flowing through the
  graph, logits and the loss (everything from the output head on), optimizer scratch.

The same tracker runs on real tensors (the profiler) and on meta tensors (the estimator).
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field
from typing import Iterable

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

CATEGORIES: tuple[str, ...] = (
    "base_weights", "trainable_params", "gradients", "optimizer_states", "activations", "temporaries",
)
PHASES: tuple[str, ...] = ("setup", "forward", "backward", "optimizer")
_FORWARD_PROVISIONAL = "forward_temp"  # allocated in forward before the head: activation if it survives


@dataclass
class _Record:
    nbytes: int
    category: str
    provisional: bool = False  # a forward allocation whose fate (activation or not) is not known yet
    event: int = 0             # the event count when it was allocated


@dataclass
class TrackerState:
    """What a tracker has seen: live bytes by category, the peak and a timeline."""

    live: dict[str, int] = field(default_factory=lambda: dict.fromkeys(CATEGORIES, 0))
    peak_bytes: int = 0
    peak_breakdown: dict[str, int] = field(default_factory=lambda: dict.fromkeys(CATEGORIES, 0))
    # each category's own high-water mark (not necessarily at the same moment as the peak)
    category_peaks: dict[str, int] = field(default_factory=lambda: dict.fromkeys(CATEGORIES, 0))
    peak_phase: str = "setup"
    peak_step: int = 0
    peak_event: int = 0
    # (event index, phase index, step, bytes per category in CATEGORIES order)
    timeline: list[tuple[int, int, int, tuple[int, ...]]] = field(default_factory=list)
    events: int = 0

    @property
    def total(self) -> int:
        return sum(self.live.values())


class TensorTracker(TorchDispatchMode):
    """Counts live tensor bytes by category while active (see the module docstring).

    Args:
        model: the module being trained; its parameters, buffers and quantized storages are
            attributed by identity, and its forward marks the forward phase.
        optimizer: its state becomes `optimizer_states` and its step the optimizer phase.
        devices: device types to count (e.g. {"cpu"}); None counts every device.
        timeline_every: keep one timeline sample per this many allocation events.
    """

    def __init__(self, model: nn.Module | None = None, optimizer: torch.optim.Optimizer | None = None,
                 devices: Iterable[str] | None = None, timeline_every: int = 1) -> None:
        super().__init__()
        self.model = model
        self.optimizer = optimizer
        self.devices = set(devices) if devices is not None else None
        self.timeline_every = max(1, int(timeline_every))
        self.state = TrackerState()
        self.phase = "setup"
        self.step = 0
        self._records: dict[int, _Record] = {}
        self._head_seen = False
        self._handles: list = []
        self._saved_hooks = None

    # ---- bookkeeping -------------------------------------------------------------------
    def _counted(self, tensor: torch.Tensor) -> bool:
        return self.devices is None or tensor.device.type in self.devices

    def add(self, tensor: torch.Tensor, category: str, provisional: bool = False) -> None:
        """Start counting `tensor`'s storage under `category` (re-categorize if counted already)."""
        if not isinstance(tensor, torch.Tensor) or not self._counted(tensor):
            return
        try:
            storage = tensor.untyped_storage()
        except (RuntimeError, NotImplementedError):  # e.g. a tensor subclass without storage
            return
        key = storage._cdata
        record = self._records.get(key)
        if record is not None:
            self._move(record, category, provisional)
            return
        nbytes = storage.nbytes()
        if nbytes == 0:
            return
        self._records[key] = _Record(nbytes, category, provisional, self.state.events + 1)
        self.state.live[category] += nbytes
        weakref.finalize(storage, self._free, key)
        self._after_alloc()

    def _move(self, record: _Record, category: str, provisional: bool = False) -> None:
        if record.category != category:
            self.state.live[record.category] -= record.nbytes
            self.state.live[category] += record.nbytes
            record.category = category
        record.provisional = provisional

    def recategorize(self, tensor: torch.Tensor, category: str, only_from: tuple[str, ...] | None = None) -> None:
        """Move an already counted storage to `category` (optionally only from the given ones)."""
        if not isinstance(tensor, torch.Tensor) or not self._counted(tensor):
            return
        record = self._records.get(tensor.untyped_storage()._cdata)
        if record is None:
            self.add(tensor, category)
        elif only_from is None or record.category in only_from:
            self._move(record, category)

    def _free(self, key: int) -> None:
        record = self._records.pop(key, None)
        if record is not None:
            self.state.live[record.category] -= record.nbytes
            self._sample()

    def _after_alloc(self) -> None:
        state = self.state
        total = state.total
        for category, live in state.live.items():
            if live > state.category_peaks[category]:
                state.category_peaks[category] = live
        if total > state.peak_bytes:
            state.peak_bytes = total
            state.peak_breakdown = dict(state.live)
            state.peak_phase = self.phase
            state.peak_event = state.events + 1
            state.peak_step = self.step
        self._sample()

    def _sample(self) -> None:
        state = self.state
        state.events += 1
        if state.events % self.timeline_every == 0:
            state.timeline.append((state.events, PHASES.index(self.phase), self.step,
                                   tuple(state.live[c] for c in CATEGORIES)))

    def set_phase(self, phase: str) -> None:
        """Mark the start of a phase ("forward", "backward", "optimizer", "setup")."""
        if phase == self.phase:
            return
        if self.phase == "forward":
            self._end_forward()
        if phase == "forward":
            self.step += 1
            self._head_seen = False
        self.phase = phase
        self._sample()

    def _end_forward(self) -> None:
        # What the forward pass left alive is what backward needs: activations.
        for record in self._records.values():
            if record.provisional:
                self._move(record, "activations")

    # ---- the dispatch mode -------------------------------------------------------------
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if self.phase != "backward" and torch._C._current_autograd_node() is not None:
            self.set_phase("backward")
        category, provisional = self._category_for_new()
        for tensor in tree_flatten(out)[0]:
            if isinstance(tensor, torch.Tensor) and self._counted(tensor):
                key = tensor.untyped_storage()._cdata
                if key not in self._records:  # views and in-place results share a storage
                    self.add(tensor, category, provisional)
        return out

    def _category_for_new(self) -> tuple[str, bool]:
        if self.phase == "forward" and not self._head_seen:
            return "temporaries", True
        if self.phase == "backward" and torch.is_grad_enabled():
            # backward runs with grad mode off; checkpoint recomputation switches it back on
            return "activations", False
        return "temporaries", False

    # ---- hooks that tell the tracker what tensors are ----------------------------------
    def _register_known(self) -> None:
        if self.model is not None:
            register_model_tensors(self, self.model)
        if self.optimizer is not None:
            self._note_optimizer_state()

    def _note_optimizer_state(self) -> None:
        for group in self.optimizer.param_groups:
            for param in group["params"]:
                if param.grad is not None:
                    self.recategorize(param.grad, "gradients")
        for per_param in self.optimizer.state.values():
            for value in per_param.values():
                if isinstance(value, torch.Tensor):
                    self.recategorize(value, "optimizer_states")

    def _install_hooks(self) -> None:
        handles = self._handles
        if self.model is not None:
            handles.append(self.model.register_forward_pre_hook(lambda m, a: self._on_model_forward()))
            head = _output_head(self.model)
            if head is not None:
                handles.append(head.register_forward_pre_hook(lambda m, a: self._on_head()))
            for param in self.model.parameters():
                if param.requires_grad:
                    handles.append(param.register_post_accumulate_grad_hook(self._on_grad))
        handles.append(nn.modules.module.register_module_forward_pre_hook(self._on_module_pre))
        if self.optimizer is not None:
            handles.append(self.optimizer.register_step_pre_hook(lambda o, a, k: self.set_phase("optimizer")))
            handles.append(self.optimizer.register_step_post_hook(lambda o, a, k: self._on_step_done()))
        self._saved_hooks = torch.autograd.graph.saved_tensors_hooks(self._on_save, lambda t: t)
        self._saved_hooks.__enter__()

    def _on_model_forward(self) -> None:
        if self.phase != "backward":  # in backward a forward call is checkpoint recomputation
            self.set_phase("forward")

    def _on_head(self) -> None:
        if self.phase == "forward":
            self._head_seen = True

    def _on_module_pre(self, module, args) -> None:
        if self.phase not in ("forward", "backward"):  # the first module call after a step begins a forward
            self.set_phase("forward")

    def _on_grad(self, param: torch.Tensor) -> None:
        if param.grad is not None:
            self.recategorize(param.grad, "gradients")

    def _on_save(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.phase == "forward" and not self._head_seen and self._counted(tensor):
            record = self._records.get(tensor.untyped_storage()._cdata)
            if record is not None and record.provisional:
                self._move(record, "activations")
        return tensor

    def _fix_peak_for_new_state(self) -> None:
        # A first step creates its state as it goes: if the peak fell inside this step, the
        # state tensors alive at that moment were counted as temporaries; move them now.
        state = self.state
        if state.peak_phase != "optimizer" or state.peak_step != self.step:
            return
        seen: set[int] = set()
        for per_param in self.optimizer.state.values():
            for value in per_param.values():
                if not isinstance(value, torch.Tensor) or not self._counted(value):
                    continue
                key = value.untyped_storage()._cdata
                record = self._records.get(key)
                if key in seen or record is None or record.category != "temporaries" or record.event > state.peak_event:
                    continue
                seen.add(key)
                state.peak_breakdown["temporaries"] -= record.nbytes
                state.peak_breakdown["optimizer_states"] += record.nbytes

    def _on_step_done(self) -> None:
        self._fix_peak_for_new_state()
        self._note_optimizer_state()
        self.set_phase("setup")

    def __enter__(self):
        self._register_known()
        self._install_hooks()
        return super().__enter__()

    def __exit__(self, *exc):
        result = super().__exit__(*exc)
        if self._saved_hooks is not None:
            self._saved_hooks.__exit__(*exc)
            self._saved_hooks = None
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        if self.phase == "forward":
            self._end_forward()
        return result


def _output_head(model: nn.Module) -> nn.Module | None:
    get_head = getattr(model, "get_output_embeddings", None)
    return get_head() if callable(get_head) else None


def _local(tensor: torch.Tensor) -> torch.Tensor:
    # A parameter sharded over processes (FSDP's DTensor) owns no storage itself: its local shard does.
    return tensor.to_local() if hasattr(tensor, "to_local") else tensor


def register_model_tensors(tracker: TensorTracker, model: nn.Module) -> None:
    """Count a model's parameters, buffers and quantized storages under their categories."""
    from ..nn import quant as quantlib  # the only module that knows bitsandbytes' storages

    for module in model.modules():
        if quantlib.is_quantized_linear(module):
            for tensor in quantlib.packed_tensors(module).values():
                tracker.add(tensor, "base_weights")
    for param in model.parameters():
        tracker.add(_local(param), "trainable_params" if param.requires_grad else "base_weights")
        if param.grad is not None:
            tracker.add(_local(param.grad), "gradients")
    for buffer in model.buffers():
        tracker.add(buffer, "base_weights")
