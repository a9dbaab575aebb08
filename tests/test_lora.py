"""LoraLinear and add_lora: start equal to the base, train only A and B, match float LoRA."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_model, token_batch
from torch import nn

import qlowrank as ql
from qlowrank.nn import quant as quantlib

ARCHS = ["llama", "mistral", "qwen2", "gpt2", "bert"]
QUANTS = {
    "nf4": ql.QuantConfig(bits=4, quant_type="nf4", compute_dtype=torch.float32),
    "fp4-bf16": ql.QuantConfig(bits=4, quant_type="fp4", compute_dtype=torch.bfloat16),
    "int8": ql.QuantConfig(bits=8),
    "float": ql.QuantConfig(bits=None),
}
# Gradients of A and B through a quantized base vs a float base holding dequantize_weight:
# both compute the same fp32 products, only the summation order differs (observed max
# relative difference 3e-7); 1e-5 leaves room for other BLAS kernels, not for real bugs.
GRAD_PARITY_RTOL = 1e-5
GRAD_PARITY_ATOL = 1e-7


def _logits(model, tokens):
    with torch.no_grad():
        return model(tokens).logits


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("quant_name", list(QUANTS))
def test_add_lora_starts_exactly_at_the_base(arch, quant_name, device):
    model = tiny_model(arch).to(device)
    ql.quantize_model(model, QUANTS[quant_name])
    tokens = token_batch().to(device)
    base = _logits(model, tokens)
    ql.add_lora(model, ql.LoraConfig(r=4, alpha=8))
    assert any(isinstance(m, ql.LoraLinear) for m in model.modules())
    assert torch.equal(_logits(model, tokens), base)


def _perturb_b(model, scale=0.05, seed=3):
    generator = torch.Generator().manual_seed(seed)
    for _, layer in ql.lora_layers(model):
        noise = torch.randn(layer.lora_B.weight.shape, generator=generator) * scale
        layer.lora_B.weight.data.copy_(noise.to(layer.lora_B.weight.device))


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_disable_lora_gives_base_outputs(arch):
    model = tiny_model(arch)
    ql.quantize_model(model, QUANTS["nf4"])
    tokens = token_batch()
    base = _logits(model, tokens)
    ql.add_lora(model, ql.LoraConfig(r=4))
    _perturb_b(model)
    assert not torch.equal(_logits(model, tokens), base)
    with ql.disable_lora(model):
        assert torch.equal(_logits(model, tokens), base)
    assert not torch.equal(_logits(model, tokens), base)


@pytest.mark.parametrize("quant_name", ["nf4", "int8"])
def test_training_changes_only_lora_and_base_bytes_stay_identical(quant_name, device):
    model = tiny_model("llama").to(device)
    ql.quantize_model(model, QUANTS[quant_name])
    ql.add_lora(model, ql.LoraConfig(r=4))
    model.train()
    frozen_before = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    packed_before = {
        name: {k: t.clone() for k, t in quantlib.packed_tensors(layer.base_layer).items()}
        for name, layer in ql.lora_layers(model)
    }
    lora_before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    assert lora_before and all(".lora_" in n for n in lora_before)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.1)
    tokens = token_batch().to(device)
    for _ in range(3):
        model(tokens, labels=tokens).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    for name, param in model.named_parameters():
        if name in frozen_before:
            assert torch.equal(param, frozen_before[name]), name
        else:
            assert not torch.equal(param, lora_before[name]), f"{name} did not train"
    for name, layer in ql.lora_layers(model):
        for key, tensor in quantlib.packed_tensors(layer.base_layer).items():
            before = packed_before[name][key]
            assert tensor.dtype == before.dtype and tensor.shape == before.shape
            assert _raw_bytes(tensor) == _raw_bytes(before), f"{name}.{key}"


def _raw_bytes(tensor: torch.Tensor) -> bytes:
    return tensor.detach().cpu().reshape(-1).view(torch.uint8).numpy().tobytes()


@pytest.mark.parametrize("bits", [4, 8])
def test_qlora_gradients_match_float_lora_on_dequantized_weight(bits, device):
    torch.manual_seed(0)
    linear = nn.Linear(64, 96, bias=True)
    quant = ql.QuantConfig(bits=bits, compute_dtype=torch.float32, int8_threshold=0.0)
    quantized = ql.LoraLinear(quantlib.quantize_linear(linear.weight, linear.bias, quant, device), ql.LoraConfig(r=8))
    float_base = nn.Linear(64, 96, bias=True, device=device)
    float_base.weight.data.copy_(ql.dequantize_weight(quantized.base_layer))
    float_base.bias.data.copy_(linear.bias)
    floating = ql.LoraLinear(float_base, ql.LoraConfig(r=8))
    floating.lora_A.weight.data.copy_(quantized.lora_A.weight)
    torch.nn.init.normal_(quantized.lora_B.weight, std=0.1)
    floating.lora_B.weight.data.copy_(quantized.lora_B.weight)
    quantized.train(), floating.train()
    x = torch.randn(3, 10, 64, device=device)
    target = torch.randn(3, 10, 96, device=device)
    grads = []
    for layer in (quantized, floating):
        loss = ((layer(x) - target) ** 2).mean()
        loss.backward()
        grads.append((layer.lora_A.weight.grad, layer.lora_B.weight.grad))
    for got, want in zip(grads[0], grads[1]):
        assert got.abs().sum() > 0
        torch.testing.assert_close(got, want, rtol=GRAD_PARITY_RTOL, atol=GRAD_PARITY_ATOL)


def test_output_dtype_is_the_base_dtype_and_factors_are_float32():
    base = nn.Linear(32, 16).to(torch.bfloat16)
    layer = ql.LoraLinear(base, ql.LoraConfig(r=4))
    nn.init.normal_(layer.lora_B.weight)
    y = layer(torch.randn(2, 32, dtype=torch.bfloat16))
    assert y.dtype == torch.bfloat16
    assert layer.lora_A.weight.dtype == torch.float32 and layer.lora_B.weight.dtype == torch.float32
    quantized = ql.LoraLinear(
        quantlib.quantize_linear(base.weight, base.bias, ql.QuantConfig(bits=4), "cpu"), ql.LoraConfig(r=4))
    assert quantized(torch.randn(2, 32)).dtype == torch.float32


@pytest.mark.parametrize("use_rslora,expected", [(False, 32 / 16), (True, 32 / 4)])
def test_scaling_and_delta_weight(use_rslora, expected):
    layer = ql.LoraLinear(nn.Linear(8, 6), ql.LoraConfig(r=16, alpha=32, use_rslora=use_rslora))
    assert layer.scaling == pytest.approx(expected)
    nn.init.normal_(layer.lora_B.weight)
    torch.testing.assert_close(layer.delta_weight(), expected * layer.lora_B.weight @ layer.lora_A.weight)
    x = torch.randn(5, 8)
    torch.testing.assert_close(layer(x), layer.base_layer(x) + x @ layer.delta_weight().t())


def test_gaussian_init_and_kaiming_init_differ_in_spread():
    kaiming = ql.LoraLinear(nn.Linear(256, 8), ql.LoraConfig(r=8, init="kaiming"))
    gaussian = ql.LoraLinear(nn.Linear(256, 8), ql.LoraConfig(r=8, init="gaussian"))
    assert gaussian.lora_A.weight.std().item() == pytest.approx(1 / 8, rel=0.1)
    assert kaiming.lora_A.weight.abs().max().item() <= 1 / 256 ** 0.5 + 1e-6  # kaiming_uniform(a=sqrt 5) bound
    assert torch.count_nonzero(kaiming.lora_B.weight) == 0 and torch.count_nonzero(gaussian.lora_B.weight) == 0


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_merge_unmerge_on_float_base_is_w_plus_delta_every_time(arch):
    model = tiny_model(arch)
    ql.add_lora(model, ql.LoraConfig(r=4))
    _perturb_b(model)
    tokens = token_batch()
    unmerged = _logits(model, tokens)
    name, layer = next(iter(ql.lora_layers(model)))
    original = ql.dequantize_weight(layer.base_layer).clone()
    for _ in range(3):
        for _, lora_layer in ql.lora_layers(model):
            lora_layer.merge()
        torch.testing.assert_close(ql.dequantize_weight(layer.base_layer), original + layer.delta_weight())
        torch.testing.assert_close(_logits(model, tokens), unmerged, atol=1e-5, rtol=1e-5)
        for _, lora_layer in ql.lora_layers(model):
            lora_layer.unmerge()
        torch.testing.assert_close(ql.dequantize_weight(layer.base_layer), original, atol=1e-7, rtol=0)


def test_merge_refused_on_quantized_base_points_to_export():
    layer = ql.LoraLinear(
        quantlib.quantize_linear(torch.randn(64, 64), None, ql.QuantConfig(bits=4), "cpu"), ql.LoraConfig(r=4))
    with pytest.raises(RuntimeError, match="export_merged"):
        layer.merge()
    with pytest.raises(RuntimeError, match="re-quantize"):
        layer.unmerge()


def test_merge_refuses_nan_adapter():
    layer = ql.LoraLinear(nn.Linear(8, 8), ql.LoraConfig(r=2))
    layer.lora_B.weight.data[0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        layer.merge()


@pytest.mark.parametrize("targets,expected", [
    (["q_proj", "v_proj"], {"q_proj", "v_proj"}),
    (r".*\.mlp\.(up|down)_proj", {"up_proj", "down_proj"}),
    ("all-linear", {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}),
])
def test_target_selection(targets, expected):
    model = tiny_model("llama")
    ql.add_lora(model, ql.LoraConfig(r=2, target_modules=targets))
    wrapped = {name.rsplit(".", 1)[-1] for name, _ in ql.lora_layers(model)}
    assert wrapped == expected
    assert not isinstance(model.lm_head, ql.LoraLinear)
