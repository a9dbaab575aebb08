"""Per-rank memory of a training step on several processes (DDP, FSDP2), from the single-process simulation.

The step is simulated once on the meta device (estimate.py) at the per-process batch, so
activations and temporaries are already per rank. What changes with the process count is
who holds the model:

- DDP: every rank holds everything; DDP adds its gradient buckets (one more copy of the
  trainable gradients, kept for the whole run).
- FSDP2 as the trainer applies it (`fully_shard` per decoder block, then the root): every
  parameter is split 1/N across ranks, frozen quantized weights included; buffers (a 4-bit
  layer's quantization state: absmax, double-quant absmax and offset; rotary tables) stay
  whole on every rank. Gradients and optimizer states follow their parameters (1/N). While
  it computes, a rank holds whole copies of what it gathered: the root's own parameters
  (embeddings, head, final norm), which FSDP keeps gathered from forward to backward, and
  up to two decoder blocks (the one computing and the one prefetched), plus that block's
  whole gradient before it is reduce-scattered. These go to `temporaries`.
"""

from __future__ import annotations

from torch import nn

from ..config import SHARDINGS
from ..model.structure import find_block_types


def _bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def per_rank_breakdown(model: nn.Module, breakdown: dict[str, int], processes: int,
                       sharding: str | None, phase: str = "forward/backward") -> dict[str, int]:
    """The single-process peak `breakdown` of `model` turned into one rank's, for `processes` ranks.

    `phase` is where that peak falls: "forward/backward" (FSDP holds gathered copies then) or
    "optimizer" (nothing is gathered; the step's scratch follows the sharded parameters).

    Raises:
        ValueError: an unknown sharding, fewer than one process, or FSDP with no decoder blocks.
    """
    if sharding not in SHARDINGS:
        raise ValueError(f"sharding={sharding!r}: use None (DDP when processes > 1) or 'fsdp'")
    if processes < 1:
        raise ValueError(f"processes={processes} must be >= 1")
    params = list({id(p): p for p in model.parameters()}.values())   # tied weights once
    trainable = [p for p in params if p.requires_grad]
    out = dict(breakdown)
    if sharding is None:
        if processes > 1:
            out["gradients"] = out.get("gradients", 0) + _bytes(trainable)   # DDP's bucket copy
        return out
    types = find_block_types(model)
    blocks = [m for m in model.modules() if types and isinstance(m, types)]
    if not blocks:
        raise ValueError(f"sharding='fsdp': no decoder blocks found in {type(model).__name__}")
    in_blocks = {id(p) for block in blocks for p in block.parameters()}
    n = processes
    frozen = [p for p in params if not p.requires_grad]
    buffers = list({id(b): b for b in model.buffers()}.values())
    root = [p for p in params if id(p) not in in_blocks]
    largest_block = max(_bytes(block.parameters()) for block in blocks)
    largest_block_grads = max(_bytes(p for p in block.parameters() if p.requires_grad) for block in blocks)
    out["base_weights"] = -(-_bytes(frozen) // n) + _bytes(buffers)
    out["trainable_params"] = -(-_bytes(trainable) // n)
    out["gradients"] = -(-out.get("gradients", 0) // n)
    out["optimizer_states"] = -(-out.get("optimizer_states", 0) // n)
    if phase == "optimizer":
        out["temporaries"] = -(-out.get("temporaries", 0) // n)
    else:
        gathered = (_bytes(root) + 2 * largest_block) * (n - 1) // n + largest_block_grads
        out["temporaries"] = out.get("temporaries", 0) + gathered
    return out
