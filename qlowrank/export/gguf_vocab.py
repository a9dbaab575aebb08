"""A GGUF file's tokenizer: a byte-level BPE tokenizer (GPT-2 style) as llama.cpp's "gpt2" vocabulary, merges, special tokens and chat template.

Shared by the merged GGUF export (export/gguf_writer.py). SentencePiece-style tokenizers (BPE with
byte fallback: Llama 2, Mistral 7B v0.1, Gemma) are refused with a clear error.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

from torch import nn

from ..model.gguf_header import read_gguf_layout
from ..state import state_of


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
        return "gpt-2"   # llama.cpp's name for GPT-2's split ("gpt2" is its tokenizer model, and refused as a pre name)
    return "default"


def add_tokenizer(gguf, writer, model: nn.Module, tokenizer, vocab_size: int) -> str:
    """Write `tokenizer` into the GGUF being written; returns the pre-tokenizer name (ValueError if not byte-level BPE)."""
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


