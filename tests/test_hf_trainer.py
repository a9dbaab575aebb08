"""A qlowrank model inside transformers.Trainer and TRL 1.x's SFTTrainer / DPOTrainer: adapter checkpoints, exact resume, float32 factors, no second model.

Every model here is a tiny Llama checkpoint loaded by `qlowrank.load_model` in 4-bit NF4 with
LoRA (seed 0), so each run starts from the same factors; the trainers are the libraries' own.
"""

from __future__ import annotations

import math
from pydoc_data.topics import topics

import pytest
import torch
import transformers
from safetensors.torch import load_file

import qlowrank as ql
from conftest import tiny_llama, tiny_tokenizer
from qlowrank.integrations.hf import AdapterCheckpoints, QlowrankTrainer
from qlowrank.train.preference import sequence_log_probs

trl = pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")

KEYS = sorted(topics)[:12]
# TRL's fused head and qlowrank's chunked head score the same tokens of the same 4-bit model in
# float32; they differ only in the order of float32 sums. Measured (run with -s): at most 1.2e-7
# relative on these summed log-probs (about -250 each); 1e-5 is 80x that, and the float
# checkpoint (what a reloaded reference would be) is 4.5e-4 away at its nearest, 45x the bound.
LOGP_REL_TOL = 1e-5


class SFT(AdapterCheckpoints, trl.SFTTrainer):
    """TRL's SFTTrainer, saving the qlowrank adapter."""


class DPO(AdapterCheckpoints, trl.DPOTrainer):
    """TRL's DPOTrainer, saving the qlowrank adapter."""


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A tiny Llama checkpoint (head scaled, so the loss can fall under frozen-head LoRA) and its BPE tokenizer."""
    folder = tmp_path_factory.mktemp("hf") / "base"
    tok = tiny_tokenizer()
    tiny_llama(tok, head_scale=8.0).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder, tok


def qlowrank_model(folder, dropout: float = 0.0, compute=torch.float32) -> torch.nn.Module:
    return ql.load_model(folder, quant=ql.QuantConfig(bits=4, compute_dtype=compute),
                         lora=ql.LoraConfig(r=4, alpha=8, dropout=dropout), seed=0, progress=False)


def factor_dtypes(model) -> set[torch.dtype]:
    return {p.dtype for name, p in model.named_parameters() if ".lora_" in name}


def trained_b(model) -> float:
    """The largest |B| entry: 0 until an optimizer step has moved the adapter."""
    return max(float(p.detach().abs().max()) for name, p in model.named_parameters() if "lora_B" in name)


class LossLog(transformers.TrainerCallback):
    def __init__(self):
        self.losses = {}

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "loss" in logs:
            self.losses[state.global_step] = logs["loss"]


class CrashAfterSave(transformers.TrainerCallback):
    """Stops the run the moment checkpoint `step` is on disk, as a kill would."""

    def __init__(self, step: int):
        self.step = step

    def on_save(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            raise KeyboardInterrupt


def test_trainer_checkpoints_the_adapter_and_resumes_exactly(base, tmp_path):
    folder, tok = base
    rows = datasets.Dataset.from_list([{"input_ids": tok(topics[k][:100])["input_ids"]} for k in KEYS[:8]])
    collator = transformers.DataCollatorForLanguageModeling(tok, mlm=False)

    def run(out, crash=None, resume=None):
        model = qlowrank_model(folder, dropout=0.1)   # dropout: the resumed run must also restore the RNG
        log = LossLog()
        args = transformers.TrainingArguments(output_dir=str(out), max_steps=4, save_steps=2, logging_steps=1,
                                              per_device_train_batch_size=2, learning_rate=1e-2, use_cpu=True,
                                              report_to="none", disable_tqdm=True, seed=0)
        trainer = QlowrankTrainer(model=model, args=args, train_dataset=rows, data_collator=collator,
                                  processing_class=tok, callbacks=[log] + ([CrashAfterSave(crash)] if crash else []))
        trainer.train(resume_from_checkpoint=resume)
        return trainer, model, log.losses

    trainer, whole, losses = run(tmp_path / "whole")
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "cut", crash=2)
    checkpoint = tmp_path / "cut" / "checkpoint-2"
    files = {p.name for p in checkpoint.iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", "optimizer.pt", "rng_state.pth"} <= files
    assert "model.safetensors" not in files and "config.json" not in files   # no packed 4-bit state dict
    _, resumed, rest = run(tmp_path / "cut", resume=str(checkpoint))
    assert sorted(rest) == [3, 4] and [rest[3], rest[4]] == [losses[3], losses[4]], (losses, rest)
    for a, b in zip(ql.lora_parameters(whole), ql.lora_parameters(resumed)):
        assert torch.equal(a, b)

    # save_model() into output_dir: the adapter beside the checkpoints, which stay.
    trainer.save_model()
    out = tmp_path / "whole"
    assert (out / "checkpoint-4" / "optimizer.pt").is_file() and not (out / "model.safetensors").exists()
    saved = load_file(out / "adapter_model.safetensors")
    assert saved and all(k.startswith("base_model.model.") for k in saved)   # PEFT's key layout
    fresh = ql.load_adapter(qlowrank_model(folder), out).eval()
    ids = torch.tensor([tok(topics[KEYS[0]][:80])["input_ids"]])
    whole.eval()
    with torch.no_grad():
        assert torch.equal(fresh(ids).logits, whole(ids).logits)
    assert trained_b(whole) > 0

    # What plain transformers.Trainer does with the same model: the whole state dict.
    plain = transformers.Trainer(model=whole, args=transformers.TrainingArguments(str(tmp_path / "plain"),
                                                                                 use_cpu=True, report_to="none"))
    plain.save_model()
    assert (tmp_path / "plain" / "model.safetensors").is_file()
    assert not (tmp_path / "plain" / "adapter_config.json").exists()
    with pytest.raises(ValueError, match="no qlowrank LoRA layers"):
        QlowrankTrainer(model=transformers.AutoModelForCausalLM.from_pretrained(folder), args=plain.args)


def test_sft_trainer_trains_float32_factors_and_saves_the_adapter(base, tmp_path):
    folder, tok = base
    model = qlowrank_model(folder, compute=torch.bfloat16)
    rows = [{"prompt": f"Topic {k}:\n", "completion": topics[k][:80]} for k in KEYS]
    # TRL's defaults on a CPU: bf16 autocast and transformers' activation checkpointing, both on.
    args = trl.SFTConfig(output_dir=str(tmp_path), max_steps=2, save_steps=2, per_device_train_batch_size=4,
                         learning_rate=1e-2, use_cpu=True, report_to="none", disable_tqdm=True)
    trainer = SFT(model=model, args=args, train_dataset=datasets.Dataset.from_list(rows), processing_class=tok)
    assert args.bf16 and args.gradient_checkpointing
    assert factor_dtypes(model) == {torch.float32}
    assert {id(p) for p in model.parameters() if p.requires_grad} == {id(p) for p in ql.lora_parameters(model)}
    trainer.train()
    assert factor_dtypes(model) == {torch.float32} and trained_b(model) > 0
    files = {p.name for p in (tmp_path / "checkpoint-2").iterdir()}
    assert "adapter_model.safetensors" in files and "model.safetensors" not in files


def test_trl_casts_the_factors_of_a_model_that_says_it_is_4bit(base, tmp_path):
    """What the dtype assertions above would catch: TRL's bf16 cast, and AdapterCheckpoints refusing it."""
    folder, tok = base
    rows = datasets.Dataset.from_list([{"prompt": "Topic:\n", "completion": topics[k][:40]} for k in KEYS[:4]])
    args = trl.SFTConfig(output_dir=str(tmp_path), max_steps=1, use_cpu=True, report_to="none", disable_tqdm=True)
    model = qlowrank_model(folder)
    assert not getattr(model, "is_loaded_in_4bit", False) and not getattr(model, "is_loaded_in_8bit", False)
    model.is_loaded_in_4bit = True    # what a transformers + BitsAndBytesConfig model carries
    trl.SFTTrainer(model=model, args=args, train_dataset=rows, processing_class=tok)
    assert factor_dtypes(model) == {torch.bfloat16}
    model = qlowrank_model(folder)
    model.is_loaded_in_4bit = True
    with pytest.raises(ValueError, match="bfloat16 after SFT was built.*is_loaded_in_4bit"):
        SFT(model=model, args=args, train_dataset=rows, processing_class=tok)


def _pairs() -> list[dict]:
    return [{"prompt": f"Topic {k}:\n", "chosen": topics[k][:60], "rejected": topics[KEYS[(i + 3) % 8]][:60]}
            for i, k in enumerate(KEYS[:8])]


def _dpo_args(out, **kw):
    return trl.DPOConfig(output_dir=str(out), beta=0.1, per_device_train_batch_size=4, learning_rate=5e-3,
                         use_cpu=True, bf16=False, gradient_checkpointing=False, report_to="none", disable_tqdm=True,
                         logging_steps=1, **kw)


def _logp(model, prompt_ids, completion_ids) -> float:
    ids = torch.tensor([prompt_ids + completion_ids])
    labels = torch.tensor([[-100] * len(prompt_ids) + completion_ids])
    with torch.no_grad():
        return float(sequence_log_probs(model, ids, labels)[0][0])


def _dpo(folder, tok, out, callbacks=()):
    model = qlowrank_model(folder)
    trainer = DPO(model=model, args=_dpo_args(out, max_steps=2, save_steps=1, precompute_ref_log_probs=True),
                  train_dataset=datasets.Dataset.from_list(_pairs()), processing_class=tok, callbacks=list(callbacks))
    return model, trainer


def test_dpo_trainer_with_precomputed_reference_needs_no_second_model(base, tmp_path):
    folder, tok = base
    model, trainer = _dpo(folder, tok, tmp_path / "whole")
    assert trainer.ref_model is None and factor_dtypes(model) == {torch.float32}
    # The reference TRL precomputed is the 4-bit base (B = 0: the policy at build time), not a float reload.
    floated = transformers.AutoModelForCausalLM.from_pretrained(folder)
    worst, nearest = 0.0, math.inf
    for row in trainer.train_dataset:
        for side in ("chosen", "rejected"):
            with ql.disable_lora(model):
                ours = _logp(model, row["prompt_ids"], row[f"{side}_ids"])
            worst = max(worst, abs(row[f"ref_{side}_logps"] - ours) / abs(ours))
            nearest = min(nearest, abs(_logp(floated, row["prompt_ids"], row[f"{side}_ids"]) - ours) / abs(ours))
    print(f"precomputed vs LoRA-off log-probs: worst {worst:.1e}; float checkpoint's nearest {nearest:.1e}")
    assert worst < LOGP_REL_TOL < nearest / 10
    log = LossLog()
    trainer.add_callback(log)
    trainer.train()
    assert log.losses[1] == pytest.approx(math.log(2), abs=1e-5)   # policy == reference on the first step
    first = trainer.state.log_history[0]
    assert abs(first["rewards/margins"]) < 1e-4
    margins = [h["rewards/margins"] for h in trainer.state.log_history if "rewards/margins" in h]
    assert factor_dtypes(model) == {torch.float32} and trained_b(model) > 0 and margins[-1] != margins[0]

    # Killed after checkpoint-1, then rebuilt from the fresh model (the same reference) and resumed.
    with pytest.raises(KeyboardInterrupt):
        _dpo(folder, tok, tmp_path / "cut", [CrashAfterSave(1)])[1].train()
    rest = LossLog()
    resumed, trainer = _dpo(folder, tok, tmp_path / "cut", [rest])
    trainer.train(resume_from_checkpoint=str(tmp_path / "cut" / "checkpoint-1"))
    assert list(rest.losses) == [2] and rest.losses[2] == log.losses[2], (log.losses, rest.losses)
    assert all(torch.equal(a, b) for a, b in zip(ql.lora_parameters(model), ql.lora_parameters(resumed)))


def test_dpo_trainer_without_precompute_loads_the_base_again(base, tmp_path):
    """The reason for the recipe: a model that is not a PeftModel gets a second, float, reference model."""
    folder, tok = base
    model = qlowrank_model(folder)
    trainer = DPO(model=model, args=_dpo_args(tmp_path, max_steps=1),
                  train_dataset=datasets.Dataset.from_list(_pairs()[:4]), processing_class=tok)
    second = trainer.ref_model
    assert second is not None and second is not model
    assert not list(ql.lora_layers(second))                          # the plain checkpoint, reloaded
    assert all(p.dtype == torch.float32 for p in second.parameters())   # and not quantized
