"""export_merged: write a trained model as a plain, dequantized, merged Hugging Face checkpoint.

Each LoRA-wrapped weight becomes `dequant(W_q) + scale * B @ A`, computed in float32 and
cast once to the export dtype, so the checkpoint computes what the trained (quantized)
model computed; `base=<float checkpoint>` merges into the original float weights instead.
The output is streamed tensor by tensor into a temporary directory (peak RAM: the quantized
model plus the largest tensor), checked against the trained model on a probe batch, and
only then renamed into place. Nothing is re-quantized, and the result needs neither
qlowrank, nor peft, nor bitsandbytes to load.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import struct
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import transformers
from torch import nn
from tqdm.auto import tqdm

from ..adapter import base_bits
from ..atomic import staged_dir
from ..config import parse_dtype
from ..model.load import checkpoint_files, key_mapper, open_safetensors, release_freed_memory, tied_keys
from ..model.tokens import TrainableTokens
from ..nn import quant as quantlib
from ..nn.lora import LoraLinear
from ..state import state_of

REPORT_NAME = "qlowrank_export_report.json"
INDEX_NAME = "model.safetensors.index.json"
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model", "vocab.json",
    "merges.txt", "vocab.txt", "added_tokens.json", "chat_template.jinja", "chat_template.json",
)
DEFAULT_SHARD_BYTES = 2 * 2**30


@dataclass
class _Entry:
    key: str                                # state-dict key in the exported checkpoint
    shape: tuple[int, ...]                  # shape as stored (Conv1D weights: (in, out))
    dtype: torch.dtype                      # dtype before the export cast
    produce: Callable[[], torch.Tensor]     # computes the tensor when its shard is written


def export_merged(
    model: nn.Module,
    out_dir: str | os.PathLike,
    dtype: torch.dtype | str = torch.bfloat16,
    base: str | os.PathLike | None = None,
    overwrite: bool = False,
    tokenizer=None,
    max_shard_size: int = DEFAULT_SHARD_BYTES,
    probe: bool = True,
    progress: bool = True,
    format: str = "safetensors",
    gguf_type: str = "f16",
    before_tensor: Callable[[str], None] | None = None,
) -> dict:
    """Write the model as a merged, dequantized Hugging Face checkpoint (or one GGUF file).

    Args:
        model: a transformers model with LoraLinear / bitsandbytes layers (or plain float).
        out_dir: the checkpoint directory; it appears only once complete.
        dtype: dtype of the exported weights (bf16, fp16 or fp32).
        base: a local float safetensors checkpoint (usually the one the model was loaded
            from): merge B A into its original weights instead of into dequant(W_q). The
            result keeps the original weights' precision but no longer reproduces the
            quantized model that was trained (the LoRA factors learned to correct the
            quantized weights, not the original ones).
        overwrite: replace an existing `out_dir` (kept otherwise).
        tokenizer: a tokenizer to save alongside; default: the files of the checkpoint the
            model was loaded from, when load_model recorded it.
        max_shard_size: bytes per safetensors shard.
        probe: run a probe batch through the trained and the exported model and record the
            relative logits error in `qlowrank_export_report.json`.
        progress: show a tqdm bar per tensor.
        format: "safetensors" (a Hugging Face checkpoint directory) or "gguf" (`out_dir` is then
            the .gguf file; see `qlowrank.gguf_export.export_gguf`; `dtype` is replaced by `gguf_type`).
        gguf_type: with format="gguf": f16, bf16, q8_0 or f32.
        before_tensor: called with each tensor's key just before it is computed, in the
            order of `export_keys(model)` (the trainer gathers that tensor's FSDP shard there).

    Returns:
        The report (also written beside the weights): fidelity figures, shards, bytes.

    Raises:
        OSError: the output cannot be written (full disk, read-only folder); the staging
            folder is removed and an existing `out_dir` is unchanged.
    """
    if format == "gguf":
        from .gguf import export_gguf  # beside this module; it reuses the merge plan below
        return export_gguf(model, out_dir, gguf_type=gguf_type, tokenizer=tokenizer, overwrite=overwrite,
                           probe=probe, base=base)
    if format != "safetensors":
        raise ValueError(f"format={format!r}: use 'safetensors' or 'gguf'")
    dtype = parse_dtype(dtype, "export dtype")
    out_dir = Path(out_dir)
    if out_dir.exists() and not overwrite:
        raise FileExistsError(f"{out_dir} exists; pass overwrite=True (CLI: --overwrite) to replace it")
    if not isinstance(model, transformers.PreTrainedModel):
        raise TypeError(f"export_merged needs a transformers model (it writes config.json); got {type(model).__name__}")
    start = time.time()
    entries = _plan(model)
    if base is not None:
        entries = _from_original(model, entries, Path(base))
    if before_tensor is not None:
        entries = [_Entry(e.key, e.shape, e.dtype, _announced(before_tensor, e)) for e in entries]
    with staged_dir(out_dir, "export") as tmp:
        shards, total = _write_shards(entries, tmp, dtype, max_shard_size, progress)
        _write_config(model, tmp, dtype)
        tokenizer_source = _write_tokenizer(model, tmp, tokenizer)
        report = {
            "dtype": str(dtype).removeprefix("torch."),
            "weights_from": f"original:{base}" if base is not None else "dequantized",
            "base_bits": base_bits(model),
            "shards": shards,
            "total_bytes": total,
            "tokenizer": tokenizer_source,
        }
        if probe:
            report.update(probe_fidelity(model, tmp, dtype))
        report["seconds"] = round(time.time() - start, 2)
        (tmp / REPORT_NAME).write_text(json.dumps(report, indent=2) + "\n")
    print(f"exported {out_dir}: " + ", ".join(f"{k}={v}" for k, v in report.items() if k != "tokenizer"))
    return report


def _weight_of(layer: nn.Module) -> Callable[[], torch.Tensor]:
    """Producer of a wrapped / quantized layer's float32 weight, in its checkpoint layout."""
    fan_in_fan_out = getattr(layer, "fan_in_fan_out", False)

    def produce() -> torch.Tensor:
        if isinstance(layer, LoraLinear):
            layer.check_finite()
            weight = layer.merged_weight()  # (out, in) float32: dequant(W) + scale * B @ A
        else:
            weight = quantlib.dequantize_weight(layer)
        return weight.t() if fan_in_fan_out else weight  # Conv1D checkpoints store (in, out)

    return produce


def _plan(model: nn.Module) -> list[_Entry]:
    """Every tensor the exported state dict holds, with how to compute it (nothing computed yet)."""
    entries: list[_Entry] = []
    skip_inside: str | None = None
    seen: set[int] = set()
    tied = tied_keys(model)
    for name, module in model.named_modules():
        prefix = f"{name}." if name else ""
        if skip_inside is not None and prefix.startswith(skip_inside):
            continue
        if isinstance(module, TrainableTokens):
            skip_inside = prefix
            if prefix + "weight" not in tied:   # a tied head is re-tied to the exported embeddings on load
                weight = module.base_layer.weight
                entries.append(_Entry(prefix + "weight", tuple(weight.shape), torch.float32, module.merged_weight))
            continue
        if isinstance(module, LoraLinear) or quantlib.is_quantized_linear(module):
            skip_inside = prefix
            out_features, in_features = module.out_features, module.in_features
            layout = (in_features, out_features) if getattr(module, "fan_in_fan_out", False) else (out_features, in_features)
            entries.append(_Entry(prefix + "weight", layout, torch.float32, _weight_of(module)))
            bias = (module.base_layer if isinstance(module, LoraLinear) else module).bias
            if bias is not None:
                owner = module.base_layer if isinstance(module, LoraLinear) else module
                entries.append(_Entry(prefix + "bias", tuple(bias.shape), bias.dtype, lambda m=owner: m.bias.detach()))
            continue
        tensors = [(k, v) for k, v in module._parameters.items() if v is not None]
        tensors += [(k, v) for k, v in module._buffers.items() if v is not None and k not in module._non_persistent_buffers_set]
        for leaf, tensor in tensors:
            key = prefix + leaf
            if key in tied or id(tensor) in seen:
                continue  # tied to a tensor already exported; from_pretrained re-ties it
            seen.add(id(tensor))
            # Looked up when written, not now: a sharded (FSDP) module swaps in the gathered tensor.
            entries.append(_Entry(key, tuple(tensor.shape), tensor.dtype, lambda m=module, n=leaf: getattr(m, n).detach()))
    return entries


def export_keys(model: nn.Module) -> list[str]:
    """The keys export_merged writes, in the order it computes them."""
    return [entry.key for entry in _plan(model)]


def _announced(before: Callable[[str], None], entry: _Entry) -> Callable[[], torch.Tensor]:
    def produce() -> torch.Tensor:
        before(entry.key)
        # A copy: writing hands the bytes to numpy, which pins the storage, and FSDP must be
        # able to free the gathered parameter afterwards.
        return entry.produce().clone()

    return produce


def _from_original(model: nn.Module, entries: list[_Entry], base: Path) -> list[_Entry]:
    """Replace each producer by the original checkpoint's tensor (+ scale * B A for LoRA layers)."""
    changed = sorted({layer.init for layer in model.modules() if isinstance(layer, LoraLinear)
                      and (layer.init == "pissa" or (layer.init == "loftq" and layer.loftq_iters > 1))})
    if changed:
        raise ValueError(f"base={base}: this model was initialised with {changed}, which replaced the frozen weights "
                         "(PiSSA's residual, LoftQ's quant(W - s B A)); its LoRA factors are not an update to the "
                         "original weights. Export without base= (from the weights the model trained on).")
    files = checkpoint_files(base)
    mapped = key_mapper({e.key for e in entries}, model.base_model_prefix)
    where = {}
    for ckpt_key, path in files.weight_map.items():
        key = mapped(ckpt_key)
        if key is not None:
            where[key] = (path, ckpt_key)
    missing = [e.key for e in entries if e.key not in where]
    if missing:
        raise ValueError(f"base={base}: the original checkpoint lacks {missing[:20]}; is it the model's base?")
    modules = dict(model.named_modules())
    result = []
    for entry in entries:
        path, ckpt_key = where[entry.key]
        layer = modules.get(entry.key.rpartition(".")[0])
        delta_layer = layer if isinstance(layer, LoraLinear) and entry.key.endswith(".weight") else None
        result.append(_Entry(entry.key, entry.shape, entry.dtype, _original_producer(path, ckpt_key, entry, delta_layer)))
    return result


def _original_producer(path: Path, ckpt_key: str, entry: _Entry, layer: LoraLinear | None):
    def produce() -> torch.Tensor:
        with open_safetensors(path) as handle:
            tensor = handle.get_tensor(ckpt_key)
        if tuple(tensor.shape) != entry.shape:
            raise ValueError(f"{path.name}: {ckpt_key!r} has shape {tuple(tensor.shape)}, the model has {entry.shape}")
        if layer is None:
            return tensor
        layer.check_finite()
        delta = layer.delta_weight().cpu()  # (out, in) float32
        return tensor.float() + (delta.t() if layer.fan_in_fan_out else delta)

    return produce


# safetensors' dtype names (the format's header spells them like this).
_SAFETENSORS_DTYPES = {
    torch.float64: "F64", torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL",
}


def _stored_dtype(entry: _Entry, dtype: torch.dtype) -> torch.dtype:
    return dtype if entry.dtype.is_floating_point else entry.dtype


def _nbytes(entry: _Entry, dtype: torch.dtype) -> int:
    return _stored_dtype(entry, dtype).itemsize * int(torch.Size(entry.shape).numel())


def _write_safetensors(path: Path, entries: list[_Entry], dtype: torch.dtype, bar) -> None:
    """Write one safetensors file, computing, writing and freeing one tensor at a time.

    The format is an 8-byte little-endian header length, a JSON header with each tensor's
    dtype, shape and byte range, then the raw bytes. The plan knows every shape and dtype,
    so the header is written first and no tensor waits in memory for the others
    (safetensors' own save_file holds the whole shard, and then a bytes copy of it).
    """
    header: dict = {"__metadata__": {"format": "pt"}}
    offset = 0
    for entry in entries:
        size = _nbytes(entry, dtype)
        stored = _SAFETENSORS_DTYPES[_stored_dtype(entry, dtype)]
        header[entry.key] = {"dtype": stored, "shape": list(entry.shape), "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # tensor data starts 8-byte aligned
    with open(path, "wb") as handle:
        handle.write(struct.pack("<Q", len(raw)))
        handle.write(raw)
        for entry in entries:
            tensor = entry.produce()
            if tensor.is_floating_point():
                tensor = tensor.to(dtype)  # the one cast, from float32 (merged) or the stored dtype
            tensor = tensor.detach().cpu().contiguous()
            if tuple(tensor.shape) != entry.shape or tensor.dtype != _stored_dtype(entry, dtype):
                raise RuntimeError(f"export of {entry.key}: produced {tuple(tensor.shape)} {tensor.dtype}, "
                                   f"planned {entry.shape} {_stored_dtype(entry, dtype)}")
            handle.write(tensor.reshape(-1).view(torch.uint8).numpy().data)
            del tensor
            release_freed_memory()
            bar.update(1)


def _write_shards(entries: list[_Entry], folder: Path, dtype: torch.dtype, max_bytes: int, progress: bool):
    shards: list[list[_Entry]] = [[]]
    size = 0
    for entry in entries:
        if shards[-1] and size + _nbytes(entry, dtype) > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(entry)
        size += _nbytes(entry, dtype)
    weight_map = {}
    bar = tqdm(total=len(entries), desc="exporting", unit="tensor", disable=not progress)
    for i, shard in enumerate(shards, 1):
        name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        _write_safetensors(folder / name, shard, dtype, bar)
        weight_map.update({entry.key: name for entry in shard})
    bar.close()
    total = sum(_nbytes(e, dtype) for e in entries)
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (folder / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
    return len(shards), total


def _write_config(model: nn.Module, folder: Path, dtype: torch.dtype) -> None:
    config = copy.deepcopy(model.config)
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    config.dtype = dtype
    config.architectures = [type(model).__name__]
    config.save_pretrained(str(folder))
    generation = getattr(model, "generation_config", None)
    if generation is not None:
        generation.save_pretrained(str(folder))


def _write_tokenizer(model: nn.Module, folder: Path, tokenizer) -> str | None:
    tokenizer = tokenizer if tokenizer is not None else state_of(model).tokenizer  # add_tokens'
    if tokenizer is not None:
        tokenizer.save_pretrained(str(folder))
        return "given"
    source = state_of(model).source
    if not source:
        return None
    origin = Path(source["path"])
    if source.get("gguf_file"):
        gguf_tokenizer = transformers.AutoTokenizer.from_pretrained(str(origin), gguf_file=source["gguf_file"])
        gguf_tokenizer.save_pretrained(str(folder))
        return str(origin / source["gguf_file"])
    copied = [name for name in TOKENIZER_FILES if (origin / name).is_file()]
    for name in copied:
        shutil.copy2(origin / name, folder / name)
    return str(origin) if copied else None


def _logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            return model(ids.to(model.device)).logits.float().cpu()
    finally:
        model.train(was_training)


def probe_fidelity(model: nn.Module, exported_dir: str | os.PathLike, dtype: torch.dtype, seq: int = 32) -> dict:
    """Relative logits error of an exported checkpoint against the model it came from.

    A fixed random batch (2 x seq tokens, seed 0) runs through both; the error is
    ||logits_export - logits_model|| / ||logits_model|| (Frobenius), and argmax agreement is the
    fraction of positions whose top token is the same.
    """
    config = model.config
    limit = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None) or seq
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, config.vocab_size, (2, min(seq, limit)), generator=generator)
    reference = _logits(model, ids)
    # CPUs have no fp16 matmul kernels (thousands of times slower than bf16): an fp16 export
    # is probed with its fp16-rounded weights computed in float32 there.
    run_dtype = torch.float32 if dtype == torch.float16 and model.device.type == "cpu" else dtype
    exported = type(model).from_pretrained(str(exported_dir), dtype=run_dtype).to(model.device)
    logits = _logits(exported, ids)
    del exported
    error = (logits - reference).norm() / reference.norm()
    return {
        "probe_tokens": list(ids.shape),
        "probe_compute_dtype": str(run_dtype).removeprefix("torch."),
        "relative_logits_error": float(error),
        "max_abs_logits_error": float((logits - reference).abs().max()),
        "argmax_agreement": float((logits.argmax(-1) == reference.argmax(-1)).float().mean()),
    }
