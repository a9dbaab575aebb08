"""The GGUF writer: a trained model, merged and dequantized, as one GGUF file for llama.cpp, Ollama, LM Studio.

`export_merged(model, "model.gguf", format="gguf")` comes here. The merged weights are the
ones the safetensors writer writes (`dequant(W_q) + scale * B @ A` in float32, from the same
plan), cast once to the GGUF type. The file is written with the `gguf` package's writer,
tensor by tensor (header and tensor table first, so no tensor waits in memory for the
others), into a staging file renamed into place when complete. The fidelity probe reads the
written file back one module at a time through model/gguf_reader.py's streamed reader, which
undoes the file's conventions with transformers' own tensor processors: the probe checks
our conventions against an independent implementation of them.

Families (export/gguf_arch.py): Llama, Mistral, SmolLM2 ("llama"), Qwen2, Qwen3, Gemma 2,
Gemma 3 (text), Phi-3, OLMo 2, and the mixtures of experts Qwen3-MoE, Mixtral ("llama" with
experts), gpt-oss, Qwen2-MoE (its shared expert as `ffn_*_shexp`) and OLMoE, whose fused experts
(expert LoRA merged in) are split into llama.cpp's `ffn_*_exps` (export/gguf_experts.py); with a
byte-level BPE tokenizer (export/gguf_vocab.py). Refused with a clear error: other architectures
and MoE layouts (dense layers between MoE layers), RoPE scaling (but gpt-oss's YaRN), attention
biases outside Qwen2 / Qwen2-MoE / gpt-oss, and SentencePiece tokenizers (Llama 2, Mistral 7B v0.1, Gemma).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn

from ..atomic import staged_file
from ..model.gguf_reader import model_tensors
from ..model.gguf_header import read_gguf_layout
from ..model.stream import empty_model
from .gguf_arch import GgufFamily, add_hparams, gguf_family, is_norm, reader_caveats
from .gguf_experts import GgufPiece, expert_pieces, experts_transposed, is_expert_stack
from .gguf_vocab import add_tokenizer
from .entries import ExportEntry, ExportOptions, export_config, planned_entries
from .probe import probe_fidelity
from .tokenizer import load_tokenizer_for

GGUF_TYPES = ("f32", "f16", "bf16", "q8_0")


def _gguf():
    try:
        import gguf
    except ImportError:
        raise ImportError("GGUF export needs the `gguf` package: pip install 'qlowrank[gguf]' (or pip install gguf)") from None
    return gguf


def permute_rotary(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """Rows of q/k from HF's half-split rotary layout to llama.cpp's interleaved pairs, per head."""
    out, cols = weight.shape
    half = out // heads // 2
    return weight.reshape(heads, 2, half, cols).transpose(1, 2).reshape(out, cols)  # (out, in)


def rotary_heads(family: GgufFamily, key: str, config) -> int | None:
    """The head count whose rotary rows llama.cpp wants interleaved in tensor `key` (q / k of "llama"), else None."""
    if not family.permute_rotary:
        return None
    heads = config.num_attention_heads
    if key.endswith("self_attn.q_proj.weight"):
        return heads
    if key.endswith("self_attn.k_proj.weight"):
        return getattr(config, "num_key_value_heads", None) or heads
    return None


def to_gguf_layout(tensor: torch.Tensor, key: str, gguf_name: str, family: GgufFamily, config) -> torch.Tensor:
    """A float32 tensor of the model, in the layout llama.cpp's `family.arch` stores (rotary rows, norm offset)."""
    heads = rotary_heads(family, key, config)
    if heads is not None:
        tensor = permute_rotary(tensor, heads)
    if family.norm_offset and is_norm(gguf_name):
        tensor = tensor + family.norm_offset
    return tensor


def _tensor_type(gguf, piece: GgufPiece, gguf_type: str):
    """GGML type of one tensor: norms, biases (gpt-oss's per-expert ones are 2-D) and MoE routers stay F32,
    as llama.cpp's converter keeps them; q8_0 needs rows divisible by its 32-value blocks, else that tensor is F16."""
    types = gguf.GGMLQuantizationType
    shape = piece.shape
    if len(shape) == 1 or gguf_type == "f32" or piece.name.endswith(".bias") or ".ffn_gate_inp." in piece.name:
        return types.F32
    if gguf_type == "q8_0" and shape[-1] % gguf.GGML_QUANT_SIZES[types.Q8_0][0] != 0:
        return types.F16
    return {"f16": types.F16, "bf16": types.BF16, "q8_0": types.Q8_0}[gguf_type]


def _encode(gguf, tensor: torch.Tensor, qtype) -> np.ndarray:
    array = tensor.detach().float().cpu().contiguous().numpy()
    types = gguf.GGMLQuantizationType
    if qtype == types.F32:
        return array
    if qtype == types.F16:
        return array.astype(np.float16)
    return gguf.quants.quantize(array, qtype)  # bf16 / q8_0 as raw bytes


def _nbytes(gguf, shape: tuple[int, ...], qtype) -> int:
    return int(np.prod(gguf.quants.quant_shape_to_byte_shape(shape, qtype)))


def write_gguf(model: nn.Module, options: ExportOptions) -> dict:
    """The GGUF half of `export_merged`: one .gguf file, then (options.probe) its fidelity.

    Norms and biases stay f32; q8_0 tensors whose rows are not a multiple of 32 are f16.
    `general.name` is the source checkpoint's folder name. Returns a report: type, bytes,
    tensors, pre-tokenizer, seconds and (with the probe) fidelity figures.
    """
    gguf = _gguf()
    if options.gguf_type not in GGUF_TYPES:
        raise ValueError(f"gguf_type={options.gguf_type!r}: use one of {GGUF_TYPES}")
    if options.out.suffix != ".gguf":
        raise ValueError(f"{options.out}: a GGUF export is one file; name it with a .gguf suffix")
    options.check_target()
    family = gguf_family(model)
    tokenizer = load_tokenizer_for(model, options.tokenizer)
    start = time.time()
    entries = planned_entries(model, options)
    pieces = gguf_pieces(model, family, entries)
    with staged_file(options.out, "GGUF export") as tmp:
        writer = gguf.GGUFWriter(tmp, family.arch)
        add_hparams(gguf, writer, model.config, family, _general_name(model), options.gguf_type)
        pre = add_tokenizer(gguf, writer, model, tokenizer, model.config.vocab_size)
        _write_tensors(gguf, writer, entries, pieces, options.gguf_type)
        report = {"format": "gguf", "gguf_type": options.gguf_type, "architecture": family.arch,
                  "tokenizer_pre": pre, "tensors": sum(map(len, pieces)), "total_bytes": tmp.stat().st_size}
        report.update(reader_caveats(model.config, family))
        if options.probe:
            reader = GgufWeights(tmp, type(model), export_config(model, torch.float32))
            # float32, as transformers' own GGUF reader dequantizes every type.
            report.update(probe_fidelity(model, export_config(model, torch.float32), reader, torch.float32))
        report["seconds"] = round(time.time() - start, 2)
    print(f"exported {options.out}: " + ", ".join(f"{k}={v}" for k, v in report.items()))
    return report


def _general_name(model: nn.Module) -> str:
    return Path(str(getattr(model.config, "_name_or_path", "") or "model")).stem or "model"


def _name_map(model: nn.Module, arch: str):
    gguf = _gguf()
    model_arch = next(key for key, name in gguf.MODEL_ARCH_NAMES.items() if name == arch)
    return gguf.get_tensor_name_map(model_arch, model.config.num_hidden_layers)


def gguf_names(model: nn.Module, arch: str, keys: list[str]) -> dict[str, str]:
    """State-dict key -> GGUF tensor name for each of `keys`, from the `gguf` package's name map (ValueError for one without).

    A parameter without a `.weight` / `.bias` suffix (gpt-oss's attention sinks) is named as a
    weight, as llama.cpp's converter names it.
    """
    name_map = _name_map(model, arch)
    result = {}
    for key in keys:
        name = name_map.get_name(key, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise ValueError(f"GGUF export: no {arch!r} GGUF name for tensor {key!r} of {type(model).__name__}")
        result[key] = name if name.endswith((".weight", ".bias")) else name + ".weight"
    return result


def expert_namer(model: nn.Module, arch: str) -> Callable[[str], str]:
    """`name_of(hf_key)`: the `gguf` map's name (no suffix) of an unfused expert projection key, as expert_pieces wants."""
    name_map = _name_map(model, arch)

    def name_of(key: str) -> str:
        name = name_map.get_name(key)
        if name is None:
            raise ValueError(f"GGUF export: no {arch!r} GGUF name for {key!r} of {type(model).__name__}")
        return name

    return name_of


def gguf_pieces(model: nn.Module, family: GgufFamily, entries: list[ExportEntry]) -> list[list[GgufPiece]]:
    """For each entry, the GGUF tensors it is written as (fused experts: split into llama.cpp's ffn_*_exps)."""
    name_of = expert_namer(model, family.arch)
    plain = gguf_names(model, family.arch, [e.key for e in entries if not is_expert_stack(e.key)])
    pieces = []
    for entry in entries:
        if is_expert_stack(entry.key):
            pieces.append(expert_pieces(entry.key, entry.shape, experts_transposed(model, entry.key), name_of))
            continue
        name = plain[entry.key]
        # llama.cpp's converter squeezes out dimensions of 1: Qwen2-MoE's shared-expert gate (1, H) is
        # ffn_gate_inp_shexp (H,), which llama.cpp and transformers' reader both expect.
        shape = tuple(size for size in entry.shape if size != 1) or entry.shape
        pieces.append([GgufPiece(name, shape, lambda t, k=entry.key, n=name, s=shape:
                                 to_gguf_layout(t, k, n, family, model.config).reshape(s))])
    return pieces


def _write_tensors(gguf, writer, entries: list[ExportEntry], pieces: list[list[GgufPiece]], gguf_type: str) -> None:
    """The tensor table, then each tensor computed, put in llama.cpp's layout, encoded and written one at a time."""
    types = [[_tensor_type(gguf, piece, gguf_type) for piece in group] for group in pieces]
    for group, qtypes in zip(pieces, types):
        for piece, qtype in zip(group, qtypes):
            writer.add_tensor_info(piece.name, piece.shape, np.dtype(np.float32), _nbytes(gguf, piece.shape, qtype),
                                   raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for entry, group, qtypes in zip(entries, pieces, types):
        tensor = entry.produce().float()
        for piece, qtype in zip(group, qtypes):
            writer.write_tensor_data(_encode(gguf, piece.take(tensor), qtype))
        del tensor
    writer.close()


class GgufWeights:
    """Reads one tensor of a written GGUF file by state-dict key, as float32 in HF's layout (the probe's WeightReader).

    The file is read as the streamed reader reads it (model/gguf_reader.py): memory-mapped (its pages
    are file-backed, reclaimable), each call dequantizing the GGUF tensors of one key and
    handing them to transformers' tensor processor for the file's architecture, which undoes
    the rotary permutation, the norm offset and the expert split.
    """

    def __init__(self, path: Path, cls: type, config):
        arch = str(read_gguf_layout(path)[0]["general.architecture"])
        self.tensors = model_tensors(path, arch, empty_model(config, torch.float32, cls), config.to_dict())
        self.keys = set(self.tensors.names.values())

    def __call__(self, key: str) -> torch.Tensor:
        if key not in self.keys:
            raise KeyError(f"the GGUF export holds no tensor for {key!r}, which the model class expects")
        return self.tensors.read(key)
