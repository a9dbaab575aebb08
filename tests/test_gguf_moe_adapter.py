"""The adapter GGUF of a mixture of experts (Qwen3-MoE, Mixtral, gpt-oss, Qwen2-MoE, OLMoE): expert LoRA as llama.cpp's 3-D lora_a / lora_b.

llama.cpp's `build_lora_mm_id` adds alpha / r * B_e (A_e x) to expert e's output, r = lora_b's ne[0];
so W_e + alpha / r * B_e A_e, rebuilt here from the B = 0 base GGUF and the adapter GGUF, must be the
merged GGUF's expert tensor (gate / up split and gpt-oss's transposed interleaving included).
Qwen2-MoE's shared-expert gate, (1, H) in the model, is (H,) in the base GGUF (ne = [H], which llama.cpp reads
as [H, 1]): its pair is lora_a (r, H), lora_b (1, r), as for any (out, in) weight with out = 1.
"""

from __future__ import annotations

import functools

import gguf
import numpy as np
import pytest
import torch
import transformers
from conftest import tiny_tokenizer
from test_gguf_moe import ARCH, FAMILIES, _config, _tensors

import qlowrank as ql

# base + alpha / r * (B @ A) recomputed from the files against the merged GGUF, relative to the
# tensor's largest entry. Both sides are float32 sums of the same r = 4 products added to the same
# weight, scaled in a different order (alpha / r on B @ A here, scale * B A there): a few units of
# 2^-24 ~ 6e-8 (measured: at most 1.5e-7, Mixtral's experts; 2-D pairs 0.0). The LoRA delta is >= 0.14 of it.
RECONSTRUCTION_TOLERANCE = 1e-6
# down_proj's scale becomes 5 / 4 while the file's alpha is 6: folded into the expert down stacks' lora_b.
# The router's LoRA (PEFT's all-linear adds it) is llama.cpp's ffn_gate_inp pair.
LORA = dict(r=4, alpha=6, alpha_pattern={"down_proj": 5}, target_parameters=["experts", "router"])
EXPS = ("ffn_gate_exps", "ffn_up_exps", "ffn_down_exps")


@pytest.fixture(scope="module")
def bundles(tmp_path_factory):
    """family -> a 4-bit model with LoRA on attention and experts, its B = 0 base GGUF, merged GGUF and adapter GGUF."""
    tok = tiny_tokenizer()
    return functools.cache(lambda family: _build(family, tok, tmp_path_factory.mktemp(family)))


def _build(family: str, tok, root) -> dict:
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(_config(family, len(tok))).eval()
    ql.quantize_model(model, ql.QuantConfig(bits=4, compute_dtype=torch.float32))
    ql.add_lora(model, ql.LoraConfig(**LORA))
    quiet = dict(format="gguf", gguf_type="f32", tokenizer=tok, probe=False, progress=False)
    ql.export_merged(model, root / "base.gguf", **quiet)   # B = 0: the base llama.cpp would load
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.05)
    ql.export_merged(model, root / "merged.gguf", **quiet)
    report = ql.save_gguf_adapter(model, root / "adapter.gguf")
    return {"model": model, "root": root, "report": report}


def _ne(path) -> dict[str, list[int]]:
    return {t.name: t.shape.tolist() for t in gguf.GGUFReader(str(path)).tensors}


@pytest.mark.parametrize("family", FAMILIES)
def test_moe_adapter_gguf_rebuilds_the_merged_expert_tensors(family, bundles):
    bundle = bundles(family)
    root, config = bundle["root"], bundle["model"].config
    reader = gguf.GGUFReader(str(root / "adapter.gguf"))
    assert reader.fields["general.type"].contents() == "adapter"
    assert reader.fields["adapter.type"].contents() == "lora"
    assert reader.fields["general.architecture"].contents() == gguf.MODEL_ARCH_NAMES[ARCH[family]]
    assert reader.fields["adapter.lora.alpha"].types == [gguf.GGUFValueType.FLOAT32]
    alpha = reader.fields["adapter.lora.alpha"].contents()
    assert alpha == LORA["alpha"]
    adapter, base, merged = _tensors(root / "adapter.gguf"), _tensors(root / "base.gguf"), _tensors(root / "merged.gguf")
    targets = {name.removesuffix(".lora_a") for name in adapter if name.endswith(".lora_a")}
    assert set(adapter) == {t + suffix for t in targets for suffix in (".lora_a", ".lora_b")}
    layers, experts = config.num_hidden_layers, getattr(config, "num_experts", None) or config.num_local_experts
    expected_exps = {f"blk.{i}.{kind}.weight" for i in range(layers) for kind in EXPS}
    assert {t for t in targets if "_exps" in t} == expected_exps
    assert {t for t in targets if ".ffn_gate_inp." in t} == {f"blk.{i}.ffn_gate_inp.weight" for i in range(layers)}
    if family == "qwen2_moe":   # all-linear adapts the shared expert and its gate too
        assert {f"blk.{i}.ffn_{kind}.weight" for i in range(layers) for kind in ("gate_shexp", "up_shexp", "down_shexp",
                                                                                  "gate_inp_shexp")} <= targets
    assert len(targets) == len(expected_exps) + len(list(ql.lora_layers(bundle["model"]))) + layers
    assert bundle["report"]["layers"] == len(targets) - len(expected_exps)   # linears and routers
    assert bundle["report"]["expert_stacks"] == 2 * layers      # gate_up_proj and down_proj per layer
    # each layer's expert down stack (alpha 5, not 6), and Qwen2-MoE's shared expert down_proj
    assert bundle["report"]["folded"] == layers * (2 if family == "qwen2_moe" else 1)
    ne = {name: shape + [1] * (2 - len(shape)) for name, shape in _ne(root / "base.gguf").items()}   # (H,): [H, 1]
    for target in sorted(targets):
        lora_a, lora_b = adapter[target + ".lora_a"], adapter[target + ".lora_b"]
        ne_a, ne_b = list(reversed(lora_a.shape)), list(reversed(lora_b.shape))
        # llama.cpp's checks (llama-adapter.cpp): base ne[0] == a ne[0], base ne[1] == b ne[1], a ne[1] == b ne[0]
        assert ne[target][0] == ne_a[0] and ne[target][1] == ne_b[1] and ne_a[1] == ne_b[0] == LORA["r"], target
        if "_exps" in target:   # and mul_mat_id picks expert e's slice of every tensor along ne[2]
            assert lora_a.ndim == lora_b.ndim == 3 and ne[target][2] == ne_a[2] == ne_b[2] == experts, target
        rank = lora_b.shape[-1]   # llama.cpp reads the rank from lora_b (ne[0])
        rebuilt = base[target] + alpha / rank * (lora_b @ lora_a)   # per expert for 3-D: (E, out, r) @ (E, r, in)
        scale = np.abs(merged[target]).max()
        assert np.abs(merged[target] - base[target]).max() > 1e3 * RECONSTRUCTION_TOLERANCE * scale, target  # B is not 0
        assert np.abs(rebuilt - merged[target]).max() <= RECONSTRUCTION_TOLERANCE * scale, target
    for layer in range(layers):   # the fused gate_up LoRA has one A for both halves
        gate, up = (adapter[f"blk.{layer}.{kind}.weight.lora_a"] for kind in EXPS[:2])
        assert np.array_equal(gate, up)


@pytest.mark.parametrize("family", FAMILIES)
def test_moe_adapter_gguf_with_lora_on_attention_only(family, bundles, tmp_path):
    """No expert LoRA: the adapter holds the attention pairs (and Qwen2-MoE's shared expert and its gate) alone,
    each naming a 2-D tensor of the base GGUF (the gate's (H,) read as [H, 1])."""
    model = transformers.AutoModelForCausalLM.from_config(_config(family, len(tiny_tokenizer())))
    ql.add_lora(model, ql.LoraConfig(r=4, alpha=8))
    report = ql.save_gguf_adapter(model, tmp_path / "attention.gguf")
    ne = {name: shape + [1] * (2 - len(shape)) for name, shape in _ne(bundles(family)["root"] / "base.gguf").items()}
    written = _ne(tmp_path / "attention.gguf")
    assert report["expert_stacks"] == 0 and len(written) == 2 * report["layers"] > 0
    for name, shape in written.items():
        target = name.rsplit(".", 1)[0]
        assert "_exps" not in target and len(ne[target]) == 2 and len(shape) == 2, name
        assert shape == ([ne[target][0], 4] if name.endswith(".lora_a") else [4, ne[target][1]]), name


def test_lora_factors_of_no_written_layer_are_refused(tmp_path):
    """A LoRA factor the writer has no tensor for stops the export, rather than being left out of the file."""
    model = transformers.AutoModelForCausalLM.from_config(_config("mixtral", len(tiny_tokenizer())))
    ql.add_lora(model, ql.LoraConfig(r=4, alpha=8, target_parameters=["experts"]))
    model.model.norm.register_parameter("lora_A", torch.nn.Parameter(torch.zeros(4, model.config.hidden_size)))
    with pytest.raises(ValueError, match=r"LoRA factors \['model.norm.lora_A'\] belong to no layer this writer writes"):
        ql.save_gguf_adapter(model, tmp_path / "a.gguf")
    assert not (tmp_path / "a.gguf").exists()
