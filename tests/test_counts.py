"""Trainable-parameter counts: true element counts, and the LoRA paper's figures from configs."""

from __future__ import annotations

import pytest
import torch
import transformers
from conftest import tiny_model

import qlowrank as ql


def _meta_model(config, auto=transformers.AutoModelForCausalLM):
    with torch.device("meta"):  # shapes only: a 175B model costs no memory
        return auto.from_config(config)


def _roberta(hidden, layers, heads):
    return transformers.RobertaConfig(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                                      intermediate_size=4 * hidden)


def _gpt3_as_opt():
    # GPT-3 175B's shape (96 layers, d_model 12288, 96 heads, d_ff 4 d_model) with separate
    # q/k/v projections, which OPT has and GPT-2's fused c_attn does not.
    return transformers.OPTConfig(hidden_size=12288, num_hidden_layers=96, ffn_dim=49152, num_attention_heads=96,
                                  vocab_size=50272, max_position_embeddings=2048, word_embed_proj_dim=12288)


@pytest.mark.parametrize("name,config,targets,r,expected", [
    ("RoBERTa-base", _roberta(768, 12, 12), ["query", "value"], 8, 294_912),
    ("RoBERTa-large", _roberta(1024, 24, 16), ["query", "value"], 8, 786_432),
    ("GPT-3 175B r=1", _gpt3_as_opt(), ["q_proj", "v_proj"], 1, 4_718_592),
    ("GPT-3 175B r=8", _gpt3_as_opt(), ["q_proj", "v_proj"], 8, 37_748_736),
])
def test_lora_paper_trainable_parameter_counts(name, config, targets, r, expected):
    auto = transformers.AutoModel if "RoBERTa" in name else transformers.AutoModelForCausalLM
    model = _meta_model(config, auto)
    ql.add_lora(model, ql.LoraConfig(r=r, alpha=r, target_modules=targets))
    counts = ql.count_parameters(model)
    assert counts.trainable == expected
    if "175B" in name:
        assert 174e9 < counts.total < 176e9


def test_packed_4bit_weights_count_as_the_weights_they_hold():
    model = tiny_model("llama")
    before = ql.count_parameters(model)
    assert before.trainable == before.total
    ql.quantize_model(model, ql.QuantConfig(bits=4))
    after_quant = ql.count_parameters(model)
    assert after_quant.total == before.total  # two 4-bit weights per stored byte, counted as two
    ql.add_lora(model, ql.LoraConfig(r=4))
    after_lora = ql.count_parameters(model)
    # each of the 7 projections per layer x 2 layers gets r * (in + out) new weights
    expected_lora = 2 * 4 * sum(in_ + out for in_, out in [
        (64, 64), (64, 32), (64, 32), (64, 64), (64, 128), (64, 128), (128, 64)])
    assert after_lora.trainable == expected_lora
    assert after_lora.total == before.total + expected_lora
