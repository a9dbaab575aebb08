"""The Trainer on tiny 4-bit LoRA models: the loss falls, resume is exact, NaN and Ctrl-C are handled."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import doc_examples, tiny_config, train_config, trainable_model

import qlowrank as ql
from qlowrank.train import (
    IGNORE_INDEX,
    Example,
    NonFiniteLossError,
    Trainer,
    build_optimizer,
    list_checkpoints,
    lr_factor,
    pack_examples,
)

# Resume restores the adapter (float32 safetensors), the optimizer state, the scheduler, the
# RNG states and the data position exactly, and these tests run on the CPU, whose kernels are
# deterministic: resumed losses equal the uninterrupted run's bit for bit (no tolerance).


def test_loss_falls_eval_improves_and_outputs_are_written(tmp_path, tok):
    examples = doc_examples(tok)
    trainer = Trainer(trainable_model(tok, checkpointing=True), train_config(tmp_path, steps=16, warmup_steps=2, eval_every=8, precision="bf16",
                                           profile_memory=True),
                      examples[:20], examples[20:], pad_token_id=tok.pad_token_id)
    result = trainer.train()
    # Measured: mean of the first 4 steps 6.05, of the last 4 5.25 (a 0.8 drop); half of it is required.
    assert sum(result.losses[-4:]) / 4 < sum(result.losses[:4]) / 4 - 0.4, result.losses
    assert [e["step"] for e in result.evals] == [0, 8, 16]
    assert result.evals[-1]["eval_loss"] < result.evals[0]["eval_loss"]
    out = tmp_path / "out"
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in lines if "loss" in m] == list(range(1, 17))
    steps = [m for m in lines if "loss" in m]
    # 20 examples in micro-batches of 4: steps 1-15 are three whole epochs, each example's
    # tokens counted once per epoch (padding is not counted).
    assert sum(m["tokens"] for m in steps[:15]) == 3 * sum(len(e.input_ids) for e in examples[:20])
    assert all(m["peak_mem_gib"] > 0 and m["epoch"] == (m["step"] - 1) // 5 for m in steps)
    assert set(json.loads((out / "memory.json").read_text())["breakdown"]) >= {"trainable_params", "optimizer_states"}
    # The saved adapter reproduces the trained model on a fresh copy of the same base.
    fresh = trainable_model(tok)
    ql.load_adapter(fresh, result.adapter_dir)
    ids = torch.tensor([examples[0].input_ids])
    trainer.model.eval(), fresh.eval()
    with torch.no_grad():
        torch.testing.assert_close(fresh(ids).logits, trainer.model(ids).logits, atol=0, rtol=0)
    assert [p.name for p in list_checkpoints(out / "checkpoints")] == ["step-000016"]


def _interrupt_at(step):
    def callback(trainer, current, metrics):
        if current == step:
            raise KeyboardInterrupt  # what Ctrl-C raises in the main thread
    return callback


def test_resume_after_ctrl_c_reproduces_the_uninterrupted_trajectory(tmp_path, tok, capsys):
    # 14 examples / batch 3 -> 5 micro-batches per epoch; grad_accum 2 -> steps cross epoch
    # boundaries mid-step, and dropout makes the RNG state matter.
    examples = doc_examples(tok, 14)
    kw = dict(steps=6, grad_accum=2, batch_size=3, warmup_steps=2)
    straight = Trainer(trainable_model(tok, dropout=0.1), train_config(tmp_path / "a", **kw), examples,
                       pad_token_id=tok.pad_token_id).train()
    first = Trainer(trainable_model(tok, dropout=0.1), train_config(tmp_path / "b", **kw), examples,
                    pad_token_id=tok.pad_token_id, on_step=_interrupt_at(3))
    with pytest.raises(KeyboardInterrupt):
        first.train()
    assert "checkpoint of step 3 written" in capsys.readouterr().out
    assert [p.name for p in list_checkpoints(tmp_path / "b" / "out" / "checkpoints")] == ["step-000003"]
    resumed = Trainer(trainable_model(tok, dropout=0.1), train_config(tmp_path / "b", **kw), examples, pad_token_id=tok.pad_token_id)
    result = resumed.train(resume=True)
    assert len(result.losses) == 3 and result.final_step == 6
    assert result.losses == straight.losses[3:]
    # A different batch size would change the data order: refused, with the reason.
    other = Trainer(trainable_model(tok), train_config(tmp_path / "b", **{**kw, "batch_size": 2}), examples,
                    pad_token_id=tok.pad_token_id)
    with pytest.raises(ValueError, match="batch_size: 3 -> 2"):
        other.train(resume=True)


def test_nan_loss_stops_with_clear_error_and_keeps_last_good_checkpoint(tmp_path, tok):
    def poison(trainer, step, metrics):
        if step == 3:
            _, layer = next(iter(ql.lora_layers(trainer.model)))
            layer.lora_B.weight.data.fill_(float("nan"))

    trainer = Trainer(trainable_model(tok), train_config(tmp_path, steps=6, save_every=2), doc_examples(tok),
                      pad_token_id=tok.pad_token_id, on_step=poison)
    with pytest.raises(NonFiniteLossError, match=r"loss is nan at step 4.*Last good checkpoint: .*step-000002"):
        trainer.train()
    assert trainer.step == 3
    checkpoints = list_checkpoints(tmp_path / "out" / "checkpoints")
    assert [p.name for p in checkpoints] == ["step-000002"]
    fresh = trainable_model(tok)
    ql.load_adapter(fresh, checkpoints[0] / "adapter")
    assert all(torch.isfinite(p).all() for p in ql.lora_parameters(fresh))


def test_lora_plus_groups_and_schedule(tok):
    model = trainable_model(tok)
    optimizer = build_optimizer(model, "adamw", lr=1e-3, lora_plus_ratio=16)
    a, b = optimizer.param_groups
    n_layers = len(list(ql.lora_layers(model)))
    assert (a["name"], a["lr"], len(a["params"])) == ("lora_A", 1e-3, n_layers)
    assert (b["name"], b["lr"], len(b["params"])) == ("lora_B", 1.6e-2, n_layers)
    assert {id(p) for g in optimizer.param_groups for p in g["params"]} == {id(p) for p in ql.lora_parameters(model)}
    assert [lr_factor(s, 4, 14) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert lr_factor(9, 4, 14) == pytest.approx(0.5) and lr_factor(14, 4, 14, min_lr_ratio=0.1) == pytest.approx(0.1)


@pytest.mark.parametrize("optimizer", ["adamw8bit", "paged_adamw8bit"])
def test_8bit_adamw_with_lora_plus_trains_on_packed_data(tmp_path, tok, optimizer):
    examples = pack_examples(doc_examples(tok), seq_len=48)
    config = train_config(tmp_path, steps=8, optimizer=optimizer, lora_plus_ratio=4, lr=5e-3, chunk_tokens=None)
    result = Trainer(trainable_model(tok), config, examples, pad_token_id=tok.pad_token_id).train()
    assert sum(result.losses[-2:]) / 2 < sum(result.losses[:2]) / 2 - 0.3, result.losses


def test_epochs_set_the_step_count_and_every_example_is_seen_once_per_epoch(tmp_path, tok):
    examples = doc_examples(tok, 10)
    seen = []
    trainer = Trainer(trainable_model(tok), train_config(tmp_path, epochs=2, batch_size=4, grad_accum=1), examples,
                      pad_token_id=tok.pad_token_id)
    stream = trainer.sampler.stream()
    for _ in range(trainer.sampler.per_epoch * 2):
        seen.append([examples.index(e) for e in next(stream)])
    assert trainer.total_steps == 6   # ceil(10 / 4) = 3 micro-batches per epoch, 2 epochs
    for epoch in (seen[:3], seen[3:]):
        assert sorted(i for batch in epoch for i in batch) == list(range(10))
    assert seen[:3] != seen[3:]       # each epoch has its own order


def test_a_rank_left_without_examples_gets_one_fully_masked_example():
    from qlowrank.train.batching import BatchLayout

    examples = [Example([1, 2, 3], [1, 2, 3], "a"), Example([4, 5], [4, 5], "b"), Example([6], [6], "c")]
    first, second = (BatchLayout(batch_size=2, processes=2, rank=r, grad_accum=1) for r in (0, 1))
    assert first.share(examples) == examples[:2] and second.share(examples) == examples[2:]
    # The end of an epoch: one example left for two ranks. Rank 1 still runs a forward and a
    # backward (DDP and FSDP synchronize there) on a copy of it that adds no loss.
    (masked,) = second.share(examples[:1])
    assert masked.input_ids == [1, 2, 3] and set(masked.labels) == {IGNORE_INDEX} and masked.source == "padding"
    # Under torch.compile a short share is filled up to the batch size (one shape, one compile).
    filled = BatchLayout(batch_size=2, processes=2, rank=0, grad_accum=1, fill=True).share(examples[:1])
    assert len(filled) == 2 and filled[0] is examples[0] and set(filled[1].labels) == {IGNORE_INDEX}


def test_options_are_refused_where_they_are_defined_and_one_optimizer_list_serves_trainer_and_estimator(tmp_path):
    from qlowrank.config import SHARDINGS, TRAIN_OPTIMIZERS

    with pytest.raises(ValueError, match=r"TrainConfig.optimizer='lion'.*paged_adamw8bit"):
        train_config(tmp_path, optimizer="lion")
    with pytest.raises(ValueError, match="TrainConfig.sharding='ddp'"):
        train_config(tmp_path, sharding="ddp")
    with pytest.raises(ValueError, match="optimizer='lion' is not supported"):
        ql.estimate_memory(tiny_config("llama"), optimizer="lion")
    assert "sgd" in TRAIN_OPTIMIZERS and SHARDINGS == (None, "fsdp")
    for name in TRAIN_OPTIMIZERS:
        assert train_config(tmp_path, optimizer=name).optimizer == name
