"""`qlowrank demo` end to end on the real SmolLM2-135M (slow: ~1.5 minutes on 2 CPU cores with few steps)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import transformers

from qlowrank.data import tokenize_row
from qlowrank.data.demo_rows import build_conversations
from qlowrank.nn.loss import IGNORE_INDEX

pytestmark = pytest.mark.slow

# The exported bf16 checkpoint, run by plain transformers in bf16, against the trained 4-bit
# model under bf16 autocast: measured eval losses 2.4454 vs 2.4464 (50 steps). Rounding the
# merged weights to bf16 once is the only difference; 0.05 allows 50x the measured gap.
EXPORT_LOSS_ATOL = 0.05


def test_demo_data_holds_out_whole_topics_and_masks_smollm2_chat(tmp_path):
    from qlowrank.cli.train import load_tokenizer
    from qlowrank.model.embedded import smollm2_gguf

    train, held = build_conversations()
    assert len(train) > 100 and len(held) > 15
    assert not {r["topic"] for r in train} & {r["topic"] for r in held}
    tokenizer = load_tokenizer(smollm2_gguf())
    example = tokenize_row(train[0], tokenizer)
    learned = tokenizer.decode([t for t, label in zip(example.input_ids, example.labels) if label != IGNORE_INDEX])
    assert learned == train[0]["messages"][1]["content"] + "<|im_end|>\n"


def test_demo_runs_to_the_end_and_the_eval_loss_falls(tmp_path):
    out = tmp_path / "demo"
    done = subprocess.run([sys.executable, "-m", "qlowrank", "demo", "--steps", "12", "--out", str(out),
                           "--max-new-tokens", "12"], capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    summary = json.loads((out / "demo.json").read_text())
    assert summary["eval_loss_after"] < summary["eval_loss_before"]
    assert abs(summary["export_eval_loss_plain_transformers"] - summary["eval_loss_after"]) < EXPORT_LOSS_ATOL
    assert f"fell by {summary['eval_loss_drop']:.4f}" in done.stdout
    assert "base_weights" in done.stdout and str(out) in done.stdout
    assert {"adapter", "checkpoints", "merged", "metrics.jsonl", "memory.json", "demo.json"} <= {p.name for p in out.iterdir()}
    assert summary["answer"] and summary["answer"] in done.stdout
    config = transformers.AutoConfig.from_pretrained(out / "merged")
    assert (config.model_type, config.num_hidden_layers, config.vocab_size) == ("llama", 30, 49152)
