"""LoRA on MoE parameters (fused experts, routers) in PEFT's `target_parameters` file layout, both ways.

PEFT wraps each targeted 3-D parameter of a module in a `ParamWrapper`; several targeted
parameters of one module nest, the first defined innermost. So for a Qwen3-MoE experts
module with both projections targeted the keys are

    base_model.model.<experts>.base_layer.lora_A.weight     # gate_up_proj (defined first)
    base_model.model.<experts>.lora_A.weight                # down_proj

with lora_A (r*E, in) and lora_B (out, r*E), the layout `nn/experts.py` trains in, so the
tensors are written and read as they are. A router's weight (E, H) is one 2-D ParamWrapper:

    base_model.model.<router>.lora_A.weight                 # (r, H)
    base_model.model.<router>.lora_B.weight                 # (E, r)
"""

from __future__ import annotations

import re

import torch
from torch import nn

from ..model.surgery import router_layers
from ..nn.experts import FrozenExperts
from .files import FACTORS, KEY_PREFIX, copy_into_


def adapted_projections(model: nn.Module) -> dict[str, list[str]]:
    """{experts module path: its projections that carry LoRA, in definition order}."""
    found = {}
    for name, module in model.named_modules():
        if isinstance(module, FrozenExperts):
            adapted = [p for p in module.order if getattr(module, p).r]
            if adapted:
                found[name] = adapted
    return found


def factor_owners(model: nn.Module) -> dict[str, tuple[str, str]]:
    """{PEFT key: (path of the module that holds the factor, "lora_A" | "lora_B")} for every adapted expert
    projection (`<experts>.<projection>`, an ExpertWeights) and router (a LoraRouter), in the model's order."""
    owners = {}
    for name, projections in adapted_projections(model).items():
        for depth, projection in enumerate(projections):
            nesting = "base_layer." * (len(projections) - 1 - depth)
            for factor in FACTORS:
                owners[f"{KEY_PREFIX}{name}.{nesting}{factor}.weight"] = (f"{name}.{projection}", factor)
    for name, _ in router_layers(model):   # one ParamWrapper per router: no nesting
        for factor in FACTORS:
            owners[f"{KEY_PREFIX}{name}.{factor}.weight"] = (name, factor)
    return owners


def factor_of(module: nn.Module, factor: str) -> nn.Parameter:
    """A module's LoRA factor: an ExpertWeights holds it as a parameter, a LoraLinear or LoraRouter as a Linear."""
    value = getattr(module, factor)
    return value.weight if isinstance(value, nn.Module) else value


def parameter_factors(model: nn.Module) -> dict[str, nn.Parameter]:
    """{PEFT key: factor} for every adapted expert projection and router, in the model's order."""
    return {key: factor_of(model.get_submodule(path), factor) for key, (path, factor) in factor_owners(model).items()}


def parameter_tensors(model: nn.Module, gathered: dict[str, dict[str, torch.Tensor]] | None = None
                      ) -> dict[str, torch.Tensor]:
    """The experts' and routers' LoRA factors under PEFT's keys, float32 on the CPU; `gathered`
    ({owner path: {"lora_A": A, "lora_B": B}}, FSDP's whole factors) replaces what the model holds."""
    out = {}
    for key, (path, factor) in factor_owners(model).items():
        value = gathered[path][factor] if gathered is not None else factor_of(model.get_submodule(path), factor)
        out[key] = value.detach().float().cpu().contiguous()
    return out


def parameter_ranks(model: nn.Module) -> dict[str, tuple[int, float]]:
    """{path PEFT matches rank_pattern against: (r, alpha)}: `<experts>.<projection>` and `<router>.weight`."""
    ranks = {f"{name}.{p}": (getattr(model.get_submodule(name), p).r, getattr(model.get_submodule(name), p).alpha)
             for name, projections in adapted_projections(model).items() for p in projections}
    ranks.update({f"{name}.weight": (router.r, router.alpha) for name, router in router_layers(model)})
    return ranks


def target_parameter_names(model: nn.Module) -> list[str]:
    """PEFT's `target_parameters`: each adapted parameter's path from its first part after a layer index."""
    # model.layers.3.mlp.experts.gate_up_proj -> mlp.experts.gate_up_proj; model.layers.3.mlp.gate.weight -> mlp.gate.weight
    return sorted({re.split(r"(?:^|\.)\d+\.", path)[-1] for path in parameter_ranks(model)})


def is_parameter_key(key: str, paths: set[str]) -> bool:
    """Whether an adapter key belongs to a ParamWrapper on one of these experts or router modules."""
    body = key.removeprefix(KEY_PREFIX)
    stem = re.sub(r"\.(lora_A|lora_B)(\.default)?\.weight$", "", body)
    while stem.endswith(".base_layer"):
        stem = stem[: -len(".base_layer")]
    return stem in paths and stem != body


def copy_parameter_factors(model: nn.Module, tensors: dict[str, torch.Tensor], path) -> None:
    """Copy PEFT-layout expert and router factors from `tensors` into the model's adapted parameters.

    Raises:
        ValueError: a factor is missing or has another shape (wrong base, rank or targets).
    """
    expected = parameter_factors(model)
    known = set(expected) | {key.replace(".weight", ".default.weight") for key in expected}
    problems = [f"{key} is not an adapted expert projection or router of this model" for key in tensors
                if key not in known]
    for key, target in expected.items():
        value = tensors.get(key, tensors.get(key.replace(".weight", ".default.weight")))
        if value is None:
            problems.append(f"{key} missing")
        elif tuple(value.shape) != tuple(target.shape):
            problems.append(f"{key}: file {tuple(value.shape)} vs model {tuple(target.shape)}")
    if problems:   # before anything is copied: a refused adapter leaves the model as it was
        raise ValueError(f"{path}: the expert / router LoRA factors do not match this model: {problems[:10]}")
    for key, target in expected.items():
        copy_into_(target, tensors.get(key, tensors.get(key.replace(".weight", ".default.weight"))))
