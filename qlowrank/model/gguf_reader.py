"""Streamed GGUF reader: one tensor dequantized at a time, quantized to 4/8-bit at once, so a GGUF loads at about the memory of its result.

transformers' GGUF reader dequantizes every tensor of the file to float32 before the model
exists (an 8B GGUF needs ~40 GB of RAM that way). Here the file is memory-mapped (its
tensor table read by `gguf_header`, which skips the vocabulary), the model is built on the meta device from the header's
config (`gguf_header.gguf_config`, equal to transformers'; OLMo 2's, which transformers cannot read, from
the same keys), and each tensor is then:

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

Mixtures of experts (Qwen3-MoE, Mixtral as "llama" with experts, gpt-oss, Qwen2-MoE, OLMoE): each 3-D
`ffn_*_exps` tensor goes through its processor (model/gguf_moe.py) into transformers 5's
fused stacks, and the sink freezes a layer's experts 4-bit / 8-bit once its stacks are complete.

Not streamed: the architectures of transformers' newer GGUF path (Qwen3.5, LFM2:
`transformers.integrations.gguf.GGUF_ARCHS`) and the experts of other MoE architectures,
which `NotStreamable` hands to transformers' reader (load.py falls back and says so).

Peak RAM: the quantized model plus about twice the float32 bytes of the largest quantized
linear (its float32 copy and bitsandbytes' working copy), measured in benchmarks/gguf_load.py.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from ..heap import release_free_heap
from .gguf_header import SAME_HEADER_AS, config_from_values, gguf_config_values, read_gguf_layout
from .gguf_moe import experts_of, processor_class
from .stream import LoadSettings, TensorSink, empty_model

# Rows are dequantized in slabs of about this many values: gguf's numpy dequantizers make a
# few float32 temporaries of their input's size, so a whole 128k x 4096 embedding at once
# would cost several GB; 2^22 values keep them at tens of MB and the per-call overhead small.
SLAB_VALUES = 1 << 22


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


def check_transformers_reads(path: str | Path) -> None:
    """ValueError for a GGUF file that transformers' reader (5.25) reads into a wrong model, without an error.

    Mixtral in llama.cpp's layout ("llama" with experts) becomes a dense Llama with random MLPs,
    and gpt-oss keeps random experts and attention sinks (measured: 0.09 and 0.40 relative logits
    error); the streamed reader reads both.
    """
    fields, _ = read_gguf_layout(path)
    architecture = fields.get("general.architecture")
    if architecture == "gpt-oss" or (architecture == "llama" and fields.get("llama.expert_count")):
        raise ValueError(f"{path}: transformers' GGUF reader leaves the experts of this {architecture!r} mixture of "
                         "experts randomly initialised; read it with gguf_reader='streamed' (the default)")


def load_gguf_tokenizer(folder: Path, name: str):
    """The tokenizer of a GGUF file, by transformers' reader (which names neither file nor tensor of a truncated file)."""
    import transformers
    from transformers.models.auto.tokenization_auto import TOKENIZER_MAPPING_NAMES

    check_gguf_file(folder / name)
    fields, _ = read_gguf_layout(folder / name)
    # AutoTokenizer parses the file's config first to pick a class: it refuses an architecture it has no config
    # mapping for (OLMo 2), and 5.25 fails on gpt-oss's YaRN keys there. For those the class is taken from the
    # model type qlowrank's header gives (AutoTokenizer's tokenizer_type), or the default fast tokenizer (gpt-oss
    # has no entry); either way transformers' GGUF converter for the file's tokenizer.ggml.model builds it.
    architecture = str(fields.get("general.architecture"))
    if architecture != "gpt-oss" and architecture not in SAME_HEADER_AS:
        return transformers.AutoTokenizer.from_pretrained(str(folder), gguf_file=name)
    model_type, _ = gguf_config_values(folder / name)
    if model_type in TOKENIZER_MAPPING_NAMES:
        return transformers.AutoTokenizer.from_pretrained(str(folder), gguf_file=name, tokenizer_type=model_type)
    return transformers.PreTrainedTokenizerFast.from_pretrained(str(folder), gguf_file=name)


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
    """transformers' tensor processor for a GGUF architecture, built on the file's config values.

    Mixtral ("llama" with experts) and gpt-oss get model/gguf_moe.py's, which reuse
    transformers' own where its table has none that reads llama.cpp's layout.
    """
    from transformers.modeling_gguf_pytorch_utils import TENSOR_PROCESSORS, TensorProcessor

    cls = processor_class(architecture, values) or TENSOR_PROCESSORS.get(architecture, TensorProcessor)
    return cls(config=values)


def hf_names(model: nn.Module, architecture: str, processor) -> dict[str, str]:
    """GGUF tensor name -> the model's state-dict key, from transformers' own GGUF name mapping."""
    from transformers.modeling_gguf_pytorch_utils import get_gguf_hf_weights_map

    # The file's own architecture, not the model's type: a "llama" file may build a Mistral.
    names = get_gguf_hf_weights_map(model, processor, model_type=architecture,
                                    num_layers=model.config.num_hidden_layers)
    # A parameter without a suffix (fused expert stacks, attention sinks) is mapped without one,
    # while llama.cpp names its tensor as a weight ("blk.0.ffn_down_exps.weight").
    names.update({f"{name}.weight": key for name, key in list(names.items())
                  if not name.endswith((".weight", ".bias"))})
    return names


class GgufTensors:
    """A GGUF file's tensors converted one at a time into a model's layout by transformers' processor.

    A model tensor that a processor assembles from several GGUF tensors (an MoE layer's gate
    and up experts) is handed out once the last of them has been converted.

    Args:
        path: the .gguf file.
        names: GGUF tensor name -> state-dict key (see `hf_names`).
        processor: from `tensor_processor`.
    """

    def __init__(self, path: str | Path, names: dict[str, str], processor, tensors: list[GgufTensor] | None = None):
        self.path, self.names, self.processor = Path(path), names, processor
        self.tensors = tensors if tensors is not None else open_gguf(path)[1]
        # How many of the file's tensors feed each key, and how many have been converted.
        self.sources = Counter(names[t.name] for t in self.tensors if t.name in names)
        self.arrived: Counter = Counter()
        self.stash: dict = {"tensors": {}}   # what the processor assembles across tensors (its parsed_parameters)

    def keeps(self, tensor: GgufTensor) -> bool:
        """Whether the processor leaves this tensor as it is (asked with an empty stand-in of its rank)."""
        probe = np.empty((0,) * len(tensor.shape), dtype=np.float32)
        stash = {"tensors": {}}
        try:
            result = self.processor.process(weights=probe, name=tensor.name, tensor_key_mapping=self.names,
                                            parsed_parameters=stash)
        except Exception:   # e.g. a reshape that needs the real rows: it does something
            return False
        return result.weights is probe and result.name == tensor.name and not stash["tensors"]

    def convert(self, tensor: GgufTensor, dtype_of: Callable[[str], torch.dtype]) -> list[tuple[str, torch.Tensor]]:
        """[(state-dict key, tensor in the dtype `dtype_of(key)` gives)] for one GGUF tensor; [] if unmapped or waiting."""
        if self.keeps(tensor):
            key = self.names.get(tensor.name)
            return [] if key is None else [(key, dequantize(tensor, dtype_of(key), str(self.path)))]
        # transformers' path: the whole tensor in float32 numpy, processed, then cast.
        weights = dequantize(tensor, torch.float32, str(self.path)).numpy()
        result = self.processor.process(weights=weights, name=tensor.name, tensor_key_mapping=self.names,
                                        parsed_parameters=self.stash)
        if tensor.name in self.names:
            self.arrived[self.names[tensor.name]] += 1
        # Tensors a processor stores itself (GPT-2's head, MoE stacks), HF-named: out once complete.
        stored = self.stash["tensors"]
        out = [(key, stored.pop(key)) for key in list(stored) if self.arrived[key] >= self.sources[key]]
        if result.name is not None and result.name in self.names:
            out.append((self.names[result.name], torch.from_numpy(np.ascontiguousarray(result.weights))))
        return [(key, value.to(dtype_of(key))) for key, value in out]

    def read(self, key: str) -> torch.Tensor:
        """The float32 tensor of state-dict key `key` (KeyError if the file has none)."""
        sources = [tensor for tensor in self.tensors if self.names.get(tensor.name) == key]
        if not sources:
            raise KeyError(f"{self.path}: no GGUF tensor holds {key!r}")
        alone = GgufTensors(self.path, self.names, self.processor, sources)   # its own count and stash
        out = {}
        for tensor in sources:
            out.update(alone.convert(tensor, lambda _: torch.float32))
        return out[key]


# MoE GGUF architectures whose expert tensors the streamed reader takes (model/gguf_moe.py); "llama" with experts is Mixtral.
STREAMED_MOE = ("qwen3moe", "gpt-oss", "llama", "qwen2moe", "olmoe")


def check_streamable(fields: dict, config, path: Path) -> str:
    """The file's architecture; NotStreamable for one transformers' reader must read (load.py falls back to it)."""
    from transformers.integrations.gguf import GGUF_ARCHS

    architecture = str(fields.get("general.architecture", "?"))
    if architecture in GGUF_ARCHS:
        raise NotStreamable(f"{path}: transformers reads {architecture!r} GGUF files through its newer conversion "
                            "path, which the streamed reader does not follow yet")
    if experts_of(config.to_dict()) and architecture not in STREAMED_MOE:
        raise NotStreamable(f"{path}: the streamed reader takes the experts of {STREAMED_MOE} GGUF files, "
                            f"not of {architecture!r} ones")
    return architecture


def model_tensors(path: str | Path, architecture: str, model: nn.Module, values: dict,
                  tensors: list[GgufTensor] | None = None) -> GgufTensors:
    """The tensors of a GGUF file of `architecture`, converted into `model`'s state-dict keys and layout."""
    processor = tensor_processor(architecture, values)
    return GgufTensors(path, hf_names(model, architecture, processor), processor, tensors)


def load_gguf_streamed(path: str | Path, settings: LoadSettings) -> nn.Module:
    """A GGUF model loaded tensor by tensor into `settings` (quantized linears or float).

    Raises:
        NotStreamable: a file transformers' reader must read (load.py falls back to it).
        ValueError: a truncated or corrupt file, a tensor type nothing can dequantize, or
            tensors that do not fit the config, each naming the file and the tensor.
    """
    path = Path(path)
    fields, tensors = open_gguf(path)
    model_type, values = gguf_config_values(path)
    config = config_from_values(model_type, values, path)
    architecture = check_streamable(fields, config, path)
    model = empty_model(config, settings.dtype)
    sink = TensorSink(model, settings)
    reader = model_tensors(path, architecture, model, values, tensors)

    def dtype_of(key: str) -> torch.dtype:
        # A weight that will be quantized stays float32 until then, as on transformers' path
        # (quantize_linear decides whether to round it through the compute dtype first).
        return torch.float32 if sink.quantizes(key) else settings.dtype

    # Checked before dequantizing, to fail fast on a config that does not fit, where the
    # processor leaves the tensor as it is (others change its shape: Mamba's conv1d, MoE stacks).
    unexpected = []
    for tensor in tqdm(tensors, desc="loading", unit="tensor", disable=not settings.progress):
        key = reader.names.get(tensor.name)
        if key is not None and reader.keeps(tensor):
            sink.check_shape(key, tensor.shape, f"{path.name}: GGUF tensor {tensor.name!r}")
        converted = reader.convert(tensor, dtype_of)
        if not converted and key is None:
            unexpected.append(tensor.name)
        for key, weight in converted:
            sink.put(key, weight, f"{path.name}: GGUF tensor {tensor.name!r}", owned=True)
        del converted
    model = sink.finish(str(path), unexpected)
    del tensors, reader  # drops the memory map
    release_free_heap()
    return model
