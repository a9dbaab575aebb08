"""GGUF for every dense family: merged export read back by transformers' reader, streamed reading, the adapter alone as GGUF."""

from __future__ import annotations

import json

import gguf
import numpy as np
import pytest
import torch
import transformers
from conftest import random_lora_b, rel_error, tiny_tokenizer

import qlowrank as ql
from qlowrank.cli.main import main

# Same merged float32 weights on both sides, the same float32 program: only a different
# summation order could differ (measured: exactly 0.0 for every family below).
F32_TOLERANCE = 1e-6
# base + alpha / r * (B @ A) recomputed from the files against the merged export, relative to
# the weight's largest entry: float32 rounding of a product of r = 4 terms added to a weight
# (a few units of 2^-24; measured <= 1.2e-7). The LoRA delta itself is ~1e-2 of that entry.
RECONSTRUCTION_TOLERANCE = 1e-6
# The same float32 weights quantized to NF4 by the same bitsandbytes call on both paths (GGUF, safetensors):
# the same codes, so the logits agree to float32 rounding (measured 0.0 for OLMo 2).
SAME_NF4_TOLERANCE = 1e-6
# Every dense family the GGUF paths cover. head_dim: Qwen3's reader default is 128 (transformers
# does not read its key_length), so the tiny Qwen3 keeps it; Gemma's is set small.
COMMON = dict(num_hidden_layers=2, hidden_size=64, intermediate_size=128, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=128)
SPECIALS = dict(pad_token_id=0, bos_token_id=1, eos_token_id=0)
CONFIGS = {
    "llama": lambda: transformers.LlamaConfig(**COMMON, tie_word_embeddings=False),
    "mistral": lambda: transformers.MistralConfig(**COMMON, sliding_window=None),
    "qwen2": lambda: transformers.Qwen2Config(**COMMON),
    "qwen3": lambda: transformers.Qwen3Config(**{**COMMON, "num_attention_heads": 2, "num_key_value_heads": 1},
                                              head_dim=128),
    "gemma2": lambda: transformers.Gemma2Config(**COMMON, head_dim=16, **SPECIALS),
    "gemma3": lambda: transformers.Gemma3TextConfig(**COMMON, head_dim=16, **SPECIALS),
    "phi3": lambda: transformers.Phi3Config(**COMMON, **SPECIALS),
    "olmo2": lambda: transformers.Olmo2Config(**COMMON, pad_token_id=0, eos_token_id=0),
}
GGUF_ARCH = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2", "qwen3": "qwen3", "gemma2": "gemma2",
             "gemma3": "gemma3", "phi3": "phi3", "olmo2": "olmo2"}
NEW = ("qwen3", "gemma2", "gemma3", "phi3", "olmo2")
# transformers 5.25's GGUF reader has no OLMo 2 mapping: that family is checked by tensor names and by qlowrank's reader.
READ_BY_TRANSFORMERS = ("llama", "qwen3", "gemma2", "gemma3", "phi3")
# An alpha_pattern makes down_proj's scale 5 / 4 while the file's alpha is 6: folded into its lora_b.
LORA = dict(r=4, alpha=6, alpha_pattern={"down_proj": 5})


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def bundles(tmp_path_factory, tok):
    """family -> a trained tiny 4-bit model and its exports (built on first use)."""
    built = {}

    def get(family: str) -> dict:
        if family not in built:
            built[family] = _build(family, tok, tmp_path_factory.mktemp(family))
        return built[family]

    return get


def _build(family: str, tok, root) -> dict:
    config = CONFIGS[family]()
    config.vocab_size = len(tok)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():   # norms away from their init, so that a wrong `1 + w` offset shows
        for name, param in model.named_parameters():
            if "norm" in name:
                param.normal_(0.3 if family.startswith("gemma") else 1.0, 0.1)
    ql.quantize_model(model, ql.QuantConfig(bits=4, compute_dtype=torch.float32))
    ql.add_lora(model, ql.LoraConfig(**LORA))
    quiet = dict(tokenizer=tok, probe=False, progress=False)
    ql.export_merged(model, root / "base.gguf", format="gguf", gguf_type="f32", **quiet)   # B = 0: the base
    random_lora_b(model)
    ql.export_merged(model, root / "merged", dtype=torch.float32, **quiet)
    report = ql.export_merged(model, root / "merged.gguf", format="gguf", gguf_type="f32", tokenizer=tok)
    adapter = ql.save_gguf_adapter(model, root / "adapter.gguf")
    return {"model": model, "root": root, "report": report, "adapter": adapter}


def _ids(vocab: int) -> torch.Tensor:
    return torch.randint(0, vocab, (2, 24), generator=torch.Generator().manual_seed(3))


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits.float()


def _transformers_read(path, dtype=torch.float32):
    return transformers.AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=dtype).eval()


def _tensors(path) -> dict[str, np.ndarray]:
    """GGUF name -> float32 values (numpy order), through the gguf package's own reader."""
    return {t.name: gguf.quants.dequantize(t.data, t.tensor_type).reshape(tuple(reversed(t.shape.tolist())))
            for t in gguf.GGUFReader(str(path)).tensors}


@pytest.mark.parametrize("family", READ_BY_TRANSFORMERS)
def test_merged_gguf_reads_back_with_transformers_reader_as_the_merged_export(family, bundles):
    bundle = bundles(family)
    merged = transformers.AutoModelForCausalLM.from_pretrained(bundle["root"] / "merged").eval()
    ids = _ids(merged.config.vocab_size)
    read = _transformers_read(bundle["root"] / "merged.gguf")
    assert type(read) is type(merged)
    assert rel_error(_logits(read, ids), _logits(merged, ids)) <= F32_TOLERANCE
    assert bundle["report"]["architecture"] == GGUF_ARCH[family]
    assert bundle["report"]["relative_logits_error"] <= F32_TOLERANCE   # the export's own streamed probe


def test_olmo2_gguf_holds_the_merged_weights_under_llama_cpp_names(bundles):
    """No transformers reader for OLMo 2: its tensors, renamed by the gguf package's map, rebuild the merged model."""
    bundle = bundles("olmo2")
    merged = transformers.AutoModelForCausalLM.from_pretrained(bundle["root"] / "merged").eval()
    name_map = gguf.get_tensor_name_map(gguf.MODEL_ARCH.OLMO2, merged.config.num_hidden_layers)
    by_gguf_name = {name_map.get_name(k, try_suffixes=(".weight",)): k for k in merged.state_dict()}
    tensors = _tensors(bundle["root"] / "merged.gguf")
    assert set(tensors) == set(by_gguf_name)
    rebuilt = transformers.AutoModelForCausalLM.from_config(merged.config).eval()
    rebuilt.load_state_dict({by_gguf_name[n]: torch.from_numpy(v.copy()) for n, v in tensors.items()}, strict=True)
    ids = _ids(merged.config.vocab_size)
    assert rel_error(_logits(rebuilt, ids), _logits(merged, ids)) <= F32_TOLERANCE
    fields = gguf.GGUFReader(str(bundle["root"] / "merged.gguf")).fields
    assert fields["general.architecture"].contents() == "olmo2"
    assert fields["olmo2.attention.layer_norm_rms_epsilon"].contents() == pytest.approx(merged.config.rms_norm_eps)


def _rewrite_header(source, path, drop=(), add=None) -> None:
    """`source`'s tensors under its header less the keys `drop`, plus `add` (key -> (value, gguf value type))."""
    reader = gguf.GGUFReader(str(source))
    writer = gguf.GGUFWriter(str(path), reader.fields["general.architecture"].contents())
    for field in reader.fields.values():
        if not field.name.startswith("GGUF.") and field.name != "general.architecture" and field.name not in drop:
            writer.add_key_value(field.name, field.contents(), field.types[0],
                                 field.types[-1] if field.types[0] == gguf.GGUFValueType.ARRAY else None)
    for key, (value, kind) in (add or {}).items():
        writer.add_key_value(key, value, kind)
    for tensor in reader.tensors:
        writer.add_tensor(tensor.name, np.array(tensor.data.reshape(tuple(reversed(tensor.shape.tolist())))))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


# llama.cpp's converter (convert_hf_to_gguf.py, TextModel) writes no head width, rotary width or vocabulary size
# for an OLMo 2, whose config has no head_dim: llama.cpp derives them, and so must the reader.
OLMO2_KEYS_LLAMA_CPP_OMITS = ("olmo2.attention.key_length", "olmo2.attention.value_length",
                              "olmo2.rope.dimension_count", "olmo2.vocab_size")


def test_olmo2_gguf_loads_streamed_as_the_merged_export_in_float_and_4bit(bundles, tok, tmp_path):
    """transformers has no OLMo 2 GGUF mapping: qlowrank's header builds the config, its name map and processor the rest."""
    bundle = bundles("olmo2")
    merged = transformers.AutoModelForCausalLM.from_pretrained(bundle["root"] / "merged").eval()
    ids = _ids(merged.config.vocab_size)
    llama_cpp_layout = tmp_path / "converter.gguf"
    _rewrite_header(bundle["root"] / "merged.gguf", llama_cpp_layout, drop=OLMO2_KEYS_LLAMA_CPP_OMITS)
    for path in (bundle["root"] / "merged.gguf", llama_cpp_layout):
        ours = ql.load_model(path, quant=ql.QuantConfig(bits=None), dtype=torch.float32, device="cpu", progress=False)
        assert type(ours) is type(merged)
        for key in ("num_hidden_layers", "hidden_size", "intermediate_size", "num_attention_heads",
                    "num_key_value_heads", "max_position_embeddings", "rope_parameters", "tie_word_embeddings",
                    "vocab_size", "eos_token_id", "pad_token_id"):
            assert getattr(ours.config, key) == getattr(merged.config, key), key
        assert rel_error(_logits(ours, ids), _logits(merged, ids)) <= F32_TOLERANCE
    # 4-bit: the same float32 weights reach the same bitsandbytes call as from the safetensors export.
    quant = dict(quant=ql.QuantConfig(bits=4, compute_dtype=torch.float32), device="cpu", progress=False, seed=0)
    from_gguf = ql.load_model(bundle["root"] / "merged.gguf", lora=ql.LoraConfig(r=4), **quant).eval()
    from_hf = ql.load_model(bundle["root"] / "merged", lora=ql.LoraConfig(r=4), **quant).eval()
    assert ql.count_parameters(from_gguf) == ql.count_parameters(from_hf)
    assert rel_error(_logits(from_gguf, ids), _logits(from_hf, ids)) <= SAME_NF4_TOLERANCE
    # The tokenizer, through transformers' GGUF converter for the file's tokenizer.ggml.model.
    text = "Hello world, <|im_start|>user\nthe quick brown fox 123"
    assert ql.load_tokenizer(bundle["root"] / "merged.gguf")(text).input_ids == tok(text).input_ids


def test_olmo2_gguf_settings_transformers_olmo2_cannot_hold_are_refused(bundles, tmp_path):
    """An OLMo 3 (llama.cpp writes it as "olmo2" with sliding windows) or another head width must not load as OLMo 2."""
    source = bundles("olmo2")["root"] / "merged.gguf"
    uint32 = gguf.GGUFValueType.UINT32
    cases = {"olmo2.attention.sliding_window": ((4096, uint32), "it has no such setting"),
             "olmo2.attention.key_length": ((32, uint32), "it builds 16")}
    for key, (value, builds) in cases.items():
        path = tmp_path / f"{key}.gguf"
        _rewrite_header(source, path, drop=(key,), add={key: value})
        with pytest.raises(ValueError, match=rf"{path.name}: GGUF key '{key}' = {value[0]} .*\({builds}\)"):
            ql.load_model(path, quant=ql.QuantConfig(bits=None), device="cpu", progress=False)


def test_cli_trains_on_an_olmo2_gguf(bundles, tmp_path):
    rows = tmp_path / "data.jsonl"
    rows.write_text("".join(json.dumps({"prompt": f"def f{i}(x):", "completion": " return x"}) + "\n" for i in range(4)))
    args = ["train", "--model", str(bundles("olmo2")["root"] / "merged.gguf"), "--data", str(rows), "--out",
            str(tmp_path / "run"), "--steps", "1", "--batch", "2", "--seq", "32", "--r", "4", "--device", "cpu",
            "--precision", "fp32", "--no-progress"]
    assert main(args) == 0
    adapter = json.loads((tmp_path / "run" / "adapter" / "adapter_config.json").read_text())
    assert adapter["r"] == 4 and "q_proj" in adapter["target_modules"]


@pytest.mark.parametrize("family", READ_BY_TRANSFORMERS)
@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16))
def test_streamed_reader_equals_transformers_reader(family, dtype, bundles):
    path = bundles(family)["root"] / "merged.gguf"
    kw = dict(quant=ql.QuantConfig(bits=None), dtype=dtype, device="cpu", progress=False)
    streamed = ql.load_model(path, **kw)
    reference = ql.load_model(path, gguf_reader="transformers", **kw)
    ours, theirs = streamed.state_dict(), reference.state_dict()
    assert type(streamed) is type(reference) and ours.keys() == theirs.keys()
    assert [k for k in ours if ours[k].dtype != theirs[k].dtype or not torch.equal(ours[k], theirs[k])] == []
    ids = _ids(streamed.config.vocab_size)
    assert torch.equal(_logits(streamed, ids), _logits(reference, ids))


@pytest.mark.parametrize("family", sorted(CONFIGS))
def test_adapter_gguf_has_llama_cpp_layout_and_rebuilds_the_merged_weights(family, bundles):
    bundle = bundles(family)
    root, model = bundle["root"], bundle["model"]
    reader = gguf.GGUFReader(str(root / "adapter.gguf"))
    fields = {name: reader.fields[name].contents() for name in
              ("general.type", "adapter.type", "adapter.lora.alpha", "general.architecture")}
    assert fields == {"general.type": "adapter", "adapter.type": "lora", "adapter.lora.alpha": LORA["alpha"],
                      "general.architecture": GGUF_ARCH[family]}
    assert reader.fields["adapter.lora.alpha"].types == [gguf.GGUFValueType.FLOAT32]
    adapter, base, merged = _tensors(root / "adapter.gguf"), _tensors(root / "base.gguf"), _tensors(root / "merged.gguf")
    targets = {name[:-len(".lora_a")] for name in adapter if name.endswith(".lora_a")}
    assert len(targets) == len(list(ql.lora_layers(model))) == bundle["adapter"]["layers"]
    assert set(adapter) == {t + suffix for t in targets for suffix in (".lora_a", ".lora_b")}
    assert bundle["adapter"]["folded"] == model.config.num_hidden_layers   # one down_proj per layer
    shapes = {t.name: t.shape.tolist() for t in gguf.GGUFReader(str(root / "base.gguf")).tensors}  # ne order
    for target in targets:
        lora_a, lora_b = adapter[target + ".lora_a"], adapter[target + ".lora_b"]
        ne_a, ne_b = list(reversed(lora_a.shape)), list(reversed(lora_b.shape))
        # llama.cpp's checks (llama-adapter.cpp): base ne[0] == a ne[0], base ne[1] == b ne[1], a ne[1] == b ne[0]
        assert shapes[target][0] == ne_a[0] and shapes[target][1] == ne_b[1] and ne_a[1] == ne_b[0]
        rank = lora_b.shape[1]   # llama.cpp reads the rank from lora_b
        rebuilt = base[target] + fields["adapter.lora.alpha"] / rank * (lora_b @ lora_a)
        scale = np.abs(merged[target]).max()
        assert np.abs(merged[target] - base[target]).max() > 1e3 * RECONSTRUCTION_TOLERANCE * scale   # B is not 0
        assert np.abs(rebuilt - merged[target]).max() <= RECONSTRUCTION_TOLERANCE * scale, target


def test_adapter_gguf_refuses_what_llama_cpp_cannot_apply(tok, tmp_path):
    config = CONFIGS["qwen3"]()
    config.vocab_size = len(tok)
    dora = transformers.AutoModelForCausalLM.from_config(config)
    ql.add_lora(dora, ql.LoraConfig(r=2, use_dora=True))
    with pytest.raises(ValueError, match="DoRA layers .* cannot be expressed"):
        ql.save_gguf_adapter(dora, tmp_path / "d.gguf")
    whole = transformers.AutoModelForCausalLM.from_config(config)
    ql.add_lora(whole, ql.LoraConfig(r=2, modules_to_save=["lm_head"]))
    with pytest.raises(ValueError, match=r"\['lm_head'\] are trained whole"):
        ql.save_gguf_adapter(whole, tmp_path / "w.gguf")
    plain = transformers.AutoModelForCausalLM.from_config(config)
    with pytest.raises(ValueError, match="no LoRA layers"):
        ql.save_gguf_adapter(plain, tmp_path / "p.gguf")
    ql.add_lora(plain, ql.LoraConfig(r=2))
    with pytest.raises(ValueError, match="with a .gguf suffix"):
        ql.save_gguf_adapter(plain, tmp_path / "adapter")
    (tmp_path / "kept.gguf").write_bytes(b"old")
    with pytest.raises(FileExistsError, match="overwrite=True"):
        ql.save_gguf_adapter(plain, tmp_path / "kept.gguf")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["kept.gguf"]   # nothing half-written


def test_cli_exports_the_adapter_as_gguf(tok, tmp_path, capsys):
    config = CONFIGS["gemma3"]()
    config.vocab_size = len(tok)
    torch.manual_seed(0)
    base = transformers.AutoModelForCausalLM.from_config(config)
    base.save_pretrained(tmp_path / "base")
    tok.save_pretrained(tmp_path / "base")
    model = ql.load_model(tmp_path / "base", quant=ql.QuantConfig(bits=4, compute_dtype=torch.float32),
                          lora=ql.LoraConfig(r=4, alpha=8), device="cpu", progress=False)
    random_lora_b(model)
    ql.save_adapter(model, tmp_path / "adapter")
    args = ["export", "--model", str(tmp_path / "base"), "--adapter", str(tmp_path / "adapter"), "--device", "cpu",
            "--format", "gguf-adapter"]
    assert main(args + ["--out", str(tmp_path / "a.gguf"), "--gguf-type", "f32"]) == 0
    written = _tensors(tmp_path / "a.gguf")
    layer = dict(ql.lora_layers(model))["model.layers.1.self_attn.q_proj"]
    assert np.array_equal(written["blk.1.attn_q.weight.lora_a"], layer.lora_A.weight.detach().numpy())
    assert np.array_equal(written["blk.1.attn_q.weight.lora_b"], layer.lora_B.weight.detach().numpy())
    capsys.readouterr()
    assert main(args + ["--out", str(tmp_path / "q.gguf"), "--gguf-type", "q8_0"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["qlowrank export: error: --gguf-type q8_0: a GGUF adapter is written as one of ('f32', 'f16')"]


@pytest.mark.parametrize("family", ("qwen3", "olmo2"))
def test_truncated_gguf_names_file_and_tensor(family, bundles, tmp_path, capsys):
    data = (bundles(family)["root"] / "merged.gguf").read_bytes()
    path = tmp_path / "cut.gguf"
    path.write_bytes(data[:len(data) * 2 // 3])
    message = r"cut.gguf: tensor 'blk\.\d+\.\w+\.weight' runs past the end of the file .* truncated"
    for reader in ("streamed", "transformers"):
        with pytest.raises(ValueError, match=message):
            ql.load_model(path, quant=ql.QuantConfig(bits=4), device="cpu", progress=False, gguf_reader=reader)
    with pytest.raises(ValueError, match=message):
        ql.load_tokenizer(path)
    rows = tmp_path / "data.jsonl"
    rows.write_text(json.dumps({"prompt": "a", "completion": "b"}) + "\n")
    assert main(["train", "--model", str(path), "--data", str(rows), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "cut.gguf: tensor" in err[0] and "truncated" in err[0]


def _lfm2_gguf(path) -> torch.nn.Module:
    """A tiny LFM2 written as llama.cpp lays it out: an architecture of transformers' newer GGUF path."""
    config = transformers.Lfm2Config(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                     num_attention_heads=4, num_key_value_heads=2, layer_types=["conv", "full_attention"],
                                     max_position_embeddings=128, block_auto_adjust_ff_dim=False)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    writer = gguf.GGUFWriter(str(path), "lfm2")
    writer.add_context_length(128)
    writer.add_embedding_length(64)
    writer.add_feed_forward_length(128)
    writer.add_block_count(2)
    writer.add_head_count(4)
    writer.add_head_count_kv([0, 2])   # one count per layer; 0 marks a convolution layer
    writer.add_layer_norm_rms_eps(config.norm_eps)
    writer.add_rope_freq_base(config.rope_parameters["rope_theta"])
    writer.add_uint32("lfm2.shortconv.l_cache", config.conv_L_cache)
    writer.add_token_list([f"t{i}" for i in range(96)])
    name_map = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LFM2, 2)
    for key, value in model.state_dict().items():
        if key == "lm_head.weight":
            continue   # tied
        value = value.squeeze(1) if key.endswith("conv.conv.weight") else value   # llama.cpp stores it 2-D
        writer.add_tensor(name_map.get_name(key, try_suffixes=(".weight",)), value.numpy().copy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return model


def test_architecture_of_transformers_newer_gguf_path_falls_back_and_says_so(tmp_path, caplog):
    source = _lfm2_gguf(tmp_path / "lfm2.gguf")
    with caplog.at_level("WARNING", logger="qlowrank"):
        model = ql.load_model(tmp_path / "lfm2.gguf", quant=ql.QuantConfig(bits=None), dtype=torch.float32,
                              device="cpu", progress=False)
    assert "'lfm2' GGUF files through its newer conversion path" in caplog.text
    assert "reading it with transformers' GGUF reader instead" in caplog.text
    ids = _ids(96)
    assert rel_error(_logits(model, ids), _logits(source, ids)) <= F32_TOLERANCE
