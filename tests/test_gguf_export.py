"""GGUF export: transformers' own GGUF reader loads the file and its logits match the safetensors export."""

from __future__ import annotations

import gguf
import pytest
import torch
import transformers
from conftest import rel_error, tiny_config, tiny_tokenizer

import qlowrank as ql
from qlowrank.cli.main import main
from qlowrank.export.probe import compare_logits, model_logits, probe_ids

# Unit roundoff of each GGUF type, relative to a weight: fp16 keeps 11 significant bits, bf16 8.
# Q8_0 rounds each block of 32 weights to steps of absmax/127, an error of up to absmax/254;
# the expected absmax of 32 Gaussian weights is ~2.1 standard deviations, hence 2.1/254 of a
# typical weight. f32 is the export's own precision.
UNIT_ROUNDOFF = {"f32": 2.0**-24, "f16": 2.0**-11, "bf16": 2.0**-8, "q8_0": 2.1 / 254}
# Independent per-weight rounding errors add in quadrature, so each layer's output moves by about
# the RMS per-weight error (u/sqrt(3) for round-to-nearest), and the residual stream carries a few
# layers' worth to the logits: measured logits error / u is 0.78 (f16), 0.72 (bf16) and 1.04 (q8_0)
# on these tiny models. 4u bounds that with room for other seeds and shapes.
LOGITS_TOLERANCE = {name: 4 * u for name, u in UNIT_ROUNDOFF.items()}
# Same weights (a safetensors export in the GGUF's dtype), same float32 program on both sides:
# only a different summation order could differ (measured: exactly 0).
SAME_WEIGHTS_TOLERANCE = 1e-6
# The export's own probe compares with the trained model, which adds B(A x) to the base output
# instead of multiplying by the merged weight: float32 reassociation (README: < 1e-5).
MERGE_REASSOCIATION = 1e-5
# The export's probe reads the written file back with the gguf package, one module at a time;
# transformers' GGUF reader dequantizes with the same package into the same float32 model, so
# the figures are the same numbers (measured: identical for every type below).
STREAMED_PROBE_TOLERANCE = 0.0
ARCHS = ("llama", "qwen2", "mistral")


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


def _trained(arch: str, tok) -> torch.nn.Module:
    """A tiny 4-bit model with LoRA whose B factors are non-zero (as after training)."""
    config = tiny_config(arch)
    config.vocab_size = len(tok)
    if arch == "mistral":
        config.sliding_window = None   # the GGUF "llama" layout has no sliding window
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config)
    ql.quantize_model(model, ql.QuantConfig(bits=4, compute_dtype=torch.float32))
    ql.add_lora(model, ql.LoraConfig(r=4, alpha=8))
    with torch.no_grad():
        for _, layer in ql.lora_layers(model):
            layer.lora_B.weight.normal_(0, 0.05)
    return model.eval()


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits.float()


def _read_gguf(path):
    return transformers.AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                             dtype=torch.float32).eval()


@pytest.mark.parametrize("arch", ARCHS)
def test_gguf_logits_match_the_safetensors_export(arch, tok, tmp_path):
    model = _trained(arch, tok)
    ids = torch.randint(0, len(tok), (2, 24), generator=torch.Generator().manual_seed(3))
    ql.export_merged(model, tmp_path / "fp32", dtype=torch.float32, tokenizer=tok, probe=False, progress=False)
    reference = _logits(transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "fp32").eval(), ids)
    for gguf_type in ("f32", "f16", "bf16", "q8_0"):
        path = tmp_path / f"{arch}-{gguf_type}.gguf"
        report = ql.export_merged(model, path, format="gguf", gguf_type=gguf_type, tokenizer=tok)
        logits = _logits(_read_gguf(path), ids)
        error = rel_error(logits, reference)
        assert error <= LOGITS_TOLERANCE[gguf_type], (gguf_type, error)
        assert report["relative_logits_error"] <= LOGITS_TOLERANCE[gguf_type] + MERGE_REASSOCIATION
        # The streamed probe gives the figures of the whole file loaded by transformers' reader.
        whole = compare_logits(model_logits(_read_gguf(path), probe_ids(model)), model_logits(model, probe_ids(model)))
        for name, value in whole.items():
            assert abs(report[name] - value) <= STREAMED_PROBE_TOLERANCE, (gguf_type, name, report[name], value)
        if gguf_type in ("f16", "bf16"):
            # The safetensors export in the same dtype holds the very same weights.
            dtype = torch.float16 if gguf_type == "f16" else torch.bfloat16
            ql.export_merged(model, tmp_path / gguf_type, dtype=dtype, tokenizer=tok, probe=False, progress=False)
            same = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / gguf_type, dtype=torch.float32).eval()
            assert rel_error(logits, _logits(same, ids)) <= SAME_WEIGHTS_TOLERANCE
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []   # no partial files left


def test_gguf_carries_tokenizer_and_chat_template(tok, tmp_path):
    model = _trained("llama", tok)
    path = tmp_path / "model.gguf"
    ql.export_merged(model, path, format="gguf", gguf_type="q8_0", tokenizer=tok, probe=False)
    reader = gguf.GGUFReader(str(path))
    field = reader.fields["tokenizer.chat_template"]
    assert bytes(field.parts[field.data[0]]).decode() == tok.chat_template
    read = transformers.AutoTokenizer.from_pretrained(str(tmp_path), gguf_file=path.name)
    text = "Assignment statements bind names to objects: x = 1"
    assert read(text, add_special_tokens=False)["input_ids"] == tok(text, add_special_tokens=False)["input_ids"]
    chat = [{"role": "user", "content": "What does pass do?"}]
    assert read.apply_chat_template(chat, tokenize=False, add_generation_prompt=True) == \
        tok.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
    assert read.eos_token == tok.eos_token
    types = {gguf.GGMLQuantizationType(t.tensor_type).name for t in reader.tensors}
    assert types == {"Q8_0", "F32"}   # matrices in q8_0, norms in f32


def test_unsupported_models_are_refused_clearly(tok, tmp_path):
    gpt2 = transformers.AutoModelForCausalLM.from_config(tiny_config("gpt2"))
    with pytest.raises(ValueError, match="GPT2LMHeadModel is not supported"):
        ql.export_merged(gpt2, tmp_path / "g.gguf", format="gguf", tokenizer=tok)
    config = tiny_config("llama")
    config.rope_parameters = {"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0}
    scaled = transformers.AutoModelForCausalLM.from_config(config)
    with pytest.raises(ValueError, match="RoPE scaling 'linear'"):
        ql.export_merged(scaled, tmp_path / "s.gguf", format="gguf", tokenizer=tok)
    model = _trained("llama", tok)
    with pytest.raises(ValueError, match="with a .gguf suffix"):
        ql.export_merged(model, tmp_path / "folder", format="gguf", tokenizer=tok)
    # A SentencePiece-style tokenizer (byte fallback, Llama 2 / Mistral v0.1) is refused, nothing left behind.
    from tokenizers import Tokenizer, models
    sentencepiece_like = transformers.PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(models.BPE(vocab={"a": 0, "<unk>": 1}, merges=[], byte_fallback=True,
                                              unk_token="<unk>")))
    with pytest.raises(ValueError, match="byte-level BPE tokenizers"):
        ql.export_merged(model, tmp_path / "sp.gguf", format="gguf", tokenizer=sentencepiece_like)
    assert list(tmp_path.iterdir()) == []
    (tmp_path / "kept.gguf").write_bytes(b"old")
    with pytest.raises(FileExistsError, match="overwrite=True"):
        ql.export_merged(model, tmp_path / "kept.gguf", format="gguf", tokenizer=tok)
    assert (tmp_path / "kept.gguf").read_bytes() == b"old"


def test_cli_export_gguf_from_base_and_adapter(tok, tmp_path):
    model = _trained("qwen2", tok)
    ql.save_adapter(model, tmp_path / "adapter")
    torch.manual_seed(0)   # the same base weights _trained built, saved as a float checkpoint
    base = transformers.AutoModelForCausalLM.from_config(model.config)
    base.save_pretrained(tmp_path / "base")
    tok.save_pretrained(tmp_path / "base")
    code = main(["export", "--model", str(tmp_path / "base"), "--adapter", str(tmp_path / "adapter"),
                 "--out", str(tmp_path / "model.gguf"), "--format", "gguf", "--gguf-type", "f16", "--device", "cpu",
                 "--compute-dtype", "fp32"])
    assert code == 0
    ids = torch.randint(0, len(tok), (1, 16), generator=torch.Generator().manual_seed(5))
    error = rel_error(_logits(_read_gguf(tmp_path / "model.gguf"), ids), _logits(model, ids))
    assert error <= LOGITS_TOLERANCE["f16"], error
