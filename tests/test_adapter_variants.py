"""DoRA, LoftQ / PiSSA, rank / alpha patterns and modules_to_save: behaviour, export, and PEFT interop both ways."""

from __future__ import annotations

import json

import peft
import pytest
import torch
import transformers
from conftest import FP32_REL_TOL, logits, perturb_b, rel_error, tiny_config, tiny_model, token_batch

import qlowrank as ql
from qlowrank.adapter import read_adapter_lora
from qlowrank.cli.main import main
from qlowrank.train.optim import build_optimizer


def perturb_all(model: torch.nn.Module, seed: int = 3) -> None:
    """Non-zero B and a magnitude away from the row norms, so every part of the adapter shows in the logits."""
    perturb_b(model, seed)
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for _, layer in ql.lora_layers(model):
            if layer.use_dora:
                m = layer.lora_magnitude_vector
                m.mul_(1 + 0.2 * torch.randn(m.shape, generator=generator))


def fp32(bits):
    return ql.QuantConfig(bits=bits, compute_dtype=torch.float32)


# ---- DoRA ----

@pytest.mark.parametrize("bits", [None, 4, 8])
def test_dora_starts_at_the_base_and_trains_its_magnitude(checkpoints, bits):
    base = ql.load_model(checkpoints["llama"], quant=fp32(bits), progress=False)
    model = ql.load_model(checkpoints["llama"], quant=fp32(bits), lora=ql.LoraConfig(r=4, use_dora=True),
                          progress=False)
    ids = token_batch()
    # m = ||W + s B A|| with B = 0: DoRA's output equals the base's (up to float32 rounding).
    assert rel_error(logits(model, ids), logits(base, ids)) < FP32_REL_TOL
    params = ql.lora_parameters(model)
    magnitudes = [p for n, p in model.named_parameters() if n.endswith("lora_magnitude_vector")]
    assert len(magnitudes) == 14 and all(any(p is m for p in params) for m in magnitudes)
    before = [m.detach().clone() for m in magnitudes]
    optimizer = build_optimizer(model, lr=1e-2)
    model.train()
    for _ in range(2):
        model(ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    assert all(not torch.equal(b, m) for b, m in zip(before, magnitudes))


@pytest.mark.parametrize("bits", [None, 4])
def test_dora_merge_and_export_reproduce_the_trained_model(checkpoints, tmp_path, bits):
    model = ql.load_model(checkpoints["llama"], quant=fp32(bits), lora=ql.LoraConfig(r=4, use_dora=True),
                          dtype="fp32", progress=False)
    perturb_all(model)
    report = ql.export_merged(model, tmp_path / "merged", dtype=torch.float32, progress=False)
    assert report["relative_logits_error"] < FP32_REL_TOL
    if bits is None:  # merge / unmerge on a float base
        ids = token_batch()
        trained = logits(model, ids)
        weights = {n: layer.base_layer.weight.detach().clone() for n, layer in ql.lora_layers(model)}
        for _, layer in ql.lora_layers(model):
            layer.merge()
        assert rel_error(logits(model, ids), trained) < FP32_REL_TOL
        for name, layer in ql.lora_layers(model):
            layer.unmerge()
            assert rel_error(layer.base_layer.weight, weights[name]) < FP32_REL_TOL


# (PEFT 0.21 itself fails to build DoRA on an 8-bit base, so 8-bit is checked within qlowrank only.)
@pytest.mark.parametrize("bits", [None, 4])
def test_dora_adapter_loads_in_peft_with_same_logits(checkpoints, tmp_path, bits):
    ours = ql.load_model(checkpoints["llama"], quant=fp32(bits), lora=ql.LoraConfig(r=4, alpha=12, use_dora=True),
                         progress=False)
    perturb_all(ours)
    ql.save_adapter(ours, tmp_path / "adapter")
    assert json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["use_dora"] is True
    base = ql.load_model(checkpoints["llama"], quant=fp32(bits), progress=False)
    ids = token_batch()
    base_logits = logits(base, ids)
    theirs = peft.PeftModel.from_pretrained(base, str(tmp_path / "adapter"))
    assert rel_error(logits(ours, ids), logits(theirs, ids)) < FP32_REL_TOL
    assert rel_error(base_logits, logits(theirs, ids)) > 100 * FP32_REL_TOL


def test_peft_dora_patterns_and_modules_to_save_load_into_qlowrank(checkpoints, tmp_path):
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], use_dora=True,
                             rank_pattern={"v_proj": 2, "layers.1.self_attn.q_proj": 6},
                             alpha_pattern={"down_proj": 3}, modules_to_save=["lm_head"])
    theirs = peft.get_peft_model(tiny_model("llama"), config)
    generator = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, param in theirs.named_parameters():
            if "lora_B" in name or "lora_magnitude" in name or "modules_to_save" in name:
                param.add_(torch.randn(param.shape, generator=generator) * 0.05)
    theirs.save_pretrained(str(tmp_path / "peft_adapter"))
    ours = ql.load_model(checkpoints["llama"], quant=fp32(None), dtype="fp32", progress=False)
    ids = token_batch()
    base_logits = logits(ours, ids)
    ql.load_adapter(ours, tmp_path / "peft_adapter")
    assert rel_error(logits(ours, ids), logits(theirs, ids)) < FP32_REL_TOL
    assert rel_error(base_logits, logits(theirs, ids)) > 100 * FP32_REL_TOL
    layers = dict(ql.lora_layers(ours))
    assert layers["model.layers.0.self_attn.v_proj"].r == 2 and layers["model.layers.1.self_attn.q_proj"].r == 6
    assert layers["model.layers.0.self_attn.q_proj"].r == 4 and layers["model.layers.0.mlp.down_proj"].alpha == 3
    assert ours.lm_head.weight.requires_grad and ours.lm_head.weight.dtype == torch.float32


# ---- rank / alpha patterns, modules_to_save ----

def test_patterns_and_trainable_head_round_trip_through_peft(checkpoints, tmp_path):
    lora = ql.LoraConfig(r=4, alpha=8, rank_pattern={"v_proj": 2, r"layers\.1\.mlp\.up_proj": 8},
                         alpha_pattern={"o_proj": 5}, modules_to_save=["lm_head"])
    ours = ql.load_model(checkpoints["llama"], quant=fp32(4), lora=lora, progress=False)
    layers = dict(ql.lora_layers(ours))
    assert layers["model.layers.1.self_attn.v_proj"].r == 2 and layers["model.layers.1.mlp.up_proj"].r == 8
    assert layers["model.layers.0.mlp.up_proj"].r == 4 and layers["model.layers.0.self_attn.o_proj"].scaling == 5 / 4
    head = ours.lm_head.weight
    assert head.requires_grad and any(p is head for p in ql.lora_parameters(ours))
    perturb_b(ours)
    with torch.no_grad():
        head.add_(0.05)
    ql.save_adapter(ours, tmp_path / "adapter")
    base = ql.load_model(checkpoints["llama"], quant=fp32(4), progress=False)
    ids = token_batch()
    theirs = peft.PeftModel.from_pretrained(base, str(tmp_path / "adapter"))
    assert rel_error(logits(ours, ids), logits(theirs, ids)) < FP32_REL_TOL
    # and back: a fresh qlowrank model from the same files
    again = ql.load_adapter(ql.load_model(checkpoints["llama"], quant=fp32(4), progress=False), tmp_path / "adapter")
    assert rel_error(logits(again, ids), logits(ours, ids)) < FP32_REL_TOL


def test_trainable_tied_head_is_untied_and_exported(tmp_path):
    config = tiny_config("qwen2")
    config.tie_word_embeddings = True
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    assert model.lm_head.weight is model.model.embed_tokens.weight
    ql.quantize_model(model, fp32(4))
    ql.add_lora(model, ql.LoraConfig(r=4, modules_to_save=["lm_head"]))
    embed = model.model.embed_tokens.weight
    assert model.lm_head.weight is not embed and not embed.requires_grad and not model.config.tie_word_embeddings
    ids = token_batch()
    model.train()
    model(ids, labels=ids).loss.backward()
    assert model.lm_head.weight.grad is not None and embed.grad is None
    with torch.no_grad():
        model.lm_head.weight.mul_(1.5)
    report = ql.export_merged(model, tmp_path / "merged", dtype=torch.float32, progress=False)
    assert report["relative_logits_error"] < FP32_REL_TOL


def test_modules_to_save_errors(checkpoints):
    model = ql.load_model(checkpoints["llama"], quant=fp32(4), progress=False)
    with pytest.raises(ValueError, match=r"modules_to_save \['nope'\] matched no module"):
        ql.add_lora(model, ql.LoraConfig(r=4, modules_to_save=["nope"]))
    with pytest.raises(ValueError, match="both LoRA targets and modules_to_save"):
        ql.add_lora(model, ql.LoraConfig(r=4, target_modules=["q_proj"], modules_to_save=["q_proj"]))


# ---- LoftQ / PiSSA ----

@pytest.mark.parametrize("bits", [4, 8])
def test_loftq_and_pissa_start_closer_to_the_float_model(checkpoints, bits):
    ids = token_batch()
    floating = logits(ql.load_model(checkpoints["llama"], quant=fp32(None), dtype="fp32", progress=False), ids)
    errors = {}
    for init, iters in (("kaiming", 1), ("loftq", 1), ("loftq", 5), ("pissa", 1)):
        model = ql.load_model(checkpoints["llama"], quant=fp32(bits), progress=False,
                              lora=ql.LoraConfig(r=8, alpha=16, init=init, loftq_iters=iters))
        errors[init, iters] = rel_error(logits(model, ids), floating)
    plain = errors["kaiming", 1]
    # Measured on this tiny random Llama (r=8 of 64): 4-bit 0.88x / 0.81x / 0.83x plain NF4's
    # error, 8-bit about the same; the bound only asks for a clear gain and LoftQ-5 <= LoftQ-1.
    assert errors["loftq", 1] < 0.95 * plain and errors["pissa", 1] < 0.95 * plain
    assert errors["loftq", 5] <= errors["loftq", 1]


def test_loftq_is_layer_by_layer_seeded_and_exports_its_own_base(checkpoints, tmp_path):
    lora = ql.LoraConfig(r=4, alpha=8, init="loftq", loftq_iters=3)
    a = ql.load_model(checkpoints["llama"], quant=fp32(4), lora=lora, progress=False, seed=1)
    b = ql.load_model(checkpoints["llama"], quant=fp32(4), lora=lora, progress=False, seed=1)
    layer_a = dict(ql.lora_layers(a))["model.layers.0.mlp.up_proj"]
    layer_b = dict(ql.lora_layers(b))["model.layers.0.mlp.up_proj"]
    assert torch.equal(layer_a.lora_A.weight, layer_b.lora_A.weight)
    assert torch.equal(ql.dequantize_weight(layer_a.base_layer), ql.dequantize_weight(layer_b.base_layer))
    # With > 1 iteration the base is NF4(W - s B A), not NF4(W): the export must start from it.
    plain = ql.load_model(checkpoints["llama"], quant=fp32(4), progress=False)
    assert not torch.equal(ql.dequantize_weight(layer_a.base_layer),
                           ql.dequantize_weight(plain.model.layers[0].mlp.up_proj))
    perturb_b(a)
    report = ql.export_merged(a, tmp_path / "merged", dtype=torch.float32, progress=False)
    assert report["relative_logits_error"] < FP32_REL_TOL


def test_what_peft_cannot_rebuild_is_refused_then_saved_for_qlowrank(checkpoints, tmp_path):
    lora = ql.LoraConfig(r=4, alpha=8, init="loftq", loftq_iters=5)
    model = ql.load_model(checkpoints["llama"], quant=fp32(4), lora=lora, progress=False, seed=2)
    perturb_b(model)
    with pytest.raises(ValueError, match="cannot be expressed in PEFT's format: LoftQ with 5 iterations"):
        ql.save_adapter(model, tmp_path / "adapter")
    ql.save_adapter(model, tmp_path / "adapter", format="qlowrank")
    ids = token_batch()
    with pytest.raises(ValueError, match="loftq-initialised base"):
        ql.load_adapter(ql.load_model(checkpoints["llama"], quant=fp32(4), progress=False), tmp_path / "adapter")
    config, seed = read_adapter_lora(tmp_path / "adapter")
    assert (config.init, config.loftq_iters, seed) == ("loftq", 5, 2)
    rebuilt = ql.load_model(checkpoints["llama"], quant=fp32(4), lora=config, seed=seed, progress=False)
    ql.load_adapter(rebuilt, tmp_path / "adapter")
    assert rel_error(logits(rebuilt, ids), logits(model, ids)) < FP32_REL_TOL
    quantized_pissa = ql.load_model(checkpoints["llama"], quant=fp32(4), progress=False,
                                    lora=ql.LoraConfig(r=4, init="pissa"))
    with pytest.raises(ValueError, match="PiSSA on a quantized base"):
        ql.save_adapter(quantized_pissa, tmp_path / "pissa")


def test_loftq_one_iteration_and_float_pissa_load_in_peft(checkpoints, tmp_path):
    ids = token_batch()
    loftq = ql.load_model(checkpoints["llama"], quant=fp32(4), lora=ql.LoraConfig(r=4, init="loftq"), progress=False)
    ql.save_adapter(loftq, tmp_path / "loftq")   # the base is plain NF4(W): PEFT's own 4-bit base
    theirs = peft.PeftModel.from_pretrained(ql.load_model(checkpoints["llama"], quant=fp32(4), progress=False),
                                            str(tmp_path / "loftq"))
    assert rel_error(logits(loftq, ids), logits(theirs, ids)) < FP32_REL_TOL
    pissa = ql.load_model(checkpoints["llama"], quant=fp32(None), dtype="fp32", progress=False,
                          lora=ql.LoraConfig(r=4, init="pissa", svd="full"))
    perturb_b(pissa)
    ql.save_adapter(pissa, tmp_path / "pissa")
    assert json.loads((tmp_path / "pissa" / "adapter_config.json").read_text())["init_lora_weights"] == "pissa"
    # PEFT recomputes the residual W - s B0 A0 from the original weights, then loads B, A.
    theirs = peft.PeftModel.from_pretrained(ql.load_model(checkpoints["llama"], quant=fp32(None), dtype="fp32",
                                                          progress=False), str(tmp_path / "pissa"))
    assert rel_error(logits(pissa, ids), logits(theirs, ids)) < FP32_REL_TOL
    # and PEFT's PiSSA adapter into qlowrank: the same residual is rebuilt on load
    ours = ql.load_adapter(ql.load_model(checkpoints["llama"], quant=fp32(None), dtype="fp32", progress=False),
                           tmp_path / "pissa")
    assert rel_error(logits(ours, ids), logits(theirs, ids)) < FP32_REL_TOL


def test_init_errors_name_what_to_do(checkpoints):
    quantized = ql.load_model(checkpoints["llama"], quant=fp32(4), progress=False)
    with pytest.raises(ValueError, match=r"needs the float weights .* use load_model"):
        ql.add_lora(quantized, ql.LoraConfig(r=4, init="loftq"))
    with pytest.raises(ValueError, match="init=.loftq.. needs a quantized base"):
        ql.load_model(checkpoints["llama"], quant=fp32(None), progress=False, lora=ql.LoraConfig(r=4, init="loftq"))
    with pytest.raises(ValueError, match="loftq_iters"):
        ql.LoraConfig(init="loftq", loftq_iters=0)
    with pytest.raises(ValueError, match="rank_pattern"):
        ql.LoraConfig(rank_pattern={"q_proj": 0})


# ---- command line ----

def test_cli_train_with_loftq_dora_and_a_trained_head_then_export_rebuilds_the_base(workdir, tmp_path):
    out = tmp_path / "run"
    code = main(["train", "--config", str(workdir / "run.json"), "--steps", "2", "--out", str(out), "--init", "loftq",
                 "--loftq-iters", "2", "--dora", "--train-modules", "lm_head", "--precision", "fp32", "--export",
                 "--export-dtype", "fp32", "--seed", "3"])
    assert code == 0
    sidecar = json.loads((out / "adapter" / "qlowrank_adapter.json").read_text())
    assert (sidecar["init"], sidecar["loftq_iters"], sidecar["seed"]) == ("loftq", 2, 3)
    config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert config["use_dora"] and config["modules_to_save"] == ["lm_head"]
    # `qlowrank export` from the adapter alone rebuilds the LoftQ base: the same weights as the
    # export made from the trained model itself.
    assert main(["export", "--model", str(workdir / "model"), "--adapter", str(out / "adapter"), "--out",
                 str(tmp_path / "exported"), "--dtype", "fp32", "--compute-dtype", "fp32"]) == 0
    direct = transformers.AutoModelForCausalLM.from_pretrained(out / "merged").state_dict()
    rebuilt = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "exported").state_dict()
    assert direct.keys() == rebuilt.keys()
    assert max(rel_error(rebuilt[k], direct[k]) for k in direct) < FP32_REL_TOL
    assert main(["train", "--config", str(workdir / "run.json"), "--init", "loftq", "--loftq-iters", "0"]) == 2


# ---- memory ----

def test_dora_memory_is_estimated_as_measured():
    config = tiny_config("llama")
    quant = ql.QuantConfig(bits=4)
    peaks = {}
    for dora in (False, True):
        lora = ql.LoraConfig(r=8, use_dora=dora)
        est = ql.estimate_memory(config, quant=quant, lora=lora, batch_size=2, seq_len=32, device="cpu",
                                 chunked_loss=False)   # the steps below use the model's own loss
        torch.manual_seed(0)
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
        ql.quantize_model(model, quant)
        ql.add_lora(model, lora)
        ql.enable_gradient_checkpointing(model)
        model.train()
        optimizer = torch.optim.AdamW(ql.lora_parameters(model), lr=1e-3)
        ids = token_batch(2, 32)
        with ql.MemoryProfiler(model=model, optimizer=optimizer) as prof:
            for _ in range(2):
                model(ids, labels=ids).loss.backward()
                optimizer.step()
                optimizer.zero_grad()
        assert prof.breakdown == est.breakdown
        peaks[dora] = est
    # DoRA's own state: one float32 magnitude per output row of each of the 14 layers, plus its two Adam moments.
    rows = 2 * (64 + 32 + 32 + 64 + 128 + 128 + 64)
    assert peaks[True].breakdown["trainable_params"] - peaks[False].breakdown["trainable_params"] == 4 * rows
    assert peaks[True].breakdown["optimizer_states"] - peaks[False].breakdown["optimizer_states"] >= 8 * rows
