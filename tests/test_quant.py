"""Quantization of single layers: round-trip error bounds, what dequantize_weight means, Conv1D."""

from __future__ import annotations

import pytest
import torch
from transformers.pytorch_utils import Conv1D

import qlowrank as ql
from qlowrank.nn import quant as quantlib

# Relative Frobenius round-trip error ||W - dequant(quant(W))|| / ||W|| on N(0, 0.02)
# weights (512 x 1024), measured over seeds 0-4 on this CPU:
#   nf4 0.09200 +- 0.00007, fp4 0.12194 +- 0.00007, int8 0.00788 +- 0.00004
# (nf4 without double quant: 0.09197). The bounds sit ~10 sigma around the measured mean,
# so a broken code book, a wrong block size or no quantization at all falls outside them.
ROUND_TRIP_BOUNDS = {
    "nf4": (0.0910, 0.0930),
    "fp4": (0.1210, 0.1230),
    "int8": (0.0075, 0.0083),
}
# fp32 compute: a quantized layer's output equals x @ dequantize_weight(layer).T up to
# float32 summation-order noise (observed max 2e-7 on outputs of scale ~0.1).
FP32_MATMUL_ATOL = 1e-5


def _quant_config(kind: str, **kwargs) -> ql.QuantConfig:
    if kind == "int8":
        return ql.QuantConfig(bits=8, **kwargs)
    return ql.QuantConfig(bits=4, quant_type=kind, **kwargs)


@pytest.mark.parametrize("kind", ["nf4", "fp4", "int8"])
def test_round_trip_error_within_calibrated_bounds(kind, device):
    torch.manual_seed(0)
    weight = torch.randn(512, 1024) * 0.02
    layer = quantlib.quantize_linear(weight, None, _quant_config(kind), device)
    restored = ql.dequantize_weight(layer).cpu()
    rel = ((restored - weight).norm() / weight.norm()).item()
    low, high = ROUND_TRIP_BOUNDS[kind]
    assert low < rel < high, f"{kind} round-trip error {rel:.5f} outside [{low}, {high}]"


@pytest.mark.parametrize("kind", ["nf4", "fp4", "int8"])
def test_dequantize_weight_is_what_the_layer_computes(kind, device):
    torch.manual_seed(0)
    weight = torch.randn(96, 64) * 0.02
    bias = torch.randn(96) * 0.1
    layer = quantlib.quantize_linear(weight, bias, _quant_config(kind, compute_dtype=torch.float32, int8_threshold=0.0), device)
    layer.train()  # LLM.int8 in eval mode quantizes activations too; training mode uses the weight as is
    x = torch.randn(4, 64, device=device, requires_grad=True)
    expected = x @ ql.dequantize_weight(layer).t() + bias.to(device)
    torch.testing.assert_close(layer(x), expected, atol=FP32_MATMUL_ATOL, rtol=0)


def test_double_quant_stores_fewer_bytes():
    weight = torch.randn(256, 1024) * 0.02
    single = quantlib.quantize_linear(weight, None, ql.QuantConfig(double_quant=False), "cpu")
    double = quantlib.quantize_linear(weight, None, ql.QuantConfig(double_quant=True), "cpu")
    assert quantlib.storage_bytes(double) < quantlib.storage_bytes(single)
    # 4 bits a weight plus scales: between 0.5 and 0.6 bytes per weight.
    assert 0.5 * weight.numel() < quantlib.storage_bytes(double) < 0.6 * weight.numel()


@pytest.mark.parametrize("bits", [4, 8])
def test_conv1d_is_transposed_into_linear_layout(bits):
    torch.manual_seed(0)
    conv = Conv1D(48, 64)  # GPT-2 style: weight stored (in=64, out=48)
    torch.nn.init.normal_(conv.weight, std=0.02)
    model = torch.nn.Sequential(conv)
    ql.quantize_model(model, ql.QuantConfig(bits=bits, compute_dtype=torch.float32))
    layer = model[0]
    assert quantlib.is_quantized_linear(layer) and layer.fan_in_fan_out
    restored = ql.dequantize_weight(layer)
    assert restored.shape == (48, 64)
    rel = ((restored - conv.weight.t()).norm() / conv.weight.norm()).item()
    assert rel < ROUND_TRIP_BOUNDS["nf4" if bits == 4 else "int8"][1] + 0.01


def test_quantize_model_keeps_head_embeddings_and_norms_untouched():
    from conftest import tiny_model
    model = tiny_model("llama", dtype=torch.bfloat16)
    embed_before = model.model.embed_tokens.weight.clone()
    ql.quantize_model(model, ql.QuantConfig(bits=4), skip=["o_proj"])
    assert not quantlib.is_quantized_linear(model.lm_head)
    assert model.lm_head.weight.dtype == torch.bfloat16  # no blanket fp32 upcast
    assert model.model.norm.weight.dtype == torch.bfloat16
    assert torch.equal(model.model.embed_tokens.weight, embed_before)
    assert not quantlib.is_quantized_linear(model.model.layers[0].self_attn.o_proj)
    assert quantlib.is_quantized_linear(model.model.layers[0].self_attn.q_proj)
    assert quantlib.is_quantized_linear(model.model.layers[1].mlp.down_proj)
