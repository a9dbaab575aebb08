"""GGUF for mixtures of experts (Qwen3-MoE, Mixtral, gpt-oss, Qwen2-MoE, OLMoE): merged export in llama.cpp's ffn_*_exps layout, read back
by transformers' reader where it can, streamed in float and 4-bit into FrozenExperts, MXFP4 experts, training from a GGUF."""

from __future__ import annotations

import functools
import json

import gguf
import numpy as np
import pytest
import torch
import transformers
from conftest import adamw_losses, rel_error, tiny_tokenizer
from test_moe import moe_config

import qlowrank as ql
from qlowrank.cli.main import main
from qlowrank.nn.experts import FrozenExperts

# The same merged float32 weights on both sides run by the same float32 program: only a different
# summation order could differ (measured: exactly 0.0 for all three families, every reader).
F32_TOLERANCE = 1e-6
# Same float32 weights quantized to NF4 by the same bitsandbytes call on both paths: same codes, so
# the logits agree to float32 rounding (measured 0.0).
SAME_NF4_TOLERANCE = 1e-6
# dequant(W) + scale * B A recomputed here against the file, relative to the weight's largest entry: float32
# rounding of a sum of r = 4 products added to a weight (a few units of 2^-24).
RECONSTRUCTION_TOLERANCE = 1e-6
FAMILIES = ["qwen3_moe", "mixtral", "gpt_oss", "qwen2_moe", "olmoe"]
ARCH = {"qwen3_moe": gguf.MODEL_ARCH.QWEN3MOE, "mixtral": gguf.MODEL_ARCH.LLAMA, "gpt_oss": gguf.MODEL_ARCH.GPT_OSS,
        "qwen2_moe": gguf.MODEL_ARCH.QWEN2MOE, "olmoe": gguf.MODEL_ARCH.OLMOE}
# transformers 5.25's reader reads Qwen3-MoE and Qwen2-MoE in llama.cpp's layout: Mixtral ("llama" with experts)
# becomes a dense Llama, gpt-oss keeps random experts and sinks (and fails outright on YaRN's keys); OLMoE it
# refuses (no olmoe GGUF mapping).
READ_BY_TRANSFORMERS = ["qwen3_moe", "qwen2_moe"]
MISREAD_BY_TRANSFORMERS = ["mixtral", "gpt_oss"]
LORA = dict(r=4, alpha=8, target_parameters=["experts"])
ARCH_NAME = {family: gguf.MODEL_ARCH_NAMES[arch] for family, arch in ARCH.items()}


def _config(family: str, vocab: int) -> transformers.PretrainedConfig:
    config = moe_config(family, vocab=vocab)
    if family == "qwen3_moe":
        # transformers' GGUF reader assumes Qwen3-MoE's defaults for what it does not read
        # (expert_feed_forward_length; llama.cpp always renormalizes the top-k weights).
        config.moe_intermediate_size, config.norm_topk_prob = 768, True
    if family == "qwen2_moe":   # transformers' reader reads neither expert width: Qwen2-MoE's defaults
        config.moe_intermediate_size, config.shared_expert_intermediate_size = 1408, 5632
    if family == "gpt_oss":
        config.head_dim = 64   # transformers' gpt-oss GGUF mapping does not read key_length either
    return config


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def bundles(tmp_path_factory, tok):
    """family -> a 4-bit model with trained-looking LoRA (experts and attention), its merged export and its GGUF."""
    return functools.cache(lambda family: _build(family, tok, tmp_path_factory.mktemp(family)))


def _build(family: str, tok, root) -> dict:
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(_config(family, len(tok))).eval()
    with torch.no_grad():   # norms away from 1, so that a misplaced norm shows
        for name, param in model.named_parameters():
            if "norm" in name:
                param.normal_(1.0, 0.1)
    ql.quantize_model(model, ql.QuantConfig(bits=4, compute_dtype=torch.float32))
    ql.add_lora(model, ql.LoraConfig(**LORA))
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.05)
    quiet = dict(tokenizer=tok, progress=False)
    ql.export_merged(model, root / "merged", dtype=torch.float32, probe=False, **quiet)
    report = ql.export_merged(model, root / "model.gguf", format="gguf", gguf_type="f32", **quiet)
    return {"model": model, "root": root, "report": report}


def _ids(vocab: int) -> torch.Tensor:
    return torch.randint(0, vocab, (2, 24), generator=torch.Generator().manual_seed(5))


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits.float()


def _merged(bundle):
    return transformers.AutoModelForCausalLM.from_pretrained(bundle["root"] / "merged", dtype=torch.float32).eval()


def _tensors(path) -> dict[str, np.ndarray]:
    """GGUF name -> float32 values (numpy order), through the gguf package's own reader."""
    return {t.name: gguf.quants.dequantize(t.data, t.tensor_type).reshape(tuple(reversed(t.shape.tolist())))
            for t in gguf.GGUFReader(str(path)).tensors}


def _load(path, bits=None, **kw):
    return ql.load_model(path, quant=ql.QuantConfig(bits=bits, compute_dtype=torch.float32), dtype=torch.float32,
                         device="cpu", progress=False, **kw)


@pytest.mark.parametrize("family", FAMILIES)
def test_merged_gguf_has_llama_cpp_expert_layout(family, bundles):
    """Names from the gguf package's map of the unfused projections, llama.cpp's shapes, the merged expert values."""
    bundle = bundles(family)
    merged = _merged(bundle)
    config = merged.config
    tensors = _tensors(bundle["root"] / "model.gguf")
    name_map = gguf.get_tensor_name_map(ARCH[family], config.num_hidden_layers)
    experts = getattr(config, "num_experts", None) or config.num_local_experts
    width = getattr(config, "moe_intermediate_size", None) or config.intermediate_size
    state = merged.state_dict()
    for layer in range(config.num_hidden_layers):
        prefix = f"model.layers.{layer}.mlp.experts"
        gate, up, down = (tensors[name_map.get_name(f"{prefix}.{p}") + ".weight"] for p in ("gate_proj", "up_proj", "down_proj"))
        assert gate.shape == up.shape == (experts, width, config.hidden_size)     # ne = [H, I, E]
        assert down.shape == (experts, config.hidden_size, width)
        fused = state[f"{prefix}.gate_up_proj"].numpy()
        if family == "gpt_oss":   # (E, H, 2I) with gate / up interleaved, transposed in the file
            assert np.array_equal(gate, fused.transpose(0, 2, 1)[:, 0::2]) and np.array_equal(up, fused.transpose(0, 2, 1)[:, 1::2])
            assert np.array_equal(down, state[f"{prefix}.down_proj"].numpy().transpose(0, 2, 1))
            bias = state[f"{prefix}.gate_up_proj_bias"].numpy()
            assert np.array_equal(tensors[name_map.get_name(f"{prefix}.gate_proj") + ".bias"], bias[:, 0::2])
            assert np.array_equal(tensors[name_map.get_name(f"{prefix}.up_proj") + ".bias"], bias[:, 1::2])
            sinks = tensors[name_map.get_name(f"model.layers.{layer}.self_attn.sinks") + ".weight"]
            assert np.array_equal(sinks, state[f"model.layers.{layer}.self_attn.sinks"].numpy())
        else:                     # (E, 2I, H): gate rows, then up rows
            assert np.array_equal(gate, fused[:, :width]) and np.array_equal(up, fused[:, width:])
            assert np.array_equal(down, state[f"{prefix}.down_proj"].numpy())
    if family == "qwen2_moe":
        _check_shared_expert(tensors, state, name_map, config)
    # The expert LoRA is in the merged values: they differ from the 4-bit base by far more than rounding.
    frozen = next(m for m in bundle["model"].modules() if isinstance(m, FrozenExperts))
    base = frozen.down_proj.weight(0, torch.float32).numpy()   # (out, in) = (H, I)
    assert np.abs(tensors[name_map.get_name("model.layers.0.mlp.experts.down_proj") + ".weight"][0] - base).max() > 1e-3
    fields = gguf.GGUFReader(str(bundle["root"] / "model.gguf")).fields
    arch = gguf.MODEL_ARCH_NAMES[ARCH[family]]
    assert fields["general.architecture"].contents() == arch
    assert fields[f"{arch}.expert_count"].contents() == experts
    assert fields[f"{arch}.expert_used_count"].contents() == config.num_experts_per_tok
    assert bundle["report"]["relative_logits_error"] <= F32_TOLERANCE   # the export's own streamed probe
    if family == "qwen2_moe":   # the widths llama.cpp reads (transformers' reader assumes the defaults used here)
        assert fields[f"{arch}.expert_feed_forward_length"].contents() == config.moe_intermediate_size
        assert fields[f"{arch}.expert_shared_feed_forward_length"].contents() == config.shared_expert_intermediate_size


def _check_shared_expert(tensors: dict, state: dict, name_map, config) -> None:
    """Qwen2-MoE's shared expert: a dense SwiGLU MLP as ffn_*_shexp, its sigmoid gate (1, H) squeezed to (H,)."""
    for layer in range(config.num_hidden_layers):
        prefix = f"model.layers.{layer}.mlp"
        for projection in ("gate_proj", "up_proj", "down_proj"):
            key = f"{prefix}.shared_expert.{projection}"
            name = name_map.get_name(key) + ".weight"
            assert name.endswith("_shexp.weight") and np.array_equal(tensors[name], state[key + ".weight"].numpy())
        gate = tensors[name_map.get_name(f"{prefix}.shared_expert_gate") + ".weight"]
        assert gate.shape == (config.hidden_size,)
        assert np.array_equal(gate, state[f"{prefix}.shared_expert_gate.weight"].numpy()[0])


@pytest.mark.parametrize("family", READ_BY_TRANSFORMERS)
def test_transformers_reader_gives_the_merged_exports_logits(family, bundles):
    bundle = bundles(family)
    merged = _merged(bundle)
    read = transformers.AutoModelForCausalLM.from_pretrained(str(bundle["root"]), gguf_file="model.gguf",
                                                             dtype=torch.float32).eval()
    assert type(read) is type(merged)
    ids = _ids(merged.config.vocab_size)
    assert rel_error(_logits(read, ids), _logits(merged, ids)) <= F32_TOLERANCE


@pytest.mark.parametrize("family", FAMILIES)
def test_streamed_reader_gives_the_merged_exports_logits(family, bundles):
    bundle = bundles(family)
    merged = _merged(bundle)
    path = bundle["root"] / "model.gguf"
    streamed = _load(path)
    assert type(streamed) is type(merged)
    for key in ("num_hidden_layers", "hidden_size", "num_experts_per_tok", "head_dim", "rope_parameters", "intermediate_size",
                "moe_intermediate_size", "shared_expert_intermediate_size", "num_key_value_heads"):
        assert getattr(streamed.config, key, None) == getattr(merged.config, key, None), key   # Qwen2-MoE: no head_dim
    ids = _ids(merged.config.vocab_size)
    assert rel_error(_logits(streamed, ids), _logits(merged, ids)) <= F32_TOLERANCE
    if family in READ_BY_TRANSFORMERS:   # and the very tensors transformers' reader gives
        ours, theirs = streamed.state_dict(), _load(path, gguf_reader="transformers").state_dict()
        assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    elif family in MISREAD_BY_TRANSFORMERS:   # transformers' reader would leave the experts random: refused, not misread
        with pytest.raises(ValueError, match="leaves the experts .* randomly initialised"):
            _load(path, gguf_reader="transformers")
    else:   # transformers' reader knows no such architecture
        with pytest.raises(ValueError, match=f"architecture {ARCH_NAME[family]} is not supported"):
            _load(path, gguf_reader="transformers")


@pytest.mark.parametrize("family", FAMILIES)
def test_4bit_gguf_load_equals_4bit_safetensors_load_and_trains(family, bundles):
    bundle = bundles(family)
    from_gguf = _load(bundle["root"] / "model.gguf", bits=4, lora=ql.LoraConfig(**LORA), seed=0)
    from_hf = _load(bundle["root"] / "merged", bits=4, lora=ql.LoraConfig(**LORA), seed=0)
    frozen = [m for m in from_gguf.modules() if isinstance(m, FrozenExperts)]
    assert len(frozen) == 2 and frozen[0].gate_up_proj.quant is not None and frozen[0].gate_up_proj.r == LORA["r"]
    assert not [n for n, p in from_gguf.named_parameters() if p.dim() == 3]   # no float expert stack left
    ids = _ids(from_gguf.config.vocab_size)
    from_gguf.eval(), from_hf.eval()
    assert rel_error(_logits(from_gguf, ids), _logits(from_hf, ids)) <= SAME_NF4_TOLERANCE
    from_gguf.train()
    losses = adamw_losses(from_gguf, ids, 3)
    assert losses[-1] < losses[0]
    assert frozen[0].gate_up_proj.lora_B.abs().sum() > 0   # the expert factors trained


def test_mxfp4_experts_are_read_as_the_gguf_package_dequantizes_them(bundles, tmp_path):
    """gpt-oss's hub GGUFs store experts in MXFP4: the streamed reader takes them through gguf.quants."""
    source = bundles("gpt_oss")["root"] / "model.gguf"
    reader = gguf.GGUFReader(str(source))
    mxfp4 = gguf.GGMLQuantizationType.MXFP4
    for name, dequantized in (("mxfp4.gguf", False), ("same_values_f32.gguf", True)):
        writer = gguf.GGUFWriter(str(tmp_path / name), "gpt-oss")
        for field in reader.fields.values():
            if not field.name.startswith("GGUF.") and field.name != "general.architecture":
                writer.add_key_value(field.name, field.contents(), field.types[0],
                                     field.types[-1] if field.types[0] == gguf.GGUFValueType.ARRAY else None)
        for tensor in reader.tensors:
            values = tensor.data.reshape(tuple(reversed(tensor.shape.tolist())))
            if "_exps.weight" in tensor.name:
                packed = gguf.quants.quantize(np.ascontiguousarray(values), mxfp4)
                if dequantized:
                    writer.add_tensor(tensor.name, gguf.quants.dequantize(packed, mxfp4))
                else:
                    writer.add_tensor(tensor.name, packed, raw_shape=packed.shape, raw_dtype=mxfp4)
            else:
                writer.add_tensor(tensor.name, np.array(values))
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
    types = {t.name: t.tensor_type for t in gguf.GGUFReader(str(tmp_path / "mxfp4.gguf")).tensors}
    assert types["blk.0.ffn_gate_exps.weight"] == mxfp4
    packed, plain = _load(tmp_path / "mxfp4.gguf").state_dict(), _load(tmp_path / "same_values_f32.gguf").state_dict()
    assert packed.keys() == plain.keys() and all(torch.equal(packed[k], plain[k]) for k in packed)
    original = _load(source).state_dict()["model.layers.0.mlp.experts.gate_up_proj"]
    assert 0 < rel_error(packed["model.layers.0.mlp.experts.gate_up_proj"], original) < 0.2   # 4-bit: rounded, close


@pytest.mark.parametrize("family", FAMILIES)
def test_cli_trains_on_a_moe_gguf_and_exports_it_as_gguf(family, bundles, tmp_path):
    path = bundles(family)["root"] / "model.gguf"
    rows = tmp_path / "data.jsonl"
    rows.write_text("".join(json.dumps({"prompt": f"def f{i}(x):", "completion": " return x"}) + "\n" for i in range(8)))
    args = ["train", "--model", str(path), "--data", str(rows), "--out", str(tmp_path / "run"), "--steps", "2",
            "--batch", "2", "--seq", "32", "--r", "4", "--target-parameters", "experts", "--device", "cpu",
            "--precision", "fp32", "--no-progress", "--lr", "1e-2"]
    assert main(args) == 0
    adapter = json.loads((tmp_path / "run" / "adapter" / "adapter_config.json").read_text())
    assert sorted(adapter["target_parameters"]) == ["mlp.experts.down_proj", "mlp.experts.gate_up_proj"]
    out = tmp_path / "exported.gguf"
    assert main(["export", "--model", str(path), "--adapter", str(tmp_path / "run" / "adapter"), "--out", str(out),
                 "--format", "gguf", "--gguf-type", "f32", "--device", "cpu"]) == 0
    tensors = _tensors(out)
    assert {"blk.1.ffn_gate_exps.weight", "blk.1.ffn_up_exps.weight", "blk.1.ffn_down_exps.weight"} <= set(tensors)
    # The trained expert LoRA is folded in: dequant(W_e) + scale * B_e A_e of the saved adapter, expert by expert.
    trained = ql.load_adapter(_load(path, bits=4), tmp_path / "run" / "adapter").model.layers[1].mlp.experts.down_proj
    moved = 0.0
    for expert in range(trained.experts):
        base = trained.weight(expert, torch.float32).numpy()
        written = tensors["blk.1.ffn_down_exps.weight"][expert]
        scale = np.abs(base).max()
        assert np.abs(written - (base + trained.delta(expert).detach().numpy())).max() <= RECONSTRUCTION_TOLERANCE * scale
        moved = max(moved, np.abs(written - base).max() / scale)
    assert moved > 1e2 * RECONSTRUCTION_TOLERANCE   # the delta is really there (experts that got no token have none)


# Layouts llama.cpp's qwen2moe / olmoe cannot hold: dense MLP layers between the MoE ones, OLMoE's q/k norms
# with fewer key/value heads than heads (its k norm has hidden_size entries).
UNWRITABLE = {
    "qwen2_moe": (dict(mlp_only_layers=[1]), "dense MLP layers between its MoE layers"),
    "olmoe": (dict(num_key_value_heads=2), "2 key/value heads for 4 heads"),
}


@pytest.mark.parametrize("family", list(UNWRITABLE))
def test_moe_layouts_llama_cpp_cannot_hold_are_refused(family, tok, tmp_path):
    changes, message = UNWRITABLE[family]
    config = moe_config(family, vocab=len(tok))
    for key, value in changes.items():
        setattr(config, key, value)
    model = transformers.AutoModelForCausalLM.from_config(config)
    with pytest.raises(ValueError, match=f"{message}.*{ARCH_NAME[family]}.*export safetensors"):
        ql.export_merged(model, tmp_path / "m.gguf", format="gguf", tokenizer=tok, progress=False)
    assert not (tmp_path / "m.gguf").exists()
    # The adapter GGUF refuses the same layouts.
    ql.add_lora(model, ql.LoraConfig(r=4, alpha=8))
    with pytest.raises(ValueError, match=message):
        ql.save_gguf_adapter(model, tmp_path / "a.gguf")
    assert not (tmp_path / "a.gguf").exists()


def test_qwen2_moe_widths_and_routing_the_readers_assume_are_reported_and_read_back(tok, tmp_path):
    """Expert widths other than Qwen2-MoE's defaults: written, named in the report (transformers' reader assumes the
    defaults), and read back by the streamed reader; renormalized routing, which llama.cpp's qwen2moe omits, too."""
    config = moe_config("qwen2_moe", vocab=len(tok))   # experts 32 wide, shared expert 64
    config.norm_topk_prob = True
    model = transformers.AutoModelForCausalLM.from_config(config)
    report = ql.export_merged(model, tmp_path / "m.gguf", format="gguf", gguf_type="f32", tokenizer=tok, probe=False,
                              progress=False)
    assert report["moe_intermediate_size_not_read_by_transformers"] == 32
    assert report["shared_expert_intermediate_size_not_read_by_transformers"] == 64
    assert report["norm_topk_prob_true_not_in_gguf"] is True
    read = _load(tmp_path / "m.gguf").config
    assert (read.moe_intermediate_size, read.shared_expert_intermediate_size) == (32, 64)
