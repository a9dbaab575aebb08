"""load_model: bring a checkpoint in (local HF dir, sharded safetensors, GGUF, hub id), quantized while it loads.

For a safetensors checkpoint the model is built on the meta device (no float weights are
allocated), then the files are streamed one shard and one tensor at a time: each linear
weight is quantized the moment it arrives and its float copy is dropped, so peak host RAM
stays near the quantized model plus one (memory-mapped) shard instead of the whole float
model. GGUF files are streamed the same way by `model/gguf_reader.py` (one tensor dequantized at a
time); `gguf_reader="transformers"` uses transformers' own GGUF reader instead, which
dequantizes the whole file to float32 first.

Nothing is ever unpickled: `.bin` / `.pt` checkpoints are refused with a message.
"""

from __future__ import annotations

import json
import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
import transformers
from safetensors import safe_open
from torch import nn
from tqdm.auto import tqdm

from ..config import LoraConfig, QuantConfig, parse_dtype
from ..nn import quant as quantlib
from ..state import state_of
from .convert import CheckpointConversions
from .stream import LoadSettings, TensorSink, empty_model, tied_keys
from .surgery import add_lora, quantize_model

SAFETENSORS_NAME = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
GGUF_READERS = ("streamed", "transformers")  # load_model(gguf_reader=...)


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
    progress: bool = True,
    seed: int | None = None,
    gguf_reader: str = "streamed",
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
        progress: show a tqdm bar while streaming tensors.
        seed: with `lora`, makes the LoRA init reproducible (see `add_lora`); it also seeds
            LoftQ / PiSSA's randomized SVDs, which run layer by layer on each float weight
            as it streams in (None: 0).
        gguf_reader: how a GGUF file is read. "streamed" (default): qlowrank's reader
            dequantizes one tensor at a time and quantizes it at once, so loading peaks near
            the quantized model (Llama, Mistral, SmolLM2, Qwen2). "transformers": transformers'
            reader, which dequantizes the whole file to float32 first (any architecture it
            knows; the fallback for the others).

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
    if gguf_reader not in GGUF_READERS:
        raise ValueError(f"gguf_reader={gguf_reader!r}: use one of {GGUF_READERS}")
    settings = LoadSettings(quant, device, dtype, tuple(quant.skip_modules), lora, seed, progress)
    folder, gguf_name = _resolve(path_or_id, gguf_file)
    if gguf_name is not None:
        model = _load_gguf(folder, gguf_name, settings, gguf_reader)
        source = {"id": str(path_or_id), "path": str(folder), "gguf_file": gguf_name, "format": "gguf"}
    else:
        model = _load_safetensors(folder, settings, trust_remote_code)
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
    return empty_model(config, dtype, _model_class(config, folder, trust_remote_code), trust_remote_code)


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


def _load_safetensors(folder: Path, settings: LoadSettings, trust_remote_code: bool) -> nn.Module:
    files = checkpoint_files(folder)
    model = _build_empty(folder, trust_remote_code, settings.dtype)
    sink = TensorSink(model, settings)
    mapped = key_mapper(sink.expected, model.base_model_prefix)
    # transformers' own renames and fusions (per-expert tensors -> 3-D expert stacks), tensor by tensor.
    # Fused expert stacks go one expert at a time (per-expert tensors converted expert by expert, fused stacks
    # read a slice at a time): only one expert's float weight is in flight.
    conversions = CheckpointConversions(model, list(files.weight_map), sink.expected, sliced=sink.streams_experts)
    unexpected: list[str] = []
    bar = tqdm(total=len(files.weight_map), desc="loading", unit="tensor", disable=not settings.progress)
    for shard in files.files():
        with open_safetensors(shard) as handle:  # one memory-mapped shard at a time
            for ckpt_key in handle.keys():
                bar.update(1)
                if conversions.feeds_group(ckpt_key):
                    for out in conversions.add(ckpt_key, handle.get_tensor(ckpt_key)):
                        if out.expert is None:
                            sink.put(out.key, out.tensor, shard.name, owned=True)
                        else:
                            sink.put_expert(out.key, out.expert, out.experts, out.tensor, shard.name)
                    continue
                key = mapped(conversions.model_key(ckpt_key) or ckpt_key)
                if key is None:
                    unexpected.append(ckpt_key)
                elif sink.streams_experts(key):
                    view = handle.get_slice(ckpt_key)
                    experts = view.get_shape()[0]
                    for index in range(experts):
                        sink.put_expert(key, index, experts, view[index], shard.name)
                else:
                    sink.put(key, handle.get_tensor(ckpt_key), shard.name)
    bar.close()
    unexpected += [f"{key} (some of the tensors it is fused from are missing)" for key in conversions.incomplete()]
    return sink.finish(str(folder), unexpected)


def _load_gguf(folder: Path, name: str, settings: LoadSettings, reader: str) -> nn.Module:
    from .gguf_reader import NotStreamable, check_gguf_file, check_transformers_reads, load_gguf_streamed

    if reader == "streamed":
        try:
            return load_gguf_streamed(folder / name, settings)
        except NotStreamable as err:   # valid, but only transformers' reader reads it: say so, then use it
            logging.getLogger("qlowrank").warning(f"{err}; reading it with transformers' GGUF reader instead "
                                                  "(the whole file dequantized to float32 first)")
    check_gguf_file(folder / name)   # a truncated file named as such, not as a failed numpy reshape
    check_transformers_reads(folder / name)
    return _load_gguf_transformers(folder, name, settings)


def _load_gguf_transformers(folder: Path, name: str, settings: LoadSettings) -> nn.Module:
    """transformers' reader: the whole file dequantized to float32 first, then quantized (the fallback)."""
    quant, device, dtype = settings.quant, settings.device, settings.dtype
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
    quantize_model(model, quant, skip=settings.skip_modules, device=device, lora=settings.lora,
                   seed=settings.seed)  # bits=None: unchanged
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
        from .gguf_reader import load_gguf_tokenizer

        return load_gguf_tokenizer(folder, gguf_name)
    try:
        return transformers.AutoTokenizer.from_pretrained(str(folder))
    except (ValueError, OSError) as err:   # raised inside transformers: name the folder, keep the cause for --debug
        raise ValueError(f"{folder}: transformers cannot load a tokenizer from it ({err}); the folder needs "
                         "tokenizer.json (or its tokenizer's vocabulary files)") from err
