"""What counts as a linear layer: nn.Linear, transformers' Conv1D, bitsandbytes 4/8-bit."""

from __future__ import annotations

from torch import nn

from . import quant as quantlib


def is_conv1d(module: nn.Module) -> bool:
    """True for transformers' Conv1D (GPT-2): a linear layer whose weight is stored (in, out)."""
    # transformers' Conv1D (GPT-2) is a linear layer with its weight stored (in, out).
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf")


def is_linear_like(module: nn.Module) -> bool:
    """Layers LoraLinear can wrap: nn.Linear, transformers' Conv1D, bitsandbytes 4/8-bit."""
    return isinstance(module, nn.Linear) or is_conv1d(module) or quantlib.is_quantized_linear(module)


def linear_shape(module: nn.Module) -> tuple[int, int]:
    """(out_features, in_features) of any linear-like layer."""
    if is_conv1d(module):
        in_features, out_features = module.weight.shape
        return out_features, in_features
    return module.out_features, module.in_features
