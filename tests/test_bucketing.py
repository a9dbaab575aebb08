"""Length bucketing: batch lengths rounded up to a multiple keep the number of batch shapes small
(what keeps RSS flat on a CPU, benchmarks/soak.py) and change no loss."""

from __future__ import annotations

import pytest
import torch
from conftest import FP32_LOSS_TOLERANCE, doc_examples, random_examples, tiny_model, train_config, trainable_model

from qlowrank.data import batch_width
from qlowrank.nn.loss import IGNORE_INDEX
from qlowrank.train import Trainer, causal_lm_loss, collate


def test_batch_width_rounds_up_to_the_multiple_but_never_past_the_cap():
    assert batch_width(37, 64) == 64
    assert batch_width(64, 64) == 64
    assert batch_width(65, 64, cap=160) == 128
    assert batch_width(140, 64, cap=160) == 160        # 192 would exceed the run's longest example
    assert batch_width(37, 1) == 37 and batch_width(37, 64, cap=30) == 37   # never below the longest


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_padding_to_a_multiple_changes_no_loss(arch):
    model = tiny_model(arch)
    examples = random_examples([5, 11, 23])
    plain = collate(examples, pad_token_id=0)
    rounded = collate(examples, pad_token_id=0, multiple=16)
    assert plain["input_ids"].shape[1] == 23 and rounded["input_ids"].shape[1] == 32
    assert rounded["labels"][:, 23:].eq(IGNORE_INDEX).all() and rounded["attention_mask"][:, 23:].eq(0).all()
    with torch.no_grad():
        losses = [causal_lm_loss(model, b["input_ids"], b["labels"], b["attention_mask"], reduction="sum").item()
                  for b in (plain, rounded)]
    # FP32_LOSS_TOLERANCE: the same arithmetic on a longer sequence (test_packing.py's derivation).
    assert abs(losses[0] - losses[1]) <= FP32_LOSS_TOLERANCE * abs(losses[1])


def _widths_and_losses(tmp_path, tok, pad_multiple):  # noqa: F811
    examples = doc_examples(tok)
    model = trainable_model(tok)
    widths = []
    # The trainer's chunked loss calls the decoder, not model.forward: watch the token embedding.
    model.get_input_embeddings().register_forward_pre_hook(lambda module, args: widths.append(args[0].shape[1]))
    result = Trainer(model, train_config(tmp_path, steps=6, pad_multiple=pad_multiple), examples,
                     pad_token_id=tok.pad_token_id).train()
    return set(widths), result.losses, max(len(e.input_ids) for e in examples)


def test_the_trainer_pads_to_few_shapes_with_the_same_losses(tmp_path, tok):  # noqa: F811
    free_widths, free_losses, longest = _widths_and_losses(tmp_path / "free", tok, pad_multiple=1)
    bucket_widths, bucket_losses, _ = _widths_and_losses(tmp_path / "bucketed", tok, pad_multiple=16)
    assert len(free_widths) >= 4          # the data really has many lengths
    assert all(w % 16 == 0 or w == longest for w in bucket_widths) and len(bucket_widths) < len(free_widths)
    assert max(bucket_widths) == longest   # rounding stops at the run's longest example
    # Same batches, same arithmetic on wider rows: fp32 losses agree (test_packing.py's derivation).
    torch.testing.assert_close(torch.tensor(bucket_losses), torch.tensor(free_losses), rtol=FP32_LOSS_TOLERANCE, atol=0)


def test_a_pad_multiple_below_one_is_refused(tmp_path):
    with pytest.raises(ValueError, match="pad_multiple"):
        train_config(tmp_path, pad_multiple=0)
