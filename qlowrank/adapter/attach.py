"""load_adapter: put a saved adapter (qlowrank's or PEFT's) onto a model."""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path

import torch
from torch import nn

from ..model.load import load_tokenizer
from ..model.surgery import add_lora, lora_layers, make_trainable_copy
from ..model.tokens import DELTA, wrap_trainable_tokens
from ..nn.experts import FrozenExperts, is_fused_experts
from ..nn.router import moe_routers
from ..state import state_of
from .expert_tensors import copy_parameter_factors, is_parameter_key
from .files import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    FACTORS,
    MAGNITUDE,
    base_bits,
    copy_into_,
    read_adapter_config,
    read_adapter_weights,
    split_keys,
)
from .peft_format import adapter_lora_config, rebuilds_base


def load_adapter(model: nn.Module, adapter_dir: str | os.PathLike) -> nn.Module:
    """Load an adapter saved by qlowrank or by PEFT into the model, in place.

    A model without LoRA layers gets them (on exactly the modules the file names, with its
    rank / alpha patterns, DoRA and modules_to_save); a model with LoRA layers must have
    exactly the file's layers and shapes. A LoftQ or PiSSA adapter needs the base it was
    trained on: load the model with `load_model(path, quant, lora=read_adapter_lora(dir)[0])`.

    Raises:
        ValueError: wrong base, wrong shapes, missing or unexpected keys (all listed).
    """
    adapter_dir = Path(adapter_dir)
    config, sidecar = read_adapter_config(adapter_dir)
    weights_path = adapter_dir / ADAPTER_WEIGHTS
    tensors = read_adapter_weights(weights_path)
    owners = _parameter_owners(model) if config.get("target_parameters") else set()
    parameter_part = {key: tensors.pop(key) for key in list(tensors) if is_parameter_key(key, owners)}
    by_module, saved, tokens = split_keys(list(tensors), config.get("modules_to_save") or [], weights_path)
    lora, seed = adapter_lora_config(config, sidecar, sorted(by_module))
    if not rebuilds_base(lora.init, lora.loftq_iters):
        lora = replace(lora, init="kaiming")  # the base is plain quant(W); A and B come from the file
    _check_base(model, sidecar, adapter_dir)
    wanted = set(FACTORS) | ({MAGNITUDE} if lora.use_dora else set())
    incomplete = sorted(name for name, parts in by_module.items() if set(parts) != wanted)
    if incomplete:
        raise ValueError(f"{weights_path}: these layers lack one of {sorted(wanted)}: {incomplete[:20]}")
    modules = dict(model.named_modules())
    not_in_model = sorted(name for name in [*by_module, *saved] if name not in modules)
    if not_in_model:
        raise ValueError(
            f"{weights_path}: adapter layers that this model does not have (wrong base model?): {not_in_model[:20]}"
        )
    existing = dict(lora_layers(model))
    if not existing:
        if lora.init != "kaiming" and base_bits(model) is not None:
            raise ValueError(
                f"{adapter_dir} was trained from a {lora.init}-initialised base, which a quantized model no longer "
                f"can be rebuilt into: load it with load_model(path, quant=..., lora=lora, seed={seed}) where "
                f"lora, seed = qlowrank.adapters.read_adapter_lora({str(adapter_dir)!r}), then load_adapter")
        add_lora(model, lora, seed=seed)
        existing = dict(lora_layers(model))
    else:
        _check_same_init(existing, lora, seed, model, adapter_dir)
        for name in saved:
            if name not in state_of(model).modules_to_save:
                make_trainable_copy(model, name)
                state_of(model).modules_to_save = [*state_of(model).modules_to_save, name]
    missing = sorted(set(existing) - set(by_module))
    unexpected = sorted(set(by_module) - set(existing))
    if missing or unexpected:
        raise ValueError(
            f"{weights_path} does not match the model's LoRA layers: missing (in the model, not the file): "
            f"{missing[:20]}; unexpected (in the file, not the model): {unexpected[:20]}"
        )
    _copy_factors(existing, by_module, tensors, weights_path)
    _copy_saved(model, saved, tensors, weights_path)
    _load_token_rows(model, tokens, tensors, config, adapter_dir)
    _set_scaling(existing, lora)
    if parameter_part or lora.target_parameters:
        copy_parameter_factors(model, parameter_part, weights_path)
    return model


def _parameter_owners(model: nn.Module) -> set[str]:
    """Paths of the modules whose parameters PEFT's `target_parameters` wraps: fused experts and routers."""
    experts = {name for name, module in model.named_modules() if isinstance(module, FrozenExperts) or is_fused_experts(module)}
    return experts | set(moe_routers(model))


def _load_token_rows(model: nn.Module, tokens: dict, tensors: dict, config: dict, adapter_dir: Path) -> None:
    """New-token rows (PEFT's trainable_token_indices): enlarge the vocabulary if needed, then set the rows."""
    if not tokens:
        return
    indices = config.get("trainable_token_indices") or {}
    id_lists = [list(v) for v in indices.values()] if isinstance(indices, dict) else [list(indices)]
    ids = id_lists[0] if id_lists else []
    if not ids or any(other != ids for other in id_lists):
        raise ValueError(f"{adapter_dir}: new-token rows need one list of trainable_token_indices in "
                         f"{ADAPTER_CONFIG}; found {indices!r}")
    deltas = {name: tensors[key] for name, key in tokens.items()}
    wrong = {name: tuple(d.shape) for name, d in deltas.items() if d.shape[0] != len(ids)}
    if wrong:
        raise ValueError(f"{adapter_dir}: new-token rows {wrong} do not match the {len(ids)} trainable_token_indices")
    current = state_of(model).trainable_tokens
    if current:
        if sorted(current) != sorted(deltas) or any(list(v) != ids for v in current.values()):
            raise ValueError(f"{adapter_dir}: new-token rows {sorted(deltas)} / ids {ids} differ from this model's "
                             f"{current}")
        with torch.no_grad():
            for name, delta in deltas.items():
                getattr(model.get_submodule(name), DELTA).copy_(delta)
        return
    if max(ids) >= model.get_input_embeddings().weight.shape[0]:
        model.resize_token_embeddings(max(ids) + 1)
    saved = wrap_trainable_tokens(model, ids, deltas)
    missing = sorted(set(saved) - set(deltas))
    if missing:
        raise ValueError(f"{adapter_dir}: no new-token rows for {missing} (an untied output head needs its own)")
    if (adapter_dir / "tokenizer_config.json").is_file():   # save_adapter stores the enlarged tokenizer too
        state_of(model).tokenizer = load_tokenizer(adapter_dir)


def _check_same_init(existing: dict, lora, seed: int, model: nn.Module, adapter_dir: Path) -> None:
    layer = next(iter(existing.values()))
    if bool(layer.use_dora) != lora.use_dora:
        raise ValueError(f"{adapter_dir}: use_dora={lora.use_dora} but the model's LoRA layers have "
                         f"use_dora={layer.use_dora}")
    if rebuilds_base(lora.init, lora.loftq_iters):
        have = (layer.init, layer.loftq_iters if lora.init == "loftq" else 1, state_of(model).seed)
        want = (lora.init, lora.loftq_iters if lora.init == "loftq" else 1, seed)
        if have != want:
            raise ValueError(f"{adapter_dir} was trained on a base initialised with (init, loftq_iters, seed)={want}, "
                             f"this model's is {have}: its frozen weights differ")


def _check_base(model: nn.Module, sidecar: dict | None, adapter_dir: Path) -> None:
    wanted = (sidecar or {}).get("base_model_type")
    have = getattr(getattr(model, "config", None), "model_type", None)
    if wanted and have and wanted != have:
        raise ValueError(f"{adapter_dir} was trained on a {wanted!r} model but this model is {have!r} (wrong base)")


def _copy_factors(layers: dict, by_module: dict, tensors: dict, path: Path) -> None:
    pairs = []
    for name, layer in layers.items():
        for part, key in by_module[name].items():
            target = layer.lora_magnitude_vector if part == MAGNITUDE else getattr(layer, part).weight
            pairs.append((f"{name}.{part}", target, tensors[key]))
    _copy_all(pairs, path)


def _copy_saved(model: nn.Module, saved: dict, tensors: dict, path: Path) -> None:
    pairs = []
    for name, params in saved.items():
        module = model.get_submodule(name)
        for leaf, key in params.items():
            pairs.append((f"{name}.{leaf}", getattr(module, leaf), tensors[key]))
    _copy_all(pairs, path)


def _copy_all(pairs: list, path: Path) -> None:
    wrong = [f"{name}: file {tuple(value.shape)} vs model {tuple(target.shape)}"
             for name, target, value in pairs if tuple(value.shape) != tuple(target.shape)]
    if wrong:
        raise ValueError(f"{path}: shape mismatches (wrong base model or rank?): {wrong[:20]}")
    for _, target, value in pairs:
        copy_into_(target, value)


def _set_scaling(layers: dict, lora) -> None:
    for name, layer in layers.items():
        _, layer.alpha = lora.rank_and_alpha(name)
        layer.use_rslora = lora.use_rslora
        layer.scaling = replace(lora, r=layer.r, alpha=layer.alpha).scaling   # LoraConfig says how, once
