"""transformers' own checkpoint conversions (renames, per-expert tensors fused into 3-D stacks), applied while streaming.

transformers 5 builds a mixture of experts as fused 3-D parameters (`mlp.experts.gate_up_proj`)
while hub checkpoints, and `save_pretrained` itself, store one tensor per expert
(`mlp.experts.3.up_proj.weight`; Mixtral's `block_sparse_moe.experts.3.w1.weight`). Its
loader converts them with per-model `WeightConverter`s (`transformers/conversion_mapping.py`).
This module reuses those very converters, one target at a time: each checkpoint key is
renamed up front (no tensor read), the keys that feed one fused target are counted, and the
converter runs as soon as its last source tensor has been read. So only the tensors of one
target (one layer's experts) wait in memory, never the float model.
"""

from __future__ import annotations

import copy
from collections import Counter
from dataclasses import dataclass, field

import torch
from torch import nn


@dataclass
class _Group:
    """The checkpoint tensors that one converter fuses into one model key."""

    converter: object                              # a fresh copy of transformers' WeightConverter
    sources: dict[str, str] = field(default_factory=dict)        # checkpoint key -> its source pattern
    arrived: dict[str, torch.Tensor] = field(default_factory=dict)


class CheckpointConversions:
    """Maps checkpoint keys to model keys with transformers' conversions; fuses grouped tensors when complete."""

    def __init__(self, model: nn.Module, checkpoint_keys: list[str], expected: set[str]) -> None:
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

    def model_key(self, checkpoint_key: str) -> str | None:
        """Where an unconverted checkpoint tensor goes (None: it feeds a group, or nothing)."""
        return self.direct.get(checkpoint_key)

    def feeds_group(self, checkpoint_key: str) -> bool:
        return checkpoint_key in self.group_of

    def add(self, checkpoint_key: str, tensor: torch.Tensor) -> dict[str, torch.Tensor]:
        """Hand one tensor of a group in; returns the converted model tensors once the group is complete, else {}."""
        target = self.group_of[checkpoint_key]
        group = self.groups[target]
        group.arrived[checkpoint_key] = tensor
        if len(group.arrived) < len(group.sources):
            return {}
        per_pattern = Counter(group.sources.values())
        if len(set(per_pattern.values())) > 1:
            raise ValueError(f"{target} is fused from {dict(per_pattern)} tensors per source pattern: the checkpoint "
                             "lacks some of them (truncated or incomplete)")
        # transformers sorts keys naturally before collecting (expert 2 before expert 10): so do we.
        for key in sorted(group.arrived, key=self._natural_key):
            group.converter.add_tensor(target, key, group.sources[key], group.arrived[key])
        group.arrived.clear()
        del self.groups[target]
        try:
            converted = group.converter.convert(target, model=self.model, config=getattr(self.model, "config", None))
        except (RuntimeError, ValueError) as err:
            raise ValueError(f"{target}: transformers' conversion of its checkpoint tensors failed ({err}); the "
                             "checkpoint does not match its config") from None
        return {name: value[0] if isinstance(value, list) else value for name, value in converted.items()}

    def incomplete(self) -> list[str]:
        """Model keys whose source tensors did not all arrive (a truncated checkpoint)."""
        return sorted(self.groups)
