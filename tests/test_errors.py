"""Every invalid input gets one clear error that names the thing and what to do."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_model
from torch import nn

import qlowrank as ql
from qlowrank.nn import quant as quantlib


@pytest.mark.parametrize("kwargs,match", [
    (dict(bits=3), r"QuantConfig.bits=3 .* 4, 8 or None"),
    (dict(quant_type="int4"), r"QuantConfig.quant_type='int4' .*nf4"),
    (dict(blocksize=100), r"QuantConfig.blocksize=100"),
    (dict(compute_dtype="fp64"), r"QuantConfig.compute_dtype='fp64'.*bf16"),
    (dict(int8_threshold=-1), r"QuantConfig.int8_threshold=-1"),
    (dict(double_quant="yes"), r"QuantConfig.double_quant='yes'"),
])
def test_quant_config_rejects_bad_values(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ql.QuantConfig(**kwargs)


@pytest.mark.parametrize("kwargs,match", [
    (dict(r=0), r"LoraConfig.r=0"),
    (dict(r=4.5), r"LoraConfig.r=4.5"),
    (dict(alpha=0), r"LoraConfig.alpha=0"),
    (dict(dropout=1.0), r"LoraConfig.dropout=1.0"),
    (dict(init="xavier"), r"LoraConfig.init='xavier'.*kaiming"),
    (dict(target_modules="(("), r"neither 'all-linear' nor a valid regex"),
    (dict(target_modules=[]), r"non-empty list"),
])
def test_lora_config_rejects_bad_values(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ql.LoraConfig(**kwargs)


def test_fp16_compute_on_cpu_is_refused_with_the_reason():
    with pytest.raises(ValueError, match="slower than bf16"):
        quantlib.quantize_linear(torch.randn(64, 64), None, ql.QuantConfig(compute_dtype=torch.float16), "cpu")


def test_unmatched_target_lists_existing_linear_names():
    model = tiny_model("llama")
    with pytest.raises(ValueError, match=r"\['query'\] matched no linear layer.*q_proj") as err:
        ql.add_lora(model, ql.LoraConfig(target_modules=["q_proj", "query"]))
    assert "down_proj" in str(err.value)
    with pytest.raises(ValueError, match=r"'attn\\\\\.zzz' matched no linear layer"):
        ql.add_lora(model, ql.LoraConfig(target_modules=r"attn\.zzz"))
    assert not any(isinstance(m, ql.LoraLinear) for m in model.modules())  # nothing half-done


def test_add_lora_twice_is_refused():
    model = tiny_model("llama")
    ql.add_lora(model, ql.LoraConfig(r=2))
    with pytest.raises(ValueError, match="already has LoRA"):
        ql.add_lora(model, ql.LoraConfig(r=2))


def test_wrapping_an_unsupported_module_is_refused():
    with pytest.raises(TypeError, match="cannot wrap Conv2d"):
        ql.LoraLinear(nn.Conv2d(3, 3, 3), ql.LoraConfig())


def test_quantizing_meta_weights_is_refused():
    with torch.device("meta"):
        model = nn.Sequential(nn.Linear(8, 8))
    with pytest.raises(ValueError, match="meta device"):
        ql.quantize_model(model, ql.QuantConfig(bits=4))
