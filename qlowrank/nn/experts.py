"""FrozenExperts: transformers 5's fused MoE experts with a 4-bit / 8-bit (or float) frozen base and optional LoRA per expert.

transformers 5 stores a mixture of experts as 3-D parameters (`gate_up_proj`: E x 2I x H,
`down_proj`: E x H x I; gpt-oss transposed, with biases and gate / up interleaved). Here
each projection becomes an `ExpertWeights` holding the stack quantized expert by expert,
and the forward runs only the experts that receive tokens, one at a time:

    y_e = dequant(W_q[e]) x  +  scale * B_e (A_e x)      # x: the tokens routed to expert e

The dequantized weight is transient: a custom autograd function dequantizes it again in
backward instead of saving it (as bitsandbytes' 4-bit matmul does), so the float weight of
one expert is alive at a time. The router stays float (LoRA on it: `nn/router.py`).

LoRA factors are kept in PEFT's `target_parameters` layout, so adapter files need no
reshaping: `lora_A` (r*E, in) with expert e's rows at [e*r, (e+1)*r), and `lora_B`
(out, r*E) with expert e's columns at e, e+E, e+2E, ... The delta B_e A_e is never built
for the stack: the update is (x A_e^T) B_e^T on the routed tokens only.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..config import LoraConfig, QuantConfig
from . import quant as quantlib

# The 3-D parameters of a transformers experts module, in the order its class defines them
# (PEFT nests its wrappers in that order); `up_proj` is the projection of gate-less experts.
PROJECTIONS = ("gate_up_proj", "up_proj", "down_proj")


def is_fused_experts(module: nn.Module) -> bool:
    """True for a transformers 5 experts module: fused 3-D projections, decorated with its layout flags."""
    return (hasattr(module, "is_transposed") and hasattr(module, "has_gate")
            and isinstance(getattr(module, "down_proj", None), torch.Tensor) and module.down_proj.dim() == 3)


def expert_projections(module: nn.Module) -> list[str]:
    """The names of the fused 3-D projections of an experts module, in definition order."""
    return [name for name in module._parameters if name in PROJECTIONS and module._parameters[name].dim() == 3]


@dataclass(frozen=True)
class ExpertLayout:
    """How a family lays its experts out (transformers' `use_experts_implementation` flags)."""

    transposed: bool         # stored (E, in, out) instead of (E, out, in) (gpt-oss)
    has_gate: bool           # gate_up_proj (gated) or up_proj alone
    has_bias: bool           # per-expert biases `<projection>_bias` (E, out)


class _ExpertMatmul(torch.autograd.Function):
    """x @ dequant(W_e)^T, with W_e dequantized again in backward instead of saved (no weight gradient)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weights: "ExpertWeights", index: int) -> torch.Tensor:
        ctx.weights, ctx.index = weights, index
        return F.linear(x, weights.weight(index, x.dtype))   # (n, out)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        weight = ctx.weights.weight(ctx.index, grad.dtype)  # (out, in), transient again
        return grad @ weight, None, None


class ExpertWeights(nn.Module):
    """One fused projection of E experts, frozen: quantized per expert (or float), plus optional LoRA factors."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, quant: QuantConfig | None,
                 device: torch.device | str, dtype: torch.dtype) -> None:
        """`weight` is (E, out, in) float; `quant` None or bits=None keeps it in `dtype`."""
        super().__init__()
        quant = quant if quant is not None and quant.bits is not None else None
        if quant is None:
            packed = {"float_weight": weight.detach().to(device=device, dtype=dtype)}
        else:
            packed = quantlib.quantize_expert_stack(weight.detach(), quant, device)
        self._store(packed, tuple(weight.shape), bias, quant, device, dtype)

    @classmethod
    def from_packed(cls, packed: dict[str, torch.Tensor], shape: tuple[int, int, int], bias: torch.Tensor | None,
                    quant: QuantConfig | None, device: torch.device | str, dtype: torch.dtype) -> "ExpertWeights":
        """From storage already made: `quantize_expert_stack`'s tensors, or {"float_weight": (E, out, in)} with
        `quant` None (what `nn.expert_stack.ExpertStack` fills one expert at a time while loading)."""
        self = cls.__new__(cls)
        nn.Module.__init__(self)
        self._store(packed, shape, bias, quant, device, dtype)
        return self

    def _store(self, packed: dict[str, torch.Tensor], shape: tuple[int, ...], bias: torch.Tensor | None,
               quant: QuantConfig | None, device: torch.device | str, dtype: torch.dtype) -> None:
        self.experts, self.out_features, self.in_features = shape
        self.quant = quant
        self.dtype = dtype
        # What is per expert (codes, block scales; the float stack) is a frozen parameter, as a bitsandbytes
        # layer's packed weight is: FSDP shards parameters (buffers stay whole on every rank) and DDP
        # broadcasts buffers before every forward. The shared code books are buffers.
        for name, tensor in packed.items():
            if name in quantlib.EXPERT_CODE_BOOKS:
                self.register_buffer(name, tensor)
            else:
                self.register_parameter(name, nn.Parameter(tensor, requires_grad=False))
        self.packed_names: tuple[str, ...] = tuple(packed)
        self.bias = nn.Parameter(bias.detach().to(device=device, dtype=dtype), requires_grad=False) if bias is not None else None
        self.r = 0
        self.alpha = 0.0
        self.scaling = 0.0

    def weight(self, index: int, dtype: torch.dtype) -> torch.Tensor:
        """Expert `index`'s frozen (out, in) weight in `dtype` (dequantized, transient)."""
        if self.quant is None:
            return self.float_weight[index].to(dtype)
        tensors = {name: getattr(self, name) for name in self.packed_names}
        return quantlib.dequantize_expert(tensors, index, (self.out_features, self.in_features), self.quant, dtype)

    def stored_device(self) -> torch.device:
        """Where the frozen stack is stored."""
        return getattr(self, self.packed_names[0]).device

    def stored_tensors(self) -> list[torch.Tensor]:
        """The tensors that store the frozen stack (parameters and code-book buffers), bias excluded."""
        return [getattr(self, name) for name in self.packed_names]

    def stored_bytes(self) -> int:
        """Bytes of the frozen weight as stored (codes, scales, code books), bias excluded."""
        return sum(tensor.numel() * tensor.element_size() for tensor in self.stored_tensors())

    def weight_count(self) -> int:
        """How many weights the stack holds (a packed 4-bit byte holds two)."""
        return self.experts * self.out_features * self.in_features

    def add_lora(self, config: LoraConfig, generator: torch.Generator | None) -> None:
        """Attach float32 factors in PEFT's layout: A (r*E, in) Kaiming-uniform, B (out, r*E) zero."""
        if config.use_dora or config.dropout > 0:
            raise ValueError("LoRA on fused MoE experts supports neither DoRA nor dropout (PEFT's target_parameters "
                             "neither): set use_dora=False and dropout=0, or do not target the experts")
        device = self.stored_device()
        self.r, self.alpha, self.scaling = config.r, config.alpha, config.scaling   # alpha: for rank / alpha patterns
        values = torch.empty(config.r * self.experts, self.in_features, dtype=torch.float32)
        if device.type != "meta":
            for index in range(self.experts):  # each expert's A as a (r, in) Linear would be initialised
                nn.init.kaiming_uniform_(values[index * config.r:(index + 1) * config.r], a=math.sqrt(5), generator=generator)
        self.lora_A = nn.Parameter(values.to(device))                                        # (r*E, in)
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, config.r * self.experts, device=device))  # (out, r*E)

    def factors(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Expert `index`'s (A_e (r, in), B_e (out, r)) views of the PEFT-layout factors."""
        a = self.lora_A[index * self.r:(index + 1) * self.r]   # (r, in)
        b = self.lora_B[:, index::self.experts]                # (out, r)
        return a, b

    def delta(self, index: int) -> torch.Tensor:
        """scale * B_e A_e in float32, (out, in): what merging adds to expert `index`."""
        a, b = self.factors(index)
        return (b.float() @ a.float()) * self.scaling

    def forward(self, x: torch.Tensor, index: int, lora_enabled: bool = True) -> torch.Tensor:
        """(n, in) tokens routed to expert `index` -> (n, out)."""
        y = _ExpertMatmul.apply(x, self, index) if x.requires_grad else F.linear(x, self.weight(index, x.dtype))
        if self.bias is not None:
            y = y + self.bias[index].to(y.dtype)
        if self.r and lora_enabled:
            a, b = self.factors(index)
            y = y + F.linear(F.linear(x, a.to(x.dtype)), (b * self.scaling).to(x.dtype))   # (n, r) -> (n, out)
        return y


class FrozenExperts(nn.Module):
    """A drop-in for a transformers experts module: same call (hidden, top_k_index, top_k_weights), frozen stored experts."""

    def __init__(self, original: nn.Module, projections: dict[str, ExpertWeights]) -> None:
        super().__init__()
        self.num_experts = projections["down_proj"].experts
        self.layout = ExpertLayout(bool(original.is_transposed), bool(original.has_gate), bool(original.has_bias))
        self.has_post_expert_norm = bool(getattr(original, "has_post_expert_norm", False))
        for name, weights in projections.items():
            self.add_module(name, weights)
        self.order = tuple(projections)   # definition order of the original parameters
        # The family's own gating (SwiGLU chunked, gpt-oss's clamped interleaved GLU) and activation.
        self._apply_gate = original._apply_gate.__get__(self)
        for attribute in ("act_fn", "alpha", "limit", "post_expert_norm"):
            if hasattr(original, attribute):
                setattr(self, attribute, getattr(original, attribute))
        self.disabled = False   # LoRA switched off (disable_lora), as on LoraLinear

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> torch.Tensor:
        out = torch.zeros_like(hidden_states)                         # (T, H)
        first = self.gate_up_proj if self.layout.has_gate else self.up_proj
        enabled = not self.disabled
        for index, token_idx, position in _routed(top_k_index, self.num_experts):
            x = hidden_states[token_idx]                              # (n, H)
            h = first(x, index, enabled)                              # (n, 2I) or (n, I)
            h = self._apply_gate(h) if self.layout.has_gate else self.act_fn(h)
            y = self.down_proj(h, index, enabled)                     # (n, H)
            if self.has_post_expert_norm:
                y = self.post_expert_norm(y)
            y = y * top_k_weights[token_idx, position, None].to(y.dtype)
            out.index_add_(0, token_idx, y.to(out.dtype))
        return out


def _routed(top_k_index: torch.Tensor, experts: int):
    """(expert, token rows, top-k slot) for each expert that receives tokens.

    On the meta device (the estimator) routing is unknown: every expert gets an equal share
    of the T x k assignments, which keeps the saved activations' total exact.
    """
    if top_k_index.is_meta:
        tokens, k = top_k_index.shape
        share = -(-tokens * k // experts)
        rows = torch.empty(share, dtype=torch.long, device="meta")
        for index in range(experts):
            yield index, rows, rows
        return
    with torch.no_grad():
        hits = torch.unique(top_k_index).tolist()
    for index in hits:
        if 0 <= index < experts:
            token_idx, position = torch.where(top_k_index == index)
            yield index, token_idx, position


def freeze_experts(original: nn.Module, quant: QuantConfig | None, device: torch.device | str,
                   dtype: torch.dtype, tensors: dict[str, torch.Tensor] | None = None) -> FrozenExperts:
    """A FrozenExperts from a transformers experts module (or from `tensors`: its parameters by name, as loaded,
    a projection either a float stack or an `ExpertWeights` already built).

    Weights are brought to the (E, out, in) layout (gpt-oss's transposed stacks are
    transposed once here); biases stay (E, out). Gate and up keep their order (interleaved
    or concatenated): the family's own `_apply_gate` reads them.
    """
    tensors = tensors if tensors is not None else dict(original.named_parameters(recurse=False))
    projections = {}
    for name in expert_projections(original):
        weight = tensors[name]
        if isinstance(weight, ExpertWeights):   # built while streaming (nn.expert_stack), its bias with it
            projections[name] = weight
            continue
        weight = weight.transpose(1, 2) if original.is_transposed else weight   # (E, out, in)
        projections[name] = ExpertWeights(weight, tensors.get(f"{name}_bias"), quant, device, dtype)
    return FrozenExperts(original, projections)
