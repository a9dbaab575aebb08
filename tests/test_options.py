"""cli/options.py is the one translator: `train --dry-run`, `--batch auto`, `estimate` and `profile` describe the run that trains."""

from __future__ import annotations

import json
import re

import pytest
import torch
from conftest import planned_flags

import qlowrank as ql
from qlowrank.cli import options
from qlowrank.cli.main import build_parser, main
from qlowrank.cli.train import resolve_options
from qlowrank.memory import format_bytes
from qlowrank.model.embedded import smollm2_gguf

VARIANT = ["--dora", "--init", "pissa", "--train-modules", "lm_head"]
# Flags of `train` that change memory beyond the adapter: accumulation keeps every LoRA gradient
# alive across micro-batches, packing adds a block-diagonal mask (memory/estimator.py).
STEP = ["--grad-accum", "4", "--packing"]


def _library_estimate(model, batch=4, seq=512, step=None, **lora_fields):
    """What the library says for a train run with default flags plus `lora_fields` and `step` (estimate_memory's
    grad_accum / packing), at --batch `batch` --seq `seq`."""
    quant = ql.QuantConfig(bits=4, quant_type="nf4", double_quant=True, compute_dtype=torch.bfloat16)
    lora = ql.LoraConfig(r=16, alpha=32, target_modules="all-linear", **lora_fields)
    return ql.estimate_memory(model, quant=quant, lora=lora, batch_size=batch, seq_len=seq, optimizer="adamw",
                              dtype=torch.bfloat16, device="cpu", chunked_loss=True,
                              **{"gradient_checkpointing": True, **(step or {})})


def _printed(out: str) -> tuple[str, str, str]:
    """(tensor peak, process peak, trainable params) as `train --dry-run` and `estimate` print them."""
    peak = re.search(r"^tensor peak:\s+(\S+ \S+)", out, flags=re.MULTILINE).group(1)
    process = re.search(r"^process peak:\s+(\S+ \S+)", out, flags=re.MULTILINE).group(1)
    trainable = re.search(r"trainable params\s+([\d,]+)", out).group(1)
    return peak, process, trainable


def _figures(estimate) -> tuple[str, str, str]:
    return format_bytes(estimate.total_bytes), format_bytes(estimate.process_bytes), f"{estimate.trainable_parameters:,}"


def test_dry_run_estimates_exactly_the_adapter_that_would_train(workdir, capsys):
    model = workdir / "model"
    assert main(["train", "--model", str(model), "--dry-run", "--seq", "512", *VARIANT]) == 0
    expected = _library_estimate(model, use_dora=True, init="pissa", modules_to_save=["lm_head"])
    assert _printed(capsys.readouterr().out) == _figures(expected)
    # The variant matters: a plain adapter trains far fewer parameters (lm_head is 320 x 64
    # floats, DoRA adds a magnitude per output row), so dropping the flags would show here.
    plain = _library_estimate(model)
    assert expected.trainable_parameters > plain.trainable_parameters + 320 * 64


def test_estimate_dry_run_and_batch_auto_show_the_same_figures_for_the_same_flags(workdir, capsys):
    model = workdir / "model"
    expected = _library_estimate(model, step={"grad_accum": 4, "packing": True},
                                 use_dora=True, init="pissa", modules_to_save=["lm_head"])
    # --grad-accum and --packing reach the estimate: without them the library says otherwise.
    assert expected.total_bytes != _library_estimate(model, use_dora=True, init="pissa",
                                                     modules_to_save=["lm_head"]).total_bytes

    assert main(["train", "--model", str(model), "--dry-run", "--batch", "4", "--seq", "512", *VARIANT, *STEP]) == 0
    assert _printed(capsys.readouterr().out) == _figures(expected)
    estimate = ["estimate", "--model", str(model), "--device", "cpu", "--batch", "4", "--seq", "512", *VARIANT, *STEP,
                "--compile"]
    assert main(estimate) == 0
    assert _printed(capsys.readouterr().out) == _figures(expected)
    assert main([*estimate, "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert (result["total_bytes"], result["process_bytes"]) == (expected.total_bytes, expected.process_bytes)
    assert (result["settings"]["grad_accum"], result["settings"]["packing"]) == (4, True)

    # --batch auto with room for the whole global batch of 16 (4 x --grad-accum 4) in one micro-batch...
    assert main(["train", "--model", str(model), "--dry-run", "--batch", "auto", "--max-memory", "1000GiB", "--seq", "512",
                 *VARIANT, *STEP]) == 0
    out = capsys.readouterr().out
    # ...plans a layout (the fastest by timed blocks: which one depends on this machine), and the
    # dry-run's figures are the library's for exactly that layout, adapter variants included
    flags = planned_flags(out)
    micro, accum = int(flags[1]), int(flags[3])
    layout = ({"gradient_checkpointing": False} if "--no-checkpointing" in flags else
              {"keep_blocks": int(flags[5]), "keep_attention": flags[7] == "on"})
    chosen = _library_estimate(model, batch=micro, step={"grad_accum": accum, "packing": True, **layout},
                               use_dora=True, init="pissa", modules_to_save=["lm_head"])
    assert micro * accum == 16
    assert re.search(r"predicted process peak (\S+ \S+)", out).group(1) == format_bytes(chosen.process_bytes)
    assert _printed(out) == _figures(chosen)


def test_profile_reports_the_estimate_of_the_same_flags(workdir, tmp_path, capsys):
    flags = ["--model", str(workdir / "model"), "--device", "cpu", "--batch", "2", "--seq", "64", *VARIANT,
             "--grad-accum", "2", "--chunk-tokens", "32"]
    assert main(["estimate", *flags]) == 0
    tensor_peak = _printed(capsys.readouterr().out)[0]
    assert main(["profile", *flags, "--steps", "2", "--out", str(tmp_path / "profile")]) == 0
    reported = re.search(r"estimate_memory for the same settings: (\S+ \S+)", capsys.readouterr().out).group(1)
    assert reported == tensor_peak


def test_profile_refuses_packing_it_would_not_measure(workdir, tmp_path, capsys):
    assert main(["profile", "--model", str(workdir / "model"), "--device", "cpu", "--packing",
                 "--out", str(tmp_path / "p")]) == 2
    assert "--packing would not be measured" in capsys.readouterr().err


def test_one_translation_for_every_command():
    parser = build_parser()
    train = resolve_options(parser.parse_args(["train", "--model", "m", "--r", "8", "--targets", "q_proj,v_proj", *VARIANT]))
    estimate = parser.parse_args(["estimate", "--model", "m", "--lora-rank", "8", "--target", "q_proj,v_proj", *VARIANT])
    assert options.lora_config(train) == options.lora_config(estimate)
    assert options.lora_config(train).modules_to_save == ["lm_head"] and options.lora_config(train).use_dora
    assert options.quant_config(train) == options.quant_config(estimate)


def test_config_file_values_sit_under_the_flags(tmp_path):
    config = tmp_path / "run.toml"
    config.write_text('r = 4\nseq = 96\ntrain-modules = "lm_head"\ndora = true\n')
    parser = build_parser()
    args = resolve_options(parser.parse_args(["train", "--config", str(config), "--seq", "128"]))
    lora = options.lora_config(args)
    assert (lora.r, lora.alpha, lora.use_dora, lora.modules_to_save, args.seq) == (4, 8, True, ["lm_head"], 128)
    config.write_text("r = 4.5\n")
    with pytest.raises(ValueError, match="option 'r' is 4.5; it must be an integer"):
        resolve_options(parser.parse_args(["train", "--config", str(config)]))


def test_full_fine_tuning_is_for_estimates_of_a_float_base_only():
    parser = build_parser()
    float_base = parser.parse_args(["estimate", "--r", "0", "--bits", "none"])
    assert options.lora_config(float_base, allow_full=True) is None
    with pytest.raises(ValueError, match="needs --bits none"):
        options.lora_config(parser.parse_args(["estimate", "--r", "0"]), allow_full=True)
    with pytest.raises(ValueError):   # train never fully fine-tunes: r must be >= 1
        options.lora_config(resolve_options(parser.parse_args(["train", "--r", "0"])))


def test_estimate_needs_a_model_imitates_trains_device_and_refuses_fp16_on_a_cpu(capsys):
    """No silent substitutions: a missing --model is an error, the device default is train's, fp16 on a CPU is refused."""
    assert main(["estimate", "--seq", "32"]) == 2
    assert "qlowrank estimate needs --model" in capsys.readouterr().err
    model = str(smollm2_gguf())
    assert main(["estimate", "--model", model, "--seq", "32", "--json"]) == 0
    here = "cuda" if torch.cuda.is_available() else "cpu"   # train's default: cuda when present
    assert json.loads(capsys.readouterr().out)["settings"]["device"] == here
    assert main(["estimate", "--model", model, "--seq", "32", "--dtype", "fp16", "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == ("qlowrank estimate: error: --dtype fp16: fp16 compute is refused on a CPU; use bf16 (or fp32), "
                       "or --device cuda")
    assert main(["estimate", "--model", model, "--seq", "32", "--dtype", "fp16", "--device", "cuda", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["settings"]["dtype"] == "float16"   # estimated as asked, not as bf16
