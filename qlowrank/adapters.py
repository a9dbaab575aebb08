"""save_adapter / load_adapter: LoRA factors in PEFT's file format, both ways.

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
from safetensors.torch import save as safetensors_bytes
from torch import nn

from .atomic import staged_dir
from .config import LoraConfig, QuantConfig
from .inject import add_lora, lora_layers
from .loading import open_safetensors
from .quant import quantized_bits

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
QLOWRANK_SIDECAR = "qlowrank_adapter.json"
KEY_PREFIX = "base_model.model."
_FACTORS = ("lora_A", "lora_B")


def save_adapter(model: nn.Module, out_dir: str | os.PathLike, overwrite: bool = True,
                 tensors: dict[str, dict[str, torch.Tensor]] | None = None) -> Path:
    """Write the model's LoRA factors as a PEFT adapter directory.

    The directory is written under a temporary name and renamed into place, so a crash
    never leaves a half-written adapter.

    Args:
        model: a model with LoraLinear layers (from add_lora or load_model(lora=...)).
        out_dir: the adapter directory to create.
        overwrite: replace an existing adapter directory (a directory that holds anything
            other than an adapter is never replaced).
        tensors: {layer name: {"lora_A": A, "lora_B": B}} to write instead of the layers'
            own weights (factors gathered from processes that each hold a shard).

    Returns:
        The adapter directory.

    Raises:
        OSError: the folder cannot be written (full disk, read-only); nothing partial is left
            and an existing adapter there is unchanged.
    """
    layers = dict(lora_layers(model))
    if not layers:
        raise ValueError("save_adapter: the model has no LoRA layers (call add_lora or load_model(lora=...) first)")
    ranks = {layer.r for layer in layers.values()}
    alphas = {(layer.alpha, layer.use_rslora) for layer in layers.values()}
    if len(ranks) > 1 or len(alphas) > 1:
        raise ValueError(f"save_adapter needs one r / alpha / rsLoRA setting for all layers, found r={sorted(ranks)}")
    first = next(iter(layers.values()))
    def factor_of(name: str, factor: str) -> torch.Tensor:
        weight = tensors[name][factor] if tensors is not None else getattr(layers[name], factor).weight.detach()
        return weight.float().cpu().contiguous()

    tensors = {f"{KEY_PREFIX}{name}.{factor}.weight": factor_of(name, factor) for name in layers for factor in _FACTORS}
    config = _peft_config(model, layers, first)
    out_dir = Path(out_dir)
    _check_replaceable(out_dir, overwrite)
    with staged_dir(out_dir, "adapter") as tmp:
        # Serialized in memory and written by Python, so a full disk is a plain OSError.
        (tmp / ADAPTER_WEIGHTS).write_bytes(safetensors_bytes(tensors, metadata={"format": "pt"}))
        (tmp / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        (tmp / QLOWRANK_SIDECAR).write_text(json.dumps(_sidecar(model, first), indent=2) + "\n")
    return out_dir


def _check_replaceable(out_dir: Path, overwrite: bool) -> None:
    if not out_dir.exists():
        return
    if not overwrite:
        raise FileExistsError(f"{out_dir} exists; pass overwrite=True to replace it")
    if not out_dir.is_dir() or (any(out_dir.iterdir()) and not (out_dir / ADAPTER_CONFIG).is_file()):
        raise FileExistsError(f"{out_dir} exists and is not an adapter directory; refusing to replace it")


def _target_modules(model: nn.Module, names: list[str]) -> list[str]:
    """Short names (q_proj, ...) when they pick out exactly the wrapped layers, else full paths."""
    leaves = sorted({name.rsplit(".", 1)[-1] for name in names})
    wrapped = set(names)
    inner = (n for n, _ in model.named_modules() if ".lora_" not in n and ".base_layer" not in n)
    matches = {n for n in inner if n.rsplit(".", 1)[-1] in leaves}
    return leaves if matches == wrapped else sorted(names)


def _peft_config(model: nn.Module, layers: dict, first) -> dict:
    config = getattr(model, "config", None)
    lora_cfg = getattr(model, "qlowrank_lora_config", None)
    is_causal = "ForCausalLM" in type(model).__name__ or "LMHead" in type(model).__name__
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM" if is_causal else None,
        "base_model_name_or_path": getattr(config, "_name_or_path", None) or None,
        "r": first.r,
        "lora_alpha": first.alpha,
        "lora_dropout": float(getattr(lora_cfg, "dropout", 0.0)),
        "use_rslora": first.use_rslora,
        "target_modules": _target_modules(model, list(layers)),
        "fan_in_fan_out": bool(first.fan_in_fan_out),
        "bias": "none",
        "modules_to_save": None,
        "init_lora_weights": True,
        "inference_mode": True,
        "use_dora": False,
        "rank_pattern": {},
        "alpha_pattern": {},
        "layers_to_transform": None,
        "layers_pattern": None,
        "revision": None,
    }


def _sidecar(model: nn.Module, first) -> dict:
    from . import __version__  # the package's own attribute: not importable while __init__ runs

    quant = getattr(model, "qlowrank_quant_config", None)
    bits = base_bits(model)
    if quant is None:
        quant = QuantConfig(bits=bits)
    config = getattr(model, "config", None)
    return {
        "qlowrank_version": __version__,
        "base_quant": None if bits is None else {
            "bits": bits, "quant_type": quant.quant_type, "double_quant": quant.double_quant,
            "blocksize": quant.blocksize, "compute_dtype": str(quant.compute_dtype).removeprefix("torch."),
            "int8_threshold": quant.int8_threshold,
        },
        "base_model_type": getattr(config, "model_type", None),
        "base_architecture": type(model).__name__,
        "source": getattr(model, "qlowrank_source", None),
        "init": first.init,
    }


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
    config = _read_json_object(path)
    if config.get("peft_type") != "LORA":
        raise ValueError(f"{path}: peft_type={config.get('peft_type')!r}; qlowrank reads LoRA adapters only")
    unsupported = {
        "use_dora": bool(config.get("use_dora")), "bias": config.get("bias", "none") != "none",
        "modules_to_save": bool(config.get("modules_to_save")), "rank_pattern": bool(config.get("rank_pattern")),
        "alpha_pattern": bool(config.get("alpha_pattern")), "lora_bias": bool(config.get("lora_bias")),
    }
    bad = [name for name, flag in unsupported.items() if flag]
    if bad:
        raise ValueError(f"{path} uses PEFT features qlowrank does not load: {bad} (values: "
                         f"{ {k: config.get(k) for k in bad} })")
    _check_config_values(config, path)
    sidecar_path = adapter_dir / QLOWRANK_SIDECAR
    sidecar = _read_json_object(sidecar_path) if sidecar_path.is_file() else None
    if sidecar is not None and not isinstance(sidecar.get("base_quant") or {}, dict):
        raise ValueError(f"{sidecar_path}: key 'base_quant' must be an object or null, got {sidecar['base_quant']!r:.80}")
    return config, sidecar


def _read_json_object(path: Path) -> dict:
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
        if not tensor.is_floating_point() or tensor.dim() != 2:
            raise ValueError(f"{path}: {key} is a {tensor.dim()}-D {str(tensor.dtype).removeprefix('torch.')} "
                             "tensor; LoRA factors are 2-D floating-point matrices")
        if not torch.isfinite(tensor).all():
            bad = int((~torch.isfinite(tensor)).sum())
            raise ValueError(f"{path}: {key} holds {bad} NaN or inf values; the adapter is broken (a diverged run?)")
    return tensors


def _module_names(keys: list[str], path: Path) -> dict[str, dict[str, torch.Tensor]]:
    names: dict[str, dict] = {}
    bad = []
    for key in keys:
        body = key.removeprefix(KEY_PREFIX)
        stem, _, tail = body.rpartition(".")  # tail: "weight"
        module, _, factor = stem.rpartition(".")
        # PEFT may keep an adapter name: <path>.lora_A.default.weight
        if factor not in _FACTORS and module.rsplit(".", 1)[-1] in _FACTORS:
            module, _, factor = module.rpartition(".")
        if factor not in _FACTORS or tail != "weight" or not module:
            bad.append(key)
            continue
        names.setdefault(module, {})[factor] = key
    if bad:
        raise ValueError(f"{path}: keys that are not LoRA factors (lora_A / lora_B weights): {bad[:20]}")
    return names


def load_adapter(model: nn.Module, adapter_dir: str | os.PathLike) -> nn.Module:
    """Load a LoRA adapter saved by qlowrank or by PEFT into the model, in place.

    A model without LoRA layers gets them (on exactly the modules the file names); a model
    with LoRA layers must have exactly the file's layers and shapes. The adapter's
    lora_alpha / use_rslora set the layers' scaling.

    Raises:
        ValueError: wrong base, wrong shapes, missing or unexpected keys (all listed).
    """
    adapter_dir = Path(adapter_dir)
    config, sidecar = read_adapter_config(adapter_dir)
    weights_path = adapter_dir / ADAPTER_WEIGHTS
    tensors = read_adapter_weights(weights_path)
    by_module = _module_names(list(tensors), weights_path)
    _check_base(model, sidecar, adapter_dir)
    incomplete = sorted(name for name, parts in by_module.items() if set(parts) != set(_FACTORS))
    if incomplete:
        raise ValueError(f"{weights_path}: these layers lack lora_A or lora_B: {incomplete[:20]}")
    modules = dict(model.named_modules())
    not_in_model = sorted(name for name in by_module if name not in modules)
    if not_in_model:
        raise ValueError(
            f"{weights_path}: adapter layers that this model does not have (wrong base model?): {not_in_model[:20]}"
        )
    existing = dict(lora_layers(model))
    if not existing:
        r = int(config["r"])
        add_lora(model, LoraConfig(
            r=r, alpha=config.get("lora_alpha", r), dropout=float(config.get("lora_dropout") or 0.0),
            target_modules=sorted(by_module), exclude_modules=[], use_rslora=bool(config.get("use_rslora")),
            init=(sidecar or {}).get("init", "kaiming"),
        ))
        existing = dict(lora_layers(model))
    missing = sorted(set(existing) - set(by_module))
    unexpected = sorted(set(by_module) - set(existing))
    if missing or unexpected:
        raise ValueError(
            f"{weights_path} does not match the model's LoRA layers: missing (in the model, not the file): "
            f"{missing[:20]}; unexpected (in the file, not the model): {unexpected[:20]}"
        )
    _copy_factors(existing, by_module, tensors, weights_path)
    _set_scaling(existing.values(), config)
    return model


def _check_base(model: nn.Module, sidecar: dict | None, adapter_dir: Path) -> None:
    wanted = (sidecar or {}).get("base_model_type")
    have = getattr(getattr(model, "config", None), "model_type", None)
    if wanted and have and wanted != have:
        raise ValueError(f"{adapter_dir} was trained on a {wanted!r} model but this model is {have!r} (wrong base)")


def _copy_factors(layers: dict, by_module: dict, tensors: dict, path: Path) -> None:
    wrong = []
    for name, layer in layers.items():
        for factor in _FACTORS:
            target = getattr(layer, factor).weight
            value = tensors[by_module[name][factor]]
            if tuple(value.shape) != tuple(target.shape):
                wrong.append(f"{name}.{factor}: file {tuple(value.shape)} vs model {tuple(target.shape)}")
    if wrong:
        raise ValueError(f"{path}: shape mismatches (wrong base model or rank?): {wrong[:20]}")
    with torch.no_grad():
        for name, layer in layers.items():
            for factor in _FACTORS:
                target = getattr(layer, factor).weight
                value = tensors[by_module[name][factor]].to(device=target.device, dtype=target.dtype)
                if hasattr(target, "device_mesh"):   # a factor sharded over processes (FSDP): keep this rank's shard
                    from torch.distributed.tensor import distribute_tensor
                    value = distribute_tensor(value, target.device_mesh, target.placements)
                target.copy_(value)


def _set_scaling(layers, config: dict) -> None:
    for layer in layers:
        layer.alpha = config.get("lora_alpha", layer.r)
        layer.use_rslora = bool(config.get("use_rslora", False))
        layer.scaling = layer.alpha / (layer.r ** 0.5 if layer.use_rslora else layer.r)
