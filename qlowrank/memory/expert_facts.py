"""What the CPU process model needs to know about a mixture of experts: its MoE layers and the bytes its routed experts dequantize."""

from __future__ import annotations

import torch
from torch import nn

from ..nn.experts import expert_projections, is_fused_experts


def expert_facts(model: nn.Module, tokens: int, bits: int | None, dtype: torch.dtype) -> dict:
    """`ModelFacts` fields of the fused experts of a (meta) model before quantization.

    `tokens` is batch x seq of one micro-batch. `expert_dequant_bytes` is, for one MoE layer,
    the experts that receive tokens (all of them once tokens x top-k reaches their number)
    times one expert's weights in `dtype`: what its routed experts dequantize in one pass, one
    expert at a time. A float base dequantizes nothing (its stacks are read in place).
    """
    layers = [m for m in model.modules() if is_fused_experts(m)]
    if not layers:
        return {"moe_layers": 0, "expert_dequant_bytes": 0}
    first = layers[0]
    experts = first.down_proj.shape[0]
    config = getattr(model, "config", None)
    top_k = getattr(getattr(config, "get_text_config", lambda: config)(), "num_experts_per_tok", None) or experts
    weights = sum(getattr(first, name)[0].numel() for name in expert_projections(first))   # one expert's
    routed = min(experts, tokens * top_k)
    dequant = routed * weights * dtype.itemsize if bits in (4, 8) else 0
    return {"moe_layers": len(layers), "expert_dequant_bytes": dequant}
