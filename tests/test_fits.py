"""One meaning of "fits": `MemoryEstimate.fits`, `qlowrank estimate --gpu`, `train --dry-run --max-memory`, the
planner (`--batch auto`) and examples/will_it_fit.py give the same verdict on the same run, at every budget of a
grid around its boundary (the predicted process peak plus the headroom for the prediction's error)."""

from __future__ import annotations

import json

import pytest
from conftest import tiny_config
from test_examples import example

import qlowrank as ql
from qlowrank.cli import options
from qlowrank.cli.main import build_parser, main
from qlowrank.cli.train import resolve_options
from qlowrank.config import RunSpec, TrainConfig
from qlowrank.planner import plan
from qlowrank.train import Trainer

MIB = 2**20


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A 2-layer tiny Llama config on disk, and the flags and RunSpec of one run of it."""
    folder = tmp_path_factory.mktemp("fits")
    tiny_config("llama").save_pretrained(folder)
    flags = ["--model", str(folder), "--bits", "4", "--r", "8", "--alpha", "16", "--seq", "256", "--batch", "2",
             "--keep-attention", "off", "--device", "cpu"]
    spec = RunSpec(model=str(folder), quant=ql.QuantConfig(bits=4), lora=ql.LoraConfig(r=8, alpha=16), seq_len=256,
                   keep_attention=False, device="cpu", train=TrainConfig(batch_size=2))
    return flags, spec


def test_every_command_reads_the_flags_as_the_same_spec(run):
    flags, spec = run
    parser = build_parser()
    assert options.run_spec(resolve_options(parser.parse_args(["train", *flags]))) == spec
    assert options.run_spec(parser.parse_args(["estimate", *flags])) == spec


def _planner_fits(spec: RunSpec, budget: int) -> bool:
    """Whether `--batch auto` (the planner) finds the spec's micro-batch of 2 inside `budget`."""
    try:
        found = plan(spec, budget, global_batch=2, timed=False, progress=False)
    except ValueError:   # nothing fits, not even one sequence
        return False
    return any(c.layout.micro_batch == 2 for c in found.candidates)


def test_fits_means_one_thing_at_every_budget_around_the_boundary(run, capsys):
    flags, spec = run
    estimate = ql.estimate_memory(spec)
    need = estimate.required_bytes
    assert need > estimate.process_bytes   # the headroom is part of what has to fit
    grid = {need - MIB: False, need - 1: False, need: True, need + MIB: True}
    will_it_fit = example("will_it_fit")
    for budget, expected in grid.items():
        assert estimate.fits(budget) is expected, budget
        assert main(["estimate", *flags, "--gpu", f"{budget}B", "--json"]) == 0
        assert json.loads(capsys.readouterr().out)["fits"] is expected, budget
        assert main(["train", *flags, "--dry-run", "--max-memory", f"{budget}B"]) == 0
        printed = capsys.readouterr().out
        assert ("\nfits in --max-memory" in printed) is expected and ("does NOT fit" in printed) is not expected
        assert _planner_fits(spec, budget) is expected, budget
        assert will_it_fit.fits(spec, budget) is expected, budget


def test_the_trainer_lays_out_checkpointing_as_the_spec_says(tmp_path):
    """Trainer(model, spec) reads the spec: its loop, and its checkpointing unless the blocks have some already."""
    from conftest import doc_examples, tiny_tokenizer, train_config, trainable_model

    from qlowrank.model.checkpointing import CHECKPOINT
    from qlowrank.model.patches import patched_blocks

    tok = tiny_tokenizer()
    examples = doc_examples(tok, 4)
    for checkpointing, keep, expected in ((True, 0, 2), (True, 1, 1), (False, 0, 0)):
        model = trainable_model(tok)
        spec = RunSpec(train=train_config(tmp_path, steps=1), checkpointing=checkpointing, keep_blocks=keep,
                       device="cpu")
        trainer = Trainer(model, spec, examples)
        assert len(patched_blocks(model, CHECKPOINT)) == expected and trainer.config is spec.train
    model = trainable_model(tok, checkpointing=True)   # the user's own layout stays: all 2 blocks
    Trainer(model, RunSpec(train=train_config(tmp_path, steps=1), keep_blocks=1, device="cpu"), examples)
    assert len(patched_blocks(model, CHECKPOINT)) == 2
