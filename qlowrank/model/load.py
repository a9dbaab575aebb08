"""load_model: bring a checkpoint in (local HF dir, sharded safetensors, GGUF, hub id), quantized while it loads.

For a safetensors checkpoint the model is built on the meta device (no float weights are
allocated), then the files are streamed one shard and one tensor at a time: each linear
weight is quantized the moment it arrives and its float copy is dropped, so peak host RAM
stays near the quantized model plus one (memory-mapped) shard instead of the whole float
model. GGUF files go through transformers' own GGUF reader, which dequantizes the whole
file first (GGUF models are small enough for that; the streamed path is for big ones).

Nothing is ever unpickled: `.bin` / `.pt` checkpoints are refused with a message.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
import transformers
from accelerate import init_empty_weights
from safetensors import safe_open
from torch import nn
from tqdm.auto import tqdm

from ..config import LoraConfig, QuantConfig, parse_dtype
from ..nn import quant as quantlib
from ..nn.layers import is_conv1d
from ..state import state_of
from .inspect import linear_layers, name_matches, output_head_names, set_submodule
from .surgery import add_lora, quantize_layer, quantize_model

SAFETENSORS_NAME = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


@dataclass
class CheckpointFiles:
    """Where each tensor of a local safetensors checkpoint lives."""

    folder: Path
    weight_map: dict[str, Path] = field(default_factory=dict)  # checkpoint key -> file

    def files(self) -> list[Path]:
        """The shard files in a stable order, each listed once."""
        return sorted(set(self.weight_map.values()))


def default_device() -> torch.device:
    """CUDA when one is present, else the CPU (the design's meaning of device=None)."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def load_model(
    path_or_id: str | os.PathLike,
    quant: QuantConfig | None = None,
    lora: LoraConfig | None = None,
    device: torch.device | str | None = None,
    gguf_file: str | None = None,
    trust_remote_code: bool = False,
    dtype: torch.dtype | str | None = None,
    skip_modules: tuple[str, ...] = (),
    progress: bool = True,
    seed: int | None = None,
) -> nn.Module:
    """Load a causal LM with its linear layers quantized while loading, optionally with LoRA.

    Args:
        path_or_id: a local Hugging Face directory (config.json + model.safetensors, or shards
            with model.safetensors.index.json), a `.gguf` file, a directory plus `gguf_file`,
            or a hub id (only when a hub is reachable).
        quant: how to store the linear layers; None means `QuantConfig()` (NF4, double-quant).
            `QuantConfig(bits=None)` loads an unquantized float base.
        lora: when given, `add_lora(model, lora)` is applied: the model is ready to train.
        device: where the weights live; None = CUDA if available, else CPU.
        gguf_file: the GGUF file name inside `path_or_id` (a directory).
        trust_remote_code: allow a checkpoint's own modelling code (off unless asked for).
        dtype: dtype of the weights that stay in float (embeddings, norms, output head);
            None = `quant.compute_dtype`.
        skip_modules: linear layer names (or name suffixes) to keep in float.
        progress: show a tqdm bar while streaming tensors.
        seed: with `lora`, makes the LoRA init reproducible (see `add_lora`); it also seeds
            LoftQ / PiSSA's randomized SVDs, which run layer by layer on each float weight
            as it streams in (None: 0).

    Returns:
        The transformers model (eval mode) with bitsandbytes layers and, if asked, LoRA
        wrappers. `state_of(model).quant` and `state_of(model).source` record how it was
        loaded (save_adapter and export_merged read them).

    Raises:
        FileNotFoundError: the path, a shard, or config.json is missing.
        ValueError: a pickle checkpoint, a corrupt file, an unknown architecture, a shape
            mismatch, or missing / unexpected tensors (each named).
    """
    quant = quant if quant is not None else QuantConfig()
    device = torch.device(device) if device is not None else default_device()
    quant.check_device(device)
    dtype = parse_dtype(dtype, "dtype") if dtype is not None else quant.compute_dtype
    folder, gguf_name = _resolve(path_or_id, gguf_file)
    if gguf_name is not None:
        model = _load_gguf(folder, gguf_name, quant, device, dtype, skip_modules, lora, seed)
        source = {"id": str(path_or_id), "path": str(folder), "gguf_file": gguf_name, "format": "gguf"}
    else:
        model = _load_safetensors(folder, quant, device, dtype, trust_remote_code, skip_modules, progress, lora, seed)
        source = {"id": str(path_or_id), "path": str(folder), "gguf_file": None, "format": "safetensors"}
    model.eval()
    model.config._name_or_path = str(path_or_id)
    state_of(model).quant = quant
    state_of(model).source = source
    if lora is not None:
        add_lora(model, lora, seed=seed)
    return model


def _resolve(path_or_id: str | os.PathLike, gguf_file: str | None) -> tuple[Path, str | None]:
    """(local folder, GGUF file name or None); downloads a hub id when a hub is reachable."""
    path = Path(path_or_id).expanduser()
    if path.is_file():
        if path.suffix == ".gguf":
            return path.parent, path.name
        if path.suffix in _PICKLE_SUFFIXES:
            _refuse_pickle(path)
        if path.suffix == ".safetensors":
            raise ValueError(f"{path} is a weights file; pass the directory that holds it and its config.json")
        raise ValueError(f"{path} is neither a model directory nor a .gguf file")
    if path.is_dir():
        if gguf_file is not None and not (path / gguf_file).is_file():
            raise FileNotFoundError(f"gguf_file={gguf_file!r} not found in {path}")
        return path, gguf_file
    if _looks_like_hub_id(str(path_or_id)):
        return _download(str(path_or_id), gguf_file), gguf_file
    raise FileNotFoundError(f"{path_or_id} does not exist (expected a model directory, a .gguf file or a hub id)")


def _looks_like_hub_id(name: str) -> bool:
    return re.fullmatch(r"[A-Za-z0-9][\w.-]*/[\w.-]+", name) is not None and not name.startswith((".", "/"))


def _download(repo_id: str, gguf_file: str | None) -> Path:
    from huggingface_hub import snapshot_download

    # Only what load_model can use: never pickles, never the other GGUF variants of a repo.
    patterns = ["*.json", "*.txt", "*.model", "*.jinja", "tokenizer*"]
    patterns += [gguf_file] if gguf_file else ["*.safetensors"]
    try:
        return Path(snapshot_download(repo_id, allow_patterns=patterns))
    except Exception as err:  # network, auth and "no such repo" errors all end here
        raise FileNotFoundError(
            f"{repo_id!r} is not a local path and could not be fetched from the Hugging Face hub ({type(err).__name__}: "
            f"{err}). Download the model to a directory and pass that directory."
        ) from err


def _refuse_pickle(path: Path) -> None:
    raise ValueError(
        f"{path} is a pickle checkpoint; qlowrank never unpickles (loading a pickle can run arbitrary code). "
        "Convert it to safetensors once in a trusted environment, e.g. "
        "AutoModelForCausalLM.from_pretrained(dir).save_pretrained(new_dir), and load new_dir."
    )


def checkpoint_files(folder: Path) -> CheckpointFiles:
    """Locate the safetensors files of a local checkpoint (single file or sharded with an index).

    Raises:
        FileNotFoundError: no safetensors weights (pickles are named and refused), or a shard
            that the index names is missing.
        ValueError: the index is not valid JSON.
    """
    folder = Path(folder)
    index = folder / SAFETENSORS_INDEX
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as err:
            raise ValueError(f"{index} is not a valid safetensors index (needs a 'weight_map'): {err}") from None
        files = CheckpointFiles(folder, {key: folder / name for key, name in weight_map.items()})
        for shard in files.files():
            if not shard.is_file():
                raise FileNotFoundError(f"{shard} is listed in {index.name} but missing; the checkpoint is incomplete")
        return files
    single = folder / SAFETENSORS_NAME
    if single.is_file():
        with open_safetensors(single) as handle:
            return CheckpointFiles(folder, {key: single for key in handle.keys()})
    pickles = sorted(p.name for p in folder.iterdir() if p.suffix in _PICKLE_SUFFIXES)
    if pickles:
        _refuse_pickle(folder / pickles[0])
    raise FileNotFoundError(f"no {SAFETENSORS_NAME} or {SAFETENSORS_INDEX} in {folder}")


def open_safetensors(path: Path):
    """safe_open on the CPU, with a corrupt or truncated file reported by name."""
    try:
        return safe_open(str(path), framework="pt", device="cpu")
    except Exception as err:  # safetensors raises its own SafetensorError for bad headers
        raise ValueError(f"{path} is not a readable safetensors file ({err}); the file is corrupt or truncated") from None


def _read_config(folder: Path, trust_remote_code: bool) -> transformers.PretrainedConfig:
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"{folder / 'config.json'} is missing; a Hugging Face model directory needs one")
    try:
        return transformers.AutoConfig.from_pretrained(str(folder), trust_remote_code=trust_remote_code)
    except (ValueError, KeyError, OSError) as err:
        raise ValueError(
            f"{folder / 'config.json'}: transformers cannot read this configuration ({err}). An unknown model_type "
            "needs a newer transformers, or trust_remote_code=True if the checkpoint ships its own code."
        ) from None


def _model_class(config: transformers.PretrainedConfig, folder: Path, trust_remote_code: bool):
    """The causal-LM class for a config (or the class its `architectures` names)."""
    auto = transformers.AutoModelForCausalLM
    if type(config) in auto._model_mapping or (trust_remote_code and getattr(config, "auto_map", None)):
        return auto
    for name in getattr(config, "architectures", None) or []:
        cls = getattr(transformers, name, None)
        if isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel):
            return cls
    raise ValueError(
        f"{folder / 'config.json'}: unknown architecture {getattr(config, 'architectures', None)} "
        f"(model_type={config.model_type!r}); transformers has no causal-LM class for it"
    )


def _build_empty(folder: Path, trust_remote_code: bool, dtype: torch.dtype) -> nn.Module:
    config = _read_config(folder, trust_remote_code)
    if getattr(config, "quantization_config", None):
        raise ValueError(
            f"{folder / 'config.json'} holds a quantization_config: this checkpoint is already quantized. "
            "load_model needs the float (bf16/fp16/fp32) checkpoint and quantizes it itself."
        )
    cls = _model_class(config, folder, trust_remote_code)
    # Parameters on meta (no memory), buffers real: non-persistent buffers such as rotary
    # inv_freq are computed in __init__ and are not in the checkpoint.
    with init_empty_weights(include_buffers=False):
        if cls is transformers.AutoModelForCausalLM:
            return cls.from_config(config, dtype=dtype, trust_remote_code=trust_remote_code)
        return cls._from_config(config, dtype=dtype)


def key_mapper(expected: set[str], prefix: str):
    """Map a checkpoint key to the model's key: exact, or with / without the base-model prefix."""

    def mapped(key: str) -> str | None:
        if key in expected:
            return key
        if prefix and f"{prefix}.{key}" in expected:
            return f"{prefix}.{key}"
        if prefix and key.startswith(prefix + ".") and key[len(prefix) + 1:] in expected:
            return key[len(prefix) + 1:]
        return None

    return mapped


def tied_keys(model: nn.Module) -> set[str]:
    """State-dict keys that are tied to another tensor (not stored in checkpoints)."""
    if not getattr(model.config, "tie_word_embeddings", False):
        return set()
    tied = getattr(model, "_tied_weights_keys", None) or {}
    return set(tied.keys() if isinstance(tied, dict) else tied)


def _load_safetensors(folder, quant, device, dtype, trust_remote_code, skip_modules, progress, lora=None,
                      seed=None) -> nn.Module:
    files = checkpoint_files(folder)
    model = _build_empty(folder, trust_remote_code, dtype)
    expected = set(model.state_dict().keys())
    mapped = key_mapper(expected, model.base_model_prefix)
    heads = output_head_names(model)
    to_quantize = set()
    if quant.bits is not None:
        to_quantize = {
            name for name, _ in linear_layers(model) if name not in heads and not name_matches(name, skip_modules)
        }
    pending: dict[str, dict[str, torch.Tensor]] = {}  # linear name -> arrived weight / bias
    loaded: set[str] = set()
    unexpected: list[str] = []
    bar = tqdm(total=len(files.weight_map), desc="loading", unit="tensor", disable=not progress)
    for shard in files.files():
        with open_safetensors(shard) as handle:  # one memory-mapped shard at a time
            for ckpt_key in handle.keys():
                key = mapped(ckpt_key)
                bar.update(1)
                if key is None:
                    unexpected.append(ckpt_key)
                    continue
                tensor = handle.get_tensor(ckpt_key)
                module_name, _, leaf = key.rpartition(".")
                module = model.get_submodule(module_name)
                _check_shape(module, leaf, tensor, key, shard)
                loaded.add(key)
                if module_name in to_quantize and leaf in ("weight", "bias"):
                    pending.setdefault(module_name, {})[leaf] = tensor
                    _quantize_if_complete(model, module_name, pending, quant, device, dtype, heads, lora, seed)
                else:
                    _assign(module, leaf, tensor, device, dtype)
    bar.close()
    _check_keys(model, folder, expected, loaded, unexpected, pending)
    if tied_keys(model):
        model.tie_weights()
    still_meta = [name for name, p in model.named_parameters() if p.is_meta]
    if still_meta:
        raise ValueError(f"{folder}: these parameters were never loaded: {still_meta[:20]}")
    return model


def _check_shape(module: nn.Module, leaf: str, tensor: torch.Tensor, key: str, shard: Path) -> None:
    current = getattr(module, leaf, None)
    if isinstance(current, torch.Tensor) and tuple(current.shape) != tuple(tensor.shape):
        raise ValueError(
            f"{shard.name}: tensor {key!r} has shape {tuple(tensor.shape)} but the model built from config.json "
            f"expects {tuple(current.shape)}; the weights do not belong to this config"
        )


def _assign(module: nn.Module, leaf: str, tensor: torch.Tensor, device: torch.device, dtype: torch.dtype) -> None:
    # Always a copy: a tensor that still pointed into the memory-mapped shard would keep the
    # whole mapping (every page read so far) resident for the life of the model.
    tensor = tensor.to(device=device, dtype=dtype if tensor.is_floating_point() else tensor.dtype, copy=True)
    if leaf in module._parameters:
        old = module._parameters[leaf]
        module._parameters[leaf] = nn.Parameter(tensor, requires_grad=old.requires_grad if old is not None else False)
    else:
        module._buffers[leaf] = tensor


def _quantize_if_complete(model, name, pending, quant, device, dtype, heads, lora, seed) -> None:
    module = model.get_submodule(name)
    parts = pending[name]
    if "weight" not in parts or (module.bias is not None and "bias" not in parts):
        return  # the other half is in a later tensor or shard
    weight = parts["weight"].t() if is_conv1d(module) else parts["weight"]  # (out, in)
    bias = parts.get("bias")
    bias = bias.to(dtype) if bias is not None else None
    # LoftQ / PiSSA run here, on the one float weight in flight (quantize_layer decides).
    new = quantize_layer(name, weight.to(device), bias, quant, device, lora, heads, seed)
    new.fan_in_fan_out = is_conv1d(module)
    new.train(module.training)
    set_submodule(model, name, new)
    del pending[name]
    release_freed_memory()


@functools.lru_cache(maxsize=1)
def _libc_trim():
    name = ctypes.util.find_library("c")
    libc = ctypes.CDLL(name) if name else None
    return getattr(libc, "malloc_trim", None)


def release_freed_memory() -> None:
    """Give freed heap memory back to the OS (glibc only; a no-op elsewhere).

    Quantizing a layer frees float temporaries of many sizes; glibc keeps such memory in
    its arenas, and on the 1.2B benchmark that fragmentation alone added ~1 GB to the peak.
    """
    trim = _libc_trim()
    if trim is not None:
        trim(0)


def _check_keys(model, folder, expected, loaded, unexpected, pending) -> None:
    ignore_unexpected = list(getattr(model, "_keys_to_ignore_on_load_unexpected", None) or [])
    unexpected = [k for k in unexpected if not any(re.search(p, k) for p in ignore_unexpected)]
    missing = sorted(expected - loaded - tied_keys(model))
    ignore_missing = list(getattr(model, "_keys_to_ignore_on_load_missing", None) or [])
    missing = [k for k in missing if not any(re.search(p, k) for p in ignore_missing)]
    if missing or unexpected or pending:
        raise ValueError(
            f"{folder}: the checkpoint does not match the model built from its config.json. "
            f"missing tensors: {missing[:20]}{' ...' if len(missing) > 20 else ''}; "
            f"unexpected tensors: {unexpected[:20]}{' ...' if len(unexpected) > 20 else ''}"
            + (f"; layers with a weight but no bias: {sorted(pending)[:20]}" if pending else "")
        )


def _load_gguf(folder: Path, name: str, quant: QuantConfig, device, dtype, skip_modules, lora=None, seed=None) -> nn.Module:
    try:
        # float32: transformers dequantizes the GGUF blocks; quantizing from float32 avoids a
        # second rounding through bf16 before NF4 / int8.
        model = transformers.AutoModelForCausalLM.from_pretrained(str(folder), gguf_file=name, dtype=torch.float32)
    except ImportError as err:
        raise ImportError(f"reading {folder / name} needs the `gguf` package: pip install gguf ({err})") from None
    except (ValueError, OSError, RuntimeError) as err:
        raise ValueError(f"{folder / name}: transformers cannot read this GGUF file ({err})") from None
    # The weights are now plain float tensors; transformers' GGUF marker would make the model
    # look pre-quantized (and leak a quantization_config into exports).
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.to(device)
    quantize_model(model, quant, skip=skip_modules, device=device, lora=lora, seed=seed)  # bits=None: unchanged
    for module in model.modules():
        if quantlib.is_quantized_linear(module):
            continue
        for leaf, param in module._parameters.items():
            if param is not None and param.is_floating_point() and param.dtype != dtype:
                module._parameters[leaf] = nn.Parameter(param.detach().to(dtype), requires_grad=param.requires_grad)
    if tied_keys(model):
        model.tie_weights()  # the casts above replaced the shared embedding / head parameter
    return model


def load_tokenizer(path_or_id: str | os.PathLike, gguf_file: str | None = None):
    """The tokenizer of a model directory, a `.gguf` file (transformers' reader), or a hub id."""
    folder, gguf_name = _resolve(path_or_id, gguf_file)
    if gguf_name is not None:
        return transformers.AutoTokenizer.from_pretrained(str(folder), gguf_file=gguf_name)
    return transformers.AutoTokenizer.from_pretrained(str(folder))
