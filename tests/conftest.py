"""Shared fixtures: tiny random models built from configs, and the device parametrization."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import transformers

DEVICES = [
    "cpu",
    pytest.param("cuda", marks=[
        pytest.mark.cuda,
        pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU"),
    ]),
]

VOCAB = 256


def tiny_config(arch: str) -> transformers.PretrainedConfig:
    """A 2-layer model of the given family, small enough to build in milliseconds."""
    common = dict(vocab_size=VOCAB, num_hidden_layers=2)
    if arch == "llama":
        return transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_attention_heads=4,
                                        num_key_value_heads=2, tie_word_embeddings=False, **common)
    if arch == "mistral":
        return transformers.MistralConfig(hidden_size=64, intermediate_size=128, num_attention_heads=4,
                                          num_key_value_heads=2, sliding_window=8, **common)
    if arch == "qwen2":
        return transformers.Qwen2Config(hidden_size=64, intermediate_size=128, num_attention_heads=4,
                                        num_key_value_heads=2, **common)
    if arch == "gpt2":
        return transformers.GPT2Config(vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=64,
                                       bos_token_id=0, eos_token_id=0)
    if arch == "bert":
        return transformers.BertConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128,
                                       num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=64)
    raise ValueError(arch)


def tiny_model(arch: str, seed: int = 0, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """A random causal LM (or BERT masked LM) in eval mode, from `tiny_config`."""
    torch.manual_seed(seed)
    config = tiny_config(arch)
    auto = transformers.AutoModelForMaskedLM if arch == "bert" else transformers.AutoModelForCausalLM
    model = auto.from_config(config, dtype=dtype)
    return model.eval()


def token_batch(batch: int = 2, seq: int = 16, seed: int = 1) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (batch, seq), generator=generator)


@pytest.fixture(params=DEVICES)
def device(request) -> str:
    return request.param


def rel_error(a: torch.Tensor, b: torch.Tensor) -> float:
    """Relative Frobenius error ||a - b|| / ||b||."""
    return float((a - b).norm() / b.norm())


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    """Tiny Llama, GPT-2 and Mistral models saved as ordinary Hugging Face checkpoints."""
    root = tmp_path_factory.mktemp("ckpt")
    folders = {}
    for arch in ("llama", "gpt2", "mistral"):
        tiny_model(arch).save_pretrained(root / arch)
        folders[arch] = root / arch
    return folders
