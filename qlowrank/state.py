"""QlowrankState: everything qlowrank knows about a model, kept in one object on one attribute.

Loading, surgery, adapters and export each learn something about a model (how its base was
quantized, where it came from, which adapter it carries). They record it here rather than
in loose attributes, so one place says what qlowrank remembers and every reader finds it
under the same name: `state_of(model)`. That holds for its layers too: what qlowrank has
patched on a decoder block (`model.patches`), the LoftQ / PiSSA factors on their way from
quantizing to `add_lora`, and the dtype hooks of a trainable copy are recorded here, not on
the modules.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .config import LoraConfig, QuantConfig

ATTRIBUTE = "qlowrank_state"


@dataclass
class QlowrankState:
    """What qlowrank knows about one model; every field is optional until the step that sets it."""

    quant: QuantConfig | None = None        # how load_model stored the base (None: not loaded by qlowrank)
    source: dict | None = None              # where the base came from: id, path, gguf_file, format
    lora: LoraConfig | None = None          # the adapter add_lora applied
    seed: int = 0                           # what the LoRA init and LoftQ / PiSSA SVDs were seeded with
    modules_to_save: list[str] = field(default_factory=list)        # trained whole, in float32
    trainable_tokens: dict[str, list[int]] = field(default_factory=dict)  # module -> new-token rows it trains
    tokenizer: Any = None                   # the tokenizer enlarged by add_tokens (saved with the adapter)
    patches: dict[nn.Module, Any] = field(default_factory=dict)     # block -> model.patches.BlockPatches
    # layer name -> its LoftQ / PiSSA (A, B), from quantizing until add_lora puts them in the LoraLinear
    init_factors: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    dtype_hooks: dict[str, tuple[Any, Any]] = field(default_factory=dict)  # trainable copy -> its cast hooks' handles


def state_of(model: nn.Module) -> QlowrankState:
    """The model's QlowrankState, created empty on first use."""
    state = model.__dict__.get(ATTRIBUTE)
    if state is None:
        state = QlowrankState()
        model.__dict__[ATTRIBUTE] = state   # a plain attribute: not a submodule, parameter or buffer
    return state
