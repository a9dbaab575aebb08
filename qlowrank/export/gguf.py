"""The GGUF writer: a trained model, merged and dequantized, as one GGUF file for llama.cpp, Ollama, LM Studio.

`export_merged(model, "model.gguf", format="gguf")` comes here. The merged weights are the
ones the safetensors writer writes (`dequant(W_q) + scale * B @ A` in float32, from the same
plan), cast once to the GGUF type. The file is written with the `gguf` package's writer,
tensor by tensor (header and tensor table first, so no tensor waits in memory for the
others), into a staging file renamed into place when complete. The fidelity probe reads the
written file back one module at a time (`GgufWeights`, on model/gguf.py's streamed reader:
gguf's dequantizer, rotary rows un-permuted), as the safetensors probe does.

Supported: the Llama layout (Llama, Mistral, SmolLM2: GGUF architecture "llama") and Qwen2
("qwen2"), with a byte-level BPE tokenizer (GPT-2 style: Llama 3, Qwen2, SmolLM2), written
with its merges, special tokens and chat template. llama.cpp computes rotary embeddings on
interleaved pairs for "llama", so q_proj / k_proj rows are permuted into that layout (k
with the key/value head count); transformers' GGUF reader permutes them back. Refused with
a clear error: other architectures, RoPE scaling, attention or MLP biases on Llama, and
SentencePiece tokenizers (Llama 2, Mistral 7B v0.1).
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..atomic import staged_file
from ..model.gguf import dequantize, open_gguf, rotary_heads, unpermute_rotary
from ..model.gguf_header import read_gguf_layout
from ..state import state_of
from .plan import ExportEntry, ExportOptions, export_config, planned_entries
from .probe import probe_fidelity
from .tokenizer import load_tokenizer_for

GGUF_TYPES = ("f32", "f16", "bf16", "q8_0")
# HF class -> GGUF architecture. llama.cpp's own converter writes Mistral as "llama" too.
ARCHITECTURES = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "llama", "Qwen2ForCausalLM": "qwen2"}


def _gguf():
    try:
        import gguf
    except ImportError:
        raise ImportError("GGUF export needs the `gguf` package: pip install 'qlowrank[gguf]' (or pip install gguf)") from None
    return gguf


def check_gguf_support(model: nn.Module) -> str:
    """The GGUF architecture name for `model`, or ValueError saying why it cannot be written."""
    name = type(model).__name__
    if name not in ARCHITECTURES:
        raise ValueError(f"GGUF export supports {sorted(ARCHITECTURES)} (the Llama layout and Qwen2); {name} is not "
                         "supported: export safetensors (format='safetensors') and convert with llama.cpp's converter")
    config = model.config
    # transformers 5 keeps RoPE settings in rope_parameters, older versions in rope_scaling.
    rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    rope_type = rope.get("rope_type", rope.get("type")) if isinstance(rope, dict) else None
    if rope_type not in (None, "default"):
        raise ValueError(f"GGUF export: {name} uses RoPE scaling {rope_type!r}, which this writer does not encode yet "
                         "(e.g. Llama 3.1's 'llama3'); export safetensors and convert with llama.cpp's converter")
    if ARCHITECTURES[name] == "llama" and (getattr(config, "attention_bias", False) or getattr(config, "mlp_bias", False)):
        raise ValueError(f"GGUF export: this {name} has attention/MLP biases, which the 'llama' GGUF layout "
                         "written here does not carry; export safetensors instead")
    return ARCHITECTURES[name]


def _permute_rotary(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """Rows of q/k from HF's half-split rotary layout to llama.cpp's interleaved pairs, per head."""
    out, cols = weight.shape
    half = out // heads // 2
    return weight.reshape(heads, 2, half, cols).transpose(1, 2).reshape(out, cols)  # (out, in)


def _rope_theta(config) -> float:
    # transformers 5 may keep it inside rope_parameters.
    params = getattr(config, "rope_parameters", None) or {}
    return float(params.get("rope_theta") or getattr(config, "rope_theta", None) or 10000.0)


def _tensor_type(gguf, shape: tuple[int, ...], gguf_type: str):
    """GGML type of one tensor: norms and biases (1-D) stay F32, as llama.cpp's converter does;
    q8_0 needs rows divisible by its 32-value blocks, else that tensor is F16."""
    types = gguf.GGMLQuantizationType
    if len(shape) == 1 or gguf_type == "f32":
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


def _pre_tokenizer_name(model: nn.Module, spec: dict) -> str:
    """llama.cpp's name for the pre-tokenizer (how text is split before BPE)."""
    source = state_of(model).source or {}
    if source.get("gguf_file"):   # a GGUF source states it; transformers' rebuilt tokenizer would not show it
        fields, _ = read_gguf_layout(Path(source["path"]) / source["gguf_file"])   # the header only
        if fields.get("tokenizer.ggml.pre") is not None:
            return fields["tokenizer.ggml.pre"]
    pre = json.dumps(spec.get("pre_tokenizer"))
    if '"Digits"' in pre and '"individual_digits": true' in pre and '"ByteLevel"' in pre:
        return "smollm"
    if "\\\\p{N}{1,3}" in pre:
        return "llama-bpe"
    if "\\\\p{N}" in pre and "\\\\p{L}+" in pre:
        return "qwen2"
    if '"ByteLevel"' in pre:
        return "gpt2"
    return "default"


def _add_tokenizer(gguf, writer, model: nn.Module, tokenizer, vocab_size: int) -> str:
    spec = json.loads(tokenizer.backend_tokenizer.to_str()) if hasattr(tokenizer, "backend_tokenizer") else {}
    bpe = spec.get("model", {})
    byte_level = '"ByteLevel"' in json.dumps([spec.get("pre_tokenizer"), spec.get("decoder")])
    if bpe.get("type") != "BPE" or bpe.get("byte_fallback") or not byte_level:
        raise ValueError("GGUF export writes byte-level BPE tokenizers (GPT-2 style: Llama 3, Qwen2, SmolLM2); this "
                         f"tokenizer is {bpe.get('type', type(tokenizer).__name__)} "
                         f"{'with byte fallback (SentencePiece-style) ' if bpe.get('byte_fallback') else ''}"
                         "and is not supported yet")
    vocab = tokenizer.get_vocab()
    if len(vocab) > vocab_size or max(vocab.values()) >= vocab_size:
        raise ValueError(f"the tokenizer has {len(vocab)} tokens but the model's embedding has {vocab_size} rows")
    tokens = [f"[PAD{i}]" for i in range(vocab_size)]   # rows with no token (padded embeddings), as llama.cpp does
    types = [gguf.TokenType.UNUSED] * vocab_size
    for text, index in vocab.items():
        tokens[index], types[index] = text, gguf.TokenType.NORMAL
    for index, added in tokenizer.added_tokens_decoder.items():
        types[index] = gguf.TokenType.CONTROL if added.special else gguf.TokenType.USER_DEFINED
    pre = _pre_tokenizer_name(model, spec)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    # The gguf package's SpecialVocab reads merges, special ids, add-BOS flags and the chat
    # template from a saved tokenizer, exactly as llama.cpp's converter does.
    with tempfile.TemporaryDirectory() as folder:
        tokenizer.save_pretrained(folder)
        special = gguf.SpecialVocab(folder, load_merges=True, n_vocab=vocab_size)
    if not special.merges:
        raise ValueError("the tokenizer's BPE merges could not be read; GGUF readers cannot tokenize without them")
    if special.chat_template is None and getattr(tokenizer, "chat_template", None):
        special.chat_template = tokenizer.chat_template
    special.add_to_gguf(writer, quiet=True)
    return pre


def _add_hparams(gguf, writer, model: nn.Module, name: str, gguf_type: str) -> None:
    config = model.config
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    writer.add_name(name)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(heads)
    writer.add_head_count_kv(getattr(config, "num_key_value_heads", None) or heads)
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(_rope_theta(config))
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)
    file_types = gguf.LlamaFileType
    writer.add_file_type({"f32": file_types.ALL_F32, "f16": file_types.MOSTLY_F16, "bf16": file_types.MOSTLY_BF16,
                          "q8_0": file_types.MOSTLY_Q8_0}[gguf_type])
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)


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
    arch = check_gguf_support(model)
    tokenizer = load_tokenizer_for(model, options.tokenizer)
    start = time.time()
    entries = planned_entries(model, options)
    names = _gguf_names(gguf, model, arch, entries)
    with staged_file(options.out, "GGUF export") as tmp:
        writer = gguf.GGUFWriter(tmp, arch)
        _add_hparams(gguf, writer, model, _general_name(model), options.gguf_type)
        pre = _add_tokenizer(gguf, writer, model, tokenizer, model.config.vocab_size)
        _write_tensors(gguf, writer, model, entries, names, options.gguf_type)
        report = {"format": "gguf", "gguf_type": options.gguf_type, "architecture": arch, "tokenizer_pre": pre,
                  "tensors": len(entries), "total_bytes": tmp.stat().st_size}
        report.update(_dropped_window(model))
        if options.probe:
            reader = GgufWeights(tmp, names, arch, model.config)
            # float32, as transformers' own GGUF reader dequantizes every type.
            report.update(probe_fidelity(model, export_config(model, torch.float32), reader, torch.float32))
        report["seconds"] = round(time.time() - start, 2)
    print(f"exported {options.out}: " + ", ".join(f"{k}={v}" for k, v in report.items()))
    return report


def _general_name(model: nn.Module) -> str:
    return Path(str(getattr(model.config, "_name_or_path", "") or "model")).stem or "model"


def _gguf_names(gguf, model: nn.Module, arch: str, entries: list[ExportEntry]) -> dict[str, str]:
    """State-dict key -> GGUF tensor name, for every planned tensor (ValueError for one without)."""
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.QWEN2 if arch == "qwen2" else gguf.MODEL_ARCH.LLAMA,
                                     model.config.num_hidden_layers)
    result = {}
    for entry in entries:
        result[entry.key] = names.get_name(entry.key, try_suffixes=(".weight", ".bias"))
        if result[entry.key] is None:
            raise ValueError(f"GGUF export: no GGUF name for tensor {entry.key!r} of {type(model).__name__}")
    return result


def _write_tensors(gguf, writer, model: nn.Module, entries: list[ExportEntry], names: dict[str, str],
                   gguf_type: str) -> None:
    """The tensor table, then each tensor computed, permuted, encoded and written one at a time."""
    arch = writer.arch
    types = [_tensor_type(gguf, entry.shape, gguf_type) for entry in entries]
    for entry, qtype in zip(entries, types):
        writer.add_tensor_info(names[entry.key], entry.shape, np.dtype(np.float32), _nbytes(gguf, entry.shape, qtype),
                               raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for entry, qtype in zip(entries, types):
        tensor = entry.produce().float()
        heads = rotary_heads(arch, entry.key, model.config)
        if heads is not None:
            tensor = _permute_rotary(tensor, heads)
        writer.write_tensor_data(_encode(gguf, tensor, qtype))
        del tensor
    writer.close()


def _dropped_window(model: nn.Module) -> dict:
    config = model.config
    window = getattr(config, "sliding_window", None) if type(model).__name__ == "MistralForCausalLM" else None
    if window and window < config.max_position_embeddings:
        # The "llama" layout has no sliding window (llama.cpp's converter drops it too): the
        # file computes the same as the model only on contexts up to the window.
        return {"sliding_window_dropped": window}
    return {}


class GgufWeights:
    """Reads one tensor of a written GGUF file by state-dict key, as float32 in HF's layout (the probe's WeightReader).

    The file is memory-mapped by model/gguf.py's streamed reader (its pages are file-backed,
    reclaimable); each call dequantizes one tensor and undoes the rotary row permutation.
    """

    def __init__(self, path: Path, names: dict[str, str], arch: str, config):
        self.names, self.arch, self.config = names, arch, config
        self.tensors = {tensor.name: tensor for tensor in open_gguf(path)[1]}

    def __call__(self, key: str) -> torch.Tensor:
        if key not in self.names:
            raise KeyError(f"the GGUF export holds no tensor for {key!r}, which the model class expects")
        tensor = dequantize(self.tensors[self.names[key]], torch.float32)
        heads = rotary_heads(self.arch, key, self.config)
        return unpermute_rotary(tensor, heads) if heads is not None else tensor
