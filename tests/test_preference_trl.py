"""DPO and ORPO right by construction: qlowrank's first-step losses and LoRA gradients equal TRL 1.x's on the same pairs.

Both sides start from the same tiny float Llama and the same LoRA factors: qlowrank's
adapter is saved in PEFT's format and loaded into a PEFT model for TRL. B is set to
seeded random values first, so the policy differs from the reference (with B = 0 the
DPO loss is log 2 whatever the code does). DPO goes through TRL's own DPOTrainer loss
(`compute_loss`: PEFT reference via disabled adapters, fused head; see the test for TRL's "ref" copy); ORPO, whose trainer lives
in trl.experimental, through ORPOTrainer's own static / loss methods on the PEFT model's
logits (its NLL covers prompt tokens too; qlowrank's, like the paper's, only the completion,
so the NLL term is compared on completion tokens).
"""

from __future__ import annotations

import copy
import types
from pydoc_data.topics import topics

import pytest
import torch

import qlowrank as ql
from qlowrank.data.pairs import collate_pairs, tokenize_pair
from qlowrank.train.preference import Preference, PreferenceLoss

trl = pytest.importorskip("trl")
peft = pytest.importorskip("peft")

# fp32 on both sides, same weights, same tokens: what differs is the order of float32 sums
# (chunked head and masked sums here, TRL's fused head / full logits there). Measured (run
# with -s): the losses (1.0698 DPO, 6.9506 ORPO) agree exactly, the LoRA gradients within
# 4.5e-7 (DPO) / 4.9e-7 (ORPO) of each tensor's largest entry; 1e-5, the bound, is a 20x margin.
TOLERANCE = 1e-5
BETA, ORPO_LAMBDA = 0.3, 0.2


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from conftest import tiny_llama, tiny_tokenizer

    tok = tiny_tokenizer()
    keys = sorted(topics)[:6]
    rows = [{"prompt": f"Topic {k}:\n", "chosen": topics[k][:50 + 7 * i],
             "rejected": topics[keys[(i + 3) % 6]][:40 + 5 * i]} for i, k in enumerate(keys)]
    base = tiny_llama(tok, head_scale=8.0)   # logits far from uniform, so log-probs are not all alike
    ours = copy.deepcopy(base)
    ql.add_lora(ours, ql.LoraConfig(r=4, alpha=8), seed=0)
    generator = torch.Generator().manual_seed(1)
    for name, p in ours.named_parameters():
        if name.endswith("lora_B.weight"):
            p.data.copy_(torch.randn(p.shape, generator=generator) * 0.05)
    folder = tmp_path_factory.mktemp("adapter")
    ql.save_adapter(ours, folder)
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), folder, is_trainable=True)
    pairs = [tokenize_pair(r, tok, f"row {i}") for i, r in enumerate(rows)]
    batch = collate_pairs(pairs, tok.pad_token_id)
    return tok, rows, ours.train(), theirs.train(), batch


def _ours(model, kind, batch):
    objective = Preference(kind, beta=BETA, orpo_lambda=ORPO_LAMBDA)
    model.zero_grad()
    sums = PreferenceLoss(model, objective, chunk_tokens=8)(**batch)
    counts = objective.counts(batch)
    loss = sum(s / c for s, c in zip(sums, counts))
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return loss.detach(), grads, objective.metrics(lambda v: v)


def _peft_grads(model) -> dict[str, torch.Tensor]:
    # PEFT: base_model.model.<path>.lora_A.default.weight -> qlowrank: <path>.lora_A.weight
    return {n.removeprefix("base_model.model.").replace(".default", ""): p.grad.clone()
            for n, p in model.named_parameters() if p.requires_grad}


def _compare_grads(ours, theirs):
    assert set(ours) == set(theirs) and ours
    worst = max(float((ours[n] - theirs[n]).abs().max() / theirs[n].abs().max().clamp_min(1e-12)) for n in ours)
    print(f"largest relative LoRA gradient difference {worst:.2e}")
    assert worst < TOLERANCE, f"largest relative LoRA gradient difference {worst:.2e}"
    assert any(float(g.abs().max()) > 0 for g in ours.values())


def test_dpo_first_step_equals_trl_dpo_trainer(setup, tmp_path):
    from datasets import Dataset

    tok, rows, ours, theirs, batch = setup
    loss, grads, metrics = _ours(ours, "dpo", batch)
    args = trl.DPOConfig(output_dir=str(tmp_path), beta=BETA, report_to="none", per_device_train_batch_size=len(rows),
                         use_cpu=True, bf16=False, gradient_checkpointing=False)
    trainer = trl.DPOTrainer(model=theirs, args=args, train_dataset=Dataset.from_list(rows), processing_class=tok)
    assert trainer.ref_model is None   # TRL's PEFT path: no second model
    # TRL takes a PEFT model that arrives with adapter weights for a re-trained adapter and makes a frozen
    # copy ("ref") its reference. qlowrank's DPO starts a fresh adapter, whose reference is the base with
    # LoRA off: TRL's path for a new adapter. Our B != 0 (so the test can fail) needs that path chosen by hand.
    assert "ref" in theirs.peft_config
    theirs.delete_adapter("ref")
    assert theirs.active_adapter == "default"
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"],
              "completion_mask": (batch["labels"] != -100).long()}
    theirs.zero_grad()
    reference = trainer.compute_loss(trainer.model, inputs)
    reference.backward()
    print(f"loss {float(loss):.6f}, TRL {float(reference):.6f}, difference {abs(float(loss) - float(reference)):.2e}")
    assert abs(float(loss) - float(reference)) < TOLERANCE * max(1.0, abs(float(reference)))
    assert abs(float(loss) - 0.6931) > 1e-3   # not the B = 0 value: the policy differs from the reference
    _compare_grads(grads, _peft_grads(theirs))
    logged = {k: sum(v) / len(v) for k, v in trainer._metrics["train"].items()}
    for name in ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "logps/chosen",
                 "logps/rejected"):
        assert abs(metrics[name] - logged[name]) < TOLERANCE * max(1.0, abs(logged[name])), name


def test_orpo_first_step_equals_trl_orpo_loss(setup):
    from trl.experimental.orpo.orpo_trainer import ORPOTrainer

    tok, rows, ours, theirs, batch = setup
    loss, grads, metrics = _ours(ours, "orpo", batch)
    theirs.zero_grad()
    logits = theirs(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits
    n = len(rows)
    means = ORPOTrainer.get_batch_logps(logits, batch["labels"], average_log_prob=True)
    # TRL's own odds-ratio method, bound to what it reads from the trainer (beta, the device).
    host = types.SimpleNamespace(beta=ORPO_LAMBDA, accelerator=types.SimpleNamespace(device=torch.device("cpu")))
    losses, chosen_rewards, rejected_rewards, _, _ = ORPOTrainer.odds_ratio_loss(host, means[:n], means[n:])
    nll = torch.nn.CrossEntropyLoss()(logits[:n, :-1].reshape(-1, logits.shape[-1]), batch["labels"][:n, 1:].reshape(-1))
    reference = nll - losses.mean()   # ORPOTrainer.get_batch_loss_metrics: policy_nll_loss - losses.mean()
    reference.backward()
    print(f"loss {float(loss):.6f}, TRL {float(reference):.6f}, difference {abs(float(loss) - float(reference)):.2e}")
    assert abs(float(loss) - float(reference)) < TOLERANCE * max(1.0, abs(float(reference)))
    _compare_grads(grads, _peft_grads(theirs))
    assert abs(metrics["rewards/margins"] - float((chosen_rewards - rejected_rewards).mean())) < TOLERANCE
    assert abs(metrics["logps/chosen"] - float(means[:n].mean())) < TOLERANCE
