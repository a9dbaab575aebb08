"""Model surgery: quantize linear layers, wrap targets with LoraLinear, freeze the rest.

`quantize_model` and `add_lora` work in place on any nn.Module, transformers' or hand-made.
The dispatch is one short table (first match wins): layer type -> how to wrap it.
"""

from __future__ import annotations

import contextlib
import re
import zlib
from dataclasses import dataclass
from typing import Iterator, Sequence

import torch
from torch import nn

from . import quant as quantlib
from .config import LoraConfig, QuantConfig
from .lora import LoraLinear, _is_conv1d, is_linear_like


@dataclass(frozen=True)
class ParameterCount:
    """True element counts (a packed 4-bit byte counts as the two weights it holds)."""

    total: int
    trainable: int

    @property
    def trainable_fraction(self) -> float:
        return self.trainable / self.total if self.total else 0.0

    def __str__(self) -> str:
        return f"trainable {self.trainable:,} of {self.total:,} ({100 * self.trainable_fraction:.4f}%)"


def _set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def _output_head_names(model: nn.Module) -> set[str]:
    """Names of the output projection (lm_head / decoder) that must stay unquantized and unwrapped."""
    heads: set[str] = set()
    get_head = getattr(model, "get_output_embeddings", None)
    head = get_head() if callable(get_head) else None
    if head is not None:
        heads.update(name for name, module in model.named_modules() if module is head)
    return heads


def _name_matches(name: str, patterns: Sequence[str]) -> bool:
    # PEFT's rule: a listed name matches a module whose full path is it or ends with ".<it>".
    return any(name == p or name.endswith("." + p) for p in patterns)


def _linear_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return [
        (name, module) for name, module in model.named_modules()
        if name and is_linear_like(module) and not _inside_lora(name)
    ]


def _inside_lora(name: str) -> bool:
    parts = name.split(".")
    return any(part.startswith("lora_") or part == "base_layer" for part in parts)


def quantize_model(
    model: nn.Module,
    quant: QuantConfig,
    skip: Sequence[str] = (),
    device: torch.device | str | None = None,
) -> nn.Module:
    """Replace every nn.Linear / Conv1D with a frozen bitsandbytes layer, in place.

    The output head and any module whose name matches `skip` stay as they are; so do
    embeddings and norms (no blanket dtype change). Conv1D weights (in, out) are transposed
    into the Linear layout and the layer is marked `fan_in_fan_out` so export can undo it.

    Args:
        model: any module; its linear layers must hold real (non-meta) weights.
        quant: bits 4 or 8 (bits=None returns the model unchanged).
        skip: module names (or name suffixes) to leave in full precision.
        device: where the quantized weights live; default: where each weight is now.

    Returns:
        The same model, for chaining.
    """
    if quant.bits is None:
        return model
    keep = _output_head_names(model)
    # Hold names, not modules, so each float weight is freed as soon as it is replaced.
    for name in [name for name, _ in _linear_layers(model)]:
        module = model.get_submodule(name)
        if quantlib.is_quantized_linear(module) or name in keep or _name_matches(name, skip):
            continue
        if module.weight.is_meta:
            raise ValueError(f"cannot quantize {name}: its weight is on the meta device (load real weights first)")
        target = torch.device(device) if device is not None else module.weight.device
        weight = module.weight.t() if _is_conv1d(module) else module.weight  # (out, in)
        new = quantlib.quantize_linear(weight, module.bias, quant, target)
        new.fan_in_fan_out = _is_conv1d(module)
        new.train(module.training)
        _set_submodule(model, name, new)
        del module
    return model


def _is_target(name: str, lora: LoraConfig, heads: set[str]) -> bool:
    if _name_matches(name, lora.exclude_modules):
        return False
    if lora.target_modules == "all-linear":
        return name not in heads
    if isinstance(lora.target_modules, str):
        return re.fullmatch(lora.target_modules, name) is not None
    return _name_matches(name, lora.target_modules)


def add_lora(model: nn.Module, lora: LoraConfig, seed: int | None = None) -> nn.Module:
    """Wrap the target linear layers with LoraLinear and freeze every other parameter.

    Args:
        model: any module with linear layers.
        lora: rank, alpha, targets, init.
        seed: makes the random A factors reproducible: each layer draws from its own CPU
            generator seeded by (seed, layer name), so a layer's init does not depend on
            which other layers are targeted, on the device, or on torch's global RNG.
            None draws from torch's global generator.

    Raises:
        ValueError: a target name or regex matches no linear layer (the message lists the
            linear layer names that exist), or the model already has LoRA layers.
    """
    if any(isinstance(m, LoraLinear) for m in model.modules()):
        raise ValueError("this model already has LoRA layers; load an adapter with load_adapter instead of add_lora twice")
    heads = _output_head_names(model)
    candidates = _linear_layers(model)
    targets = [(name, module) for name, module in candidates if _is_target(name, lora, heads)]
    _check_targets_found(lora, candidates, targets)
    for param in model.parameters():
        param.requires_grad_(False)
    for name, module in targets:
        wrapped = LoraLinear(module, lora)
        if seed is not None:
            wrapped.reset_lora_parameters(layer_generator(seed, name))
        wrapped.train(module.training)
        _set_submodule(model, name, wrapped)
    model.qlowrank_lora_config = lora
    return model


def layer_generator(seed: int, name: str) -> torch.Generator:
    """A CPU generator for one layer: a function of (seed, layer name) only (crc32, not
    Python's per-process randomized hash(), so it is the same in every process)."""
    return torch.Generator().manual_seed((seed * 0x9E3779B1 + zlib.crc32(name.encode())) % 2**63)


def _check_targets_found(lora: LoraConfig, candidates: list, targets: list) -> None:
    existing = sorted({name.rsplit(".", 1)[-1] for name, _ in candidates})
    if not candidates:
        raise ValueError("add_lora found no linear layers (nn.Linear, Conv1D, bitsandbytes 4/8-bit) in this model")
    if isinstance(lora.target_modules, list):
        found = {p for p in lora.target_modules for name, _ in targets if _name_matches(name, [p])}
        missing = [p for p in lora.target_modules if p not in found]
        if missing:
            raise ValueError(
                f"LoraConfig.target_modules {missing} matched no linear layer; linear layer names in this model: {existing}"
            )
    elif not targets:
        raise ValueError(
            f"LoraConfig.target_modules={lora.target_modules!r} matched no linear layer "
            f"(after exclude_modules={lora.exclude_modules}); linear layer names in this model: {existing}"
        )


def lora_layers(model: nn.Module) -> Iterator[tuple[str, LoraLinear]]:
    """(name, layer) for every LoraLinear in the model."""
    for name, module in model.named_modules():
        if isinstance(module, LoraLinear):
            yield name, module


def lora_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The trainable LoRA factors (everything whose name has the `lora_` prefix)."""
    return [p for name, p in model.named_parameters() if ".lora_" in name or name.startswith("lora_")]


def count_parameters(model: nn.Module) -> ParameterCount:
    """Total and trainable parameter counts, counting packed 4-bit weights as the weights they hold."""
    total = trainable = 0
    for param in model.parameters():
        n = quantlib.weight_element_count(param)
        total += n
        if param.requires_grad:
            trainable += n
    return ParameterCount(total=total, trainable=trainable)


@contextlib.contextmanager
def disable_lora(model: nn.Module) -> Iterator[nn.Module]:
    """Inside the block the model computes its base outputs (every LoRA branch switched off)."""
    layers = [layer for _, layer in lora_layers(model)]
    previous = [layer.disabled for layer in layers]
    for layer in layers:
        layer.disabled = True
    try:
        yield model
    finally:
        for layer, was in zip(layers, previous):
            layer.disabled = was
