"""save_adapter: write a model's adapter as a PEFT adapter directory (plus qlowrank's sidecar)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors.torch import save as safetensors_bytes
from torch import nn

from ..atomic import staged_dir
from ..config import QuantConfig
from ..model.surgery import lora_layers
from ..model.tokens import DELTA
from ..state import state_of
from .expert_tensors import parameter_factors, parameter_ranks, parameter_tensors, target_parameter_names
from .files import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    FACTORS,
    KEY_PREFIX,
    MAGNITUDE,
    QLOWRANK_SIDECAR,
    TOKEN_ADAPTER,
    base_bits,
)
from .peft_format import peft_inexpressible, peft_lora_fields


def save_adapter(model: nn.Module, out_dir: str | os.PathLike, overwrite: bool = True, format: str = "peft",
                 tensors: dict[str, dict[str, torch.Tensor]] | None = None) -> Path:
    """Write the model's adapter (LoRA factors, DoRA magnitudes, modules_to_save) as a PEFT adapter directory.

    The directory is written under a temporary name and renamed into place, so a crash
    never leaves a half-written adapter.

    Args:
        model: a model with LoraLinear layers (from add_lora or load_model(lora=...)).
        out_dir: the adapter directory to create.
        overwrite: replace an existing adapter directory (a directory that holds anything
            other than an adapter is never replaced).
        format: "peft" refuses an adapter that PEFT would load into a different model (LoftQ
            with > 1 iteration, PiSSA on a quantized base or with the randomized SVD), saying
            why; "qlowrank" writes it anyway, with what qlowrank needs to rebuild the base in
            the sidecar (the trainer's checkpoints use this).
        tensors: {layer name: {"lora_A": A, "lora_B": B}} to write instead of the layers'
            own factors (gathered from processes that each hold a shard, under FSDP); for MoE
            expert LoRA the layer name is `<experts>.<projection>`, for a router its path.

    Returns:
        The adapter directory.

    Raises:
        OSError: the folder cannot be written (full disk, read-only); nothing partial is left
            and an existing adapter there is unchanged.
    """
    if format not in ("peft", "qlowrank"):
        raise ValueError(f"save_adapter format={format!r}: use 'peft' or 'qlowrank'")
    layers = dict(lora_layers(model))
    if not layers and not parameter_factors(model):
        raise ValueError("save_adapter: the model has no LoRA layers (call add_lora or load_model(lora=...) first)")
    if len({(layer.use_rslora, layer.use_dora, layer.init) for layer in layers.values()}) > 1:
        raise ValueError("save_adapter needs one rsLoRA / DoRA / init setting for all layers (one adapter config)")
    reasons = peft_inexpressible(layers, base_bits(model) is not None)
    if format == "peft" and reasons:
        raise ValueError("save_adapter: this adapter cannot be expressed in PEFT's format: " + "; ".join(reasons)
                         + ". save_adapter(model, dir, format='qlowrank') writes it for qlowrank, which rebuilds that "
                         "base from the sidecar (load_adapter / qlowrank export).")
    tensors = {**_adapter_tensors(model, layers, tensors), **parameter_tensors(model, tensors)}
    first = next(iter(layers.values()))
    config = _peft_config(model, layers)
    out_dir = Path(out_dir)
    _check_replaceable(out_dir, overwrite)
    with staged_dir(out_dir, "adapter") as tmp:
        # Serialized in memory and written by Python, so a full disk is a plain OSError.
        (tmp / ADAPTER_WEIGHTS).write_bytes(safetensors_bytes(tensors, metadata={"format": "pt"}))
        if state_of(model).tokenizer is not None:   # the enlarged vocabulary of add_tokens
            state_of(model).tokenizer.save_pretrained(str(tmp))
        (tmp / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        (tmp / QLOWRANK_SIDECAR).write_text(json.dumps(_sidecar(model, first, reasons), indent=2) + "\n")
    return out_dir


def _adapter_tensors(model: nn.Module, layers: dict, gathered: dict | None = None) -> dict[str, torch.Tensor]:
    def plain(t: torch.Tensor) -> torch.Tensor:
        return t.detach().float().cpu().contiguous()

    extras = any(layer.use_dora for layer in layers.values()) or state_of(model).modules_to_save \
        or state_of(model).trainable_tokens
    if gathered is not None and extras:
        raise ValueError("save_adapter: gathered (FSDP-sharded) factors with DoRA, modules_to_save or new tokens are "
                         "not supported yet; train those with one process or DDP")
    tensors = {f"{KEY_PREFIX}{name}.{factor}.weight":
               plain(gathered[name][factor] if gathered is not None else getattr(layer, factor).weight)
               for name, layer in layers.items() for factor in FACTORS}
    tensors.update({f"{KEY_PREFIX}{name}.{MAGNITUDE}": plain(layer.lora_magnitude_vector)
                    for name, layer in layers.items() if layer.use_dora})
    for name in state_of(model).trainable_tokens:
        tensors[f"{KEY_PREFIX}{name}.{TOKEN_ADAPTER}.{DELTA}"] = plain(getattr(model.get_submodule(name), DELTA))
    for name in state_of(model).modules_to_save:
        for leaf, param in model.get_submodule(name).named_parameters(recurse=False):
            tensors[f"{KEY_PREFIX}{name}.{leaf}"] = plain(param)
    return tensors


def _check_replaceable(out_dir: Path, overwrite: bool) -> None:
    if not out_dir.exists():
        return
    if not overwrite:
        raise FileExistsError(f"{out_dir} exists; pass overwrite=True to replace it")
    if not out_dir.is_dir() or (any(out_dir.iterdir()) and not (out_dir / ADAPTER_CONFIG).is_file()):
        raise FileExistsError(f"{out_dir} exists and is not an adapter directory; refusing to replace it")


def _target_modules(model: nn.Module, names: list[str]) -> list[str]:
    """Short names (q_proj, ...) when they pick out exactly the wrapped layers, else full paths."""
    leaves = sorted({name.rsplit(".", 1)[-1] for name in names})
    wrapped = set(names)
    inner = (n for n, _ in model.named_modules() if ".lora_" not in n and ".base_layer" not in n)
    matches = {n for n in inner if n.rsplit(".", 1)[-1] in leaves}
    return leaves if matches == wrapped else sorted(names)


def _peft_config(model: nn.Module, layers: dict) -> dict:
    config = getattr(model, "config", None)
    is_causal = "ForCausalLM" in type(model).__name__ or "LMHead" in type(model).__name__
    first = next(iter(layers.values()))
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM" if is_causal else None,
        "base_model_name_or_path": getattr(config, "_name_or_path", None) or None,
        **peft_lora_fields(model, layers, _target_modules(model, list(layers)), parameter_ranks(model)),
        "fan_in_fan_out": bool(first.fan_in_fan_out),
        "bias": "none",
        "inference_mode": True,
        "layers_to_transform": None,
        "layers_pattern": None,
        "revision": None,
        "target_parameters": target_parameter_names(model) or None,
    }


def _sidecar(model: nn.Module, first, peft_reasons: list[str]) -> dict:
    from ..version import __version__  # the package's own attribute: not importable while __init__ runs

    quant = state_of(model).quant
    bits = base_bits(model)
    if quant is None:
        quant = QuantConfig(bits=bits)
    config = getattr(model, "config", None)
    return {
        "qlowrank_version": __version__,
        "base_quant": None if bits is None else {
            "bits": bits, "quant_type": quant.quant_type, "double_quant": quant.double_quant,
            "blocksize": quant.blocksize, "compute_dtype": str(quant.compute_dtype).removeprefix("torch."),
            "int8_threshold": quant.int8_threshold,
        },
        "base_model_type": getattr(config, "model_type", None),
        "base_architecture": type(model).__name__,
        "source": state_of(model).source,
        "init": first.init,
        "vocab_size": int(model.get_input_embeddings().weight.shape[0]) if hasattr(model, "get_input_embeddings") else None,
        "loftq_iters": first.loftq_iters,
        "svd": first.svd,
        "seed": int(state_of(model).seed),
        "peft_loads_same_model": not peft_reasons,
        "peft_differences": peft_reasons,
    }
