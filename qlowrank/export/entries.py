"""What an export writes: the options, and every tensor of the merged state dict with how to compute it when written.

Both writers (Hugging Face safetensors and GGUF) take the same `ExportOptions` and walk the same plan. A LoRA layer's weight (a
LoRA router's too) is computed as dequant(W) + scale * B A in float32 (DoRA: row-rescaled) the moment it is written,
so the merged model is never held whole; `from_original` swaps in the original checkpoint's
tensors instead of the dequantized ones.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
import transformers
from torch import nn

from ..config import parse_dtype
from ..model.load import checkpoint_files, key_mapper, open_safetensors, tied_keys
from ..model.tokens import TrainableTokens
from ..nn import quant as quantlib
from ..nn.experts import FrozenExperts
from ..nn.lora import LoraLinear
from ..nn.router import LoraRouter

DEFAULT_SHARD_BYTES = 2 * 2**30
FORMATS = ("safetensors", "gguf")


@dataclass
class ExportOptions:
    """How to write one export: `export_merged`'s keyword arguments, checked once (see its docstring)."""

    out: Path                                   # checkpoint folder (safetensors) or .gguf file
    dtype: torch.dtype = torch.bfloat16         # safetensors: dtype of the float tensors written
    base: Path | None = None                    # merge into this original float checkpoint instead
    overwrite: bool = False                     # replace an existing `out` (kept otherwise)
    tokenizer: Any = None                       # written beside the weights; default: the model's own
    max_shard_size: int = DEFAULT_SHARD_BYTES   # safetensors: bytes per shard
    probe: bool = True                          # compare the written weights with the model (fidelity)
    progress: bool = True                       # a tqdm bar per tensor
    format: str = "safetensors"                 # "safetensors" | "gguf"
    gguf_type: str = "f16"                      # gguf: f16 | bf16 | q8_0 | f32
    before_tensor: Callable[[str], None] | None = None  # called with each key before it is computed (FSDP)

    def __post_init__(self):
        if self.format not in FORMATS:
            raise ValueError(f"format={self.format!r}: use 'safetensors' or 'gguf'")
        self.out = Path(self.out)
        self.base = Path(self.base) if self.base is not None else None
        self.dtype = parse_dtype(self.dtype, "export dtype")

    def check_target(self) -> None:
        """FileExistsError when `out` exists and may not be replaced."""
        if self.out.exists() and not self.overwrite:
            raise FileExistsError(f"{self.out} exists; pass overwrite=True (CLI: --overwrite) to replace it")


def export_config(model: nn.Module, dtype: torch.dtype) -> transformers.PretrainedConfig:
    """The exported checkpoint's config: the model's, without quantization, in `dtype`."""
    config = copy.deepcopy(model.config)
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    config.dtype = dtype
    config.architectures = [type(model).__name__]
    return config


@dataclass
class ExportEntry:
    """One tensor of the exported checkpoint, computed only when it is written."""

    key: str                                # state-dict key in the exported checkpoint
    shape: tuple[int, ...]                  # shape as stored (Conv1D weights: (in, out))
    dtype: torch.dtype                      # dtype before the export cast
    produce: Callable[[], torch.Tensor]     # computes the tensor when its shard is written


def weight_producer(layer: nn.Module) -> Callable[[], torch.Tensor]:
    """Producer of a wrapped / quantized layer's float32 weight, in its checkpoint layout."""
    fan_in_fan_out = getattr(layer, "fan_in_fan_out", False)

    def produce() -> torch.Tensor:
        if isinstance(layer, LoraLinear):
            layer.check_finite()
            weight = layer.merged_weight()  # (out, in) float32: dequant(W) + scale * B @ A
        else:
            weight = quantlib.dequantize_weight(layer)
        return weight.t() if fan_in_fan_out else weight  # Conv1D checkpoints store (in, out)

    return produce


def export_plan(model: nn.Module) -> list[ExportEntry]:
    """Every tensor the exported state dict holds, with how to compute it (nothing computed yet)."""
    entries: list[ExportEntry] = []
    skip_inside: str | None = None
    seen: set[int] = set()
    tied = tied_keys(model)
    for name, module in model.named_modules():
        prefix = f"{name}." if name else ""
        if skip_inside is not None and prefix.startswith(skip_inside):
            continue
        if isinstance(module, TrainableTokens):
            skip_inside = prefix
            if prefix + "weight" not in tied:   # a tied head is re-tied to the exported embeddings on load
                weight = module.base_layer.weight
                entries.append(ExportEntry(prefix + "weight", tuple(weight.shape), torch.float32, module.merged_weight))
            continue
        if isinstance(module, FrozenExperts):
            skip_inside = prefix
            entries += expert_entries(module, prefix)
            continue
        if isinstance(module, LoraRouter):
            skip_inside = prefix
            entries += router_entries(module, prefix)
            continue
        if isinstance(module, LoraLinear) or quantlib.is_quantized_linear(module):
            skip_inside = prefix
            out_features, in_features = module.out_features, module.in_features
            layout = (in_features, out_features) if getattr(module, "fan_in_fan_out", False) else (out_features, in_features)
            entries.append(ExportEntry(prefix + "weight", layout, torch.float32, weight_producer(module)))
            bias = (module.base_layer if isinstance(module, LoraLinear) else module).bias
            if bias is not None:
                owner = module.base_layer if isinstance(module, LoraLinear) else module
                entries.append(ExportEntry(prefix + "bias", tuple(bias.shape), bias.dtype, lambda m=owner: m.bias.detach()))
            continue
        tensors = [(k, v) for k, v in module._parameters.items() if v is not None]
        tensors += [(k, v) for k, v in module._buffers.items() if v is not None and k not in module._non_persistent_buffers_set]
        for leaf, tensor in tensors:
            key = prefix + leaf
            if key in tied or id(tensor) in seen:
                continue  # tied to a tensor already exported; from_pretrained re-ties it
            seen.add(id(tensor))
            # Looked up when written, not now: a sharded (FSDP) module swaps in the gathered tensor.
            entries.append(ExportEntry(key, tuple(tensor.shape), tensor.dtype, lambda m=module, n=leaf: getattr(m, n).detach()))
    return entries


def expert_entries(module: FrozenExperts, prefix: str) -> list[ExportEntry]:
    """The fused 3-D parameters of a FrozenExperts as transformers stores them: dequant(W_e) + scale * B_e A_e per expert."""
    entries = []
    transposed = module.layout.transposed
    for name in module.order:
        weights = getattr(module, name)
        shape = (weights.experts, weights.in_features, weights.out_features) if transposed else \
            (weights.experts, weights.out_features, weights.in_features)

        def produce(weights=weights) -> torch.Tensor:
            merged = torch.stack([weights.weight(e, torch.float32) + (weights.delta(e) if weights.r else 0.0)
                                  for e in range(weights.experts)])          # (E, out, in) float32
            if weights.r and not torch.isfinite(merged).all():
                raise ValueError(f"{prefix}{name}: the expert LoRA factors hold NaN or inf; refusing to merge")
            return merged.transpose(1, 2).contiguous() if transposed else merged

        entries.append(ExportEntry(prefix + name, shape, torch.float32, produce))
        if weights.bias is not None:
            entries.append(ExportEntry(f"{prefix}{name}_bias", tuple(weights.bias.shape), weights.bias.dtype,
                                       lambda w=weights: w.bias.detach()))
    return entries


def router_entries(module: LoraRouter, prefix: str) -> list[ExportEntry]:
    """A LoRA-adapted router as transformers stores it: `weight` = W + scale * B A, its other tensors (bias) as they are."""
    def produce() -> torch.Tensor:
        module.check_finite()
        return module.merged_weight()   # (E, H) float32

    base = module.base_layer
    entries = [ExportEntry(prefix + "weight", tuple(base.weight.shape), torch.float32, produce)]
    for leaf, tensor in base.named_parameters(recurse=False):
        if leaf != "weight":
            entries.append(ExportEntry(prefix + leaf, tuple(tensor.shape), tensor.dtype,
                                       lambda n=leaf: getattr(base, n).detach()))
    return entries


def export_keys(model: nn.Module) -> list[str]:
    """The keys export_merged writes, in the order it computes them."""
    return [entry.key for entry in export_plan(model)]


def planned_entries(model: nn.Module, options: ExportOptions) -> list[ExportEntry]:
    """The plan the options ask for: from the trained weights or the original ones, announced or not."""
    entries = export_plan(model)
    if options.base is not None:
        entries = from_original(model, entries, options.base)
    if options.before_tensor is not None:
        entries = [ExportEntry(e.key, e.shape, e.dtype, announced(options.before_tensor, e)) for e in entries]
    return entries


def announced(before: Callable[[str], None], entry: ExportEntry) -> Callable[[], torch.Tensor]:
    def produce() -> torch.Tensor:
        before(entry.key)
        # A copy: writing hands the bytes to numpy, which pins the storage, and FSDP must be
        # able to free the gathered parameter afterwards.
        return entry.produce().clone()

    return produce


def from_original(model: nn.Module, entries: list[ExportEntry], base: Path) -> list[ExportEntry]:
    """Replace each producer by the original checkpoint's tensor (+ scale * B A for LoRA layers)."""
    changed = sorted({layer.init for layer in model.modules() if isinstance(layer, LoraLinear)
                      and (layer.init == "pissa" or (layer.init == "loftq" and layer.loftq_iters > 1))})
    if changed:
        raise ValueError(f"base={base}: this model was initialised with {changed}, which replaced the frozen weights "
                         "(PiSSA's residual, LoftQ's quant(W - s B A)); its LoRA factors are not an update to the "
                         "original weights. Export without base= (from the weights the model trained on).")
    files = checkpoint_files(base)
    mapped = key_mapper({e.key for e in entries}, model.base_model_prefix)
    where = {}
    for ckpt_key, path in files.weight_map.items():
        key = mapped(ckpt_key)
        if key is not None:
            where[key] = (path, ckpt_key)
    missing = [e.key for e in entries if e.key not in where]
    if missing:
        raise ValueError(f"base={base}: the original checkpoint lacks {missing[:20]}; is it the model's base?")
    modules = dict(model.named_modules())
    result = []
    for entry in entries:
        path, ckpt_key = where[entry.key]
        layer = modules.get(entry.key.rpartition(".")[0])
        delta_layer = layer if isinstance(layer, (LoraLinear, LoraRouter)) and entry.key.endswith(".weight") else None
        result.append(ExportEntry(entry.key, entry.shape, entry.dtype, _original_producer(path, ckpt_key, entry, delta_layer)))
    return result


def _original_producer(path: Path, ckpt_key: str, entry: ExportEntry, layer: LoraLinear | LoraRouter | None):
    def produce() -> torch.Tensor:
        with open_safetensors(path) as handle:
            tensor = handle.get_tensor(ckpt_key)
        if tuple(tensor.shape) != entry.shape:
            raise ValueError(f"{path.name}: {ckpt_key!r} has shape {tuple(tensor.shape)}, the model has {entry.shape}")
        if layer is None:
            return tensor
        layer.check_finite()
        delta = layer.delta_weight().cpu()  # (out, in) float32
        return tensor.float() + (delta.t() if layer.fan_in_fan_out else delta)

    return produce
