"""llama.cpp itself (through llama-cpp-python) runs qlowrank's GGUF files: merged exports and adapter GGUFs of every family.

For each family the exporter writes, a tiny random 4-bit model with LoRA (B random, one scale folded into
lora_b) is exported four ways: the merged safetensors checkpoint, the merged f32 GGUF, the base f32 GGUF
(B = 0: dequant(NF4) alone) and the adapter GGUF. llama.cpp must give the merged safetensors export's
transformers logits from the merged GGUF, and the same logits from the base GGUF with the adapter applied
(`Llama(..., lora_path=...)`), which checks the adapter's names, shapes, alpha and folded scales as llama.cpp
reads them; llama.cpp's own adapter loader reads the adapter's type, architecture and alpha back, and where
its `llama-export-lora` tool is built, its merge of base + adapter has the merged GGUF's tensors. Skipped
where llama-cpp-python is not installed (`pip install 'qlowrank[llama]'`).
"""

from __future__ import annotations

import ctypes
import functools
import os
import shutil
import subprocess

import numpy as np
import pytest
import torch
import transformers
from conftest import random_lora_b, rel_error, tiny_tokenizer
from test_gguf_families import CONFIGS as DENSE_CONFIGS
from test_gguf_families import GGUF_ARCH, RECONSTRUCTION_TOLERANCE, _tensors
from test_gguf_moe import _config as moe_config

import qlowrank as ql

llama_cpp = pytest.importorskip("llama_cpp")

# llama.cpp against transformers, both in float32 on the same merged float32 weights (KV cache kept f32):
# different kernels (ggml's blocked dot products, its own RoPE / softmax / norms), so float32 rounding summed
# in another order over 2 layers. Measured on these tiny models: <= 5.7e-7 relative for the dense families and
# Qwen3-MoE / Mixtral, 1.5e-5 for gpt-oss (its clamped SwiGLU and attention sinks); base + adapter against the
# merged GGUF, both in llama.cpp: <= 4.5e-7. 1e-4 leaves 6x headroom over the worst and stays far below what a
# wrong convention costs (the adapter alone moves the logits by >= 0.41 relative here; asserted >= 1e-2).
LLAMACPP_F32_TOLERANCE = 1e-4
# ggml's CPU GELU (Gemma's activation) looks its result up in a float16 table: the input is rounded to f16 and
# so is the output, two roundings of at most 2^-11 relative each. Measured: 3.3e-4 (Gemma 3) and 2.5e-4
# (Gemma 2) against transformers, 4.4e-5 for base + adapter against the merged GGUF; 2 x 2^-11 bounds both.
GELU_F16_TOLERANCE = 2 * 2.0**-11
# The adapter's own effect on the logits must dwarf the tolerance, or agreement would prove nothing.
ADAPTER_EFFECT_FLOOR = 1e-2
DENSE = ("llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3", "phi3", "olmo2")
MOE = ("qwen3_moe", "mixtral", "gpt_oss", "qwen2_moe", "olmoe")
# down_proj's scale is 5 / 4 while the file's alpha is 6: llama.cpp's alpha / r is right only if it is folded in.
LORA = dict(r=4, alpha=6, alpha_pattern={"down_proj": 5})
MOE_LORA = dict(LORA, target_parameters=["experts", "router"])
TOKENS = 20
GELU_FAMILIES = ("gemma2", "gemma3")
ARCH = {**GGUF_ARCH, "qwen3_moe": "qwen3moe", "mixtral": "llama", "gpt_oss": "gpt-oss", "qwen2_moe": "qwen2moe",
        "olmoe": "olmoe"}


def _config(family: str, vocab: int) -> transformers.PretrainedConfig:
    if family in MOE:
        return moe_config(family, vocab)
    config = DENSE_CONFIGS[family]()
    config.vocab_size = vocab
    if family.startswith("gemma"):
        # llama.cpp scales Gemma's queries by 1 / sqrt(head_dim), as every released Gemma does
        # (query_pre_attn_scalar == head_dim); the config default 256 is not written to GGUF.
        config.query_pre_attn_scalar = config.head_dim
    return config


@pytest.fixture(scope="module")
def bundles(tmp_path_factory):
    """family -> (the folder holding merged/ (safetensors), merged.gguf, base.gguf, adapter.gguf; the tokens to run)."""
    tok = tiny_tokenizer()
    return functools.cache(lambda family: _build(family, tok, tmp_path_factory.mktemp(family)))


def _build(family: str, tok, root):
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(_config(family, len(tok))).eval()
    with torch.no_grad():   # norms away from their init, so that a wrong `1 + w` offset shows
        for name, param in model.named_parameters():
            if "norm" in name:
                param.normal_(0.3 if family.startswith("gemma") else 1.0, 0.1)
    ql.quantize_model(model, ql.QuantConfig(bits=4, compute_dtype=torch.float32))
    ql.add_lora(model, ql.LoraConfig(**(MOE_LORA if family in MOE else LORA)))
    quiet = dict(tokenizer=tok, probe=False, progress=False)
    ql.export_merged(model, root / "base.gguf", format="gguf", gguf_type="f32", **quiet)   # B = 0
    random_lora_b(model)
    ql.export_merged(model, root / "merged", dtype=torch.float32, **quiet)
    ql.export_merged(model, root / "merged.gguf", format="gguf", gguf_type="f32", **quiet)
    report = ql.save_gguf_adapter(model, root / "adapter.gguf")
    assert report["folded"] > 0   # the folded-scale path is exercised
    return root, _tokens(len(tok))


def _tokens(vocab: int) -> list[int]:
    return torch.randint(0, vocab, (TOKENS,), generator=torch.Generator().manual_seed(7)).tolist()


def llamacpp_logits(path, tokens: list[int], lora=None) -> torch.Tensor:
    """Logits of every position as llama.cpp computes them (float32 KV cache), the adapter applied if given."""
    kw = dict(model_path=str(path), n_ctx=64, n_batch=64, logits_all=True, verbose=False, n_threads=2,
              type_k=0, type_v=0, seed=0)   # GGML_TYPE_F32: no f16 rounding of keys and values
    if lora is not None:
        kw["lora_path"] = str(lora)
    llm = llama_cpp.Llama(**kw)
    try:
        llm.eval(tokens)
        return torch.from_numpy(np.array(llm.scores[:len(tokens)], dtype=np.float32))
    finally:
        llm.close()


def _tolerance(family: str) -> float:
    return GELU_F16_TOLERANCE if family in GELU_FAMILIES else LLAMACPP_F32_TOLERANCE


def _transformers_logits(folder, tokens: list[int]) -> torch.Tensor:
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(torch.tensor([tokens])).logits[0].float()


@pytest.mark.parametrize("family", DENSE + MOE)
def test_llamacpp_runs_the_merged_gguf_as_the_merged_export(family, bundles):
    root, tokens = bundles(family)
    reference = _transformers_logits(root / "merged", tokens)
    assert rel_error(llamacpp_logits(root / "merged.gguf", tokens), reference) <= _tolerance(family)


@pytest.mark.parametrize("family", DENSE + MOE)
def test_llamacpp_applies_the_adapter_gguf_to_its_base_as_the_merged_gguf(family, bundles):
    root, tokens = bundles(family)
    merged = llamacpp_logits(root / "merged.gguf", tokens)
    base = llamacpp_logits(root / "base.gguf", tokens)
    assert rel_error(base, merged) >= ADAPTER_EFFECT_FLOOR   # the adapter matters
    with_adapter = llamacpp_logits(root / "base.gguf", tokens, lora=root / "adapter.gguf")
    assert rel_error(with_adapter, merged) <= _tolerance(family)


def llamacpp_adapter_metadata(base, adapter) -> tuple[dict[str, str], dict[str, str]]:
    """The adapter's metadata as llama.cpp's own adapter loader reads it (llama_adapter_lora_init), and the base's."""
    llm = llama_cpp.Llama(model_path=str(base), n_ctx=32, verbose=False)
    handle = llama_cpp.llama_adapter_lora_init(llm._model.model, str(adapter).encode())
    assert handle is not None, f"llama.cpp refused {adapter}"
    buffer = ctypes.create_string_buffer(256)
    try:
        metadata = {}
        for index in range(llama_cpp.llama_adapter_meta_count(handle)):
            llama_cpp.llama_adapter_meta_key_by_index(handle, index, buffer, len(buffer))
            key = buffer.value.decode()
            llama_cpp.llama_adapter_meta_val_str_by_index(handle, index, buffer, len(buffer))
            metadata[key] = buffer.value.decode()
        return metadata, dict(llm.metadata)
    finally:
        llama_cpp.llama_adapter_lora_free(handle)
        llm.close()


@pytest.mark.parametrize("family", DENSE + MOE)
def test_llamacpp_reads_the_adapter_gguf_type_architecture_and_alpha(family, bundles):
    root, _ = bundles(family)
    metadata, base = llamacpp_adapter_metadata(root / "base.gguf", root / "adapter.gguf")
    assert metadata["general.type"] == "adapter" and metadata["adapter.type"] == "lora"
    assert float(metadata["adapter.lora.alpha"]) == LORA["alpha"]   # without it llama.cpp would scale by 1
    assert metadata["general.architecture"] == base["general.architecture"] == ARCH[family]


# llama.cpp's `llama-export-lora` tool is not part of llama-cpp-python's wheel: point LLAMA_EXPORT_LORA at a build of it
# (cmake -DLLAMA_BUILD_TOOLS=ON, target llama-export-lora) or put it on PATH.
EXPORT_LORA = os.environ.get("LLAMA_EXPORT_LORA") or shutil.which("llama-export-lora")


@pytest.mark.skipif(EXPORT_LORA is None, reason="llama.cpp's llama-export-lora is not built (LLAMA_EXPORT_LORA)")
@pytest.mark.parametrize("family", DENSE + MOE)
def test_llama_export_lora_merges_the_adapter_gguf_into_the_merged_gguf(family, bundles, tmp_path):
    """llama.cpp's own merge of base + adapter has the merged GGUF's tensors (3-D experts included)."""
    root, _ = bundles(family)
    out = tmp_path / "merged_by_llama_cpp.gguf"
    subprocess.run([EXPORT_LORA, "-m", str(root / "base.gguf"), "--lora", str(root / "adapter.gguf"), "-o", str(out)],
                   check=True, capture_output=True)
    theirs, ours = _tensors(out), _tensors(root / "merged.gguf")
    assert theirs.keys() == ours.keys()
    for name, value in ours.items():   # measured <= 1.5e-7 of the largest entry (Phi-3)
        assert np.abs(theirs[name] - value).max() <= RECONSTRUCTION_TOLERANCE * np.abs(value).max(), name
