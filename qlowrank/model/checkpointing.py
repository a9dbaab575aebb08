"""Gradient (activation) checkpointing that works with a frozen, quantized base.

Only block inputs are kept during the forward pass; each block is recomputed in backward.
We always use PyTorch's non-reentrant checkpoint: the reentrant one needs an input that
requires grad, and with frozen embeddings nothing upstream of the first block does, which
is where "element 0 of tensors does not require grad" comes from in other tools.

On long sequences the attention kernel's output is kept rather than recomputed (selective
checkpointing): its forward is the one op of a block whose recompute grows with seq^2 while
its output stays small, one (batch, heads, seq, head_dim) tensor plus a (batch, heads, seq)
float32 log-sum-exp per block. Choosing what to keep costs a Python dispatch per op, which
short sequences do not earn back: on SmolLM2-135M (2 CPU cores) keeping took a 4 x 512 step
from 4.95 s to 4.71 s but a 4 x 128 step from 1.23 s to 1.30 s (benchmarks/RESULTS.md,
issue 14), hence KEEP_ATTENTION_MIN_SEQ. The estimator runs the same policy on meta
tensors, so the bytes it keeps are in every memory prediction.

On a CPU, blocks of large width hand glibc's free heap pages back to the OS just before their
backward (`heap.release_before_backward`, `trim_heaps_before_backward`), checkpointed or not:
the recompute, or the backward of a block that kept its activations, then reuses returned pages
instead of what the forward left scattered in the heaps.
"""

from __future__ import annotations

import functools
from typing import Sequence

import torch
from torch import nn
from torch.utils.checkpoint import (
    CheckpointPolicy,
    checkpoint,
    create_selective_checkpoint_contexts,
)

from ..heap import pin_mmap_threshold, release_before_backward
from ..nn.experts import FrozenExperts
from .structure import repeated_blocks
from .patches import hook_forward, patched_blocks, unhook_forward, unwrap_forward, wrap_forward

CHECKPOINT, HEAP_TRIM = "checkpoint", "heap_trim"   # their names among a block's patches (model.patches)

_aten = torch.ops.aten
# Every fused attention kernel PyTorch dispatches F.scaled_dot_product_attention to.
ATTENTION_OPS = frozenset(
    getattr(_aten, name).default
    for name in ("_scaled_dot_product_flash_attention_for_cpu", "_scaled_dot_product_flash_attention",
                 "_scaled_dot_product_efficient_attention", "_scaled_dot_product_cudnn_attention")
    if hasattr(_aten, name)
)


def _keep_attention(ctx, op, *args, **kwargs) -> CheckpointPolicy:
    return CheckpointPolicy.MUST_SAVE if op in ATTENTION_OPS else CheckpointPolicy.PREFER_RECOMPUTE


def _keep_attention_contexts():
    return create_selective_checkpoint_contexts(_keep_attention)


# Sequences from this length on keep attention outputs when keep_attention is None (automatic):
# between the measured loss at 128 and gain at 512 (see the module docstring).
KEEP_ATTENTION_MIN_SEQ = 256


def _sequence_length(args, kwargs) -> int:
    hidden = kwargs.get("hidden_states", args[0] if args else None)
    return hidden.shape[1] if isinstance(hidden, torch.Tensor) and hidden.dim() == 3 else 0


def _checkpointed_forward(forward, keep_attention: bool | None):
    @functools.wraps(forward)
    def wrapper(*args, **kwargs):
        if not torch.is_grad_enabled():
            return forward(*args, **kwargs)
        keep = keep_attention if keep_attention is not None else _sequence_length(args, kwargs) >= KEEP_ATTENTION_MIN_SEQ
        context = {"context_fn": _keep_attention_contexts} if keep else {}
        return checkpoint(forward, *args, use_reentrant=False, **context, **kwargs)
    return wrapper


def enable_gradient_checkpointing(
    model: nn.Module,
    block_types: type | Sequence[type] | None = None,
    keep_attention: bool | None = None,
    keep_blocks: int = 0,
) -> int:
    """Recompute each block's activations in backward instead of storing them.

    Each block also trims the heaps before its backward (`trim_heaps_before_backward`). Both are
    per-block patches (`model.patches`) that compose with the others: a compiled block stays
    compiled, around the checkpoint, whichever came first.

    Args:
        model: a transformers model (its blocks are found from `_no_split_modules`) or any
            nn.Module, in which case `block_types` names the repeated block class(es).
        block_types: the module class(es) to checkpoint; default: the transformers blocks.
        keep_attention: keep each block's attention output instead of recomputing it
            (faster on long sequences; costs about one hidden-state-sized tensor per block).
            None (default): keep it for sequences of KEEP_ATTENTION_MIN_SEQ tokens or more.
            False recomputes everything, the smallest footprint.
        keep_blocks: how many of the last blocks keep their activations (not checkpointed):
            partial checkpointing trades memory for the recompute of those blocks. Their
            backward runs first, so their activations are freed early in the backward pass.
            0 (default) checkpoints every block. Blocks already checkpointed stay so: call
            `disable_gradient_checkpointing` first to change an earlier choice.

    Returns:
        The number of blocks that will be checkpointed.

    Raises:
        ValueError: no block type was given and none could be found, or none matched; or
            keep_blocks is negative or more than the model has.
    """
    blocks = repeated_blocks(model, block_types)
    if not 0 <= keep_blocks <= len(blocks):
        raise ValueError(f"keep_blocks={keep_blocks}: this model has {len(blocks)} blocks; "
                         f"keep between 0 (checkpoint all) and {len(blocks)} (checkpoint none)")
    blocks = blocks[:len(blocks) - keep_blocks]
    for block in blocks:
        wrap_forward(model, block, CHECKPOINT, functools.partial(_checkpointed_forward, keep_attention=keep_attention))
    if hasattr(model, "config") and hasattr(model.config, "use_cache"):
        model.config.use_cache = False  # a KV cache is useless in training and defeats recomputation
    _arrange_trims(model, block_types, owner=CHECKPOINT)
    return len(blocks)


def trim_heaps_before_backward(model: nn.Module, block_types: type | Sequence[type] | None = None) -> int:
    """Have each block, checkpointed or not, trim glibc's heaps when the backward reaches its output
    (`heap.release_before_backward`: CPU blocks of TRIM_MIN_HIDDEN width and more; a no-op elsewhere).

    The Trainer calls it, and `enable_gradient_checkpointing` arranges the same trims as its own;
    idempotent. `remove_heap_trims` withdraws this call's trims (those of checkpointing stay until
    `disable_gradient_checkpointing`); the MoE mmap pin stays, as glibc cannot give its dynamic
    threshold back. Returns the number of blocks it watches (0 when the model has no repeated blocks).
    """
    return _arrange_trims(model, block_types, owner=HEAP_TRIM)


def _arrange_trims(model: nn.Module, block_types: type | Sequence[type] | None, owner: str) -> int:
    experts = next((m for m in model.modules() if isinstance(m, FrozenExperts)), None)
    if experts is not None and experts.down_proj.stored_device().type == "cpu":
        pin_mmap_threshold()   # routed experts fragment the heaps most (heap.py's docstring)
    try:
        blocks = repeated_blocks(model, block_types)
    except ValueError:
        return 0
    for block in blocks:
        hook_forward(model, block, HEAP_TRIM, _release_before_backward, owner)
    return len(blocks)


def remove_heap_trims(model: nn.Module) -> int:
    """Undo `trim_heaps_before_backward` on every block of `model`; returns from how many blocks."""
    return sum(unhook_forward(model, block, HEAP_TRIM, HEAP_TRIM) for block in patched_blocks(model, HEAP_TRIM))


def _release_before_backward(module: nn.Module, args, output) -> None:
    # A forward hook runs in the module's __call__, outside a compiled forward and never during a
    # checkpoint's recompute (which calls the forward function itself).
    if torch.is_grad_enabled():
        release_before_backward(output)


def disable_gradient_checkpointing(model: nn.Module) -> None:
    """Undo `enable_gradient_checkpointing`: its recomputation and its heap trims. Other patches (a
    compiled forward, the Trainer's `trim_heaps_before_backward`) stay as they are."""
    for block in patched_blocks(model, CHECKPOINT):
        unwrap_forward(model, block, CHECKPOINT)
    for block in patched_blocks(model, HEAP_TRIM):
        unhook_forward(model, block, HEAP_TRIM, CHECKPOINT)
