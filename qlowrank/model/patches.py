"""Per-block patches that compose: a stack of forward wrappers per block, and forward hooks kept by handle.

Checkpointing and compile each replace a decoder block's forward with a wrapper around the
forward below it; heap trimming adds a forward hook. Patched by hand, each would have to know
the others: undoing checkpointing by deleting `block.forward` also threw a compiled forward
away. Here what a block carries is recorded in `state_of(model).patches`, never on the block,
and every change rebuilds the block's forward from the one it had before any patch, wrappers
applied in WRAP_ORDER (innermost first). So each patch comes off alone, in any order of
installing and removing, and takes nothing else with it; the wrappers above a removed one are
re-applied around what is left.

Forward hooks run in the module's `__call__`, outside whatever forward is installed, so they
need no order: each is its handle, kept by name with the patches that asked for it (heap trims
come from `enable_gradient_checkpointing` and from the Trainer), and removed with the last of them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from torch import nn
from torch.utils.hooks import RemovableHandle

from ..state import state_of

# Forward wrappers from the block outwards, whichever was installed first. Compile sits outside the
# checkpoint, where `compile_blocks` after `enable_gradient_checkpointing` always put it. With torch
# 2.13 and transformers 5.25 dynamo breaks the graph at the checkpoint there (transformers' output
# hooks mutate a variable inside it) and the block runs eagerly; inside the checkpoint it compiles
# (benchmarks/compile_order.py). Timed at SmolLM2-135M's width (compile_speed.py), compiled inside the
# checkpoint was slower than eager on 2 shared cores, so the order stays.
WRAP_ORDER = ("checkpoint", "compile")

Wrap = Callable[[Callable], Callable]   # the forward below -> the forward that wraps it


@dataclass
class Hook:
    """One forward hook on a block and the patches that asked for it."""

    handle: RemovableHandle
    owners: set[str]


@dataclass
class BlockPatches:
    """What qlowrank has patched on one block."""

    base: Callable | None                                   # the block's instance forward before any wrapper (None: its class's)
    wraps: dict[str, Wrap] = field(default_factory=dict)    # patch name -> wrapper factory
    hooks: dict[str, Hook] = field(default_factory=dict)    # hook name -> the hook
    installed: Callable | None = None                       # the instance forward the last rebuild left


def wrap_forward(model: nn.Module, block: nn.Module, name: str, wrap: Wrap) -> bool:
    """Add wrapper `name` (one of WRAP_ORDER) to `block`'s forward; False if it is there already."""
    if name not in WRAP_ORDER:
        raise ValueError(f"unknown block patch {name!r}: forward wrappers are {', '.join(WRAP_ORDER)}")
    patches = _patches_of(model, block)
    if name in patches.wraps:
        return False
    patches.wraps[name] = wrap
    _rebuild(block, patches)
    return True


def unwrap_forward(model: nn.Module, block: nn.Module, name: str) -> bool:
    """Take wrapper `name` off `block`'s forward, keeping the others; False if it was not there."""
    patches = state_of(model).patches.get(block)
    if patches is None or name not in patches.wraps:
        return False
    del patches.wraps[name]
    _rebuild(block, patches)
    _forget_if_bare(model, block, patches)
    return True


def hook_forward(model: nn.Module, block: nn.Module, name: str, hook: Callable, owner: str) -> bool:
    """Have `block` run forward hook `name` (`hook`, registered once) on behalf of patch `owner`;
    False if `owner` had asked for it already."""
    patches = _patches_of(model, block)
    if name not in patches.hooks:
        patches.hooks[name] = Hook(block.register_forward_hook(hook), set())
    owners = patches.hooks[name].owners
    added = owner not in owners
    owners.add(owner)
    return added


def unhook_forward(model: nn.Module, block: nn.Module, name: str, owner: str) -> bool:
    """Withdraw `owner`'s request for `block`'s forward hook `name`, removing the hook with the last
    request; False if `owner` had not asked for it."""
    patches = state_of(model).patches.get(block)
    if patches is None or owner not in getattr(patches.hooks.get(name), "owners", ()):
        return False
    patches.hooks[name].owners.discard(owner)
    if not patches.hooks[name].owners:
        patches.hooks.pop(name).handle.remove()
        _forget_if_bare(model, block, patches)
    return True


def patched_blocks(model: nn.Module, name: str) -> list[nn.Module]:
    """The blocks of `model` that carry patch `name` (a wrapper or a hook)."""
    return [block for block, patches in state_of(model).patches.items()
            if name in patches.wraps or name in patches.hooks]


def applied_patches(model: nn.Module) -> dict[str, tuple[str, ...]]:
    """Each patched block's path in `model` -> its patches: wrappers innermost first, then hooks."""
    table = state_of(model).patches
    return {path: tuple(_ordered(table[block].wraps)) + tuple(table[block].hooks)
            for path, block in model.named_modules() if block in table}


def _patches_of(model: nn.Module, block: nn.Module) -> BlockPatches:
    table = state_of(model).patches
    if block not in table:
        table[block] = BlockPatches(base=block.__dict__.get("forward"))
        table[block].installed = table[block].base
    return table[block]


def _ordered(wraps: dict[str, Wrap]) -> list[str]:
    return sorted(wraps, key=WRAP_ORDER.index)


def _rebuild(block: nn.Module, patches: BlockPatches) -> None:
    if block.__dict__.get("forward") is not patches.installed:
        raise RuntimeError(f"the forward of this {type(block).__name__} was replaced after qlowrank patched it, so "
                           "its patches cannot be rebuilt without dropping that replacement: undo it first")
    if patches.base is None:
        block.__dict__.pop("forward", None)   # the class's forward is back
    else:
        block.forward = patches.base
    forward = block.forward
    for name in _ordered(patches.wraps):
        forward = patches.wraps[name](forward)
    if patches.wraps:
        block.forward = forward
    patches.installed = block.__dict__.get("forward")


def _forget_if_bare(model: nn.Module, block: nn.Module, patches: BlockPatches) -> None:
    if not patches.wraps and not patches.hooks:
        del state_of(model).patches[block]
