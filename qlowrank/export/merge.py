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
from pathlib import Path
from typing import Callable

import torch
import transformers
from torch import nn
from tqdm.auto import tqdm

from ..adapter import base_bits
from ..atomic import staged_dir
from ..config import parse_dtype
from ..model.load import release_freed_memory
from ..state import state_of
from .plan import ExportEntry, announced, export_plan, from_original
from .probe import probe_fidelity

REPORT_NAME = "qlowrank_export_report.json"
INDEX_NAME = "model.safetensors.index.json"
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model", "vocab.json",
    "merges.txt", "vocab.txt", "added_tokens.json", "chat_template.jinja", "chat_template.json",
)
DEFAULT_SHARD_BYTES = 2 * 2**30


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
    entries = export_plan(model)
    if base is not None:
        entries = from_original(model, entries, Path(base))
    if before_tensor is not None:
        entries = [ExportEntry(e.key, e.shape, e.dtype, announced(before_tensor, e)) for e in entries]
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


# safetensors' dtype names (the format's header spells them like this).
_SAFETENSORS_DTYPES = {
    torch.float64: "F64", torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL",
}


def _stored_dtype(entry: ExportEntry, dtype: torch.dtype) -> torch.dtype:
    return dtype if entry.dtype.is_floating_point else entry.dtype


def _nbytes(entry: ExportEntry, dtype: torch.dtype) -> int:
    return _stored_dtype(entry, dtype).itemsize * int(torch.Size(entry.shape).numel())


def _write_safetensors(path: Path, entries: list[ExportEntry], dtype: torch.dtype, bar) -> None:
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


def _write_shards(entries: list[ExportEntry], folder: Path, dtype: torch.dtype, max_bytes: int, progress: bool):
    shards: list[list[ExportEntry]] = [[]]
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


