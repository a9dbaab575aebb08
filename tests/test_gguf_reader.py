"""The streamed GGUF reader: the weights and logits of transformers' reader, bit for bit, at a fraction of its memory."""

from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch
import transformers
from conftest import tiny_config, tiny_tokenizer

import qlowrank as ql

ARCHS = ("llama", "mistral", "qwen2")
EXPORT_TYPES = ("f32", "f16", "bf16", "q8_0")
# Worst-case rounding of one weight by each export type, relative to the largest weight of its
# row: half a unit in the last place for f16 (11 significant bits) and bf16 (8); q8_0 rounds a
# block of 32 to steps of absmax/127 (half a step: 1/254) and stores the scale in f16 (2^-11 more).
ROUNDING = {"f32": 0.0, "f16": 2.0**-11, "bf16": 2.0**-8, "q8_0": 1 / 254 + 2.0**-11}
FLOAT32 = ql.QuantConfig(bits=None)
GQ = gguf.GGMLQuantizationType
# Block types written with the gguf package's own quantizers, and the K-quants it has no
# quantizer for (gguf 0.19: NotImplementedError), whose blocks are built from random codes
# (every type gguf can dequantize is read; these are the ones tested equal to transformers').
QUANTIZED_TYPES = ("Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1")
K_TYPES = ("Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K")


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


def _model(arch: str, tok, **widths) -> torch.nn.Module:
    config = tiny_config(arch)
    config.vocab_size = len(tok)
    for key, value in widths.items():
        setattr(config, key, value)
    if arch == "mistral":
        config.sliding_window = None   # the GGUF "llama" layout has no sliding window
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(config).eval()


def _export(model, tok, path, gguf_type):
    ql.export_merged(model, path, format="gguf", gguf_type=gguf_type, tokenizer=tok, probe=False, progress=False)
    return path


def _load(path, reader="streamed", quant=FLOAT32, **kw):
    return ql.load_model(path, quant=quant, dtype=torch.float32, device="cpu", progress=False,
                         gguf_reader=reader, **kw)


def _assert_same_model(streamed, reference, vocab):
    """Every state-dict tensor equal bit for bit, and the same logits (exactly, at fp32)."""
    ours, theirs = streamed.state_dict(), reference.state_dict()
    assert ours.keys() == theirs.keys()
    unequal = [k for k in ours if ours[k].dtype != theirs[k].dtype or not torch.equal(ours[k], theirs[k])]
    assert not unequal, f"tensors differ from transformers' reader: {unequal}"
    assert type(streamed) is type(reference)
    ids = torch.randint(0, vocab, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(streamed(ids).logits, reference(ids).logits)


@pytest.mark.parametrize("gguf_type", EXPORT_TYPES)
@pytest.mark.parametrize("arch", ARCHS)
def test_exported_gguf_reads_back_as_the_exported_model_and_as_transformers_reads_it(arch, gguf_type, tok, tmp_path):
    model = _model(arch, tok)
    path = _export(model, tok, tmp_path / f"{arch}.gguf", gguf_type)
    streamed = _load(path)
    _assert_same_model(streamed, _load(path, reader="transformers"), len(tok))
    exported = model.state_dict()
    for key, value in streamed.state_dict().items():
        source = exported[key]
        bound = ROUNDING[gguf_type] * source.abs().amax(dim=-1, keepdim=True)
        assert torch.all((value - source).abs() <= bound), f"{key}: off by more than {gguf_type}'s rounding"


def _retyped(src, dst, encode, architecture=None):
    """A copy of the GGUF file `src` with every 2-D tensor re-encoded by `encode(float32 array)` -> (raw, type)."""
    reader = gguf.GGUFReader(str(src))
    arch = architecture or reader.fields["general.architecture"].contents()
    writer = gguf.GGUFWriter(str(dst), arch)
    for field in reader.fields.values():
        if field.name == "general.architecture" or field.name.startswith("GGUF."):
            continue
        kind = field.types[0]
        writer.add_key_value(field.name, field.contents(), kind,
                             sub_type=field.types[-1] if kind == gguf.GGUFValueType.ARRAY else None)
    for tensor in reader.tensors:
        array = np.array(tensor.data)   # f32 source: the values, in numpy order
        raw, kind = encode(array) if array.ndim == 2 else (array, GQ.F32)
        writer.add_tensor(tensor.name, raw, raw_dtype=kind)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return dst


def _random_k_blocks(array: np.ndarray, kind, seed: int = 0) -> np.ndarray:
    """Valid K-quant blocks of `array`'s shape: random codes and sub-block scales, small finite f16 scales."""
    rng = np.random.default_rng(seed)
    blocks = rng.integers(0, 256, gguf.quants.quant_shape_to_byte_shape(array.shape, kind), dtype=np.uint8)
    per_row = blocks.reshape(-1, gguf.GGML_QUANT_SIZES[kind][1])   # one block per row
    scales = rng.uniform(1e-4, 1e-3, (per_row.shape[0], 2)).astype(np.float16).view(np.uint8)
    if kind in (GQ.Q6_K, GQ.Q3_K):   # codes and sub-block scales, then d
        per_row[:, -2:] = scales[:, :2]
    elif kind == GQ.Q2_K:            # sub-block scales and codes, then d, dmin
        per_row[:, -4:] = scales
    else:                            # d, dmin first
        per_row[:, :4] = scales
    return blocks


def _encoder(name: str):
    kind = GQ[name]
    if name in K_TYPES:
        return lambda array: (_random_k_blocks(array, kind), kind)
    return lambda array: (gguf.quants.quantize(array, kind), kind)


@pytest.mark.parametrize("type_name", QUANTIZED_TYPES + K_TYPES)
@pytest.mark.parametrize("arch", ("llama", "qwen2"))
def test_every_block_type_reads_as_transformers_reads_it(arch, type_name, tok, tmp_path):
    # K-quant blocks hold 256 values, so every row (hidden, intermediate) is a multiple of 256.
    model = _model(arch, tok, hidden_size=256, intermediate_size=512, head_dim=64)
    source = _export(model, tok, tmp_path / "f32.gguf", "f32")
    path = _retyped(source, tmp_path / f"{type_name}.gguf", _encoder(type_name))
    kinds = {t.tensor_type.name for t in gguf.GGUFReader(str(path)).tensors}
    assert kinds == {"F32", type_name}
    _assert_same_model(_load(path), _load(path, reader="transformers"), len(tok))


@pytest.mark.parametrize("bits", (4, 8))
def test_quantized_load_equals_todays_path(bits, tok, tmp_path):
    """Same float32 weights in, same packed bytes and quantization state out as transformers' reader + quantize_model."""
    path = _export(_model("llama", tok), tok, tmp_path / "m.gguf", "q8_0")
    quant = ql.QuantConfig(bits=bits)
    streamed, reference = _load(path, quant=quant), _load(path, reader="transformers", quant=quant)
    ours, theirs = streamed.state_dict(), reference.state_dict()
    assert ours.keys() == theirs.keys()
    assert any(k.endswith(("absmax", "SCB")) for k in ours)   # really quantized
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)


def test_lora_on_a_streamed_gguf_trains(tok, tmp_path):
    path = _export(_model("qwen2", tok), tok, tmp_path / "m.gguf", "f16")
    model = _load(path, quant=ql.QuantConfig(bits=4, compute_dtype=torch.float32), lora=ql.LoraConfig(r=4), seed=0)
    ids = torch.randint(0, len(tok), (2, 16), generator=torch.Generator().manual_seed(0))
    model.train()
    model(ids, labels=ids).loss.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert grads and all(g is not None for g in grads)
    assert any(g.abs().sum() > 0 for g in grads)


def test_architecture_no_reader_knows_is_refused_clearly(tok, tmp_path):
    # EXAONE GGUF files are llama.cpp's, but transformers 5.25 has no config mapping for them (nor qlowrank).
    source = _export(_model("llama", tok), tok, tmp_path / "m.gguf", "f32")
    path = _retyped(source, tmp_path / "exaone.gguf", lambda a: (a, GQ.F32), architecture="exaone")
    with pytest.raises(ValueError, match=r"exaone.gguf: GGUF architecture 'exaone' has no transformers config mapping"):
        _load(path)
    # An OLMo 2 file (read from its header's olmo2.* keys) that has none of them: refused, not built from defaults.
    path = _retyped(source, tmp_path / "olmo2.gguf", lambda a: (a, GQ.F32), architecture="olmo2")
    with pytest.raises(ValueError, match=r"olmo2.gguf: GGUF key 'olmo2.embedding_length' is missing"):
        _load(path)


def test_tensor_type_nothing_dequantizes_is_named(tok, tmp_path):
    # gguf 0.19 knows Q8_1's block size but has no dequantizer for it (nor has transformers' reader).
    source = _export(_model("llama", tok), tok, tmp_path / "m.gguf", "f32")
    path = _retyped(source, tmp_path / "q8_1.gguf", lambda a: (_random_k_blocks(a, GQ.Q8_1), GQ.Q8_1))
    with pytest.raises(ValueError, match=r"q8_1.gguf: tensor 'token_embd.weight' is stored as Q8_1"):
        _load(path)


def test_unknown_reader_is_refused(tok, tmp_path):
    path = _export(_model("llama", tok), tok, tmp_path / "m.gguf", "f32")
    with pytest.raises(ValueError, match="gguf_reader='fast'"):
        _load(path, reader="fast")


@pytest.mark.slow
def test_smollm2_streams_equal_to_transformers_reader():
    """The embedded SmolLM2 (Q4_1 linears, a Q8_0 embedding, F32 norms): same weights and fp32 logits."""
    from qlowrank.model.embedded import smollm2_gguf

    path = smollm2_gguf()
    streamed = _load(path)
    _assert_same_model(streamed, _load(path, reader="transformers"), streamed.config.vocab_size)
