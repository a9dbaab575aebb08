"""transformers' own checkpoint conversions (renames, per-expert tensors fused into 3-D stacks), applied while streaming.

transformers 5 builds a mixture of experts as fused 3-D parameters (`mlp.experts.gate_up_proj`)
while hub checkpoints, and `save_pretrained` itself, store one tensor per expert
(`mlp.experts.3.up_proj.weight`; Mixtral's `block_sparse_moe.experts.3.w1.weight`). Its
loader converts them with per-model `WeightConverter`s (`transformers/conversion_mapping.py`).
This module reuses those very converters, one target at a time: each checkpoint key is
renamed up front (no tensor read), the keys that feed one fused target are counted, and the
converter runs as soon as its last source tensor has been read. So only the tensors of one
target (one layer's experts) wait in memory, never the float model.

Where the caller can take a fused stack one expert at a time (`sliced`), and the converter
only stacks the experts and joins each expert's own tensors (MergeModulelist on dim 0, then
Concatenate on another dim: every MoE converter of transformers 5.25), the same converter runs
on each expert's tensors as soon as they have arrived, and hands out a (1, ...) slice of the
target. Fusing a whole layer first held its float experts three times over at the peak (the
stacked gate, the stacked up and their concatenation).
"""

from __future__ import annotations

import copy
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn


@dataclass
class _Group:
    """The checkpoint tensors that one converter fuses into one model key."""

    converter: object                              # a fresh copy of transformers' WeightConverter
    sources: dict[str, str] = field(default_factory=dict)        # checkpoint key -> its source pattern
    arrived: dict[str, torch.Tensor] = field(default_factory=dict)
    expert_of: dict[str, int] | None = None        # checkpoint key -> its expert, where converted expert by expert
    experts: int = 0                               # how many experts the target stacks (with expert_of)


@dataclass
class Converted:
    """A model tensor a conversion produced: the whole of `key`, or expert `expert`'s (1, ...) slice of it."""

    key: str
    tensor: torch.Tensor
    expert: int | None = None    # None: the whole tensor
    experts: int = 0             # how many experts the stack holds (with `expert`)


class CheckpointConversions:
    """Maps checkpoint keys to model keys with transformers' conversions; fuses grouped tensors when complete."""

    def __init__(self, model: nn.Module, checkpoint_keys: list[str], expected: set[str],
                 sliced: Callable[[str], bool] = lambda key: False) -> None:
        """`sliced(model_key)`: whether the caller takes that fused target one expert at a time."""
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightConverter, WeightRenaming, dot_natural_key, rename_source_key

        self.model = model
        self._natural_key = dot_natural_key
        transforms = get_model_conversion_mapping(model) if hasattr(model, "config") else []
        renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
        converters = [t for t in transforms if isinstance(t, WeightConverter)]
        by_pattern = {pattern: converter for converter in converters for pattern in converter.source_patterns}
        present = dict.fromkeys(expected, True)   # rename_source_key asks `.get(key) is not None`
        prefix = getattr(model, "base_model_prefix", None) or None
        self.direct: dict[str, str] = {}          # checkpoint key -> model key (renamed or not)
        self.groups: dict[str, _Group] = {}       # model key -> the group that produces it
        self.group_of: dict[str, str] = {}        # checkpoint key -> model key of its group
        for key in checkpoint_keys:
            renamed, pattern = rename_source_key(key, renamings, converters, prefix, present)
            if renamed not in expected and key in expected:
                renamed, pattern = key, None
            if pattern is None:
                self.direct[key] = renamed
                continue
            group = self.groups.get(renamed)
            if group is None:
                group = self.groups[renamed] = _Group(copy.deepcopy(by_pattern[pattern]))
            group.sources[key] = pattern
            self.group_of[key] = renamed
        for target, group in self.groups.items():
            if sliced(target) and _per_expert(group.converter):
                group.expert_of = _expert_indices(group.sources, dot_natural_key)
                group.experts = len(group.sources) // len(set(group.sources.values()))

    def model_key(self, checkpoint_key: str) -> str | None:
        """Where an unconverted checkpoint tensor goes (None: it feeds a group, or nothing)."""
        return self.direct.get(checkpoint_key)

    def feeds_group(self, checkpoint_key: str) -> bool:
        return checkpoint_key in self.group_of

    def add(self, checkpoint_key: str, tensor: torch.Tensor) -> list[Converted]:
        """Hand one tensor of a group in; returns what it completes: the converted model tensors, or one expert's
        slice of a target converted expert by expert ([] while its other tensors are still to come)."""
        target = self.group_of[checkpoint_key]
        group = self.groups[target]
        group.arrived[checkpoint_key] = tensor
        if group.expert_of is not None:
            return self._add_to_slice(target, group, checkpoint_key)
        if len(group.arrived) < len(group.sources):
            return []
        per_pattern = Counter(group.sources.values())
        if len(set(per_pattern.values())) > 1:
            raise ValueError(f"{target} is fused from {dict(per_pattern)} tensors per source pattern: the checkpoint "
                             "lacks some of them (truncated or incomplete)")
        # transformers sorts keys naturally before collecting (expert 2 before expert 10): so do we.
        converted = self._convert(target, group, sorted(group.arrived, key=self._natural_key))
        del self.groups[target]
        return [Converted(name, tensor) for name, tensor in converted.items()]

    def _add_to_slice(self, target: str, group: _Group, checkpoint_key: str) -> list[Converted]:
        """Convert expert e's tensors once each source pattern's e-th one (in natural order) has arrived."""
        expert = group.expert_of[checkpoint_key]
        keys = [key for key in group.arrived if group.expert_of[key] == expert]
        if len(keys) < len(set(group.sources.values())):
            return []
        converted = self._convert(target, group, sorted(keys, key=self._natural_key))
        for key in keys:
            del group.sources[key]
        if not group.sources:
            del self.groups[target]
        return [Converted(name, tensor, expert, group.experts) for name, tensor in converted.items()]

    def _convert(self, target: str, group: _Group, keys: list[str]) -> dict[str, torch.Tensor]:
        """Run the group's converter on `keys` (taken out of `arrived`)."""
        for key in keys:
            group.converter.add_tensor(target, key, group.sources[key], group.arrived.pop(key))
        try:
            converted = group.converter.convert(target, model=self.model, config=getattr(self.model, "config", None))
        except (RuntimeError, ValueError) as err:
            raise ValueError(f"{target}: transformers' conversion of its checkpoint tensors failed ({err}); the "
                             "checkpoint does not match its config") from None
        return {name: value[0] if isinstance(value, list) else value for name, value in converted.items()}

    def incomplete(self) -> list[str]:
        """Model keys whose source tensors did not all arrive (a truncated checkpoint)."""
        return sorted(self.groups)


def _per_expert(converter) -> bool:
    """Whether `converter` acts on each expert alone: it stacks the experts on dim 0 (MergeModulelist) and then
    only joins each expert's tensors along another dim (Concatenate), so converting expert by expert gives the
    slices of converting them all."""
    from transformers.core_model_loading import Concatenate, MergeModulelist

    first, *rest = converter.operations or [None]
    return (isinstance(first, MergeModulelist) and first.dim == 0
            and all(type(op) is Concatenate and op.dim != 0 for op in rest))


def _expert_indices(sources: dict[str, str], natural_key) -> dict[str, int] | None:
    """Checkpoint key -> its expert: its place among its source pattern's keys in natural order, the order
    transformers stacks them in; None when the patterns have different counts (a truncated checkpoint,
    reported when the group stays incomplete)."""
    by_pattern: dict[str, list[str]] = {}
    for key, pattern in sources.items():
        by_pattern.setdefault(pattern, []).append(key)
    if len({len(keys) for keys in by_pattern.values()}) != 1:
        return None
    return {key: index for keys in by_pattern.values() for index, key in enumerate(sorted(keys, key=natural_key))}
