"""export_gguf: write a trained model, merged and dequantized, as one GGUF file for llama.cpp, Ollama, LM Studio.

The merged weights are the ones `export_merged` writes (`dequant(W_q) + scale * B @ A` in
float32, from the same plan), cast once to the GGUF type. The file is written with the
`gguf` package's writer, tensor by tensor (header and tensor table first, so no tensor
waits in memory for the others), into a temporary file renamed into place when complete.

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
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import transformers
from torch import nn

from ..state import state_of
from .plan import export_plan, from_original
from .probe import model_logits

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


def resolve_tokenizer(model: nn.Module, tokenizer=None):
    """The tokenizer given, else the one of the checkpoint the model was loaded from."""
    if tokenizer is not None:
        return tokenizer
    source = state_of(model).source
    if not source:
        raise ValueError("GGUF export needs the tokenizer (a GGUF file carries it): pass tokenizer=..., "
                         "or load the model with qlowrank.load_model so its source is known")
    if source.get("gguf_file"):
        return transformers.AutoTokenizer.from_pretrained(source["path"], gguf_file=source["gguf_file"])
    return transformers.AutoTokenizer.from_pretrained(source["path"])


def _pre_tokenizer_name(model: nn.Module, spec: dict) -> str:
    """llama.cpp's name for the pre-tokenizer (how text is split before BPE)."""
    source = state_of(model).source or {}
    if source.get("gguf_file"):   # a GGUF source states it; transformers' rebuilt tokenizer would not show it
        gguf = _gguf()
        reader = gguf.GGUFReader(str(Path(source["path"]) / source["gguf_file"]))
        field = reader.fields.get("tokenizer.ggml.pre")
        if field is not None:
            return bytes(field.parts[field.data[0]]).decode()
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


def export_gguf(
    model: nn.Module,
    out_file: str | os.PathLike,
    gguf_type: str = "f16",
    tokenizer=None,
    overwrite: bool = False,
    probe: bool = True,
    name: str | None = None,
    base: str | os.PathLike | None = None,
) -> dict:
    """Write the merged model as one GGUF file.

    Args:
        model: a Llama / Mistral / Qwen2 transformers model, with LoraLinear / bitsandbytes layers or plain.
        out_file: the `.gguf` file to write; it appears only once complete.
        gguf_type: f16 (default), bf16, q8_0 (8-bit blocks of 32 with an f16 scale) or f32.
            Norms and biases stay f32; q8_0 tensors whose rows are not a multiple of 32 are f16.
        tokenizer: the tokenizer to embed; default: the one of the checkpoint the model was loaded from.
        overwrite: replace an existing file (kept otherwise).
        probe: load the file with transformers' GGUF reader and record the relative logits error
            against `model` on a fixed random batch.
        name: `general.name` in the metadata (default: the source checkpoint's folder name).
        base: merge into this float checkpoint's original weights (as `export_merged(base=...)`).

    Returns:
        A report: type, bytes, tensors, pre-tokenizer, seconds and (with probe) fidelity figures.
    """
    gguf = _gguf()
    if gguf_type not in GGUF_TYPES:
        raise ValueError(f"gguf_type={gguf_type!r}: use one of {GGUF_TYPES}")
    out_file = Path(out_file)
    if out_file.suffix != ".gguf":
        raise ValueError(f"{out_file}: a GGUF export is one file; name it with a .gguf suffix")
    if out_file.exists() and not overwrite:
        raise FileExistsError(f"{out_file} exists; pass overwrite=True (CLI: --overwrite) to replace it")
    arch = check_gguf_support(model)
    tokenizer = resolve_tokenizer(model, tokenizer)
    config = model.config
    start = time.time()
    writer_name = name or Path(str(getattr(config, "_name_or_path", "") or "model")).stem or "model"
    entries = export_plan(model)
    if base is not None:
        entries = from_original(model, entries, Path(base))
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.QWEN2 if arch == "qwen2" else gguf.MODEL_ARCH.LLAMA,
                                     config.num_hidden_layers)
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    out_file.parent.mkdir(parents=True, exist_ok=True)
    handle, tmp_name = tempfile.mkstemp(prefix=f".{out_file.name}.partial-", dir=out_file.parent)
    os.close(handle)
    tmp = Path(tmp_name)
    try:
        writer = gguf.GGUFWriter(tmp, arch)
        _add_hparams(gguf, writer, model, writer_name, gguf_type)
        pre = _add_tokenizer(gguf, writer, model, tokenizer, config.vocab_size)
        plan = []
        for entry in entries:
            gguf_name = names.get_name(entry.key, try_suffixes=(".weight", ".bias"))
            if gguf_name is None:
                raise ValueError(f"GGUF export: no GGUF name for tensor {entry.key!r} of {type(model).__name__}")
            qtype = _tensor_type(gguf, entry.shape, gguf_type)
            writer.add_tensor_info(gguf_name, entry.shape, np.dtype(np.float32), _nbytes(gguf, entry.shape, qtype),
                                   raw_dtype=qtype)
            plan.append((entry, qtype))
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for entry, qtype in plan:
            tensor = entry.produce().float()
            if arch == "llama" and entry.key.endswith("self_attn.q_proj.weight"):
                tensor = _permute_rotary(tensor, heads)
            elif arch == "llama" and entry.key.endswith("self_attn.k_proj.weight"):
                tensor = _permute_rotary(tensor, kv_heads)
            writer.write_tensor_data(_encode(gguf, tensor, qtype))
            del tensor
        writer.close()
        report = {"format": "gguf", "gguf_type": gguf_type, "architecture": arch, "tokenizer_pre": pre,
                  "tensors": len(plan), "total_bytes": tmp.stat().st_size}
        window = getattr(config, "sliding_window", None) if type(model).__name__ == "MistralForCausalLM" else None
        if window and window < config.max_position_embeddings:
            # The "llama" layout has no sliding window (llama.cpp's converter drops it too): the
            # file computes the same as the model only on contexts up to the window.
            report["sliding_window_dropped"] = window
        if probe:
            report.update(probe_gguf(model, tmp))
        report["seconds"] = round(time.time() - start, 2)
        os.replace(tmp, out_file)
    finally:
        tmp.unlink(missing_ok=True)
    print(f"exported {out_file}: " + ", ".join(f"{k}={v}" for k, v in report.items()))
    return report


def probe_gguf(model: nn.Module, gguf_path: str | os.PathLike, seq: int = 32) -> dict:
    """Relative logits error of a GGUF file, read by transformers' own GGUF reader, against `model`."""

    gguf_path = Path(gguf_path)
    config = model.config
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, config.vocab_size, (2, min(seq, config.max_position_embeddings)), generator=generator)
    reference = model_logits(model, ids)
    loaded = transformers.AutoModelForCausalLM.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name,
                                                               dtype=torch.float32)
    logits = model_logits(loaded.to(model.device), ids)
    del loaded
    error = (logits - reference).norm() / reference.norm()
    return {"relative_logits_error": float(error),
            "argmax_agreement": float((logits.argmax(-1) == reference.argmax(-1)).float().mean())}
