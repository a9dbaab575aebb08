"""LoraRouter: a mixture of experts' router (float, frozen) with a trainable low-rank update of its weight.

    router logits = x (W + scale * B A)^T        W: (E, H) router weight, A (r, H), B (E, r)

A transformers 5 router is no nn.Linear: a `*TopKRouter` module holding a `weight` (E, H)
(gpt-oss a bias too) whose forward runs the linear, then softmax and top-k. So the update is
added to the weight and the router's own forward runs on the sum (`torch.func.functional_call`),
which keeps every family's routing as transformers writes it. That is PEFT's `ParamWrapper`
arithmetic for a 2-D parameter (W + (B @ A) * scale, cast to W's dtype), so PEFT's adapters
give the same logits. Building the whole delta each forward is cheap here: E x H is a few
hundred thousand numbers at real widths (Qwen3-30B-A3B: 128 x 2048), against experts' billions.
The router itself is never quantized.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..config import LoraConfig
from .experts import FrozenExperts, is_fused_experts
from .layers import is_linear_like


class LoraRouter(nn.Module):
    """A frozen router `base_layer` whose `weight` gets a float32 low-rank update B A (PEFT's key layout:
    `<router>.lora_A.weight` (r, H), `<router>.lora_B.weight` (E, r))."""

    fan_in_fan_out = False   # the export's merge reads this of every layer with a delta

    def __init__(self, base_layer: nn.Module, config: LoraConfig, generator: torch.Generator | None = None) -> None:
        super().__init__()
        if config.use_dora or config.dropout > 0:
            raise ValueError("LoRA on a MoE router supports neither DoRA nor dropout (PEFT's target_parameters "
                             "neither): set use_dora=False and dropout=0, or do not target the router")
        weight = base_layer.weight                        # (E, H)
        self.base_layer = base_layer
        self.out_features, self.in_features = weight.shape
        self.r, self.alpha, self.use_rslora, self.scaling = config.r, config.alpha, config.use_rslora, config.scaling
        for param in base_layer.parameters():
            param.requires_grad_(False)
        self.lora_A = nn.Linear(self.in_features, self.r, bias=False, device=weight.device, dtype=torch.float32)
        self.lora_B = nn.Linear(self.r, self.out_features, bias=False, device=weight.device, dtype=torch.float32)
        if not weight.is_meta:
            values = torch.empty(self.lora_A.weight.shape, dtype=torch.float32)   # (r, H), drawn on the CPU
            nn.init.kaiming_uniform_(values, a=math.sqrt(5), generator=generator)  # as loralib / PEFT init A
            with torch.no_grad():
                self.lora_A.weight.copy_(values)
                self.lora_B.weight.zero_()
        self.disabled = False

    def __getattr__(self, name: str):
        # top_k, num_experts, ...: what callers read of the router they replaced (PEFT's wrappers do the same).
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "base_layer":
                raise
            return getattr(self.base_layer, name)

    def delta_weight(self) -> torch.Tensor:
        """scale * B @ A in float32, (E, H): what merging adds to the router weight."""
        return (self.lora_B.weight.float() @ self.lora_A.weight.float()) * self.scaling

    def merged_weight(self) -> torch.Tensor:
        """The float32 (E, H) weight the router computes with: W + scale * B A."""
        return self.base_layer.weight.detach().float() + self.delta_weight()

    def check_finite(self) -> None:
        """Raise before merging factors that hold NaN or inf."""
        for name in ("lora_A", "lora_B"):
            if not torch.isfinite(getattr(self, name).weight).all():
                raise ValueError(f"the router's {name} holds NaN or inf values; refusing to merge a broken adapter")

    def forward(self, *args, **kwargs):
        if self.disabled:
            return self.base_layer(*args, **kwargs)
        weight = self.base_layer.weight
        # In W's dtype, as PEFT adds it: in bf16 an update below W's rounding step is invisible to the forward
        # (its gradient is not); float32 models get W + delta exactly.
        adapted = weight + self.delta_weight().to(weight.dtype)   # (E, H)
        return torch.func.functional_call(self.base_layer, {"weight": adapted}, args, kwargs)


def moe_routers(model: nn.Module) -> dict[str, nn.Module]:
    """{path: router} for every mixture-of-experts block: the fused experts' sibling with an (E, H) `weight`.

    A LoraRouter already in place counts as its block's router. Linear gates (Qwen2-MoE's
    shared-expert gate) are not routers here: they are linear layers, adapted by target_modules.
    """
    found = {}
    for parent_name, parent in model.named_modules():
        children = dict(parent.named_children())
        experts = [c for c in children.values() if isinstance(c, FrozenExperts) or is_fused_experts(c)]
        if len(experts) != 1:
            continue
        count = experts[0].num_experts if isinstance(experts[0], FrozenExperts) else experts[0].down_proj.shape[0]
        for child_name, child in children.items():
            weight = child.base_layer.weight if isinstance(child, LoraRouter) else child._parameters.get("weight")
            if (weight is not None and weight.dim() == 2 and weight.shape[0] == count
                    and (isinstance(child, LoraRouter) or not is_linear_like(child))):
                found[f"{parent_name}.{child_name}" if parent_name else child_name] = child
    return found
