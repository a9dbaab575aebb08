"""LoRA on fused MoE experts in PEFT's `target_parameters` file layout, both ways.

PEFT wraps each targeted 3-D parameter of a module in a `ParamWrapper`; several targeted
parameters of one module nest, the first defined innermost. So for a Qwen3-MoE experts
module with both projections targeted the keys are

    base_model.model.<experts>.base_layer.lora_A.weight     # gate_up_proj (defined first)
    base_model.model.<experts>.lora_A.weight                # down_proj

with lora_A (r*E, in) and lora_B (out, r*E), the layout `nn/experts.py` trains in, so the
tensors are written and read as they are.
"""

from __future__ import annotations

import re

import torch
from torch import nn

from ..nn.experts import FrozenExperts
from .files import FACTORS, KEY_PREFIX


def adapted_projections(model: nn.Module) -> dict[str, list[str]]:
    """{experts module path: its projections that carry LoRA, in definition order}."""
    found = {}
    for name, module in model.named_modules():
        if isinstance(module, FrozenExperts):
            adapted = [p for p in module.order if getattr(module, p).r]
            if adapted:
                found[name] = adapted
    return found


def expert_keys(model: nn.Module) -> dict[tuple[str, str, str], str]:
    """{(experts path, projection, factor): PEFT key} for every adapted expert projection."""
    keys = {}
    for name, projections in adapted_projections(model).items():
        for depth, projection in enumerate(projections):
            nesting = "base_layer." * (len(projections) - 1 - depth)
            for factor in FACTORS:
                keys[(name, projection, factor)] = f"{KEY_PREFIX}{name}.{nesting}{factor}.weight"
    return keys


def expert_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """The experts' LoRA factors under PEFT's keys, float32 on the CPU."""
    return {key: getattr(getattr(model.get_submodule(name), projection), factor).detach().float().cpu().contiguous()
            for (name, projection, factor), key in expert_keys(model).items()}


def target_parameter_names(model: nn.Module) -> list[str]:
    """PEFT's `target_parameters`: each adapted projection's path from its first part after a layer index."""
    names = set()
    for name, projections in adapted_projections(model).items():
        tail = re.split(r"(?:^|\.)\d+\.", name)[-1]   # model.layers.3.mlp.experts -> mlp.experts
        names.update(f"{tail}.{projection}" for projection in projections)
    return sorted(names)


def is_expert_key(key: str, experts_paths: set[str]) -> bool:
    """Whether an adapter key belongs to a ParamWrapper on one of these experts modules."""
    body = key.removeprefix(KEY_PREFIX)
    stem = re.sub(r"\.(lora_A|lora_B)(\.default)?\.weight$", "", body)
    while stem.endswith(".base_layer"):
        stem = stem[: -len(".base_layer")]
    return stem in experts_paths and stem != body


def copy_expert_factors(model: nn.Module, tensors: dict[str, torch.Tensor], path) -> None:
    """Copy PEFT-layout expert factors from `tensors` into the model's adapted projections.

    Raises:
        ValueError: a factor is missing or has another shape (wrong base, rank or targets).
    """
    expected = expert_keys(model)
    known = set(expected.values()) | {key.replace(".weight", ".default.weight") for key in expected.values()}
    problems = [f"{key} is not an adapted expert projection of this model" for key in tensors if key not in known]
    with torch.no_grad():
        for (name, projection, factor), key in expert_keys(model).items():
            target = getattr(getattr(model.get_submodule(name), projection), factor)
            value = tensors.get(key, tensors.get(key.replace(".weight", ".default.weight")))
            if value is None:
                problems.append(f"{key} missing")
            elif tuple(value.shape) != tuple(target.shape):
                problems.append(f"{key}: file {tuple(value.shape)} vs model {tuple(target.shape)}")
            else:
                target.copy_(value.to(device=target.device, dtype=target.dtype))
    if problems:
        raise ValueError(f"{path}: the expert LoRA factors do not match this model: {problems[:10]}")
