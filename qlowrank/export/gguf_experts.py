"""How one exported tensor becomes GGUF tensors: most map one to one, fused MoE experts split into llama.cpp's ffn_*_exps.

transformers 5 holds a mixture of experts as fused 3-D stacks; llama.cpp's converter
(`convert_hf_to_gguf.py`) writes three 3-D tensors per layer, each (E, out, in) in torch
order (ne = [in, out, E]), named by the `gguf` package's map of the unfused projections:

- Qwen3-MoE, Mixtral, Qwen2-MoE, OLMoE: `gate_up_proj` (E, 2I, H) holds gate rows then up rows; they become
  `ffn_gate_exps` and `ffn_up_exps` (E, I, H); `down_proj` (E, H, I) is `ffn_down_exps` as it is.
- gpt-oss stores its stacks transposed, (E, H, 2I) and (E, I, H), with gate and up
  interleaved (gate at even columns) and a bias per expert: the converter transposes them and
  splits the even / odd rows (and bias entries) into `ffn_gate_exps` / `ffn_up_exps`, with
  `.bias` tensors (E, I) and `ffn_down_exps.bias` (E, H).

A parameter without a `.weight` / `.bias` suffix (the stacks, gpt-oss's attention `sinks`) is
named as a weight, as the converter names it. model/gguf_moe.py reads these layouts back.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from ..nn.experts import FrozenExperts


@dataclass(frozen=True)
class GgufPiece:
    """One GGUF tensor cut from one exported (merged, float32, transformers-layout) tensor."""

    name: str                                   # GGUF tensor name
    shape: tuple[int, ...]                      # torch order
    take: Callable[[torch.Tensor], torch.Tensor]  # the exported tensor -> this GGUF tensor's values


def _whole(tensor: torch.Tensor) -> torch.Tensor:
    return tensor


def experts_transposed(model: nn.Module, key: str) -> bool:
    """Whether the experts module that holds `key` stores its stacks (E, in, out) (gpt-oss)."""
    module = model.get_submodule(key.rpartition(".")[0])
    return module.layout.transposed if isinstance(module, FrozenExperts) else bool(getattr(module, "is_transposed", False))


def is_expert_stack(key: str) -> bool:
    """Whether `key` is a fused expert tensor (weights or per-expert biases) of transformers 5."""
    return ".experts." in key and key.rsplit(".", 1)[-1] in ("gate_up_proj", "down_proj", "gate_up_proj_bias",
                                                            "down_proj_bias", "up_proj", "up_proj_bias")


def expert_pieces(key: str, shape: tuple[int, ...], transposed: bool, name_of: Callable[[str], str]) -> list[GgufPiece]:
    """The GGUF tensors of one fused expert tensor; `name_of(hf_key)` is the `gguf` map's name of an unfused key."""
    module, _, leaf = key.rpartition(".")
    bias = leaf.endswith("_bias")
    suffix = ".bias" if bias else ".weight"
    projection = leaf.removesuffix("_bias")
    if projection == "up_proj":
        raise ValueError(f"GGUF export: {key} belongs to gate-less experts, which no llama.cpp layout written here has")
    if projection == "down_proj":
        out_shape = shape if bias or not transposed else (shape[0], shape[2], shape[1])
        take = _whole if bias or not transposed else _transposed
        return [GgufPiece(name_of(f"{module}.down_proj") + suffix, out_shape, take)]
    # gate_up_proj: (E, 2I, H) gate rows first, or gpt-oss's (E, H, 2I) / bias (E, 2I) interleaved.
    experts = shape[0]
    if bias:
        half = (experts, shape[1] // 2)
        gate, up = (lambda t: t[:, 0::2]), (lambda t: t[:, 1::2])
    elif transposed:
        half = (experts, shape[2] // 2, shape[1])
        gate, up = (lambda t: t.transpose(1, 2)[:, 0::2]), (lambda t: t.transpose(1, 2)[:, 1::2])
    else:
        rows = shape[1] // 2
        half = (experts, rows, shape[2])
        gate, up = (lambda t: t[:, :rows]), (lambda t: t[:, rows:])
    return [GgufPiece(name_of(f"{module}.gate_proj") + suffix, half, lambda t: gate(t).contiguous()),
            GgufPiece(name_of(f"{module}.up_proj") + suffix, half, lambda t: up(t).contiguous())]


def _transposed(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.transpose(1, 2).contiguous()   # (E, in, out) -> (E, out, in)
