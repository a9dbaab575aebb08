"""Questions about a model's structure: its linear layers, output head, repeated blocks."""

from __future__ import annotations

from typing import Sequence

from torch import nn

from ..nn.layers import is_linear_like


def set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    """Replace the submodule at dotted path `name` with `new`."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def output_head_names(model: nn.Module) -> set[str]:
    """Names of the output projection (lm_head / decoder) that must stay unquantized and unwrapped."""
    heads: set[str] = set()
    get_head = getattr(model, "get_output_embeddings", None)
    head = get_head() if callable(get_head) else None
    if head is not None:
        heads.update(name for name, module in model.named_modules() if module is head)
    return heads


def name_matches(name: str, patterns: Sequence[str]) -> bool:
    """True when `name` is one of `patterns` or ends with ".<pattern>"."""
    # PEFT's rule: a listed name matches a module whose full path is it or ends with ".<it>".
    return any(name == p or name.endswith("." + p) for p in patterns)


def linear_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, layer) for every linear-like layer, not counting those inside a LoRA wrapper."""
    return [
        (name, module) for name, module in model.named_modules()
        if name and is_linear_like(module) and not inside_lora(name)
    ]


def inside_lora(name: str) -> bool:
    """True for a module path inside a LoRA wrapper (its factors or its wrapped base layer)."""
    parts = name.split(".")
    return any(part.startswith("lora_") or part == "base_layer" for part in parts)


def find_block_types(model: nn.Module) -> tuple[type, ...]:
    """The classes of the repeated blocks transformers lists in `_no_split_modules` (empty if none)."""
    # transformers names its repeated decoder/encoder blocks in `_no_split_modules`.
    names = set(getattr(model, "_no_split_modules", None) or [])
    return tuple({type(m) for m in model.modules() if type(m).__name__ in names})


def repeated_blocks(model: nn.Module, block_types: type | Sequence[type] | None = None, what: str = "") -> list[nn.Module]:
    """The model's repeated blocks (transformers' `_no_split_modules`, or `block_types`).

    Raises:
        ValueError: no block type was given and none could be found, or none matched.
    """
    what = what or "enable_gradient_checkpointing"
    if block_types is None:
        types = find_block_types(model)
        if not types:
            raise ValueError(f"{what} cannot find the repeated blocks of {type(model).__name__}; "
                             "pass block_types=<your block class>")
    else:
        types = tuple(block_types) if isinstance(block_types, (list, tuple)) else (block_types,)
    blocks = [m for m in model.modules() if isinstance(m, types)]
    if not blocks:
        raise ValueError(f"{what}: no module of type {[t.__name__ for t in types]} in {type(model).__name__}")
    return blocks
