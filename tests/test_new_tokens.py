"""New special tokens on a quantized base: resize, train only the new rows, adapter, export, PEFT."""

from __future__ import annotations

import json

import peft
import pytest
import torch
import transformers
from conftest import rel_error
from test_adapters import FP32_REL_TOL, logits

import qlowrank as ql
from qlowrank.state import state_of

NEW = ["<|tool|>", "<|/tool|>"]


def load(workdir, tied: bool = False):
    path = workdir / "model"
    if tied:
        path = workdir / "tied"
        if not path.exists():
            config = transformers.AutoConfig.from_pretrained(workdir / "model")
            config.tie_word_embeddings = True
            torch.manual_seed(0)
            transformers.AutoModelForCausalLM.from_config(config).save_pretrained(path)
            transformers.AutoTokenizer.from_pretrained(workdir / "model").save_pretrained(path)
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    model = ql.load_model(path, quant=ql.QuantConfig(bits=4, compute_dtype=torch.float32),
                          lora=ql.LoraConfig(r=4, alpha=8), progress=False)
    return model, tokenizer


@pytest.mark.parametrize("tied", [False, True])
def test_new_rows_train_old_rows_stay_and_the_export_has_the_new_vocabulary(workdir, tmp_path, tied):
    model, tokenizer = load(workdir, tied)
    old_vocab = len(tokenizer)
    old_embed = model.get_input_embeddings().weight.detach().clone()
    ids_new = ql.add_tokens(model, tokenizer, NEW)
    assert ids_new == [old_vocab, old_vocab + 1] and len(tokenizer) == old_vocab + 2
    assert tokenizer.tokenize(f"a{NEW[0]}b")[1] == NEW[0]          # never split: a special token
    embed = model.get_input_embeddings()
    assert embed.weight.shape[0] == old_vocab + 2 and model.config.vocab_size == old_vocab + 2
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    text = f"{NEW[0]} call the tool {NEW[1]} done"
    batch = tokenizer([text] * 2, return_tensors="pt")["input_ids"]
    optimizer = torch.optim.AdamW(ql.lora_parameters(model), lr=1e-2)
    model.train()
    first = None
    for _ in range(8):
        loss = model(batch, labels=batch).loss
        first = first if first is not None else loss.item()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()
    assert loss.item() < first
    # The old rows and every frozen tensor (the 4-bit base included) are bit-identical; the new rows moved.
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if n in frozen)
    assert torch.equal(embed.weight[:old_vocab].detach(), old_embed)
    assert not torch.equal(embed.weight[old_vocab:].detach(), embed.base_layer.weight[old_vocab:])

    ql.save_adapter(model, tmp_path / "adapter")
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["trainable_token_indices"]["embed_tokens"] == ids_new
    fresh, _ = load(workdir, tied)
    ql.load_adapter(fresh, tmp_path / "adapter")   # enlarges the vocabulary and restores the rows
    assert rel_error(logits(fresh, batch), logits(model, batch)) < FP32_REL_TOL
    assert len(state_of(fresh).tokenizer) == old_vocab + 2

    report = ql.export_merged(model, tmp_path / "merged", dtype=torch.float32, progress=False)
    assert report["relative_logits_error"] < FP32_REL_TOL
    exported = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    assert exported.config.vocab_size == old_vocab + 2
    assert transformers.AutoTokenizer.from_pretrained(tmp_path / "merged").convert_tokens_to_ids(NEW) == ids_new


def test_new_token_adapter_loads_in_peft(workdir, tmp_path):
    model, tokenizer = load(workdir)
    ql.add_tokens(model, tokenizer, NEW)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("trainable_tokens_delta"):
                param.add_(0.5)
    ql.save_adapter(model, tmp_path / "adapter")
    base = ql.load_model(workdir / "model", quant=ql.QuantConfig(bits=4, compute_dtype=torch.float32), progress=False)
    base.resize_token_embeddings(len(tokenizer))   # what a PEFT user does for a tokenizer with new tokens
    theirs = peft.PeftModel.from_pretrained(base, str(tmp_path / "adapter"))
    batch = tokenizer([f"x {NEW[0]} y {NEW[1]}"], return_tensors="pt")["input_ids"]
    assert rel_error(logits(model, batch), logits(theirs, batch)) < FP32_REL_TOL
