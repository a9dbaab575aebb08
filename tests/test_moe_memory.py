"""The CPU process model's mixture-of-experts term: what routed experts dequantize, and the heap it leaves."""

from __future__ import annotations

import pytest
import torch
import transformers

import qlowrank as ql
from qlowrank.memory import process
from qlowrank.memory.expert_facts import expert_facts
from qlowrank.memory.meta_model import build_meta_model


def qwen3_moe(experts: int = 16, top_k: int = 2, layers: int = 2, hidden: int = 64,
              inter: int = 32) -> transformers.PretrainedConfig:
    return transformers.Qwen3MoeConfig(vocab_size=256, hidden_size=hidden, intermediate_size=2 * hidden,
                                       moe_intermediate_size=inter, num_hidden_layers=layers, num_attention_heads=4,
                                       num_key_value_heads=2, head_dim=hidden // 4, num_experts=experts,
                                       num_experts_per_tok=top_k)


EXPERT_LORA = ql.LoraConfig(r=4, alpha=8, target_parameters=["experts"])


def facts_of(config, tokens: int, bits: int | None = 4) -> dict:
    return expert_facts(build_meta_model(config, torch.bfloat16), tokens, bits, torch.bfloat16)


# The term is int() of a product: two figures that are equal in bytes may differ by the rounding
ROUNDING_BYTES = 2


def holes(config, seq: int, quant=None, lora=EXPERT_LORA) -> int:
    estimate = ql.estimate_memory(config, quant=quant or ql.QuantConfig(), lora=lora, batch_size=1, seq_len=seq,
                                  device="cpu")
    return estimate.process_breakdown["expert_holes"]


def test_dequantized_bytes_are_the_routed_experts_weights_in_the_compute_dtype():
    facts = facts_of(qwen3_moe(experts=16, top_k=2, layers=3), tokens=64)
    # one expert: gate and up (2 x 32 x 64) and down (64 x 32), two bytes each; every expert is routed to
    assert facts == {"moe_layers": 3, "expert_dequant_bytes": 16 * 3 * 32 * 64 * 2}


def test_fewer_assignments_than_experts_dequantize_only_the_experts_hit():
    # 3 tokens x top-2 reach at most 6 of 16 experts
    assert facts_of(qwen3_moe(experts=16, top_k=2), tokens=3)["expert_dequant_bytes"] == 6 * 3 * 32 * 64 * 2


def test_a_float_base_and_a_dense_model_dequantize_nothing():
    assert facts_of(qwen3_moe(), tokens=64, bits=None)["expert_dequant_bytes"] == 0
    dense = transformers.LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                     num_attention_heads=4, num_key_value_heads=2)
    assert facts_of(dense, tokens=64) == {"moe_layers": 0, "expert_dequant_bytes": 0}
    assert holes(dense, seq=32, lora=ql.LoraConfig(r=4)) == 0


def test_the_estimate_grows_with_the_experts_hit_until_every_expert_is():
    # seq 4: 4 x top-k assignments among 32 experts, so doubling top-k doubles the experts hit ...
    assert holes(qwen3_moe(experts=32, top_k=4), seq=4) == pytest.approx(
        2 * holes(qwen3_moe(experts=32, top_k=2), seq=4), abs=ROUNDING_BYTES)
    # ... and once all are hit (64 x 2 > 32) more top-k adds none, while more experts add theirs
    assert holes(qwen3_moe(experts=32, top_k=4), seq=64) == holes(qwen3_moe(experts=32, top_k=2), seq=64)
    assert holes(qwen3_moe(experts=32, top_k=2), seq=64) == pytest.approx(
        2 * holes(qwen3_moe(experts=16, top_k=2), seq=64), abs=ROUNDING_BYTES)


def test_the_estimate_grows_with_the_expert_size_and_the_layers_as_fitted():
    one, three = holes(qwen3_moe(layers=1), seq=64), holes(qwen3_moe(layers=3), seq=64)
    dequant = 16 * 3 * 32 * 64 * 2
    assert one == int(process.CPU_EXPERT_HOLES * dequant)
    assert three == int(dequant * (process.CPU_EXPERT_HOLES + 2 * process.CPU_EXPERT_LAYER))
    assert holes(qwen3_moe(layers=1, inter=64), seq=64) == int(process.CPU_EXPERT_HOLES * 2 * dequant)


def test_the_term_is_in_the_training_peak_and_absent_from_float_and_gpu_estimates():
    config = qwen3_moe()
    estimate = ql.estimate_memory(config, quant=ql.QuantConfig(), lora=EXPERT_LORA, batch_size=1, seq_len=64,
                                  device="cpu")
    parts = estimate.process_breakdown
    assert parts["expert_holes"] > 0
    assert parts["training_peak"] == sum(v for k, v in parts.items() if k not in ("training_peak", "load_peak"))
    assert holes(config, seq=64, quant=ql.QuantConfig(bits=None)) == 0
    gpu = ql.estimate_memory(config, quant=ql.QuantConfig(), lora=EXPERT_LORA, batch_size=1, seq_len=64, device="cuda")
    assert "expert_holes" not in gpu.process_breakdown


def test_trimmed_heaps_keep_no_earlier_layers_holes():
    facts = process.ModelFacts(moe_layers=4, expert_dequant_bytes=2**30)
    trimmed = process.ModelFacts(moe_layers=4, expert_dequant_bytes=2**30, heap_trimmed=True)
    assert process.expert_holes(trimmed) == int(process.CPU_EXPERT_HOLES * 2**30)
    assert process.expert_holes(facts) == pytest.approx(
        2**30 * (process.CPU_EXPERT_HOLES + 3 * process.CPU_EXPERT_LAYER), abs=ROUNDING_BYTES)
