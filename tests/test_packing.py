"""Packed examples attend only within themselves: per-example losses equal the examples run alone."""

from __future__ import annotations

import pytest
import torch
from conftest import BF16_LOSS_TOLERANCE, FP32_LOSS_TOLERANCE, random_examples, tiny_model

import qlowrank as ql
from qlowrank.model.packing import ISOLATION_TOLERANCE, check_packed_attention, packed_attention_leaks
from qlowrank.train import Example, causal_lm_loss, collate, pack_examples


def _per_example_losses(model: torch.nn.Module, packed: list[Example], autocast: bool = False) -> dict[tuple, float]:
    """Each example's summed loss computed inside its packed row (its own labels kept, others masked)."""
    losses = {}
    for row in packed:
        start = 0
        for length in row.segments:
            keep = [lab if start < i < start + length else -100 for i, lab in enumerate(row.labels)]
            batch = collate([Example(row.input_ids, keep, row.source, row.segments)], pad_token_id=0)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                loss = causal_lm_loss(model, batch["input_ids"], batch["labels"], reduction="sum",
                                      position_ids=batch["position_ids"])
            losses[tuple(row.input_ids[start:start + length])] = loss.item()
            start += length
    return losses


def _alone_losses(model: torch.nn.Module, examples: list[Example], autocast: bool = False) -> dict[tuple, float]:
    out = {}
    for e in examples:
        batch = collate([e], pad_token_id=0)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            out[tuple(e.input_ids)] = causal_lm_loss(model, batch["input_ids"], batch["labels"], batch["attention_mask"],
                                                     reduction="sum").item()
    return out


def _assert_close(packed: dict, alone: dict, tolerance: float) -> None:
    assert packed.keys() == alone.keys()
    for key, value in alone.items():
        assert abs(packed[key] - value) <= tolerance * abs(value), (len(key), packed[key], value)


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2", "gpt2"])
def test_packed_examples_have_the_losses_they_have_alone(arch):
    model = tiny_model(arch)
    examples = random_examples([5, 9, 3, 12, 7, 6])
    packed = pack_examples(examples, seq_len=24)
    assert max(len(p.segments) for p in packed) >= 2
    check_packed_attention(model)
    _assert_close(_per_example_losses(model, packed), _alone_losses(model, examples), FP32_LOSS_TOLERANCE)


def test_packed_losses_hold_on_a_4bit_base_with_lora_under_bf16():
    model = tiny_model("llama")
    ql.quantize_model(model, ql.QuantConfig(bits=4, compute_dtype=torch.bfloat16))
    ql.add_lora(model, ql.LoraConfig(r=4))
    for _, layer in ql.lora_layers(model):   # B = 0 would hide the LoRA path
        torch.nn.init.normal_(layer.lora_B.weight, std=0.05)
    examples = random_examples([6, 10, 4, 8], seed=1)
    packed = pack_examples(examples, seq_len=20)
    _assert_close(_per_example_losses(model, packed, autocast=True), _alone_losses(model, examples, autocast=True),
                  BF16_LOSS_TOLERANCE)


def test_without_restarting_positions_packed_examples_leak():
    """The check above can fail: the old concatenate-and-attend packing changes the losses."""
    model = tiny_model("llama")
    examples = random_examples([5, 9, 3, 12, 7, 6])
    packed = pack_examples(examples, seq_len=24)
    alone = _alone_losses(model, examples)
    leaky = {}
    for row in packed:
        start = 0
        for length in row.segments:
            keep = torch.tensor([[lab if start < i < start + length else -100 for i, lab in enumerate(row.labels)]])
            ids = torch.tensor([row.input_ids])
            leaky[tuple(row.input_ids[start:start + length])] = causal_lm_loss(model, ids, keep, torch.ones_like(ids),
                                                                                reduction="sum").item()
            start += length
    worst = max(abs(leaky[k] - v) / abs(v) for k, v in alone.items())
    assert worst > 100 * FP32_LOSS_TOLERANCE, worst
    assert packed_attention_leaks(model) <= ISOLATION_TOLERANCE


class _MaskedAlways(torch.nn.Module):
    """A model whose forward always passes a full 2D mask, so restarting positions isolate nothing."""

    def __init__(self, inner: torch.nn.Module) -> None:
        super().__init__()
        self.inner, self.config = inner, inner.config

    def forward(self, input_ids, position_ids=None, **kwargs):
        return self.inner(input_ids=input_ids, position_ids=position_ids, attention_mask=torch.ones_like(input_ids))


def test_the_trainer_refuses_packed_data_for_a_model_that_leaks(tmp_path):
    from qlowrank.train import TrainConfig, Trainer

    leaky = _MaskedAlways(tiny_model("llama"))
    assert packed_attention_leaks(leaky) > 1e3 * ISOLATION_TOLERANCE
    packed = pack_examples(random_examples([5, 9, 3, 12]), seq_len=24)
    with pytest.raises(ValueError, match="attend to each other"):
        Trainer(leaky, TrainConfig(out_dir=str(tmp_path), steps=1, progress=False), packed)
