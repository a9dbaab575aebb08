"""cli/options.py is the one translator: `train --dry-run`, `--batch auto` and `estimate` describe the run that trains."""

from __future__ import annotations

import re

import pytest
import torch

import qlowrank as ql
from qlowrank.cli import options
from qlowrank.cli.main import build_parser, main
from qlowrank.cli.train import resolve_options
from qlowrank.memory import format_bytes

VARIANT = ["--dora", "--init", "pissa", "--train-modules", "lm_head"]


def _library_estimate(model, **lora_fields):
    """What the library says for a train run with default flags plus `lora_fields`, at --batch 4 --seq 512."""
    quant = ql.QuantConfig(bits=4, quant_type="nf4", double_quant=True, compute_dtype=torch.bfloat16)
    lora = ql.LoraConfig(r=16, alpha=32, target_modules="all-linear", **lora_fields)
    return ql.estimate_memory(model, quant=quant, lora=lora, batch_size=4, seq_len=512, gradient_checkpointing=True,
                              optimizer="adamw", dtype=torch.bfloat16, device="cpu", chunked_loss=True)


def _printed(out: str) -> tuple[str, str]:
    """(tensor peak, trainable params) as `train --dry-run` printed them."""
    peak = re.search(r"^tensor peak:\s+(.+)$", out, flags=re.M).group(1).strip()
    trainable = re.search(r"trainable params\s+([\d,]+)", out).group(1)
    return peak, trainable


def test_dry_run_estimates_exactly_the_adapter_that_would_train(workdir, capsys):
    model = workdir / "model"
    assert main(["train", "--model", str(model), "--dry-run", "--seq", "512", *VARIANT]) == 0
    peak, trainable = _printed(capsys.readouterr().out)
    expected = _library_estimate(model, use_dora=True, init="pissa", modules_to_save=["lm_head"])
    assert (peak, trainable) == (format_bytes(expected.total_bytes), f"{expected.trainable_parameters:,}")
    # The variant matters: a plain adapter trains far fewer parameters (lm_head is 320 x 64
    # floats, DoRA adds a magnitude per output row), so dropping the flags would show here.
    plain = _library_estimate(model)
    assert expected.trainable_parameters > plain.trainable_parameters + 320 * 64


def test_estimate_accepts_the_flags_of_train_that_change_memory(workdir, capsys):
    model = workdir / "model"
    assert main(["train", "--model", str(model), "--dry-run", "--seq", "512", *VARIANT]) == 0
    from_train = _printed(capsys.readouterr().out)
    assert main(["estimate", "--model", str(model), "--device", "cpu", "--batch", "4", "--seq", "512", *VARIANT,
                 "--grad-accum", "4", "--packing", "--compile"]) == 0
    assert _printed(capsys.readouterr().out) == from_train


def test_one_translation_for_every_command():
    parser = build_parser()
    train = resolve_options(parser.parse_args(["train", "--model", "m", "--r", "8", "--targets", "q_proj,v_proj", *VARIANT]))
    estimate = parser.parse_args(["estimate", "--model", "m", "--lora-rank", "8", "--target", "q_proj,v_proj", *VARIANT])
    assert options.lora_config(train) == options.lora_config(estimate)
    assert options.lora_config(train).modules_to_save == ["lm_head"] and options.lora_config(train).use_dora
    assert options.quant_config(train) == options.quant_config(estimate)


def test_full_fine_tuning_is_for_estimates_of_a_float_base_only():
    parser = build_parser()
    float_base = parser.parse_args(["estimate", "--r", "0", "--bits", "none"])
    assert options.lora_config(float_base, allow_full=True) is None
    with pytest.raises(ValueError, match="needs --bits none"):
        options.lora_config(parser.parse_args(["estimate", "--r", "0"]), allow_full=True)
    with pytest.raises(ValueError):   # train never fully fine-tunes: r must be >= 1
        options.lora_config(resolve_options(parser.parse_args(["train", "--r", "0"])))
