"""Expert LoRA as llama.cpp's 3-D adapter tensors: `blk.N.ffn_{gate,up,down}_exps.weight.lora_a` / `.lora_b`.

llama.cpp applies an adapter to expert stacks in `build_lora_mm_id` (src/llama-graph.cpp):
`mul_mat_id(lora_b, mul_mat_id(lora_a, x, ids), ids)` scaled by alpha / r, with r read from
lora_b's ne[0]. So for a base tensor of ne = [in, out, E] the pair is lora_a ne = [in, r, E]
and lora_b ne = [r, out, E], i.e. (E, r, in) and (E, out, r) in torch order: expert e's A_e and
B_e stacked along the first axis, as llama.cpp's `convert_lora_to_gguf.py` stacks a PEFT
adapter's per-expert factors. `llama-adapter.cpp` checks ne[0] and ne[1] only, as for 2-D.

The fused stacks split as the merged export splits them (export/gguf_experts.py): gate and up
share the input, so `ffn_gate_exps` and `ffn_up_exps` get the same A and each its half of B's
rows (gate rows first; gpt-oss: even / odd rows). B is handed to `expert_pieces` in the layout of
the exported stack (gpt-oss's transposed), so its row split is the very code that splits the weight.
"""

from __future__ import annotations

from typing import Callable, Iterator

import torch
from torch import nn

from ..nn.experts import ExpertWeights, FrozenExperts
from .gguf_experts import expert_pieces


def expert_lora_layers(model: nn.Module) -> list[tuple[str, ExpertWeights]]:
    """(state-dict key of the fused stack, its weights) for every expert projection that carries LoRA."""
    return [(f"{name}.{projection}", getattr(module, projection))
            for name, module in model.named_modules() if isinstance(module, FrozenExperts)
            for projection in module.order if getattr(module, projection).r]


def stacked_factors(weights: ExpertWeights) -> tuple[torch.Tensor, torch.Tensor]:
    """(A (E, r, in), B (E, out, r)) in float32, from the PEFT-layout factors one expert at a time."""
    pairs = [weights.factors(index) for index in range(weights.experts)]   # the layout lives in factors()
    a = torch.stack([a.detach().float().cpu() for a, _ in pairs])
    b = torch.stack([b.detach().float().cpu() for _, b in pairs])
    return a, b


def expert_lora_tensors(key: str, weights: ExpertWeights, transposed: bool, ratio: float,
                        name_of: Callable[[str], str]) -> Iterator[tuple[str, torch.Tensor, torch.Tensor]]:
    """(GGUF base tensor name, lora_a, lora_b) for each `ffn_*_exps` tensor the stack `key` is written as.

    `ratio` (the layer's scale over llama.cpp's alpha / r) is folded into B, as for dense layers.
    """
    a, b = stacked_factors(weights)
    if not (torch.isfinite(a).all() and torch.isfinite(b).all()):
        raise ValueError(f"save_gguf_adapter: the expert LoRA factors of {key} hold NaN or inf")
    if ratio != 1.0:
        b = b * ratio
    # The exported stack is (E, in, out) for gpt-oss: B's (E, out, r) becomes (E, r, out) like it,
    # and the pieces' `take` transposes it back while splitting gate / up rows.
    exported = b.transpose(1, 2) if transposed else b
    for piece in expert_pieces(key, tuple(exported.shape), transposed, name_of):
        yield piece.name, a, piece.take(exported)
