"""Handing freed heap memory back to the OS (glibc's `malloc_trim`), where there is one, and reading the heaps.

Loading and export trim after each quantized or merged layer: quantizing frees float
temporaries of many sizes, and on the 1.2B loading benchmark that fragmentation alone added
~1 GB to the peak. Training trims before the backward of each wide block (checkpointed or
not; `model.checkpointing.trim_heaps_before_backward`):

On a CPU every tensor below glibc's mmap threshold (which rises to 32 MiB) lives in malloc's
heaps, and a freed block stays resident until the heap's top is free too, which pinned blocks
of long-lived tensors rarely allow. A checkpointed backward recomputes each block and frees
its temporaries, so without trimming the heaps keep the largest temporaries of every pass
beside the live tensors. `malloc_trim(0)` returns the whole free pages inside the heaps (it
madvises them away; the addresses stay valid and fault back in when reused).

The freed pages fault back in when the next block reuses them, a cost per byte; a block's
compute per byte of its temporaries grows with the hidden width. Measured on the 2-core EPYC
(benchmarks/RESULTS.md, "Trimming the heaps"), one trim before each checkpointed block's
backward: at Llama-3-8B's widths (4 layers, seq 2048; benchmarks/heap_trim.py) the anonymous
peak fell 2649 -> 2150 MiB (-19%) for +1.8% step time; at SmolLM2's width (576, 4 x 512 tokens)
the step took 13-18% longer for a 5% lower median peak. Hence TRIM_MIN_HIDDEN. Blocks that keep
their activations (no checkpointing, or the last blocks under partial checkpointing) trim too:
without checkpointing at 8B width (4 layers, 1 x 2048, accumulated twice) the peak fell 4403 ->
3776 MiB (-14%), step time within the runs' spread.

Mixtures of experts fragment the heaps far more: each routed expert dequantizes its weight
(megabytes) and runs on a different number of tokens, in the forward, the recompute and the
backward. At Qwen3-30B-A3B's widths (1 layer, seq 1024, 4-bit, LoRA on experts; RESULTS.md,
"Mixtures of experts", `benchmarks/moe.py --heap`) a training run's anonymous peak was 5.60 GiB
for 1.13 GiB of tensors. Pinning glibc's mmap threshold at EXPERT_MMAP_THRESHOLD (it otherwise
climbs to 32 MiB after the first large free) sends the larger temporaries to mmap, which returns
them on free: 3.61 GiB, for 29.3 s against 24.9 s of load + 2 steps. Lower thresholds cut deeper
and cost more time (8 MiB: 3.27 GiB, 34.9 s; 4 MiB: 2.57 GiB, 37.8 s): each freed expert weight is
faulted in again.

Set QLOWRANK_HEAP_TRIM=0 to turn the training trims and the pinned threshold off (for
comparisons; nothing else changes).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os

import torch

# Blocks at least this wide trim before their backward. The refault cost relative to the
# block's compute scales as 1 / width: 14% at 576 and ~0 at 4096 measured, so ~2.6% at 3072
# by that scaling (not measured between); 3072 takes in Llama-3.2-3B, Qwen2.5-7B, 7-8B and up.
TRIM_MIN_HIDDEN = 3072


# mallopt's parameter for the mmap threshold (glibc's malloc.h: M_MMAP_THRESHOLD = -3); setting it
# also ends glibc's dynamic raising of the threshold.
M_MMAP_THRESHOLD = -3
# Where MoE training on a CPU pins it (the module docstring's measurements).
EXPERT_MMAP_THRESHOLD = 16 << 20

# struct mallinfo2 (glibc >= 2.33): ten size_t fields
MALLINFO2_FIELDS = ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
                    "keepcost")


class _Mallinfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in MALLINFO2_FIELDS]


@functools.cache
def _libc():
    """The C library, or None where it cannot be opened."""
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None


@functools.cache
def _malloc_trim():
    """glibc's malloc_trim, or None (another libc)."""
    trim = getattr(_libc(), "malloc_trim", None)
    if trim is not None:
        trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    return trim


@functools.cache
def _training_trims_enabled() -> bool:
    return os.environ.get("QLOWRANK_HEAP_TRIM", "1") != "0" and _malloc_trim() is not None


def trims_before_backward(hidden_size: int) -> bool:
    """Whether training blocks of this width trim the heaps before their backward (on a CPU)."""
    return hidden_size >= TRIM_MIN_HIDDEN and _training_trims_enabled()


def release_free_heap() -> bool:
    """Return the heaps' free pages to the OS; True if glibc did (False: nothing to give or no glibc)."""
    trim = _malloc_trim()
    return bool(trim(0)) if trim is not None else False


def pin_mmap_threshold(nbytes: int = EXPERT_MMAP_THRESHOLD) -> bool:
    """Have glibc mmap every allocation of `nbytes` or more from now on, for the whole process; True if it did.

    A no-op (False) without glibc or with QLOWRANK_HEAP_TRIM=0.
    """
    mallopt = getattr(_libc(), "mallopt", None)
    if mallopt is None or not _training_trims_enabled():
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(M_MMAP_THRESHOLD, nbytes))


def heap_statistics() -> dict[str, int]:
    """glibc's mallinfo2() by field: bytes in the heaps (arena), in use there (uordblks), free there
    (fordblks), mmapped (hblkhd), ...; {} without glibc 2.33+."""
    mallinfo2 = getattr(_libc(), "mallinfo2", None)
    if mallinfo2 is None:
        return {}
    mallinfo2.restype = _Mallinfo2
    info = mallinfo2()
    return {name: int(getattr(info, name)) for name in MALLINFO2_FIELDS}


def _release_hook(grad: torch.Tensor) -> None:
    release_free_heap()


@torch.compiler.disable   # under compile_blocks: a hook registration and a ctypes lookup, nothing to trace
def release_before_backward(output) -> bool:
    """Trim the heaps when the backward reaches `output` (a block's output hidden states, or a tuple
    whose first item is them): the moment before that block's recompute and backward begin.
    Only on a CPU and for blocks of at least TRIM_MIN_HIDDEN width; True if a trim was arranged."""
    hidden = output[0] if isinstance(output, (tuple, list)) and output else output
    if (isinstance(hidden, torch.Tensor) and hidden.requires_grad and hidden.device.type == "cpu"
            and trims_before_backward(hidden.shape[-1])):
        hidden.register_hook(_release_hook)
        return True
    return False
