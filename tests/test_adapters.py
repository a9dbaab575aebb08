"""save_adapter / load_adapter: PEFT's file format, proven both ways with the real `peft`."""

from __future__ import annotations

import json

import peft
import pytest
import torch
from conftest import FP32_REL_TOL, INT8_REL_TOL, logits, perturb_b, rel_error, tiny_model, token_batch
from safetensors import safe_open
from safetensors.torch import save_file

import qlowrank as ql


@pytest.mark.parametrize("arch,bits", [("llama", 4), ("gpt2", 4), ("mistral", 4), ("llama", None), ("gpt2", 8)])
def test_qlowrank_adapter_loads_in_peft_with_same_logits(checkpoints, tmp_path, arch, bits):
    quant = ql.QuantConfig(bits=bits, compute_dtype=torch.float32)
    ours = ql.load_model(checkpoints[arch], quant=quant, lora=ql.LoraConfig(r=4, alpha=12), progress=False)
    perturb_b(ours)
    ql.save_adapter(ours, tmp_path / "adapter")
    # PEFT wraps the very same (quantized) base layers, loaded afresh.
    base = ql.load_model(checkpoints[arch], quant=quant, progress=False)
    ids = token_batch()
    base_logits = logits(base, ids)
    theirs = peft.PeftModel.from_pretrained(base, str(tmp_path / "adapter"))
    tol = INT8_REL_TOL if bits == 8 else FP32_REL_TOL
    assert rel_error(logits(ours, ids), logits(theirs, ids)) < tol
    assert rel_error(base_logits, logits(theirs, ids)) > 100 * FP32_REL_TOL  # PEFT really applied it


def test_adapter_files_have_peft_names_and_config(checkpoints, tmp_path):
    quant = ql.QuantConfig(bits=4, compute_dtype=torch.float32)
    lora = ql.LoraConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj"], use_rslora=True)
    model = ql.load_model(checkpoints["llama"], quant=quant, lora=lora, progress=False)
    ql.save_adapter(model, tmp_path / "adapter")
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert (config["peft_type"], config["r"], config["lora_alpha"], config["use_rslora"]) == ("LORA", 4, 8, True)
    assert config["target_modules"] == ["q_proj", "v_proj"]
    assert config["base_model_name_or_path"] == str(checkpoints["llama"])
    with safe_open(str(tmp_path / "adapter" / "adapter_model.safetensors"), framework="pt") as handle:
        keys = sorted(handle.keys())
        assert handle.get_tensor(keys[0]).dtype == torch.float32
    assert keys[0] == "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
    assert len(keys) == 2 * 2 * 2  # 2 layers x (q, v) x (A, B)
    sidecar = json.loads((tmp_path / "adapter" / "qlowrank_adapter.json").read_text())
    assert sidecar["base_quant"]["bits"] == 4 and sidecar["base_quant"]["quant_type"] == "nf4"
    peft_config = peft.PeftConfig.from_pretrained(str(tmp_path / "adapter"))  # PEFT parses it
    assert peft_config.r == 4 and set(peft_config.target_modules) == {"q_proj", "v_proj"}


@pytest.mark.parametrize("arch,targets", [("llama", ["q_proj", "down_proj"]), ("gpt2", ["c_attn", "c_fc"]),
                                          ("mistral", ["k_proj", "o_proj"])])
def test_peft_adapter_loads_into_qlowrank_with_same_logits(checkpoints, tmp_path, arch, targets):
    reference = tiny_model(arch)
    config = peft.LoraConfig(r=4, lora_alpha=12, target_modules=targets, fan_in_fan_out=arch == "gpt2",
                             use_rslora=arch == "mistral")
    theirs = peft.get_peft_model(reference, config)
    generator = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, param in theirs.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.05)
    theirs.save_pretrained(str(tmp_path / "peft_adapter"))
    ours = ql.load_model(checkpoints[arch], quant=ql.QuantConfig(bits=None), dtype="fp32", progress=False)
    ids = token_batch()
    base_logits = logits(ours, ids)
    ql.load_adapter(ours, tmp_path / "peft_adapter")
    assert rel_error(logits(ours, ids), logits(theirs, ids)) < FP32_REL_TOL
    assert rel_error(base_logits, logits(theirs, ids)) > 100 * FP32_REL_TOL
    assert sorted({n.rsplit(".", 1)[-1] for n, _ in ql.lora_layers(ours)}) == sorted(targets)


def test_round_trip_into_a_model_with_lora_layers(checkpoints, tmp_path):
    quant = ql.QuantConfig(bits=4, compute_dtype=torch.float32)
    trained = ql.load_model(checkpoints["mistral"], quant=quant, lora=ql.LoraConfig(r=4, alpha=8), progress=False)
    perturb_b(trained)
    ql.save_adapter(trained, tmp_path / "adapter")
    fresh = ql.load_model(checkpoints["mistral"], quant=quant, lora=ql.LoraConfig(r=4, alpha=16), progress=False)
    ql.load_adapter(fresh, tmp_path / "adapter")
    ids = token_batch()
    assert torch.equal(logits(fresh, ids), logits(trained, ids))  # alpha 8 from the file, not 16
    ql.save_adapter(fresh, tmp_path / "adapter")  # overwriting an adapter directory is allowed
    with pytest.raises(FileExistsError, match="overwrite=True"):
        ql.save_adapter(fresh, tmp_path / "adapter", overwrite=False)
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "todo.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="not an adapter directory"):
        ql.save_adapter(fresh, tmp_path / "notes")
    assert (tmp_path / "notes" / "todo.txt").read_text() == "keep me"


def test_load_adapter_errors_list_what_is_wrong(checkpoints, tmp_path):
    quant = ql.QuantConfig(bits=4, compute_dtype=torch.float32)
    llama = ql.load_model(checkpoints["llama"], quant=quant, lora=ql.LoraConfig(r=4, alpha=8), progress=False)
    ql.save_adapter(llama, tmp_path / "llama_adapter")

    gpt2 = ql.load_model(checkpoints["gpt2"], quant=quant, progress=False)
    with pytest.raises(ValueError, match="trained on a 'llama' model but this model is 'gpt2'"):
        ql.load_adapter(gpt2, tmp_path / "llama_adapter")

    rank8 = ql.load_model(checkpoints["llama"], quant=quant, lora=ql.LoraConfig(r=8), progress=False)
    with pytest.raises(ValueError, match=r"shape mismatches .*q_proj.lora_A: file \(4, 64\) vs model \(8, 64\)"):
        ql.load_adapter(rank8, tmp_path / "llama_adapter")

    only_q = ql.load_model(checkpoints["llama"], quant=quant, lora=ql.LoraConfig(r=4, target_modules=["q_proj"]),
                           progress=False)
    with pytest.raises(ValueError, match=r"unexpected \(in the file, not the model\): \['model.layers.0.mlp.down_proj'"):
        ql.load_adapter(only_q, tmp_path / "llama_adapter")

    weights = tmp_path / "llama_adapter" / "adapter_model.safetensors"
    with safe_open(str(weights), framework="pt") as handle:
        tensors = {k: handle.get_tensor(k) for k in handle.keys()}
    tensors["base_model.model.model.layers.9.self_attn.q_proj.lora_A.weight"] = torch.zeros(4, 64)
    tensors["base_model.model.model.layers.9.self_attn.q_proj.lora_B.weight"] = torch.zeros(64, 4)
    save_file(tensors, str(weights))
    with pytest.raises(ValueError, match=r"does not have \(wrong base model\?\): \['model.layers.9.self_attn.q_proj'\]"):
        ql.load_adapter(ql.load_model(checkpoints["llama"], quant=quant, progress=False), tmp_path / "llama_adapter")

    config_path = tmp_path / "llama_adapter" / "adapter_config.json"
    config = json.loads(config_path.read_text())
    config_path.write_text(json.dumps({**config, "bias": "all"}))
    with pytest.raises(ValueError, match=r"PEFT features qlowrank does not load: \['bias'\]"):
        ql.load_adapter(llama, tmp_path / "llama_adapter")
    config_path.write_text(json.dumps({**config, "use_dora": True}))   # DoRA without its magnitude vectors
    with pytest.raises(ValueError, match=r"these layers lack one of \['lora_A', 'lora_B', 'lora_magnitude_vector'\]"):
        ql.load_adapter(llama, tmp_path / "llama_adapter")
    config_path.write_text(json.dumps({**config, "peft_type": "IA3"}))
    with pytest.raises(ValueError, match="peft_type='IA3'"):
        ql.load_adapter(llama, tmp_path / "llama_adapter")
    with pytest.raises(FileNotFoundError, match="adapter_config.json not found"):
        ql.load_adapter(llama, tmp_path / "nowhere")
