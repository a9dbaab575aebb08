"""Streamed GGUF reader: one tensor dequantized at a time, quantized to 4/8-bit at once, so a GGUF loads at about the memory of its result.

transformers' GGUF reader dequantizes every tensor of the file to float32 before the model
exists (an 8B GGUF needs ~40 GB of RAM that way). Here the file is memory-mapped (its
tensor table read by `gguf_header`, which skips the vocabulary), the model is built on the meta device from the header's
config (`gguf_header.gguf_config`, equal to transformers'), and each tensor is then:

1. dequantized alone with `gguf.quants.dequantize` (the function transformers' reader calls,
   so the float values are the same bits), a slab of rows at a time;
2. put back into Hugging Face's layout by transformers' own per-architecture tensor processor
   (`modeling_gguf_pytorch_utils.TENSOR_PROCESSORS`: the q/k rotary rows of "llama", Gemma's
   `1 + w` norms, ...) and named by transformers' own name map (`get_gguf_hf_weights_map`), so
   every architecture that reader knows is read with its conventions and no table of ours;
3. handed to `stream.TensorSink`, which quantizes a linear the moment its weight (and bias)
   are complete and drops the float copy, or keeps an embedding / norm / head in float.

A processor that leaves a tensor as it is (asked first with an empty stand-in) lets it be
dequantized straight into the dtype it is kept in; the others get transformers' float32
numpy path, as in transformers' reader.

Not streamed: the architectures of transformers' newer GGUF path (Qwen3.5, LFM2:
`transformers.integrations.gguf.GGUF_ARCHS`), which `NotStreamable` hands to transformers'
reader (load.py falls back and says so), and mixtures of experts, refused until the fused
expert modules can take them.

Peak RAM: the quantized model plus about twice the float32 bytes of the largest quantized
linear (its float32 copy and bitsandbytes' working copy), measured in benchmarks/gguf_load.py.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from ..heap import release_free_heap
from .gguf_header import config_from_values, gguf_config_values, read_gguf_layout
from .stream import LoadSettings, TensorSink, empty_model

# Rows are dequantized in slabs of about this many values: gguf's numpy dequantizers make a
# few float32 temporaries of their input's size, so a whole 128k x 4096 embedding at once
# would cost several GB; 2^22 values keep them at tens of MB and the per-call overhead small.
SLAB_VALUES = 1 << 22
FALLBACK = "load_model(..., gguf_reader='transformers') (transformers' reader, which dequantizes the whole file first)"


class NotStreamable(ValueError):
    """A valid GGUF file that the streamed reader cannot read but transformers' reader can (load.py falls back to it)."""


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
        ValueError: not a GGUF file, a tensor type the `gguf` package does not know, or a
            file shorter than its tensor table says (truncated), naming the file and tensor.
    """
    gguf = _gguf()
    types = gguf.GGMLQuantizationType
    fields, table = read_gguf_layout(path)
    blob = np.memmap(path, mode="r", dtype=np.uint8)
    tensors = []
    for entry in table:
        if entry.ggml_type not in types._value2member_map_ or types(entry.ggml_type) not in gguf.GGML_QUANT_SIZES:
            raise ValueError(f"{path}: tensor {entry.name!r} has tensor type id {entry.ggml_type}, which the `gguf` "
                             "package does not know: the file is corrupt or newer than `gguf` (pip install -U gguf)")
        kind = types(entry.ggml_type)
        shape = tuple(reversed(entry.dims))
        block, size = gguf.GGML_QUANT_SIZES[kind]
        count = int(np.prod(shape))
        if count % block or (shape and shape[-1] % block):
            raise ValueError(f"{path}: tensor {entry.name!r} has shape {shape}, which does not divide into "
                             f"{kind.name} blocks of {block}: the file is corrupt")
        raw = blob[entry.offset:entry.offset + count * size // block]
        if raw.size * block != count * size:
            raise ValueError(f"{path}: tensor {entry.name!r} runs past the end of the file ({blob.size} bytes); the "
                             "file is truncated or corrupt (download or copy it again)")
        if kind in (types.F32, types.F16):
            data = raw.view(np.float32 if kind == types.F32 else np.float16).reshape(shape)
        else:
            data = raw.reshape(gguf.quants.quant_shape_to_byte_shape(shape, kind))
        tensors.append(GgufTensor(entry.name, shape, kind, data))
    return fields, tensors


def check_gguf_file(path: str | Path) -> None:
    """ValueError naming the file and tensor when a GGUF file is truncated or its tensor table corrupt.

    Reads the header only. Called before transformers' GGUF reader (tokenizer, fallback),
    whose own errors on a short file name neither ("cannot reshape array of size ...").
    """
    open_gguf(path)


def dequantize(tensor: GgufTensor, dtype: torch.dtype, origin: str = "") -> torch.Tensor:
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
        try:
            slab = quants.dequantize(data[start:start + step], kind)
        except NotImplementedError:
            raise ValueError(f"{origin or 'GGUF file'}: tensor {tensor.name!r} is stored as {kind.name}, which the "
                             "`gguf` package cannot dequantize (nor can transformers' reader, which uses it)") from None
        if not slab.flags.writeable:  # F32 comes back as a view of the read-only mapping
            slab = np.array(slab)
        out[start:start + step] = torch.from_numpy(slab)
    return out.reshape(shape)


def tensor_processor(architecture: str, values: dict):
    """transformers' tensor processor for a GGUF architecture, built on the file's config values."""
    from transformers.modeling_gguf_pytorch_utils import TENSOR_PROCESSORS, TensorProcessor

    return TENSOR_PROCESSORS.get(architecture, TensorProcessor)(config=values)


def hf_names(model: nn.Module, architecture: str, processor) -> dict[str, str]:
    """GGUF tensor name -> the model's state-dict key, from transformers' own GGUF name mapping."""
    from transformers.modeling_gguf_pytorch_utils import get_gguf_hf_weights_map

    # The file's own architecture, not the model's type: a "llama" file may build a Mistral.
    return get_gguf_hf_weights_map(model, processor, model_type=architecture,
                                   num_layers=model.config.num_hidden_layers)


class GgufTensors:
    """A GGUF file's tensors converted one at a time into a model's layout by transformers' processor.

    Args:
        path: the .gguf file.
        names: GGUF tensor name -> state-dict key (see `hf_names`).
        processor: from `tensor_processor`.
    """

    def __init__(self, path: str | Path, names: dict[str, str], processor, tensors: list[GgufTensor] | None = None):
        self.path, self.names, self.processor = Path(path), names, processor
        self.tensors = tensors if tensors is not None else open_gguf(path)[1]

    def _changes(self, tensor: GgufTensor) -> bool:
        """Whether the processor changes this tensor (asked with an empty stand-in of its rank)."""
        probe = np.empty((0,) * len(tensor.shape), dtype=np.float32)
        stash = {"tensors": {}}
        try:
            result = self.processor.process(weights=probe, name=tensor.name, tensor_key_mapping=self.names,
                                            parsed_parameters=stash)
        except Exception:   # e.g. a reshape that needs the real rows: it does something
            return True
        return result.weights is not probe or result.name != tensor.name or bool(stash["tensors"])

    def convert(self, tensor: GgufTensor, dtype_of: Callable[[str], torch.dtype]) -> list[tuple[str, torch.Tensor]]:
        """[(state-dict key, tensor in the dtype `dtype_of(key)` gives)] for one GGUF tensor; [] if unmapped."""
        if not self._changes(tensor):
            key = self.names.get(tensor.name)
            return [] if key is None else [(key, dequantize(tensor, dtype_of(key), str(self.path)))]
        # transformers' path: the whole tensor in float32 numpy, processed, then cast.
        weights = dequantize(tensor, torch.float32, str(self.path)).numpy()
        stash = {"tensors": {}}
        result = self.processor.process(weights=weights, name=tensor.name, tensor_key_mapping=self.names,
                                        parsed_parameters=stash)
        out = list(stash["tensors"].items())   # tensors a processor stores itself (GPT-2's head), HF-named
        if result.name is not None and result.name in self.names:
            out.append((self.names[result.name], torch.from_numpy(np.ascontiguousarray(result.weights))))
        return [(key, value.to(dtype_of(key))) for key, value in out]

    def read(self, key: str) -> torch.Tensor:
        """The float32 tensor of state-dict key `key` (KeyError if the file has none)."""
        by_key = {self.names[tensor.name]: tensor for tensor in self.tensors if tensor.name in self.names}
        if key not in by_key:
            raise KeyError(f"{self.path}: no GGUF tensor holds {key!r}")
        return dict(self.convert(by_key[key], lambda _: torch.float32))[key]


def check_streamable(fields: dict, tensors: list[GgufTensor], config, path: Path) -> str:
    """The file's architecture; NotStreamable (transformers' newer GGUF path) or ValueError (MoE) otherwise."""
    from transformers.integrations.gguf import GGUF_ARCHS

    architecture = str(fields.get("general.architecture", "?"))
    if architecture in GGUF_ARCHS:
        raise NotStreamable(f"{path}: transformers reads {architecture!r} GGUF files through its newer conversion "
                            "path, which the streamed reader does not follow yet")
    experts = getattr(config, "num_experts", None) or getattr(config, "num_local_experts", None)
    if experts or any("_exps" in tensor.name for tensor in tensors):
        raise ValueError(f"{path}: a mixture-of-experts GGUF ({architecture!r}) cannot be loaded yet; load the "
                         "model's safetensors checkpoint instead")
    return architecture


def load_gguf_streamed(path: str | Path, settings: LoadSettings) -> nn.Module:
    """A GGUF model loaded tensor by tensor into `settings` (quantized linears or float).

    Raises:
        NotStreamable: a file transformers' reader must read (load.py falls back to it).
        ValueError: a truncated or corrupt file, a tensor type nothing can dequantize, a
            mixture of experts, or tensors that do not fit the config, each naming the file
            and the tensor.
    """
    path = Path(path)
    fields, tensors = open_gguf(path)
    model_type, values = gguf_config_values(path)
    config = config_from_values(model_type, values, path)
    architecture = check_streamable(fields, tensors, config, path)
    model = empty_model(config, settings.dtype)
    sink = TensorSink(model, settings)
    processor = tensor_processor(architecture, values)
    reader = GgufTensors(path, hf_names(model, architecture, processor), processor, tensors)

    def dtype_of(key: str) -> torch.dtype:
        # A weight that will be quantized stays float32 until then, as on transformers' path
        # (quantize_linear decides whether to round it through the compute dtype first).
        return torch.float32 if sink.quantizes(key) else settings.dtype

    # Checked before dequantizing, to fail fast on a config that does not fit; a processor may
    # still change a tensor's rank (Mamba's conv1d), so only same-rank shapes are compared here.
    shapes = {key: tuple(value.shape) for key, value in model.state_dict().items()}
    unexpected = []
    for tensor in tqdm(tensors, desc="loading", unit="tensor", disable=not settings.progress):
        key = reader.names.get(tensor.name)
        if key in shapes and len(tensor.shape) == len(shapes[key]):
            sink.check_shape(key, tensor.shape, f"{path.name}: GGUF tensor {tensor.name!r}")
        converted = reader.convert(tensor, dtype_of)
        if not converted:
            unexpected.append(tensor.name)
        for key, weight in converted:
            sink.put(key, weight, f"{path.name}: GGUF tensor {tensor.name!r}", owned=True)
        del converted
    model = sink.finish(str(path), unexpected)
    del tensors, reader  # drops the memory map
    release_free_heap()
    return model
