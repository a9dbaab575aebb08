"""Preference pairs end to end: rows and masks, bad rows named, `qlowrank train --objective dpo / orpo`, accumulation, resume."""

from __future__ import annotations

import json
from pydoc_data.topics import topics

import pytest
import torch

from conftest import tiny_llama, tiny_tokenizer, trainable_model
from qlowrank.cli.main import main
from qlowrank.data import DataError
from qlowrank.data.pairs import PAIR_LAYOUTS, load_pairs, tokenize_pair
from qlowrank.train import Trainer, TrainConfig, TrainingInterrupted

IGNORE = -100
# Accumulated and one-batch steps differ only in the order of float32 sums (per-pair losses
# added in two groups, then divided). Measured: loss difference 0.0 (DPO 0.6931, ORPO 6.797),
# factors after one AdamW step at lr 1e-2 within 4.5e-8 (DPO) / 1.2e-7 (ORPO); 1e-5 leaves a
# wide margin and still fails on a wrong normaliser (pairs per micro-batch instead of per step: 2x).
SUM_ORDER = 1e-5
METRICS = ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "logps/chosen",
           "logps/rejected")


def _rows(n: int = 16) -> list[dict]:
    """The right text for a topic against the text of another topic (the demo's pydoc_data)."""
    keys = sorted(topics)[:n]
    return [{"prompt": f"Topic {k}:\n", "chosen": topics[k][:60], "rejected": topics[keys[(i + 5) % n]][:60]}
            for i, k in enumerate(keys)]


@pytest.fixture(scope="module")
def pairs_dir(tmp_path_factory):
    """A tiny Llama (head scaled so its log-probs can move) with a BPE tokenizer, and a pairs JSONL."""
    root = tmp_path_factory.mktemp("pairs")
    tok = tiny_tokenizer()
    model = tiny_llama(tok, head_scale=8.0)
    model.save_pretrained(root / "model")
    tok.save_pretrained(root / "model")
    (root / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in _rows()))
    return root


def test_plain_and_chat_pairs_learn_the_completions_only(tok):
    row = PAIR_LAYOUTS[1].example
    pair = tokenize_pair(row, tok)
    prompt = tok(row["prompt"])["input_ids"]
    assert pair.input_ids[:len(prompt)] == prompt and pair.rejected_ids[:len(prompt)] == prompt
    assert set(pair.labels[:len(prompt)]) == {IGNORE} and set(pair.rejected_labels[:len(prompt)]) == {IGNORE}
    learned = [t for t in pair.labels if t != IGNORE]
    assert tok.decode(learned) == row["chosen"] + tok.eos_token
    assert tok.decode([t for t in pair.rejected_labels if t != IGNORE]) == row["rejected"] + tok.eos_token

    chat = tokenize_pair(PAIR_LAYOUTS[0].example, tok)
    text = tok.decode([t for t in chat.labels if t != IGNORE])
    assert "Paris." in text and "capital" not in text and "<|im_end|>" in text   # answer + end of turn, no prompt
    assert "Lyon." in tok.decode([t for t in chat.rejected_labels if t != IGNORE])


@pytest.mark.parametrize("row, message", [
    ({"prompt": "a", "chosen": "b"}, "missing field 'rejected'"),
    ({"prompt": [{"role": "user", "content": "a"}], "chosen": "b", "rejected": "c"}, "must be a list of messages"),
    ({"prompt": "a", "chosen": 3, "rejected": "c"}, "field 'chosen' must be a string"),
    ({"text": "no pair here"}, "row has none of the fields"),
])
def test_bad_pair_rows_exit_2_naming_file_and_row(pairs_dir, tmp_path, capsys, row, message):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(_rows()[0]) + "\n" + json.dumps(row) + "\n")
    with pytest.raises(DataError, match=message):
        load_pairs(bad, tiny_tokenizer(), 64)
    code = main(["train", "--model", str(pairs_dir / "model"), "--data", str(bad), "--objective", "dpo",
                 "--out", str(tmp_path / "o"), "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and f"{bad}:2:" in err and message in err, err


def _metrics(out) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_cli_dpo_runs_and_rewards_margins_rise(pairs_dir, tmp_path):
    out = tmp_path / "dpo"
    data = str(pairs_dir / "pairs.jsonl")
    code = main(["train", "--model", str(pairs_dir / "model"), "--data", data, "--eval-data", data,
                 "--objective", "dpo", "--beta", "0.1", "--seq", "64", "--batch", "4", "--r", "8", "--lr", "5e-3",
                 "--steps", "12", "--eval-every", "4", "--out", str(out), "--no-progress", "--precision", "fp32"])
    assert code == 0
    lines = _metrics(out)
    steps = [m for m in lines if "loss" in m]
    evals = [m for m in lines if "eval_loss" in m]
    assert len(steps) == 12 and all(set(METRICS) <= set(m) for m in steps)
    margins = [m["eval_rewards/margins"] for m in evals]
    # LoRA starts with B = 0: the policy is the reference, so every reward is exactly 0 before training.
    assert margins[0] == 0.0 and evals[0]["eval_loss"] == pytest.approx(0.693147, abs=1e-5)
    assert margins[-1] > margins[0] + 0.5 and evals[-1]["eval_rewards/accuracies"] > 0.5, margins
    assert (out / "adapter" / "adapter_model.safetensors").is_file()


def test_cli_orpo_runs_and_its_loss_falls(pairs_dir, tmp_path):
    out = tmp_path / "orpo"
    code = main(["train", "--model", str(pairs_dir / "model"), "--data", str(pairs_dir / "pairs.jsonl"),
                 "--objective", "orpo", "--orpo-lambda", "0.2", "--seq", "64", "--batch", "4", "--r", "8",
                 "--lr", "5e-3", "--steps", "8", "--eval-data", str(pairs_dir / "pairs.jsonl"), "--out", str(out),
                 "--no-progress"])
    assert code == 0
    evals = [m for m in _metrics(out) if "eval_loss" in m]
    assert evals[-1]["eval_loss"] < evals[0]["eval_loss"] - 0.5 and "eval_ppl" not in evals[0]


@pytest.mark.parametrize("objective", ["dpo", "orpo"])
def test_accumulated_step_equals_one_batch(tok, tmp_path, objective):
    pairs = [tokenize_pair(r, tok) for r in _rows(8)]
    results = []
    for batch, accum in ((4, 1), (2, 2)):
        model = trainable_model(tok)
        config = TrainConfig(out_dir=str(tmp_path / f"{batch}"), steps=1, batch_size=batch, grad_accum=accum, lr=1e-2,
                             objective=objective, precision="fp32", progress=False, profile_memory=False)
        loss = Trainer(model, config, pairs, pad_token_id=tok.pad_token_id).train().losses[0]
        results.append((loss, torch.cat([p.detach().flatten() for p in model.parameters() if p.requires_grad])))
    (one, weights_one), (two, weights_two) = results
    assert abs(one - two) < SUM_ORDER and float((weights_one - weights_two).abs().max()) < SUM_ORDER


def test_dpo_resumes_exactly_after_an_interruption(tok, tmp_path):
    pairs = [tokenize_pair(r, tok) for r in _rows(12)]

    def run(out, stop_at=None, resume=False):
        def stop(trainer, step, metrics):
            if step == stop_at:
                raise KeyboardInterrupt   # what SIGINT raises; SIGTERM takes the same path (signals.py)
        config = TrainConfig(out_dir=str(out), steps=6, batch_size=3, lr=5e-3, objective="dpo", precision="fp32",
                             progress=False, profile_memory=False)
        return Trainer(trainable_model(tok), config, pairs, pad_token_id=tok.pad_token_id, on_step=stop).train(resume)

    whole = run(tmp_path / "whole").losses
    with pytest.raises(TrainingInterrupted):
        run(tmp_path / "cut", stop_at=3)
    rest = run(tmp_path / "cut", resume=True).losses
    assert len(rest) == 3 and rest == whole[3:], (whole, rest)
