"""Streamed GGUF reader: one tensor dequantized at a time, quantized to 4/8-bit at once, so a GGUF loads at about the memory of its result.

transformers' GGUF reader dequantizes every tensor of the file to float32 before the model
exists (an 8B GGUF needs ~40 GB of RAM that way). Here the file is memory-mapped (its
tensor table read by `gguf_header`, which skips the vocabulary), the model is built on the meta device from the header's
config (`gguf_header.gguf_config`, equal to transformers'), and each tensor is then:

1. dequantized alone with `gguf.quants.dequantize` (the function transformers' reader calls,
   so the float values are the same bits), a slab of rows at a time, straight into a tensor
   of the dtype it will be kept in;
2. put back into Hugging Face's layout: GGUF lists dimensions fastest-first (`open_gguf`
   reverses them into torch order), and llama.cpp's converter interleaves the rotary
   halves of q_proj / k_proj rows for the "llama" architecture, undone here per head;
3. handed to `stream.TensorSink`, which quantizes a linear the moment its weight (and bias)
   are complete and drops the float copy, or keeps an embedding / norm / head in float.

Peak RAM: the quantized model plus about twice the float32 bytes of the largest quantized
linear (its float32 copy and bitsandbytes' working copy), measured in benchmarks/gguf_load.py.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from ..heap import release_free_heap
from .gguf_header import gguf_config, read_gguf_layout
from .stream import LoadSettings, TensorSink, empty_model

# GGUF architectures this reader knows (general.architecture). llama.cpp writes Llama,
# Mistral and SmolLM2 as "llama"; only "llama" has its q/k rows permuted (convert_hf_to_gguf.py).
ARCHITECTURES = {"llama": True, "qwen2": False}  # architecture -> q/k rotary rows permuted
# Tensor types tested equal to transformers' reader (tests/test_gguf_reader.py).
TENSOR_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q4_K", "Q5_K", "Q6_K")
# Rows are dequantized in slabs of about this many values: gguf's numpy dequantizers make a
# few float32 temporaries of their input's size, so a whole 128k x 4096 embedding at once
# would cost several GB; 2^22 values keep them at tens of MB and the per-call overhead small.
SLAB_VALUES = 1 << 22
FALLBACK = "load_model(..., gguf_reader='transformers') (transformers' reader, which dequantizes the whole file first)"


def _gguf():
    try:
        import gguf
    except ImportError:
        raise ImportError("reading a GGUF file needs the `gguf` package: pip install gguf") from None
    return gguf


@dataclass
class GgufTensor:
    """One tensor of a mapped GGUF file, laid out as `gguf.GGUFReader` lays it out."""

    name: str
    shape: tuple[int, ...]   # torch order (GGUF's dimensions reversed)
    ggml_type: object        # gguf.GGMLQuantizationType
    data: np.ndarray         # read-only view of the mapping: values (F32, F16) or bytes (blocks, BF16), rows last


def open_gguf(path: str | Path) -> tuple[dict, list[GgufTensor]]:
    """(metadata, tensors) of a GGUF file, its data memory-mapped: bytes are read only when a tensor is touched.

    The tensor table comes from `gguf_header.read_gguf_layout`, not from `gguf.GGUFReader`,
    which decodes the whole vocabulary first (157 MiB of Python objects for SmolLM2's 49k
    tokens, several times that for Llama 3's 128k): as much as the 4-bit model's linears.

    Raises:
        ValueError: not a GGUF file, a tensor type this reader does not read (naming the
            fallback), or a file shorter than its tensor table says.
    """
    types = _gguf().GGMLQuantizationType
    fields, table = read_gguf_layout(path)
    blob = np.memmap(path, mode="r", dtype=np.uint8)
    tensors = []
    for entry in table:
        kind = types(entry.ggml_type) if entry.ggml_type in types._value2member_map_ else None
        if kind is None or kind.name not in TENSOR_TYPES:
            raise ValueError(f"{path}: tensor {entry.name!r} is stored as {kind.name if kind else entry.ggml_type}, "
                             f"which the streamed GGUF reader does not read (it reads {', '.join(TENSOR_TYPES)}). "
                             f"Use {FALLBACK}.")
        shape = tuple(reversed(entry.dims))
        block, size = _gguf().GGML_QUANT_SIZES[kind]
        raw = blob[entry.offset:entry.offset + int(np.prod(shape)) * size // block]
        if raw.size * block != int(np.prod(shape)) * size:
            raise ValueError(f"{path}: tensor {entry.name!r} runs past the end of the file; the file is truncated")
        if kind in (types.F32, types.F16):
            data = raw.view(np.float32 if kind == types.F32 else np.float16).reshape(shape)
        else:
            data = raw.reshape(_gguf().quants.quant_shape_to_byte_shape(shape, kind))
        tensors.append(GgufTensor(entry.name, shape, kind, data))
    return fields, tensors


def hf_names(model: nn.Module, architecture: str) -> dict[str, str]:
    """GGUF tensor name -> the model's state-dict key, from the `gguf` package's name map."""
    gguf = _gguf()
    arch = next(key for key, name in gguf.MODEL_ARCH_NAMES.items() if name == architecture)
    name_map = gguf.get_tensor_name_map(arch, model.config.num_hidden_layers)
    names = {}
    for key in model.state_dict():
        stem, dot, suffix = key.rpartition(".")
        gguf_name = name_map.get_name(stem)
        if gguf_name is not None:
            names[gguf_name + dot + suffix] = key
    return names


def dequantize(tensor, dtype: torch.dtype) -> torch.Tensor:
    """One GGUF tensor as a float torch tensor of `dtype` in numpy (row-major, HF) order.

    Values are `gguf.quants.dequantize`'s float32 results, cast once to `dtype`: the slabs
    hold whole rows, and GGUF blocks never cross a row, so the result equals dequantizing
    the tensor whole (transformers' reader) bit for bit.
    """
    quants = _gguf().quants
    kind, shape = tensor.ggml_type, tensor.shape
    data = tensor.data.reshape(-1, tensor.data.shape[-1])  # (rows, values or bytes per row)
    out = torch.empty((data.shape[0], shape[-1]), dtype=dtype)
    step = max(1, SLAB_VALUES // shape[-1])
    for start in range(0, data.shape[0], step):
        slab = quants.dequantize(data[start:start + step], kind)
        if not slab.flags.writeable:  # F32 comes back as a view of the read-only mapping
            slab = np.array(slab)
        out[start:start + step] = torch.from_numpy(slab)
    return out.reshape(shape)


def unpermute_rotary(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """Rows of q/k from llama.cpp's interleaved rotary pairs back to HF's two halves, per head.

    The inverse of the exporter's permutation; the same reshape as transformers' reader.
    """
    out, cols = weight.shape
    half = out // heads // 2
    return weight.reshape(heads, half, 2, cols).transpose(1, 2).reshape(out, cols)  # (out, in)


def rotary_heads(architecture: str, key: str, config) -> int | None:
    """The head count whose rotary rows llama.cpp permuted in tensor `key` (q / k of "llama"), else None."""
    if not ARCHITECTURES.get(architecture, False):
        return None
    heads = config.num_attention_heads
    if key.endswith("self_attn.q_proj.weight"):
        return heads
    if key.endswith("self_attn.k_proj.weight"):
        return getattr(config, "num_key_value_heads", None) or heads
    return None


def check_architecture(fields: dict, path: Path) -> str:
    """The file's architecture, or ValueError naming what the streamed reader reads and the fallback."""
    architecture = str(fields.get("general.architecture", "?"))
    if architecture not in ARCHITECTURES:
        raise ValueError(f"{path}: the streamed GGUF reader knows the architectures {sorted(ARCHITECTURES)} "
                         f"(Llama, Mistral, SmolLM2, Qwen2); this file is {architecture!r}. Use {FALLBACK}.")
    return architecture


def load_gguf_streamed(path: str | Path, settings: LoadSettings) -> nn.Module:
    """A GGUF model loaded tensor by tensor into `settings` (quantized linears or float).

    Raises:
        ValueError: an architecture or tensor type this reader does not know (naming the
            transformers fallback), a corrupt file, or tensors that do not fit the config.
    """
    path = Path(path)
    fields, tensors = open_gguf(path)
    architecture = check_architecture(fields, path)
    config = gguf_config(path)
    model = empty_model(config, settings.dtype)
    sink = TensorSink(model, settings)
    names = hf_names(model, architecture)
    unexpected = []
    for tensor in tqdm(tensors, desc="loading", unit="tensor", disable=not settings.progress):
        key = names.get(tensor.name)
        if key is None:
            unexpected.append(tensor.name)
            continue
        sink.check_shape(key, tensor.shape, path.name)
        # A weight that will be quantized stays float32 until then, as on transformers' path
        # (quantize_linear decides whether to round it through the compute dtype first).
        weight = dequantize(tensor, torch.float32 if sink.quantizes(key) else settings.dtype)
        heads = rotary_heads(architecture, key, config)
        if heads is not None:
            weight = unpermute_rotary(weight, heads)
        sink.put(key, weight, path.name, owned=True)
        del weight
    model = sink.finish(str(path), unexpected)
    del tensors  # drops the memory map
    release_free_heap()
    return model
