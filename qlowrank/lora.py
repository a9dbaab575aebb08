"""LoraLinear: a frozen linear layer (float, Conv1D, 4-bit or 8-bit) plus a trainable B A.

    y = base(x) + scale * B(A(dropout(x)))        scale = alpha / r  (rsLoRA: alpha / sqrt(r))

A (r x in) starts random, B (out x r) starts at zero, so a freshly wrapped layer computes
exactly what its base computes. A and B are float32 `nn.Linear`s named `lora_A` / `lora_B`:
the `lora_` prefix is the one rule for what trains and what an adapter file holds, and the
names give PEFT's key layout (`<path>.lora_A.weight`) for free.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from . import quant as quantlib
from .config import LoraConfig


def _is_conv1d(module: nn.Module) -> bool:
    # transformers' Conv1D (GPT-2) is a linear layer with its weight stored (in, out).
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf")


def is_linear_like(module: nn.Module) -> bool:
    """Layers LoraLinear can wrap: nn.Linear, transformers' Conv1D, bitsandbytes 4/8-bit."""
    return isinstance(module, nn.Linear) or _is_conv1d(module) or quantlib.is_quantized_linear(module)


def linear_shape(module: nn.Module) -> tuple[int, int]:
    """(out_features, in_features) of any linear-like layer."""
    if _is_conv1d(module):
        in_features, out_features = module.weight.shape
        return out_features, in_features
    return module.out_features, module.in_features


class LoraLinear(nn.Module):
    """A frozen `base_layer` with a trainable low-rank update.

    Args:
        base_layer: nn.Linear, transformers Conv1D, or a bitsandbytes Linear4bit/Linear8bitLt.
        config: rank, alpha, dropout, rsLoRA and init of the update.
    """

    def __init__(self, base_layer: nn.Module, config: LoraConfig) -> None:
        super().__init__()
        if not is_linear_like(base_layer):
            raise TypeError(
                f"LoraLinear cannot wrap {type(base_layer).__name__}; it wraps nn.Linear, Conv1D, "
                "bitsandbytes Linear4bit and Linear8bitLt"
            )
        quantlib.guard_cpu_repack(base_layer)
        self.base_layer = base_layer
        self.out_features, self.in_features = linear_shape(base_layer)
        self.r = config.r
        self.alpha = config.alpha
        self.use_rslora = config.use_rslora
        self.scaling = config.scaling
        self.init = config.init
        self.fan_in_fan_out = _is_conv1d(base_layer) or getattr(base_layer, "fan_in_fan_out", False)
        self.lora_dropout = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()
        device = _weight_device(base_layer)
        self.lora_A = nn.Linear(self.in_features, self.r, bias=False, device=device, dtype=torch.float32)  # (r, in)
        self.lora_B = nn.Linear(self.r, self.out_features, bias=False, device=device, dtype=torch.float32)  # (out, r)
        self.disabled = False
        self.merged = False
        for param in self.base_layer.parameters():
            param.requires_grad_(False)
        self.reset_lora_parameters()

    def reset_lora_parameters(self, generator: torch.Generator | None = None) -> None:
        """A random (Kaiming-uniform as in loralib, or N(0, 1/r)), B zero: the update starts at 0.

        Args:
            generator: a CPU generator to draw A from (reproducible, and the same numbers on
                every device); None draws from torch's global generator.
        """
        weight = self.lora_A.weight
        values = weight if generator is None else torch.empty(weight.shape, dtype=torch.float32)  # (r, in)
        if self.init == "gaussian":
            nn.init.normal_(values, std=1.0 / self.r, generator=generator)
        else:
            nn.init.kaiming_uniform_(values, a=math.sqrt(5), generator=generator)
        with torch.no_grad():
            weight.copy_(values)
        nn.init.zeros_(self.lora_B.weight)

    @property
    def is_quantized(self) -> bool:
        return quantlib.is_quantized_linear(self.base_layer)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.base_layer(x)
        if self.disabled or self.merged:
            return result
        h = self.lora_dropout(x)
        # The float32 factors are cast to the activations' dtype (as autocast would), so a
        # bf16 model does not upcast its (B, T, in) activations; gradients still reach fp32.
        # The scale is folded into B (out x r) rather than applied to the (B, T, out) update.
        a = self.lora_A.weight.to(h.dtype)
        b = (self.lora_B.weight * self.scaling).to(h.dtype)
        update = F.linear(F.linear(h, a), b)  # (B, T, r) -> (B, T, out)
        return result + update.to(result.dtype)

    def delta_weight(self) -> torch.Tensor:
        """scale * B @ A in float32, shape (out, in) (the Linear layout, also for Conv1D)."""
        return (self.lora_B.weight.float() @ self.lora_A.weight.float()) * self.scaling

    def merged_weight(self) -> torch.Tensor:
        """dequant(W) + scale * B A in float32, shape (out, in): the weight the layer computes with."""
        weight = quantlib.dequantize_weight(self.base_layer).to(self.lora_A.weight.device)
        if self.merged:
            return weight
        return weight + self.delta_weight()

    def merge(self) -> None:
        """Fold B A into a float base weight in place (refused for quantized bases)."""
        self._refuse_quantized("merge")
        if self.merged:
            return
        self._check_finite()
        self._add_to_base(self.delta_weight())
        self.merged = True

    def unmerge(self) -> None:
        """Undo `merge()` (exact up to the base dtype's rounding)."""
        self._refuse_quantized("unmerge")
        if not self.merged:
            return
        self._add_to_base(-self.delta_weight())
        self.merged = False

    def _add_to_base(self, delta: torch.Tensor) -> None:
        weight = self.base_layer.weight
        with torch.no_grad():
            if self.fan_in_fan_out:
                delta = delta.t()
            weight.copy_((weight.float() + delta.to(weight.device)).to(weight.dtype))

    def _check_finite(self) -> None:
        for name in ("lora_A", "lora_B"):
            if not torch.isfinite(getattr(self, name).weight).all():
                raise ValueError(f"{name} holds NaN or inf values; refusing to merge a broken adapter")

    def _refuse_quantized(self, action: str) -> None:
        if self.is_quantized:
            raise RuntimeError(
                f"LoraLinear.{action}() refused: the base is {quantlib.quantized_bits(self.base_layer)}-bit, and "
                "writing B A into it would re-quantize and degrade the weights. Use "
                "qlowrank.export_merged(model, out_dir) to write a dequantized, merged float checkpoint."
            )

    def extra_repr(self) -> str:
        return f"r={self.r}, alpha={self.alpha}, scaling={self.scaling:.4g}, rslora={self.use_rslora}"


def _weight_device(layer: nn.Module) -> torch.device:
    return next(layer.parameters()).device
