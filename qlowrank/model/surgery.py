"""Model surgery: quantize linear layers, wrap targets with LoraLinear, freeze the rest.

`quantize_model` and `add_lora` work in place on any nn.Module, transformers' or hand-made.
The dispatch is one short table (first match wins): layer type -> how to wrap it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import re
from dataclasses import dataclass
from typing import Iterator, Sequence

import torch
from torch import nn

from ..config import LoraConfig, QuantConfig
from ..nn import quant as quantlib
from ..nn.experts import ExpertWeights, FrozenExperts, expert_projections, freeze_experts, is_fused_experts
from ..nn.init import layer_generator, quantize_with_init  # noqa: F401  (layer_generator: public here too)
from ..nn.layers import is_conv1d
from ..nn.lora import LoraLinear
from ..nn.router import LoraRouter, moe_routers
from ..state import state_of
from .structure import inside_lora, linear_layers, name_matches, output_head_names, set_submodule


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


def quantize_model(
    model: nn.Module,
    quant: QuantConfig,
    skip: Sequence[str] = (),
    device: torch.device | str | None = None,
    lora: LoraConfig | None = None,
    seed: int | None = None,
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
        lora: with `init="loftq"` / `"pissa"`, each LoRA target is initialised from its float
            weight as it is quantized (call `add_lora(model, lora)` next to attach the factors).
        seed: seed of those initialisations' randomized SVDs (None: 0).

    Returns:
        The same model, for chaining.
    """
    if quant.bits is None:
        return model
    keep = output_head_names(model)
    # Hold names, not modules, so each float weight is freed as soon as it is replaced.
    for name in [name for name, _ in linear_layers(model)]:
        module = model.get_submodule(name)
        if quantlib.is_quantized_linear(module) or name in keep or name_matches(name, skip):
            continue
        if module.weight.is_meta:
            raise ValueError(f"cannot quantize {name}: its weight is on the meta device (load real weights first)")
        target = torch.device(device) if device is not None else module.weight.device
        weight = module.weight.t() if is_conv1d(module) else module.weight  # (out, in)
        new, factors = quantize_layer(name, weight, module.bias, quant, target, lora, keep, seed)
        if factors is not None:
            state_of(model).init_factors[name] = factors
        new.fan_in_fan_out = is_conv1d(module)
        new.train(module.training)
        set_submodule(model, name, new)
        del module
    for name in [name for name, module in model.named_modules() if is_fused_experts(module)]:
        module = model.get_submodule(name)
        if name_matches(name, skip):
            continue
        target = torch.device(device) if device is not None else module.down_proj.device
        set_submodule(model, name, freeze_experts(module, quant, target, module.down_proj.dtype))
        del module
    return model


def quantize_layer(name: str, weight: torch.Tensor, bias: torch.Tensor | None, quant: QuantConfig,
                   device: torch.device, lora: LoraConfig | None, heads: set[str],
                   seed: int | None = None) -> tuple[nn.Module, tuple[torch.Tensor, torch.Tensor] | None]:
    """One frozen quantized layer from its float (out, in) weight, and its LoftQ / PiSSA (A, B) when it is a
    target of such an init (None otherwise): the caller records them in `state_of(model).init_factors`."""
    if lora is not None and lora.init in ("loftq", "pissa") and _is_target(name, lora, heads):
        return quantize_with_init(weight, bias, quant, lora.layer_config(name), device, layer_generator(seed or 0, name))
    return quantlib.quantize_linear(weight, bias, quant, device), None


def _is_target(name: str, lora: LoraConfig, heads: set[str]) -> bool:
    if name_matches(name, lora.exclude_modules):
        return False
    if lora.target_modules == "all-linear":
        return name not in heads
    if isinstance(lora.target_modules, str):
        return re.fullmatch(lora.target_modules, name) is not None
    return name_matches(name, lora.target_modules)


def add_lora(model: nn.Module, lora: LoraConfig, seed: int | None = None) -> nn.Module:
    """Wrap the target linear layers with LoraLinear and freeze every other parameter.

    Each layer gets its own r / alpha from `lora.rank_pattern` / `alpha_pattern`; the
    modules named in `lora.modules_to_save` become trainable float32 copies (a module tied
    to another one, such as an lm_head sharing the input embeddings, is untied first).

    Args:
        model: any module with linear layers (quantized or not).
        lora: rank, alpha, targets, init, DoRA, patterns, modules to save.
        seed: makes the random A factors reproducible: each layer draws from its own CPU
            generator seeded by (seed, layer name), so a layer's init does not depend on
            which other layers are targeted, on the device, or on torch's global RNG.
            None draws from torch's global generator. It also seeds a PiSSA SVD on a float
            base (None: 0); LoftQ / PiSSA on a quantized base are computed while quantizing
            (`quantize_model(..., lora=...)`, `load_model`).

    Raises:
        ValueError: a target name or regex matches no linear layer (the message lists the
            linear layer names that exist), or the model already has LoRA layers.
    """
    if any(isinstance(m, (LoraLinear, LoraRouter)) for m in model.modules()):
        raise ValueError("this model already has LoRA layers; load an adapter with load_adapter instead of add_lora twice")
    heads = output_head_names(model)
    candidates = linear_layers(model)
    targets = [(name, module) for name, module in candidates if _is_target(name, lora, heads)]
    _check_targets_found(lora, candidates, targets)
    for param in model.parameters():
        param.requires_grad_(False)
    saved = _modules_to_save(model, lora, {name for name, _ in targets})
    factors = state_of(model).init_factors
    for name, module in targets:
        wrapped = LoraLinear(module, lora.layer_config(name), name=name, seed=seed, init_factors=factors.pop(name, None))
        wrapped.train(module.training)
        set_submodule(model, name, wrapped)
    factors.clear()   # factors of layers this adapter does not target are of no use now
    for name in saved:
        make_trainable_copy(model, name)
    _add_parameter_lora(model, lora, seed)
    state_of(model).lora = lora
    state_of(model).modules_to_save = saved
    state_of(model).seed = 0 if seed is None else seed   # what the init SVDs were seeded with
    return model


def _expert_matches(model: nn.Module, patterns: Sequence[str]) -> list[tuple[str, set[str]]]:
    """(`<experts>.<projection>`, the patterns naming it) for each fused expert parameter some pattern names."""
    found = []
    for name, module in model.named_modules():
        if isinstance(module, FrozenExperts):
            projections = list(module.order)
        elif is_fused_experts(module):
            projections = expert_projections(module)
        else:
            continue
        for projection in projections:
            path = f"{name}.{projection}"
            hits = {p for p in patterns if p == "experts" or name_matches(path, [p])}
            if hits:
                found.append((path, hits))
    return found


def _router_matches(model: nn.Module, patterns: Sequence[str]) -> list[tuple[str, set[str]]]:
    # PEFT names a router by its parameter (`mlp.gate.weight`), so a pattern matches `<router>.weight`.
    found = []
    for path in moe_routers(model):
        hits = {p for p in patterns if p == "router" or name_matches(f"{path}.weight", [p])}
        if hits:
            found.append((path, hits))
    return found


def _add_parameter_lora(model: nn.Module, lora: LoraConfig, seed: int | None) -> None:
    """LoRA on what `target_parameters` names: fused expert stacks (ExpertWeights) and router weights (LoraRouter)."""
    if not lora.target_parameters:
        return
    experts, routers = _expert_matches(model, lora.target_parameters), _router_matches(model, lora.target_parameters)
    named = set().union(*(hits for _, hits in experts + routers))
    unmatched = [p for p in lora.target_parameters if p not in named]
    if unmatched:
        raise ValueError(f"LoraConfig.target_parameters {unmatched} matched no fused MoE expert parameter nor router "
                         "weight of this model (they are named like 'mlp.experts.gate_up_proj' and 'mlp.gate.weight'; "
                         "'experts' means every expert projection, 'router' every router)")
    for path, _ in experts:
        experts_name, _, projection = path.rpartition(".")
        module = model.get_submodule(experts_name)
        if not isinstance(module, FrozenExperts):  # a float base: the same module, its stacks kept in float
            module = freeze_experts(module, None, module.down_proj.device, module.down_proj.dtype)
            set_submodule(model, experts_name, module)
        weights: ExpertWeights = getattr(module, projection)
        weights.add_lora(lora.layer_config(path), None if seed is None else layer_generator(seed, path))
    for path, _ in routers:
        generator = None if seed is None else layer_generator(seed, path)
        set_submodule(model, path, LoraRouter(model.get_submodule(path), lora.layer_config(f"{path}.weight"), generator))


def router_layers(model: nn.Module) -> Iterator[tuple[str, LoraRouter]]:
    """(name, router) for every LoraRouter in the model."""
    for name, module in model.named_modules():
        if isinstance(module, LoraRouter):
            yield name, module


def random_adapted_model(config, quant: QuantConfig, lora: LoraConfig, dtype: torch.dtype,
                         device: torch.device | str = "cpu") -> nn.Module:
    """A randomly initialised model of a transformers `config`, quantized and adapted as a run with
    `quant` and `lora` would be: the stand-in whose steps cost what the run's do (timing, calibration).
    The factors start plain: LoftQ / PiSSA change their values, not the work or the bytes."""
    import transformers

    model = transformers.AutoModelForCausalLM.from_config(config, dtype=dtype).to(device)
    if quant.bits is not None:
        quantize_model(model, quant)
    add_lora(model, dataclasses.replace(lora, init="kaiming", loftq_iters=1), seed=0)
    return model


def _modules_to_save(model: nn.Module, lora: LoraConfig, targets: set[str]) -> list[str]:
    if not lora.modules_to_save:
        return []
    names = [name for name, _ in model.named_modules()
             if name and not inside_lora(name) and name_matches(name, lora.modules_to_save)]
    found = {p for p in lora.modules_to_save for name in names if name_matches(name, [p])}
    missing = [p for p in lora.modules_to_save if p not in found]
    if missing:
        raise ValueError(f"LoraConfig.modules_to_save {missing} matched no module of this model")
    both = sorted(set(names) & targets)
    if both:
        raise ValueError(f"{both} are both LoRA targets and modules_to_save; a module is adapted or trained "
                         "whole, not both: remove it from one of the two lists (exclude_modules for the targets)")
    return names


def make_trainable_copy(model: nn.Module, name: str) -> nn.Module:
    """Make one module (lm_head, embed_tokens, ...) fully trainable in float32, untied from any other module.

    A quantized linear layer is replaced by a float nn.Linear holding its dequantized weight.
    The module keeps its dtype at its boundary: inputs are cast to float32 and outputs back
    to the dtype its weight had, so a bf16 model around it is unchanged.
    """
    module = model.get_submodule(name)
    if quantlib.is_quantized_linear(module):
        weight = quantlib.dequantize_weight(module)  # (out, in) float32
        new = nn.Linear(weight.shape[1], weight.shape[0], bias=module.bias is not None, device="meta")
        new.weight = nn.Parameter(weight)
        if module.bias is not None:
            new.bias = nn.Parameter(module.bias.detach().float().clone())
        set_submodule(model, name, new)
        module, outer_dtype = new, getattr(model, "dtype", torch.float32)
    else:
        outer_dtype = next(module.parameters()).dtype
    shared = {id(p) for other_name, other in model.named_modules() if other_name != name
              for p in other.parameters(recurse=False)}
    for leaf, param in list(module.named_parameters(recurse=False)):
        if id(param) in shared or param.dtype != torch.float32:
            # A copy: training a tied lm_head must not move the input embeddings (PEFT's rule too).
            setattr(module, leaf, nn.Parameter(param.detach().float().clone()))
        getattr(module, leaf).requires_grad_(True)
    if any(id(p) in shared for p in module.parameters()) or _was_tied(model, name):
        model.config.tie_word_embeddings = False
    hooks = state_of(model).dtype_hooks
    if outer_dtype != torch.float32 and name not in hooks:
        hooks[name] = (module.register_forward_pre_hook(_to_float32),
                       module.register_forward_hook(lambda mod, args, out, dtype=outer_dtype: _cast_output(out, dtype)))
    return module


def _was_tied(model: nn.Module, name: str) -> bool:
    config = getattr(model, "config", None)
    if not getattr(config, "tie_word_embeddings", False):
        return False
    heads = output_head_names(model)
    inputs = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    is_input = inputs is not None and model.get_submodule(name) is inputs
    return name in heads or is_input


def _to_float32(module: nn.Module, args: tuple) -> tuple:
    return tuple(a.float() if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args)


def _cast_output(out, dtype: torch.dtype):
    return out.to(dtype) if isinstance(out, torch.Tensor) and out.is_floating_point() else out


def _check_targets_found(lora: LoraConfig, candidates: list, targets: list) -> None:
    existing = sorted({name.rsplit(".", 1)[-1] for name, _ in candidates})
    if not candidates:
        raise ValueError("add_lora found no linear layers (nn.Linear, Conv1D, bitsandbytes 4/8-bit) in this model")
    if isinstance(lora.target_modules, list):
        found = {p for p in lora.target_modules for name, _ in targets if name_matches(name, [p])}
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
    """Everything an adapter trains: the LoRA factors and DoRA magnitudes (the `lora_` prefix), the
    parameters of `modules_to_save`, and the rows of new tokens (`add_tokens`)."""
    saved = tuple(f"{name}." for name in state_of(model).modules_to_save)
    return [p for name, p in model.named_parameters()
            if ".lora_" in name or name.startswith("lora_") or name.endswith(".trainable_tokens_delta")
            or (saved and name.startswith(saved))]


def count_parameters(model: nn.Module) -> ParameterCount:
    """Total and trainable parameter counts, counting packed 4-bit weights as the weights they hold."""
    total = trainable = 0
    stacks: set[int] = set()
    for module in model.modules():
        if isinstance(module, ExpertWeights):   # a frozen stack's packed codes and scales hold weight_count() weights
            total += module.weight_count()
            stacks.update(id(tensor) for tensor in module.stored_tensors())
    for param in model.parameters():
        if id(param) in stacks:
            continue
        n = quantlib.weight_element_count(param)
        total += n
        if param.requires_grad:
            trainable += n
    return ParameterCount(total=total, trainable=trainable)


@contextlib.contextmanager
def disable_lora(model: nn.Module) -> Iterator[nn.Module]:
    """Inside the block the model computes its base outputs (every LoRA branch switched off)."""
    switches = [module for module in model.modules() if isinstance(module, (LoraLinear, LoraRouter, FrozenExperts))]
    previous = [module.disabled for module in switches]
    for module in switches:
        module.disabled = True
    try:
        yield model
    finally:
        for module, was in zip(switches, previous):
            module.disabled = was
