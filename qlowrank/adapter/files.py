"""The adapter directory's format: file names, PEFT's key layout, and validated readers.

An adapter directory holds what PEFT's `save_pretrained` writes and `PeftModel.from_pretrained`
reads: `adapter_config.json` (peft_type LORA, r, lora_alpha, target_modules, ...) and
`adapter_model.safetensors` with keys `base_model.model.<module path>.lora_A.weight` /
`.lora_B.weight` (A: (r, in), B: (out, r), also for GPT-2's Conv1D). qlowrank adds one
sidecar, `qlowrank_adapter.json`, recording how the base was quantized during training so
that an export can rebuild the same base; PEFT ignores it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from torch import nn

from ..config import LoraConfig
from ..model.load import open_safetensors
from ..model.tokens import DELTA
from ..nn.quant import quantized_bits
from .peft_format import adapter_lora_config, check_peft_config

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
QLOWRANK_SIDECAR = "qlowrank_adapter.json"
KEY_PREFIX = "base_model.model."
FACTORS = ("lora_A", "lora_B")
MAGNITUDE = "lora_magnitude_vector"   # DoRA's per-row magnitude, PEFT's key name
TOKEN_ADAPTER = "token_adapter"        # PEFT's key: <embedding>.token_adapter.trainable_tokens_delta


def base_bits(model: nn.Module) -> int | None:
    """4 or 8 when the model holds bitsandbytes layers (the larger if mixed), else None."""
    bits = {quantized_bits(m) for m in model.modules()} - {None}
    return max(bits) if bits else None


def read_adapter_config(adapter_dir: str | os.PathLike) -> tuple[dict, dict | None]:
    """(adapter_config.json, qlowrank sidecar or None) of an adapter directory, validated."""
    adapter_dir = Path(adapter_dir)
    path = adapter_dir / ADAPTER_CONFIG
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found; an adapter directory holds {ADAPTER_CONFIG} and {ADAPTER_WEIGHTS}")
    config = read_json_object(path)
    check_peft_config(config, path)
    _check_config_values(config, path)
    sidecar_path = adapter_dir / QLOWRANK_SIDECAR
    sidecar = read_json_object(sidecar_path) if sidecar_path.is_file() else None
    if sidecar is not None and not isinstance(sidecar.get("base_quant") or {}, dict):
        raise ValueError(f"{sidecar_path}: key 'base_quant' must be an object or null, got {sidecar['base_quant']!r:.80}")
    return config, sidecar


def read_json_object(path: Path) -> dict:
    """The JSON object in `path`; ValueError naming the file if it is not UTF-8, not JSON, or not an object."""
    try:
        value = json.loads(path.read_bytes().decode("utf-8-sig"))
    except UnicodeDecodeError as err:
        raise ValueError(f"{path} is not UTF-8 text (offset {err.start}: {err.reason})") from None
    except (ValueError, RecursionError) as err:   # JSONDecodeError is a ValueError
        raise ValueError(f"{path} is not valid JSON: {str(err) or 'nested too deeply'}") from None
    if not isinstance(value, dict):
        raise ValueError(f"{path} must hold a JSON object, got {type(value).__name__}")
    return value


# adapter_config.json keys qlowrank reads: (accepts, what to say when it does not).
_CONFIG_KEYS = {
    "r": (lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 1, "a positive integer", True),
    "lora_alpha": (lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and 0 < v < float("inf"),
                   "a positive number", False),
    "lora_dropout": (lambda v: v is None or (isinstance(v, (int, float)) and not isinstance(v, bool) and 0 <= v < 1),
                     "a number in [0, 1)", False),
    "use_rslora": (lambda v: isinstance(v, bool), "true or false", False),
    "fan_in_fan_out": (lambda v: isinstance(v, bool), "true or false", False),
}


def _check_config_values(config: dict, path: Path) -> None:
    for key, (accepts, wanted, required) in _CONFIG_KEYS.items():
        if key not in config:
            if required:
                raise ValueError(f"{path}: key {key!r} is missing; a LoRA adapter config records the rank")
            continue
        if not accepts(config[key]):
            raise ValueError(f"{path}: key {key!r} is {config[key]!r:.80}; it must be {wanted}")


def read_adapter_weights(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of an adapter_model.safetensors, checked: readable, 2-D floating point, finite."""
    if not path.is_file():
        if path.with_suffix(".bin").is_file():
            raise ValueError(f"{path.with_suffix('.bin')} is a pickle adapter; qlowrank reads {ADAPTER_WEIGHTS} only "
                             "(re-save it with a current PEFT, which writes safetensors)")
        raise FileNotFoundError(f"{path} not found")
    with open_safetensors(path) as handle:
        try:
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}
        except Exception as err:   # safetensors' own error type: a tensor's bytes do not fit its header
            raise ValueError(f"{path}: a tensor cannot be read ({err}); the file is corrupt") from None
    for key, tensor in tensors.items():
        vector = key.endswith((MAGNITUDE, ".bias"))   # DoRA magnitudes and modules_to_save biases are 1-D
        if not tensor.is_floating_point() or tensor.dim() != (1 if vector else 2):
            raise ValueError(f"{path}: {key} is a {tensor.dim()}-D {str(tensor.dtype).removeprefix('torch.')} "
                             f"tensor; it must be a {'1-D floating-point vector' if vector else '2-D floating-point matrix'}")
        if not torch.isfinite(tensor).all():
            bad = int((~torch.isfinite(tensor)).sum())
            raise ValueError(f"{path}: {key} holds {bad} NaN or inf values; the adapter is broken (a diverged run?)")
    return tensors


def split_keys(keys: list[str], saved_modules: list[str], path: Path) -> tuple[dict, dict, dict]:
    """({LoRA layer: {"lora_A" | "lora_B" | MAGNITUDE: key}}, {modules_to_save module: {param: key}},
    {embedding with new-token rows: key})."""
    layers: dict[str, dict] = {}
    tokens: dict[str, str] = {}
    saved: dict[str, dict] = {}
    bad = []
    for key in keys:
        body = key.removeprefix(KEY_PREFIX).replace(".modules_to_save.default.", ".")  # older PEFT layouts
        stem, _, tail = body.rpartition(".")
        if f".{TOKEN_ADAPTER}.{DELTA}" in f".{body}":
            tokens[body.split(f".{TOKEN_ADAPTER}.")[0]] = key
            continue
        if tail == MAGNITUDE or stem.endswith("." + MAGNITUDE):  # PEFT may keep ".default.weight" on it
            module = body.split("." + MAGNITUDE)[0]
            layers.setdefault(module, {})[MAGNITUDE] = key
            continue
        module, _, factor = stem.rpartition(".")
        # PEFT may keep an adapter name: <path>.lora_A.default.weight
        if factor not in FACTORS and module.rsplit(".", 1)[-1] in FACTORS:
            module, _, factor = module.rpartition(".")
        if factor in FACTORS and tail == "weight" and module:
            layers.setdefault(module, {})[factor] = key
        elif saved_modules and any(stem == p or stem.endswith("." + p) for p in saved_modules):
            saved.setdefault(stem, {})[tail] = key
        else:
            bad.append(key)
    if bad:
        raise ValueError(f"{path}: keys that are neither LoRA factors, DoRA magnitudes, new-token rows nor "
                         f"modules_to_save parameters: {bad[:20]}")
    return layers, saved, tokens


def read_adapter_lora(adapter_dir: str | os.PathLike) -> tuple[LoraConfig, int]:
    """(LoraConfig, seed) of a saved adapter: what `load_model(path, quant, lora=..., seed=...)` needs
    to rebuild the model it was trained on (for LoftQ / PiSSA, the initialised base too)."""
    adapter_dir = Path(adapter_dir)
    config, sidecar = read_adapter_config(adapter_dir)
    layers, _, _ = split_keys(list(read_adapter_weights(adapter_dir / ADAPTER_WEIGHTS)),
                               config.get("modules_to_save") or [], adapter_dir / ADAPTER_WEIGHTS)
    return adapter_lora_config(config, sidecar, sorted(layers))


def copy_into_(target: torch.Tensor, value: torch.Tensor) -> None:
    """Copy a whole tensor read from a file into a model's parameter, under no_grad. A parameter sharded
    over processes (FSDP's DTensor) keeps this rank's shard of it (collective: every rank copies, in one order)."""
    value = value.to(device=target.device, dtype=target.dtype)
    if hasattr(target, "device_mesh"):
        from torch.distributed.tensor import distribute_tensor

        value = distribute_tensor(value, target.device_mesh, target.placements)
    with torch.no_grad():
        target.copy_(value)
