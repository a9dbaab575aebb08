"""load_model: streamed quantize-while-loading from local safetensors checkpoints, and its errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import tiny_model, token_batch
from safetensors import safe_open
from safetensors.torch import save_file

import qlowrank as ql
from qlowrank.nn import quant as quantlib
from qlowrank.nn.lora import LoraLinear
from qlowrank.state import state_of

FP32 = dict(compute_dtype=torch.float32)


def save_checkpoint(model: torch.nn.Module, folder: Path, shard: str | None = "40KB") -> Path:
    """A checkpoint as transformers writes it: sharded with an index, or one model.safetensors."""
    if shard:
        model.save_pretrained(folder, max_shard_size=shard)
    else:
        model.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("ckpt")
    return {arch: save_checkpoint(tiny_model(arch), root / arch) for arch in ("llama", "gpt2", "mistral")}


@pytest.mark.parametrize("arch", ["llama", "gpt2", "mistral"])
@pytest.mark.parametrize("bits", [4, 8])
def test_streamed_load_equals_quantizing_the_float_model(checkpoints, arch, bits):
    # Same float32 weights quantized by the same bitsandbytes calls: bitwise-equal logits.
    assert len(list(checkpoints[arch].glob("*.safetensors"))) > 1  # really sharded
    quant = ql.QuantConfig(bits=bits, **FP32)
    loaded = ql.load_model(checkpoints[arch], quant=quant, device="cpu", progress=False)
    reference = ql.quantize_model(tiny_model(arch), quant)
    ids = token_batch()
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, reference(ids).logits)
    quantized = [m for m in loaded.modules() if quantlib.is_quantized_linear(m)]
    assert len(quantized) == len([m for m in reference.modules() if quantlib.is_quantized_linear(m)]) > 0
    assert not quantlib.is_quantized_linear(loaded.get_output_embeddings())  # head stays float
    assert not loaded.training


def test_gpt2_conv1d_layout_and_tied_head(checkpoints):
    loaded = ql.load_model(checkpoints["gpt2"], quant=ql.QuantConfig(bits=4, **FP32), device="cpu", progress=False)
    c_attn = loaded.transformer.h[0].attn.c_attn
    assert quantlib.is_quantized_linear(c_attn) and c_attn.fan_in_fan_out
    assert quantlib.dequantize_weight(c_attn).shape == (192, 64)  # (out, in) although Conv1D stores (in, out)
    assert loaded.lm_head.weight is loaded.transformer.wte.weight  # tie restored, not a missing key


def test_float_load_single_file_with_lora_ready_to_train(tmp_path):
    model = tiny_model("llama")
    folder = save_checkpoint(model, tmp_path / "single", shard=None)
    assert (folder / "model.safetensors").is_file() and not (folder / "model.safetensors.index.json").exists()
    lora = ql.LoraConfig(r=4, alpha=8)
    loaded = ql.load_model(folder, quant=ql.QuantConfig(bits=None), lora=lora, dtype="fp32", progress=False)
    ids = token_batch()
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)  # B = 0: exactly the float model
    assert loaded.device.type == ("cuda" if torch.cuda.is_available() else "cpu")  # device=None default
    counts = ql.count_parameters(loaded)
    assert counts.trainable == sum(p.numel() for p in ql.lora_parameters(loaded)) > 0
    assert all(isinstance(loaded.get_submodule(n), LoraLinear) for n, _ in ql.lora_layers(loaded))
    assert state_of(loaded).source["format"] == "safetensors"


def test_dtype_of_float_weights_defaults_to_compute_dtype(checkpoints):
    loaded = ql.load_model(checkpoints["llama"], quant=ql.QuantConfig(bits=4), device="cpu", progress=False)
    assert loaded.model.embed_tokens.weight.dtype == torch.bfloat16  # QuantConfig's default compute dtype
    assert loaded.model.norm.weight.dtype == torch.bfloat16


def _rewrite_shard(folder: Path, edit) -> None:
    """Apply edit(dict of tensors) to the shard holding the first q_proj weight."""
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    key = next(k for k in index["weight_map"] if k.endswith("q_proj.weight"))
    path = folder / index["weight_map"][key]
    with safe_open(str(path), framework="pt") as handle:
        tensors = {k: handle.get_tensor(k) for k in handle.keys()}
    edit(tensors, key)
    save_file(tensors, str(path), metadata={"format": "pt"})


def test_errors_name_the_file_or_tensor(tmp_path):
    model = tiny_model("llama")
    load = lambda folder: ql.load_model(folder, quant=ql.QuantConfig(bits=4, **FP32), device="cpu", progress=False)

    with pytest.raises(FileNotFoundError, match="does not exist"):
        load(tmp_path / "nowhere")
    # A hub id: offline (this machine) or online, a repository that does not exist is one clear error.
    with pytest.raises(FileNotFoundError, match="could not be fetched from the Hugging Face hub"):
        load("no-such-org-qlr/no-such-model")

    pickle_dir = tmp_path / "pickle"
    pickle_dir.mkdir()
    model.config.save_pretrained(pickle_dir)
    (pickle_dir / "pytorch_model.bin").write_bytes(b"not read: refused by name")
    with pytest.raises(ValueError, match="pytorch_model.bin is a pickle checkpoint; qlowrank never unpickles"):
        load(pickle_dir)

    missing_shard = save_checkpoint(model, tmp_path / "missing_shard")
    victim = sorted(missing_shard.glob("model-*.safetensors"))[1]
    victim.unlink()
    with pytest.raises(FileNotFoundError, match=victim.name):
        load(missing_shard)

    corrupt = save_checkpoint(model, tmp_path / "corrupt")
    victim = sorted(corrupt.glob("model-*.safetensors"))[0]
    victim.write_bytes(victim.read_bytes()[:100])  # truncated mid-header
    with pytest.raises(ValueError, match=f"{victim.name} is not a readable safetensors file"):
        load(corrupt)

    unknown = save_checkpoint(model, tmp_path / "unknown")
    config = json.loads((unknown / "config.json").read_text())
    config["model_type"] = "no_such_architecture"
    (unknown / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="config.json: transformers cannot read"):
        load(unknown)

    mismatch = save_checkpoint(model, tmp_path / "mismatch")
    _rewrite_shard(mismatch, lambda t, key: t.__setitem__(key, torch.zeros(3, 5)))
    with pytest.raises(ValueError, match=r"q_proj.weight' has shape \(3, 5\) but .* expects \(64, 64\)"):
        load(mismatch)

    dropped = save_checkpoint(model, tmp_path / "dropped")
    _rewrite_shard(dropped, lambda t, key: (t.pop(key), t.__setitem__("model.extra.weight", torch.zeros(2))))
    with pytest.raises(ValueError, match=r"missing tensors: \['model.layers.0.self_attn.q_proj.weight'\]; "
                                         r"unexpected tensors: \['model.extra.weight'\]"):
        load(dropped)


def test_prequantized_checkpoint_is_refused(checkpoints, tmp_path):
    folder = tmp_path / "prequant"
    folder.mkdir()
    for path in checkpoints["llama"].iterdir():
        (folder / path.name).write_bytes(path.read_bytes())
    config = json.loads((folder / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "bitsandbytes", "load_in_4bit": True}
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="already quantized"):
        ql.load_model(folder, progress=False, device="cpu")


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU")
def test_load_to_cuda_matches_cpu_quantization(checkpoints):
    quant = ql.QuantConfig(bits=4, **FP32)
    gpu = ql.load_model(checkpoints["llama"], quant=quant, device="cuda", progress=False)
    layer = gpu.model.layers[0].self_attn.q_proj
    assert layer.weight.device.type == "cuda"
    cpu = ql.load_model(checkpoints["llama"], quant=quant, device="cpu", progress=False)
    # NF4 codes are deterministic: the dequantized weights agree across devices.
    torch.testing.assert_close(quantlib.dequantize_weight(layer).cpu(),
                               quantlib.dequantize_weight(cpu.model.layers[0].self_attn.q_proj))
