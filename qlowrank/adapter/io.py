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
from dataclasses import replace
from pathlib import Path

import torch
from safetensors.torch import save as safetensors_bytes
from torch import nn

from ..atomic import staged_dir
from ..config import LoraConfig, QuantConfig
from ..model.load import open_safetensors
from ..model.surgery import add_lora, lora_layers, make_trainable_copy
from ..model.tokens import DELTA, wrap_trainable_tokens
from ..nn.quant import quantized_bits
from ..state import state_of
from .peft_format import adapter_lora_config, check_peft_config, peft_inexpressible, peft_lora_fields, rebuilds_base

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
QLOWRANK_SIDECAR = "qlowrank_adapter.json"
KEY_PREFIX = "base_model.model."
_FACTORS = ("lora_A", "lora_B")
MAGNITUDE = "lora_magnitude_vector"   # DoRA's per-row magnitude, PEFT's key name
TOKEN_ADAPTER = "token_adapter"        # PEFT's key: <embedding>.token_adapter.trainable_tokens_delta


def save_adapter(model: nn.Module, out_dir: str | os.PathLike, overwrite: bool = True, format: str = "peft",
                 tensors: dict[str, dict[str, torch.Tensor]] | None = None) -> Path:
    """Write the model's adapter (LoRA factors, DoRA magnitudes, modules_to_save) as a PEFT adapter directory.

    The directory is written under a temporary name and renamed into place, so a crash
    never leaves a half-written adapter.

    Args:
        model: a model with LoraLinear layers (from add_lora or load_model(lora=...)).
        out_dir: the adapter directory to create.
        overwrite: replace an existing adapter directory (a directory that holds anything
            other than an adapter is never replaced).
        format: "peft" refuses an adapter that PEFT would load into a different model (LoftQ
            with > 1 iteration, PiSSA on a quantized base or with the randomized SVD), saying
            why; "qlowrank" writes it anyway, with what qlowrank needs to rebuild the base in
            the sidecar (the trainer's checkpoints use this).
        tensors: {layer name: {"lora_A": A, "lora_B": B}} to write instead of the layers'
            own factors (gathered from processes that each hold a shard, under FSDP).

    Returns:
        The adapter directory.

    Raises:
        OSError: the folder cannot be written (full disk, read-only); nothing partial is left
            and an existing adapter there is unchanged.
    """
    if format not in ("peft", "qlowrank"):
        raise ValueError(f"save_adapter format={format!r}: use 'peft' or 'qlowrank'")
    layers = dict(lora_layers(model))
    if not layers:
        raise ValueError("save_adapter: the model has no LoRA layers (call add_lora or load_model(lora=...) first)")
    if len({(layer.use_rslora, layer.use_dora, layer.init) for layer in layers.values()}) > 1:
        raise ValueError("save_adapter needs one rsLoRA / DoRA / init setting for all layers (one adapter config)")
    reasons = peft_inexpressible(layers, base_bits(model) is not None)
    if format == "peft" and reasons:
        raise ValueError("save_adapter: this adapter cannot be expressed in PEFT's format: " + "; ".join(reasons)
                         + ". save_adapter(model, dir, format='qlowrank') writes it for qlowrank, which rebuilds that "
                         "base from the sidecar (load_adapter / qlowrank export).")
    tensors = _adapter_tensors(model, layers, tensors)
    first = next(iter(layers.values()))
    config = _peft_config(model, layers)
    out_dir = Path(out_dir)
    _check_replaceable(out_dir, overwrite)
    with staged_dir(out_dir, "adapter") as tmp:
        # Serialized in memory and written by Python, so a full disk is a plain OSError.
        (tmp / ADAPTER_WEIGHTS).write_bytes(safetensors_bytes(tensors, metadata={"format": "pt"}))
        if state_of(model).tokenizer is not None:   # the enlarged vocabulary of add_tokens
            state_of(model).tokenizer.save_pretrained(str(tmp))
        (tmp / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        (tmp / QLOWRANK_SIDECAR).write_text(json.dumps(_sidecar(model, first, reasons), indent=2) + "\n")
    return out_dir


def _adapter_tensors(model: nn.Module, layers: dict, gathered: dict | None = None) -> dict[str, torch.Tensor]:
    def plain(t: torch.Tensor) -> torch.Tensor:
        return t.detach().float().cpu().contiguous()

    extras = any(layer.use_dora for layer in layers.values()) or state_of(model).modules_to_save \
        or state_of(model).trainable_tokens
    if gathered is not None and extras:
        raise ValueError("save_adapter: gathered (FSDP-sharded) factors with DoRA, modules_to_save or new tokens are "
                         "not supported yet; train those with one process or DDP")
    tensors = {f"{KEY_PREFIX}{name}.{factor}.weight":
               plain(gathered[name][factor] if gathered is not None else getattr(layer, factor).weight)
               for name, layer in layers.items() for factor in _FACTORS}
    tensors.update({f"{KEY_PREFIX}{name}.{MAGNITUDE}": plain(layer.lora_magnitude_vector)
                    for name, layer in layers.items() if layer.use_dora})
    for name in state_of(model).trainable_tokens:
        tensors[f"{KEY_PREFIX}{name}.{TOKEN_ADAPTER}.{DELTA}"] = plain(getattr(model.get_submodule(name), DELTA))
    for name in state_of(model).modules_to_save:
        for leaf, param in model.get_submodule(name).named_parameters(recurse=False):
            tensors[f"{KEY_PREFIX}{name}.{leaf}"] = plain(param)
    return tensors


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


def _peft_config(model: nn.Module, layers: dict) -> dict:
    config = getattr(model, "config", None)
    is_causal = "ForCausalLM" in type(model).__name__ or "LMHead" in type(model).__name__
    first = next(iter(layers.values()))
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM" if is_causal else None,
        "base_model_name_or_path": getattr(config, "_name_or_path", None) or None,
        **peft_lora_fields(model, layers, _target_modules(model, list(layers))),
        "fan_in_fan_out": bool(first.fan_in_fan_out),
        "bias": "none",
        "inference_mode": True,
        "layers_to_transform": None,
        "layers_pattern": None,
        "revision": None,
    }


def _sidecar(model: nn.Module, first, peft_reasons: list[str]) -> dict:
    from ..version import __version__  # the package's own attribute: not importable while __init__ runs

    quant = state_of(model).quant
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
        "source": state_of(model).source,
        "init": first.init,
        "vocab_size": int(model.get_input_embeddings().weight.shape[0]) if hasattr(model, "get_input_embeddings") else None,
        "loftq_iters": first.loftq_iters,
        "svd": first.svd,
        "seed": int(state_of(model).seed),
        "peft_loads_same_model": not peft_reasons,
        "peft_differences": peft_reasons,
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
    check_peft_config(config, path)
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
        vector = key.endswith((MAGNITUDE, ".bias"))   # DoRA magnitudes and modules_to_save biases are 1-D
        if not tensor.is_floating_point() or tensor.dim() != (1 if vector else 2):
            raise ValueError(f"{path}: {key} is a {tensor.dim()}-D {str(tensor.dtype).removeprefix('torch.')} "
                             f"tensor; it must be a {'1-D floating-point vector' if vector else '2-D floating-point matrix'}")
        if not torch.isfinite(tensor).all():
            bad = int((~torch.isfinite(tensor)).sum())
            raise ValueError(f"{path}: {key} holds {bad} NaN or inf values; the adapter is broken (a diverged run?)")
    return tensors


def _split_keys(keys: list[str], saved_modules: list[str], path: Path) -> tuple[dict, dict, dict]:
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
        if factor not in _FACTORS and module.rsplit(".", 1)[-1] in _FACTORS:
            module, _, factor = module.rpartition(".")
        if factor in _FACTORS and tail == "weight" and module:
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
    layers, _, _ = _split_keys(list(read_adapter_weights(adapter_dir / ADAPTER_WEIGHTS)),
                               config.get("modules_to_save") or [], adapter_dir / ADAPTER_WEIGHTS)
    return adapter_lora_config(config, sidecar, sorted(layers))


def load_adapter(model: nn.Module, adapter_dir: str | os.PathLike) -> nn.Module:
    """Load an adapter saved by qlowrank or by PEFT into the model, in place.

    A model without LoRA layers gets them (on exactly the modules the file names, with its
    rank / alpha patterns, DoRA and modules_to_save); a model with LoRA layers must have
    exactly the file's layers and shapes. A LoftQ or PiSSA adapter needs the base it was
    trained on: load the model with `load_model(path, quant, lora=read_adapter_lora(dir)[0])`.

    Raises:
        ValueError: wrong base, wrong shapes, missing or unexpected keys (all listed).
    """
    adapter_dir = Path(adapter_dir)
    config, sidecar = read_adapter_config(adapter_dir)
    weights_path = adapter_dir / ADAPTER_WEIGHTS
    tensors = read_adapter_weights(weights_path)
    by_module, saved, tokens = _split_keys(list(tensors), config.get("modules_to_save") or [], weights_path)
    lora, seed = adapter_lora_config(config, sidecar, sorted(by_module))
    if not rebuilds_base(lora.init, lora.loftq_iters):
        lora = replace(lora, init="kaiming")  # the base is plain quant(W); A and B come from the file
    _check_base(model, sidecar, adapter_dir)
    wanted = set(_FACTORS) | ({MAGNITUDE} if lora.use_dora else set())
    incomplete = sorted(name for name, parts in by_module.items() if set(parts) != wanted)
    if incomplete:
        raise ValueError(f"{weights_path}: these layers lack one of {sorted(wanted)}: {incomplete[:20]}")
    modules = dict(model.named_modules())
    not_in_model = sorted(name for name in [*by_module, *saved] if name not in modules)
    if not_in_model:
        raise ValueError(
            f"{weights_path}: adapter layers that this model does not have (wrong base model?): {not_in_model[:20]}"
        )
    existing = dict(lora_layers(model))
    if not existing:
        if lora.init != "kaiming" and base_bits(model) is not None:
            raise ValueError(
                f"{adapter_dir} was trained from a {lora.init}-initialised base, which a quantized model no longer "
                f"can be rebuilt into: load it with load_model(path, quant=..., lora=lora, seed={seed}) where "
                f"lora, seed = qlowrank.adapters.read_adapter_lora({str(adapter_dir)!r}), then load_adapter")
        add_lora(model, lora, seed=seed)
        existing = dict(lora_layers(model))
    else:
        _check_same_init(existing, lora, seed, model, adapter_dir)
        for name in saved:
            if name not in state_of(model).modules_to_save:
                make_trainable_copy(model, name)
                state_of(model).modules_to_save = [*state_of(model).modules_to_save, name]
    missing = sorted(set(existing) - set(by_module))
    unexpected = sorted(set(by_module) - set(existing))
    if missing or unexpected:
        raise ValueError(
            f"{weights_path} does not match the model's LoRA layers: missing (in the model, not the file): "
            f"{missing[:20]}; unexpected (in the file, not the model): {unexpected[:20]}"
        )
    _copy_factors(existing, by_module, tensors, weights_path)
    _copy_saved(model, saved, tensors, weights_path)
    _load_token_rows(model, tokens, tensors, config, adapter_dir)
    _set_scaling(existing, lora)
    return model


def _load_token_rows(model: nn.Module, tokens: dict, tensors: dict, config: dict, adapter_dir: Path) -> None:
    """New-token rows (PEFT's trainable_token_indices): enlarge the vocabulary if needed, then set the rows."""
    if not tokens:
        return
    indices = config.get("trainable_token_indices") or {}
    id_lists = [list(v) for v in indices.values()] if isinstance(indices, dict) else [list(indices)]
    ids = id_lists[0] if id_lists else []
    if not ids or any(other != ids for other in id_lists):
        raise ValueError(f"{adapter_dir}: new-token rows need one list of trainable_token_indices in "
                         f"{ADAPTER_CONFIG}; found {indices!r}")
    deltas = {name: tensors[key] for name, key in tokens.items()}
    wrong = {name: tuple(d.shape) for name, d in deltas.items() if d.shape[0] != len(ids)}
    if wrong:
        raise ValueError(f"{adapter_dir}: new-token rows {wrong} do not match the {len(ids)} trainable_token_indices")
    current = state_of(model).trainable_tokens
    if current:
        if sorted(current) != sorted(deltas) or any(list(v) != ids for v in current.values()):
            raise ValueError(f"{adapter_dir}: new-token rows {sorted(deltas)} / ids {ids} differ from this model's "
                             f"{current}")
        with torch.no_grad():
            for name, delta in deltas.items():
                getattr(model.get_submodule(name), DELTA).copy_(delta)
        return
    if max(ids) >= model.get_input_embeddings().weight.shape[0]:
        model.resize_token_embeddings(max(ids) + 1)
    saved = wrap_trainable_tokens(model, ids, deltas)
    missing = sorted(set(saved) - set(deltas))
    if missing:
        raise ValueError(f"{adapter_dir}: no new-token rows for {missing} (an untied output head needs its own)")
    if (adapter_dir / "tokenizer_config.json").is_file():   # save_adapter stores the enlarged tokenizer too
        from transformers import AutoTokenizer
        state_of(model).tokenizer = AutoTokenizer.from_pretrained(str(adapter_dir))


def _check_same_init(existing: dict, lora, seed: int, model: nn.Module, adapter_dir: Path) -> None:
    layer = next(iter(existing.values()))
    if bool(layer.use_dora) != lora.use_dora:
        raise ValueError(f"{adapter_dir}: use_dora={lora.use_dora} but the model's LoRA layers have "
                         f"use_dora={layer.use_dora}")
    if rebuilds_base(lora.init, lora.loftq_iters):
        have = (layer.init, layer.loftq_iters if lora.init == "loftq" else 1, state_of(model).seed)
        want = (lora.init, lora.loftq_iters if lora.init == "loftq" else 1, seed)
        if have != want:
            raise ValueError(f"{adapter_dir} was trained on a base initialised with (init, loftq_iters, seed)={want}, "
                             f"this model's is {have}: its frozen weights differ")


def _check_base(model: nn.Module, sidecar: dict | None, adapter_dir: Path) -> None:
    wanted = (sidecar or {}).get("base_model_type")
    have = getattr(getattr(model, "config", None), "model_type", None)
    if wanted and have and wanted != have:
        raise ValueError(f"{adapter_dir} was trained on a {wanted!r} model but this model is {have!r} (wrong base)")


def _copy_factors(layers: dict, by_module: dict, tensors: dict, path: Path) -> None:
    pairs = []
    for name, layer in layers.items():
        for part, key in by_module[name].items():
            target = layer.lora_magnitude_vector if part == MAGNITUDE else getattr(layer, part).weight
            pairs.append((f"{name}.{part}", target, tensors[key]))
    _copy_all(pairs, path)


def _copy_saved(model: nn.Module, saved: dict, tensors: dict, path: Path) -> None:
    pairs = []
    for name, params in saved.items():
        module = model.get_submodule(name)
        for leaf, key in params.items():
            pairs.append((f"{name}.{leaf}", getattr(module, leaf), tensors[key]))
    _copy_all(pairs, path)


def _copy_all(pairs: list, path: Path) -> None:
    wrong = [f"{name}: file {tuple(value.shape)} vs model {tuple(target.shape)}"
             for name, target, value in pairs if tuple(value.shape) != tuple(target.shape)]
    if wrong:
        raise ValueError(f"{path}: shape mismatches (wrong base model or rank?): {wrong[:20]}")
    with torch.no_grad():
        for _, target, value in pairs:
            value = value.to(device=target.device, dtype=target.dtype)
            if hasattr(target, "device_mesh"):   # sharded over processes (FSDP): keep this rank's shard
                from torch.distributed.tensor import distribute_tensor
                value = distribute_tensor(value, target.device_mesh, target.placements)
            target.copy_(value)


def _set_scaling(layers: dict, lora) -> None:
    for name, layer in layers.items():
        _, layer.alpha = lora.rank_and_alpha(name)
        layer.use_rslora = lora.use_rslora
        layer.scaling = layer.alpha / (layer.r ** 0.5 if layer.use_rslora else layer.r)
