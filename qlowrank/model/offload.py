"""Activation offloading: what the forward saves for backward waits in host memory instead of on the GPU.

    with OffloadActivations():          # around the forward only; the backward brings them back
        loss = model(**batch).loss
    loss.backward()

Every tensor autograd saves for backward passes through saved-tensor hooks. Under this context
a saved tensor on the offloaded device (CUDA) is copied to (pinned) host memory and the device
copy is dropped; the backward copies it back when it needs it. With gradient checkpointing the
forward saves little beyond each block's input hidden states (PyTorch's non-reentrant checkpoint
saves a block's inputs through these hooks), so the GPU then holds about one block's activations
whatever the depth, and the host holds layers x batch x seq x hidden x 2 bytes. Without
checkpointing every saved activation moves, which costs PCIe traffic of the whole forward's.

It patches no module: entered around a forward, before or after the per-block patches
(`model.patches`: checkpointing, compile, heap trims) and left before or after they come off, it
composes with them (tests/test_patches.py runs every order on a CPU, where the copies are real).

Left on the device: parameters (the optimizer and the next forward need them where they are),
tensors below `min_bytes` (norm statistics and LoRA's rank-r intermediates: a copy each costs
more than their bytes are worth), and tensors on other devices (on a CPU run nothing moves).
A tensor saved several times (the same normed input for q, k and v's LoRA factors; the rotary
tables each block takes) is copied once.

The copies run on the current stream, so they are ordered with the compute without events: a
copy does not overlap the kernels around it (simple and safe; a side stream would hide it).
Pinned host blocks come from PyTorch's caching host allocator, which rounds each up to a power
of two and keeps it: the host may hold up to PINNED_ROUNDING x the bytes offloaded.

What stays on the GPU whatever this context does: attention outputs kept inside checkpointed
blocks (`keep_attention`; the checkpoint stores them itself, not through these hooks; the CLI
turns `--keep-attention auto` off under offloading for that reason) and a block's recompute.

Autograd checks that a saved tensor was not modified in place before the backward; through
hooks it cannot, so unpacking makes the same check against the saved tensor's version.
Only the innermost saved-tensor hooks run: under this context the memory tracker's own hook does
not see saved tensors, so they count as forward temporaries until the forward ends (its totals,
and the estimator's, which runs the same nesting, are unchanged).

The memory estimator runs the same hooks on meta tensors (`device_type="meta"`): there a packed
tensor leaves the device (its storage dies, which the tracker sees) and unpacking allocates a new
one, as the real copy back does; `host_bytes` / `host_peak_bytes` count what the host holds.
"""

from __future__ import annotations

import weakref

import torch
from torch import nn

# Saved tensors smaller than this stay on the device (see the module docstring).
OFFLOAD_MIN_BYTES = 1 << 20
# Host bytes pinned per byte offloaded, at worst: the caching host allocator rounds every block up
# to a power of two (a block's input at 8B width, batch x seq x 4096 x 2 bytes, is one already).
PINNED_ROUNDING = 2


class _Packed:
    """A saved tensor waiting on the host (or, on meta, its shape alone)."""

    __slots__ = ("device", "host", "shape", "source", "version", "__weakref__")

    def __init__(self, source: torch.Tensor, host: torch.Tensor | None,
                 shape: tuple[torch.Size, tuple[int, ...] | None, torch.dtype] | None = None) -> None:
        # shape (meta only): size, stride (None: not dense, comes back contiguous), dtype
        self.device, self.host, self.shape = source.device, host, shape
        # the saved tensor, weakly (it may die: that is the point), and its version when saved
        self.source, self.version = weakref.ref(source), source._version

    def modified_in_place(self) -> bool:
        source = self.source()
        return source is not None and source._version != self.version


def _non_overlapping_and_dense(tensor: torch.Tensor) -> bool:
    """Whether the tensor's elements fill its storage span once each (any order of dimensions)."""
    expected = 1
    for size, stride in sorted(((s, st) for s, st in zip(tensor.size(), tensor.stride()) if s != 1),
                               key=lambda pair: pair[1]):
        if stride != expected:
            return False
        expected *= size
    return True


class OffloadActivations(torch.autograd.graph.saved_tensors_hooks):
    """Move tensors saved for backward off `device_type` while this context is active.

    Args:
        device_type: whose saved tensors move to host memory: "cuda" (default), or "meta" for the
            estimator's simulation (nothing is copied; the host bytes are counted).
        min_bytes: smaller saved tensors stay where they are.
        pin_memory: page-locked host copies (faster, asynchronous transfers); default: when CUDA is there.
    """

    def __init__(self, device_type: str = "cuda", min_bytes: int = OFFLOAD_MIN_BYTES,
                 pin_memory: bool | None = None) -> None:
        self.device_type = device_type
        self.min_bytes = min_bytes
        self.pin_memory = torch.cuda.is_available() if pin_memory is None else pin_memory
        self.host_bytes = 0          # bytes held on the host now
        self.host_peak_bytes = 0     # ... and at most, since this object was made
        self.copies = 0              # device-to-host copies made
        # id(saved tensor) -> (a weak reference to it, its packed copy): a tensor saved again is not copied again
        self._packed: dict[int, tuple[weakref.ref, weakref.ref]] = {}
        super().__init__(self._pack, self._unpack)

    def _moves(self, tensor: torch.Tensor) -> bool:
        return (tensor.device.type == self.device_type and not isinstance(tensor, nn.Parameter)
                and tensor.numel() * tensor.element_size() >= self.min_bytes)

    def _pack(self, tensor: torch.Tensor):
        if not self._moves(tensor):
            return tensor
        seen = self._packed.get(id(tensor))
        if seen is not None and seen[0]() is tensor:
            packed = seen[1]()
            if packed is not None and packed.version == tensor._version:
                return packed
        # The host copy keeps a dense layout and makes any other (an expanded view) contiguous, as
        # empty_like does: every element once, so numel x itemsize bytes either way
        nbytes = tensor.numel() * tensor.element_size()
        if tensor.device.type == "meta":
            dense = tensor.is_contiguous() or _non_overlapping_and_dense(tensor)
            packed = _Packed(tensor, None, (tensor.size(), tensor.stride() if dense else None, tensor.dtype))
        else:
            host = torch.empty_like(tensor, device="cpu", pin_memory=self.pin_memory)
            host.copy_(tensor, non_blocking=self.pin_memory)
            packed = _Packed(tensor, host)
        self.copies += 1
        self.host_bytes += nbytes
        self.host_peak_bytes = max(self.host_peak_bytes, self.host_bytes)
        weakref.finalize(packed, self._released, nbytes)
        self._packed[id(tensor)] = (weakref.ref(tensor), weakref.ref(packed))
        return packed

    def _released(self, nbytes: int) -> None:
        self.host_bytes -= nbytes

    def _unpack(self, packed):
        if not isinstance(packed, _Packed):
            return packed
        if packed.modified_in_place():
            raise RuntimeError("a tensor saved for backward was modified by an inplace operation after it was saved "
                               "(found while unpacking it from activation offloading); clone it before changing it")
        if packed.host is None:   # meta: a fresh device tensor, as the copy back allocates
            size, stride, dtype = packed.shape
            if stride is None:
                return torch.empty(size, dtype=dtype, device="meta")
            return torch.empty_strided(size, stride, dtype=dtype, device="meta")
        # a copy even where host and device are one (a CPU test of the round trip), as it is on a GPU
        return packed.host.to(packed.device, non_blocking=self.pin_memory, copy=True)

    def __exit__(self, *exc) -> None:
        super().__exit__(*exc)
        self._packed.clear()   # the weak map only dedupes within one forward
