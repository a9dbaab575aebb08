"""ExpertStack: one fused projection of E experts, filled one expert at a time as a checkpoint streams in.

A mixture of experts' checkpoint holds either one tensor per expert (`experts.3.up_proj.weight`,
fused by transformers' converters) or the fused 3-D stack itself, which safetensors can read
one expert at a time. Fusing a whole layer in float first, then quantizing it, holds the float
stack several times over while converting (the stacked gate, the stacked up and their
concatenation: 1.9 GiB for one layer of Qwen3-30B-A3B's 128 experts). Here each expert is
quantized the moment it arrives, into its slot of the quantized stack, so only one expert's
float weight is in flight. A float base fills a preallocated float stack instead (no stacking
copies either). The result is the `ExpertWeights` that `freeze_experts` would have built from
the whole stack, tensor for tensor.
"""

from __future__ import annotations

import torch

from ..config import QuantConfig
from . import quant as quantlib
from .experts import ExpertWeights


class ExpertStack:
    """An (E, out, in) expert projection under construction: `add` each expert once, then `build`."""

    def __init__(self, experts: int, quant: QuantConfig | None, device: torch.device | str, dtype: torch.dtype,
                 transposed: bool = False) -> None:
        """`transposed`: experts arrive as (in, out) (gpt-oss's layout); `quant` None keeps them in `dtype`."""
        self.experts = experts
        self.quant = quant if quant is not None and quant.bits is not None else None
        self.device = torch.device(device)
        self.dtype = dtype
        self.transposed = transposed
        self.shape: tuple[int, int] | None = None         # one expert's (out, in)
        self.tensors: dict[str, torch.Tensor] = {}        # the stacked storage, allocated with the first expert
        self.filled = torch.zeros(experts, dtype=torch.bool)

    def add(self, index: int, weight: torch.Tensor) -> None:
        """Store expert `index`'s float weight ((out, in), or (in, out) when transposed)."""
        weight = weight.t() if self.transposed else weight                         # (out, in)
        if self.shape is None:
            self.shape = (int(weight.shape[0]), int(weight.shape[1]))
        elif tuple(weight.shape) != self.shape:
            raise ValueError(f"expert {index} has shape {tuple(weight.shape)}, the experts before it {self.shape}")
        if not 0 <= index < self.experts or bool(self.filled[index]):
            raise ValueError(f"expert {index} of {self.experts} arrived twice or is out of range")
        if self.quant is None:
            parts = {"float_weight": weight.to(device=self.device, dtype=self.dtype)}
        else:
            parts = quantlib.quantize_expert(weight, self.quant, self.device)
        quantlib.store_expert(self.tensors, index, self.experts, parts)
        self.filled[index] = True

    def complete(self) -> bool:
        """Whether every expert has arrived."""
        return bool(self.filled.all())

    def build(self, bias: torch.Tensor | None) -> ExpertWeights:
        """The frozen projection (ValueError while experts are missing); `bias` (E, out) or None."""
        if not self.complete():
            missing = (~self.filled).nonzero().flatten().tolist()
            raise ValueError(f"experts {missing[:20]} of {self.experts} never arrived")
        return ExpertWeights.from_packed(self.tensors, (self.experts, *self.shape), bias, self.quant, self.device,
                                         self.dtype)
