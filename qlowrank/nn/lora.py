"""LoraLinear: a frozen linear layer (float, Conv1D, 4-bit or 8-bit) plus a trainable B A (optionally DoRA).

    y = base(x) + scale * B(A(dropout(x)))        scale = alpha / r  (rsLoRA: alpha / sqrt(r))
    DoRA:  y = m / ||W + scale B A||_row * (W x + scale B A x) + bias    (m trainable, the norm detached)

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

from ..config import LoraConfig
from . import dora
from . import quant as quantlib
from .init import layer_generator, pissa_float_inplace
from .loss import autocast_off
from .layers import is_conv1d, is_linear_like, linear_shape


class LoraLinear(nn.Module):
    """A frozen `base_layer` with a trainable low-rank update.

    Args:
        base_layer: nn.Linear, transformers Conv1D, or a bitsandbytes Linear4bit/Linear8bitLt.
        config: rank, alpha, dropout, rsLoRA, DoRA and init of the update (r and alpha
            already resolved for this layer, see `LoraConfig.layer_config`).
        name: the layer's path in the model (with `seed`, picks the layer's own generator).
        seed: None draws A from torch's global generator; an int from a generator seeded by
            (seed, name), reproducibly (a PiSSA SVD on a float base uses seed 0 for None).
        init_factors: LoftQ / PiSSA's (A, B) for this layer, computed while it was quantized
            (`nn.init.quantize_with_init`; `add_lora` passes what `quantize_model` recorded).
    """

    def __init__(self, base_layer: nn.Module, config: LoraConfig, name: str = "", seed: int | None = None,
                 init_factors: tuple[torch.Tensor, torch.Tensor] | None = None) -> None:
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
        self.svd = config.svd                # PiSSA on a float base runs its SVD here
        self.loftq_iters = config.loftq_iters
        self._original_weight = None         # a merged DoRA layer's pre-merge weight
        self.fan_in_fan_out = is_conv1d(base_layer) or getattr(base_layer, "fan_in_fan_out", False)
        self.lora_dropout = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()
        device = _weight_device(base_layer)
        self.lora_A = nn.Linear(self.in_features, self.r, bias=False, device=device, dtype=torch.float32)  # (r, in)
        self.lora_B = nn.Linear(self.r, self.out_features, bias=False, device=device, dtype=torch.float32)  # (out, r)
        self.disabled = False
        self.merged = False
        self.use_dora = config.use_dora
        for param in self.base_layer.parameters():
            param.requires_grad_(False)
        self._init_factors(name, seed, init_factors)
        if self.use_dora:
            # The magnitude starts at the row norms of the initial weight, so DoRA starts where LoRA does.
            self.lora_magnitude_vector = nn.Parameter(self.weight_norm().to(device))  # (out,)

    def _init_factors(self, name: str, seed: int | None, stashed: tuple[torch.Tensor, torch.Tensor] | None) -> None:
        if self.init not in ("loftq", "pissa"):
            self.reset_lora_parameters(None if seed is None else layer_generator(seed, name))
            return
        if stashed is None and self.lora_A.weight.is_meta:  # a shape-only model (estimate_memory)
            return
        if stashed is None and self.is_quantized:
            raise ValueError(
                f"LoraConfig(init={self.init!r}) needs the float weights of {name or 'this layer'}, which a quantized "
                "layer no longer has: use load_model(path, quant=..., lora=...) or quantize_model(model, quant, lora=...), "
                "which initialise each layer as it is quantized"
            )
        if stashed is None and self.init == "loftq":
            raise ValueError(f"LoraConfig(init='loftq') needs a quantized base; {name or 'this layer'} is float "
                             "(use init='pissa' on a float base)")
        if stashed is None:
            stashed = pissa_float_inplace(self.base_layer, self, layer_generator(seed or 0, name))
        a, b = stashed
        if tuple(a.shape) != tuple(self.lora_A.weight.shape) or tuple(b.shape) != tuple(self.lora_B.weight.shape):
            raise ValueError(f"{name}: the {self.init} factors have r={a.shape[0]}, the LoRA config r={self.r}")
        with torch.no_grad():
            self.lora_A.weight.copy_(a)
            self.lora_B.weight.copy_(b)

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

    def base_weight(self) -> torch.Tensor:
        """The float32 (out, in) weight the base multiplies by (a meta tensor in estimate_memory)."""
        if hasattr(self.base_layer, "dequantized"):  # estimate_memory's shape-only stand-in
            return self.base_layer.dequantized(torch.float32)
        return quantlib.dequantize_weight(self.base_layer).to(self.lora_A.weight.device)

    def weight_norm(self) -> torch.Tensor:
        """||W + scale B A|| per output row, float32, shape (out,), without gradient (DoRA section 4.3)."""
        device_type = self.lora_A.weight.device.type
        # float32 on purpose: under bf16 autocast B @ A would be rounded before the sum.
        with torch.no_grad(), autocast_off(device_type):
            return torch.linalg.vector_norm(self.base_weight() + self.delta_weight(), dim=1)

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
        if not self.use_dora:
            return result + update.to(result.dtype)
        # The dequantized weight behind the row norm is transient.
        bias = getattr(self.base_layer, "bias", None)
        return dora.rescale_output(result, update, self.lora_magnitude_vector, self.weight_norm(), bias)

    def delta_weight(self) -> torch.Tensor:
        """scale * B @ A in float32, shape (out, in) (the Linear layout, also for Conv1D)."""
        return (self.lora_B.weight.float() @ self.lora_A.weight.float()) * self.scaling

    def merged_weight(self) -> torch.Tensor:
        """The float32 (out, in) weight the layer computes with: dequant(W) + scale * B A (DoRA: row-rescaled)."""
        weight = self.base_weight()
        if self.merged:
            return weight
        weight = weight + self.delta_weight()
        if self.use_dora:
            weight = dora.rescale_weight(weight, self.lora_magnitude_vector.detach().float())
        return weight

    def merge(self) -> None:
        """Fold B A into a float base weight in place (refused for quantized bases)."""
        self._refuse_quantized("merge")
        if self.merged:
            return
        self.check_finite()
        original = self.base_weight().clone()  # a float32 base returns its own storage
        self._set_base(self.merged_weight())
        self._original_weight = original if self.use_dora else None  # DoRA's rescale is not undone by a subtraction
        self.merged = True

    def unmerge(self) -> None:
        """Undo `merge()` (exact up to the base dtype's rounding)."""
        self._refuse_quantized("unmerge")
        if not self.merged:
            return
        original = self._original_weight
        self._set_base(original if original is not None else self.base_weight() - self.delta_weight())
        self._original_weight = None
        self.merged = False

    def _set_base(self, weight_out_in: torch.Tensor) -> None:
        weight = self.base_layer.weight
        with torch.no_grad():
            new = weight_out_in.t() if self.fan_in_fan_out else weight_out_in
            weight.copy_(new.to(device=weight.device, dtype=weight.dtype))

    def check_finite(self) -> None:
        tensors = {"lora_A": self.lora_A.weight, "lora_B": self.lora_B.weight}
        if self.use_dora:
            tensors["lora_magnitude_vector"] = self.lora_magnitude_vector
        for name, tensor in tensors.items():
            if not torch.isfinite(tensor).all():
                raise ValueError(f"{name} holds NaN or inf values; refusing to merge a broken adapter")

    def _refuse_quantized(self, action: str) -> None:
        if self.is_quantized:
            raise RuntimeError(
                f"LoraLinear.{action}() refused: the base is {quantlib.quantized_bits(self.base_layer)}-bit, and "
                "writing B A into it would re-quantize and degrade the weights. Use "
                "qlowrank.export_merged(model, out_dir) to write a dequantized, merged float checkpoint."
            )

    def extra_repr(self) -> str:
        return (f"r={self.r}, alpha={self.alpha}, scaling={self.scaling:.4g}, rslora={self.use_rslora}, "
                f"dora={self.use_dora}, init={self.init}")


def _weight_device(layer: nn.Module) -> torch.device:
    return next(layer.parameters()).device
