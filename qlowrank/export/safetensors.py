"""export_merged: write a trained model as a plain, dequantized, merged Hugging Face checkpoint (or one GGUF file).

Each LoRA-wrapped weight becomes `dequant(W_q) + scale * B @ A`, computed in float32 and
cast once to the export dtype, so the checkpoint computes what the trained (quantized)
model computed; `base=<float checkpoint>` merges into the original float weights instead.
The output is streamed tensor by tensor into a staging directory (peak RAM: the quantized
model plus the largest tensor), checked against the trained model on a probe batch that
reads the written shards one module at a time (probe.py), and only then renamed into
place. Nothing is re-quantized, and the result needs neither qlowrank, nor peft, nor
bitsandbytes to load.
"""

from __future__ import annotations

import json
import os
import struct
import time
from pathlib import Path
from typing import Any, Callable

import torch
import transformers
from torch import nn
from tqdm.auto import tqdm

from ..adapter import base_bits
from ..atomic import staged_dir
from ..heap import release_free_heap
from ..model.load import open_safetensors
from .gguf_writer import write_gguf  # imports the optional `gguf` package only when called
from .entries import DEFAULT_SHARD_BYTES, ExportEntry, ExportOptions, export_config, planned_entries
from .probe import probe_fidelity
from .tokenizer import save_tokenizer

REPORT_NAME = "qlowrank_export_report.json"
INDEX_NAME = "model.safetensors.index.json"


def export_merged(
    model: nn.Module,
    out_dir: str | os.PathLike,
    dtype: torch.dtype | str = torch.bfloat16,
    **options: Any,
) -> dict:
    """Write the model as a merged, dequantized Hugging Face checkpoint (or one GGUF file).

    Args:
        model: a transformers model with LoraLinear / bitsandbytes layers (or plain float).
        out_dir: the checkpoint directory; it appears only once complete.
        dtype: dtype of the exported weights (bf16, fp16 or fp32).
        **options: the rest of `ExportOptions` (export/entries.py), by name:
        base: a local float safetensors checkpoint (usually the one the model was loaded
            from): merge B A into its original weights instead of into dequant(W_q). The
            result keeps the original weights' precision but no longer reproduces the
            quantized model that was trained (the LoRA factors learned to correct the
            quantized weights, not the original ones).
        overwrite: replace an existing `out_dir` (kept otherwise).
        tokenizer: a tokenizer to save alongside; default: the one `add_tokens` enlarged,
            else the files of the checkpoint the model was loaded from (export/tokenizer.py).
        max_shard_size: bytes per safetensors shard.
        probe: run a probe batch through the trained model and, one module at a time,
            through the written weights, and record the relative logits error in
            `qlowrank_export_report.json` (export/probe.py).
        progress: show a tqdm bar per tensor.
        format: "safetensors" (a Hugging Face checkpoint directory) or "gguf" (`out_dir` is then
            the .gguf file, see export/gguf_writer.py; `dtype` is replaced by `gguf_type`).
        gguf_type: with format="gguf": f16, bf16, q8_0 or f32.
        before_tensor: called with each tensor's key just before it is computed, in the
            order of `export_keys(model)` (the trainer gathers that tensor's FSDP shard there).

    Returns:
        The report (also written beside the weights): fidelity figures, shards, bytes.

    Raises:
        OSError: the output cannot be written (full disk, read-only folder); the staging
            folder is removed and an existing `out_dir` is unchanged.
    """
    options = ExportOptions(out_dir, dtype, **options)
    if options.format == "gguf":
        return write_gguf(model, options)
    return write_safetensors(model, options)


def write_safetensors(model: nn.Module, options: ExportOptions) -> dict:
    """The safetensors half of `export_merged`: shards, index, config, tokenizer, probe, report."""
    options.check_target()
    if not isinstance(model, transformers.PreTrainedModel):
        raise TypeError(f"export_merged needs a transformers model (it writes config.json); got {type(model).__name__}")
    start = time.time()
    entries = planned_entries(model, options)
    with staged_dir(options.out, "export") as tmp:
        shards, total = _write_shards(entries, tmp, options)
        _write_config(model, export_config(model, options.dtype), tmp)
        tokenizer_source = save_tokenizer(model, tmp, options.tokenizer)
        report = {
            "dtype": str(options.dtype).removeprefix("torch."),
            "weights_from": f"original:{options.base}" if options.base is not None else "dequantized",
            "base_bits": base_bits(model),
            "shards": shards,
            "total_bytes": total,
            "tokenizer": tokenizer_source,
        }
        if options.probe:
            # The config as written, read back: the probe runs what from_pretrained(out_dir) would build.
            config = type(model).config_class.from_pretrained(str(tmp))
            report.update(probe_fidelity(model, config, ShardReader(tmp), options.dtype))
        report["seconds"] = round(time.time() - start, 2)
        (tmp / REPORT_NAME).write_text(json.dumps(report, indent=2) + "\n")
    print(f"exported {options.out}: " + ", ".join(f"{k}={v}" for k, v in report.items() if k != "tokenizer"))
    return report


class ShardReader:
    """Reads one tensor of a written checkpoint by key, through its index (the probe's WeightReader)."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.weight_map = json.loads((folder / INDEX_NAME).read_text())["weight_map"]

    def __call__(self, key: str) -> torch.Tensor:
        if key not in self.weight_map:
            raise KeyError(f"{self.folder}: the export holds no tensor {key!r}, which the model class expects")
        with open_safetensors(self.folder / self.weight_map[key]) as handle:
            return handle.get_tensor(key)


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


def _header(entries: list[ExportEntry], dtype: torch.dtype) -> bytes:
    """The safetensors header: 8-byte little-endian length, then JSON (dtype, shape, byte range per tensor)."""
    header: dict = {"__metadata__": {"format": "pt"}}
    offset = 0
    for entry in entries:
        size = _nbytes(entry, dtype)
        stored = _SAFETENSORS_DTYPES[_stored_dtype(entry, dtype)]
        header[entry.key] = {"dtype": stored, "shape": list(entry.shape), "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # tensor data starts 8-byte aligned
    return struct.pack("<Q", len(raw)) + raw


def _write_safetensors(path: Path, entries: list[ExportEntry], dtype: torch.dtype, bar) -> None:
    """Write one safetensors file, computing, writing and freeing one tensor at a time.

    The plan knows every shape and dtype, so the header is written first and no tensor waits
    in memory for the others. The `safetensors` package cannot do this: save_file and
    serialize_file (0.8) take every tensor of the file at once (measured in
    benchmarks/RESULTS.md, "Export peak").
    """
    with open(path, "wb") as handle:
        handle.write(_header(entries, dtype))
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
            release_free_heap()
            bar.update(1)


def _shard_groups(entries: list[ExportEntry], dtype: torch.dtype, max_bytes: int) -> list[list[ExportEntry]]:
    """The entries in plan order, cut into shards of at most `max_bytes` (a larger tensor gets its own)."""
    shards: list[list[ExportEntry]] = [[]]
    size = 0
    for entry in entries:
        if shards[-1] and size + _nbytes(entry, dtype) > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(entry)
        size += _nbytes(entry, dtype)
    return shards


def _write_shards(entries: list[ExportEntry], folder: Path, options: ExportOptions) -> tuple[int, int]:
    shards = _shard_groups(entries, options.dtype, options.max_shard_size)
    weight_map = {}
    bar = tqdm(total=len(entries), desc="exporting", unit="tensor", disable=not options.progress)
    for i, shard in enumerate(shards, 1):
        name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        _write_safetensors(folder / name, shard, options.dtype, bar)
        weight_map.update({entry.key: name for entry in shard})
    bar.close()
    total = sum(_nbytes(e, options.dtype) for e in entries)
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (folder / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
    return len(shards), total


def _write_config(model: nn.Module, config: transformers.PretrainedConfig, folder: Path) -> None:
    config.save_pretrained(str(folder))
    generation = getattr(model, "generation_config", None)
    if generation is not None:
        generation.save_pretrained(str(folder))
