"""TensorBoard logging: the event file the Trainer writes holds the loss curve of metrics.jsonl."""

from __future__ import annotations

import json

import pytest
from conftest import tiny_model
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import qlowrank as ql
from qlowrank.train import Example, TrainConfig, Trainer


def test_event_file_has_the_loss_curve(tmp_path):
    model = tiny_model("llama")
    ql.add_lora(model, ql.LoraConfig(r=4, alpha=8))
    examples = [Example(ids, labels=ids) for ids in ([(s + i) % 256 for i in range(16)] for s in range(0, 256, 16))]
    config = TrainConfig(out_dir=str(tmp_path), steps=4, batch_size=4, lr=1e-2, progress=False, profile_memory=False,
                         precision="fp32")
    result = Trainer(model, config, examples[:12], examples[12:]).train()

    events = list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    assert len(events) == 1
    board = EventAccumulator(str(events[0]))
    board.Reload()
    loss = board.Scalars("loss")
    assert [e.step for e in loss] == [1, 2, 3, 4]
    # The same values as the training result and metrics.jsonl (TensorBoard stores float32).
    assert [e.value for e in loss] == pytest.approx(result.losses, rel=1e-6)
    logged = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [e.value for e in loss] == pytest.approx([m["loss"] for m in logged if "loss" in m], rel=1e-6)
    evals = board.Scalars("eval_loss")
    assert [e.step for e in evals] == [0, 4]
    assert evals[-1].value == pytest.approx(result.evals[-1]["eval_loss"], rel=1e-6)
    assert {"lr", "grad_norm", "tokens_per_s"} <= set(board.Tags()["scalars"])
