"""Probe that a model keeps packed examples apart: restarting position ids must isolate them.

transformers turns position ids that restart mid-row into a block-diagonal causal mask (when
no 2D attention mask is given), but only in architectures built on its shared masking code.
A model that ignores them would let packed examples attend to each other and train on the
wrong context without any error, so the trainer asks before it trains on packed data.
"""

from __future__ import annotations

import torch
from torch import nn

# Two packed rows that share their second segment but differ in the first. With isolation the
# second segment's logits do not depend on the first at all: masked scores are -inf, whose
# softmax weight is exactly 0, so the two results are bit-identical and any difference means
# a leak. Real leaks move logits by ~1e-2 relative or more; 1e-6 leaves room for a kernel
# that blocks its reduction differently, and nothing else.
ISOLATION_TOLERANCE = 1e-6
_SEGMENT = 4   # tokens per probe segment


@torch.no_grad()
def packed_attention_leaks(model: nn.Module) -> float:
    """Relative change of the second segment's logits when only the first segment changes."""
    vocab = int(getattr(model.config, "vocab_size", 0) or 0)
    if vocab < 3:
        raise ValueError("cannot probe packed attention: the model's config has no usable vocab_size")
    device = next(model.parameters()).device
    first_a = torch.ones(_SEGMENT, dtype=torch.long)
    first_b = torch.full((_SEGMENT,), 2, dtype=torch.long)
    second = torch.arange(_SEGMENT) % (vocab - 1) + 1
    rows = torch.stack([torch.cat([first_a, second]), torch.cat([first_b, second])]).to(device)     # (2, 2S)
    positions = torch.arange(_SEGMENT).repeat(2, 2).to(device)                                     # (2, 2S)
    was_training = model.training
    model.eval()
    try:
        logits = model(input_ids=rows, position_ids=positions, use_cache=False).logits[:, _SEGMENT:].float()
    finally:
        model.train(was_training)
    return float((logits[0] - logits[1]).norm() / logits[1].norm().clamp_min(1e-30))


def check_packed_attention(model: nn.Module) -> None:
    """Raise if packed examples would attend to each other in this model."""
    leak = packed_attention_leaks(model)
    if leak > ISOLATION_TOLERANCE:
        raise ValueError(f"{type(model).__name__} lets packed examples attend to each other (restarting position ids "
                         f"are not turned into a block-diagonal mask: logits moved by {leak:.2e}); train without packing")
