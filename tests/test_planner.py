"""The memory-budget planner: layouts that fit, keep the most they can, and the fastest of them by timed blocks."""

from __future__ import annotations

import math
import re

import pytest
import torch
from conftest import tiny_config

import qlowrank as ql
from qlowrank.cli.main import main
from qlowrank.memory.process import prediction_margin
from qlowrank.model.compile import compiling_is_available
from qlowrank.config import RunSpec
from qlowrank.planner import Layout, plan as plan_spec
from qlowrank.planner.compiling import (
    COMPILE_GAIN_CEILING,
    COMPILE_SECONDS_FLOOR,
    decide,
    worth_timing,
)
from qlowrank.planner.search import fitting_layouts, untimed_order

QUANT = ql.QuantConfig(bits=4, compute_dtype=torch.bfloat16)
LORA = ql.LoraConfig(r=8, alpha=16)
SEQ = 256
GLOBAL_BATCH = 8
MARGIN = prediction_margin("cpu")


def config():
    """A 4-layer tiny Llama: 4 blocks to keep or recompute."""
    c = tiny_config("llama")
    c.num_hidden_layers, c.max_position_embeddings = 4, SEQ
    return c


def spec() -> RunSpec:
    """The run the planner lays out: 4-bit, r=8, SEQ tokens, on this CPU."""
    return RunSpec(model=config(), quant=QUANT, lora=LORA, seq_len=SEQ, device="cpu")


def process_bytes(layout: Layout) -> int:
    return ql.estimate_memory(config(), quant=QUANT, lora=LORA, seq_len=SEQ, device="cpu", batch_size=layout.micro_batch,
                              grad_accum=layout.grad_accum, gradient_checkpointing=layout.checkpointing,
                              keep_blocks=layout.keep_blocks, keep_attention=layout.keep_attention).process_bytes


def budget_between() -> int:
    """Halfway between every block checkpointed and none, at micro-batch 4 (with the headroom)."""
    low = process_bytes(Layout(4, 2, True, 0, False)) * (1 + MARGIN)
    high = process_bytes(Layout(4, 2, False)) * (1 + MARGIN)
    return int((low + high) / 2)


def test_every_layout_found_fits_and_keeps_as_many_blocks_as_fit():
    budget = budget_between()
    found = fitting_layouts(GLOBAL_BATCH, 4, process_bytes, budget, MARGIN)
    for candidate in found:
        layout = candidate.layout
        assert candidate.process_bytes == process_bytes(layout)
        assert candidate.process_bytes * (1 + candidate.margin) <= budget
        assert layout.micro_batch * layout.grad_accum == GLOBAL_BATCH
        if layout.checkpointing:   # no checkpointing would not fit, and neither would one more kept block
            whole = Layout(layout.micro_batch, layout.grad_accum, False)
            assert process_bytes(whole) * (1 + MARGIN) > budget
            if layout.keep_blocks + 1 < 4:
                more = Layout(layout.micro_batch, layout.grad_accum, True, layout.keep_blocks + 1, layout.keep_attention)
                assert process_bytes(more) * (1 + MARGIN) > budget
    # at micro-batch 4 the budget lies between none kept and all kept: a partial layout
    at_four = [c.layout for c in found if c.layout.micro_batch == 4]
    assert at_four and all(layout.checkpointing for layout in at_four)


def test_the_plan_is_the_fastest_candidate_by_its_timed_blocks():
    budget = budget_between()
    plan = plan_spec(spec(), budget, GLOBAL_BATCH, progress=False)
    assert len(plan.candidates) >= 2
    assert all(c.step_seconds and c.step_seconds > 0 for c in plan.candidates)
    assert plan.chosen.step_seconds == min(c.step_seconds for c in plan.candidates)
    assert plan.runner_up is not None and plan.runner_up.step_seconds >= plan.chosen.step_seconds
    table = plan.table()
    assert "->" in table and "2>" in table and "tokens/s" in table


def test_nothing_fits_names_the_smallest_budget_that_would():
    with pytest.raises(ValueError, match="nothing fits .* give --max-memory (\\d+)MiB or more, or lower --seq") as error:
        plan_spec(spec(), 2**20, GLOBAL_BATCH, progress=False, timed=False)
    named = int(re.search(r"give --max-memory (\d+)MiB", str(error.value)).group(1)) * 2**20
    leanest = min(process_bytes(Layout(1, GLOBAL_BATCH, True, 0, keep)) for keep in (False, True))
    assert named >= leanest * (1 + MARGIN) > named - 2**20   # the leanest layout with its headroom, rounded up
    plan = plan_spec(spec(), named, GLOBAL_BATCH, progress=False, timed=False)
    assert plan.chosen.layout.micro_batch == 1   # and at that budget it does fit
    with pytest.raises(ValueError, match="nothing fits"):
        plan_spec(spec(), named - 2**20, GLOBAL_BATCH, progress=False, timed=False)


def test_estimate_plan_prints_the_flags_of_the_chosen_layout(tmp_path, capsys):
    config().save_pretrained(tmp_path)
    budget = budget_between()
    code = main(["estimate", "--plan", "--model", str(tmp_path), "--bits", "4", "--r", "8", "--seq", str(SEQ),
                 "--global-batch", str(GLOBAL_BATCH), "--max-memory", str(budget), "--device", "cpu", "--no-progress"])
    out = capsys.readouterr().out
    assert code == 0
    assert "chosen: --batch" in out and "plan for a" in out


def test_without_timings_every_process_ranks_alike_by_recompute_then_micro_batch():
    """What ranks use under torchrun: no timed blocks, so the order cannot differ between processes."""
    plan = plan_spec(spec(), budget_between(), GLOBAL_BATCH, timed=False, progress=False)
    assert all(c.step_seconds is None for c in plan.candidates)
    order = [untimed_order(c, 4) for c in plan.candidates]
    assert order == sorted(order) and plan.chosen is plan.candidates[0]
    assert "?" in plan.table()


def test_compiling_is_chosen_only_when_the_saved_steps_pay_the_compile_back():
    # 1 s saved a step against a 30 s compile: pays back after 30 steps
    assert not decide(10.0, 9.0, 30.0, steps=30).enabled
    choice = decide(10.0, 9.0, 30.0, steps=31)
    assert choice.enabled and "pays back after 30 steps" in choice.reason
    assert not decide(10.0, 10.5, 30.0, steps=10**6).enabled   # slower compiled: never
    # whether timing a compile is worth its own cost: the largest gain ever measured must beat the cheapest compile
    assert worth_timing(1.0, steps=int(COMPILE_SECONDS_FLOOR / COMPILE_GAIN_CEILING) + 1)
    assert not worth_timing(1.0, steps=int(COMPILE_SECONDS_FLOOR / COMPILE_GAIN_CEILING) - 1)


def test_a_short_run_is_not_compiled_and_no_compile_is_timed():
    plan = plan_spec(spec(), budget_between(), GLOBAL_BATCH, progress=False, steps=2)
    assert not plan.compile.enabled and "could save at most" in plan.compile.reason
    assert plan.compile.compiled_step is None   # nothing was compiled to find out
    assert "compile: no" in plan.table()
    unknown = plan_spec(spec(), budget_between(), GLOBAL_BATCH, progress=False)
    assert not unknown.compile.enabled and "length is unknown" in unknown.compile.reason
    asked = plan_spec(spec(), budget_between(), GLOBAL_BATCH, progress=False,
                     timed=False, compile=True)
    assert asked.compile.enabled and asked.compile.reason == "asked for"


@pytest.mark.skipif(not compiling_is_available(), reason="inductor needs a C++ compiler")
def test_a_long_run_times_the_chosen_block_compiled_and_decides_by_payback():
    """The one compile of the suite (~20 s on 2 cores): the chosen layout's block, compiled, timed."""
    steps = 10**7   # so long that any gain pays back
    plan = plan_spec(spec(), budget_between(), GLOBAL_BATCH, progress=False,
                    steps=steps)
    choice = plan.compile
    assert choice.compiled_step is not None and choice.compiled_step > 0
    assert choice.eager_step == plan.chosen.step_seconds
    assert choice.compile_seconds > 0   # the first compiled call costs more than the next
    assert choice.enabled == (choice.compiled_step < choice.eager_step)
    assert choice == decide(choice.eager_step, choice.compiled_step, choice.compile_seconds, steps)


def test_train_plans_for_the_steps_its_data_makes():
    """`train --batch auto` decides compiling for the run's length: --steps, else --epochs over the data."""
    from argparse import Namespace

    from qlowrank.cli.train import planned_steps

    args = Namespace(steps=None, epochs=2.0, global_batch=8, grad_accum=1)
    assert planned_steps(args, sequences=100, world=1) == 25      # ceil(2 x 100 / 8)
    assert planned_steps(args, sequences=100, world=2) == 13      # 16 sequences a step over both processes
    args.global_batch = None                                      # default: 4 x --grad-accum
    assert planned_steps(args, sequences=100, world=1) == 50
    args.steps = 7
    assert planned_steps(args, sequences=100, world=1) == 7


def test_each_layout_keeps_the_headroom_of_its_own_regime():
    """The process model's error differs between its regimes (heaps trimmed before the peak or not), so
    the search prices each layout with its own margin: a small one admits a layout a large one would not."""
    def small_when_all_checkpointed(layout: Layout) -> float:
        return 0.0 if layout.checkpointing and not layout.keep_blocks else 0.5

    budget = process_bytes(Layout(4, 2, True, 0, False))   # exactly the all-checkpointed peak at micro-batch 4
    found = fitting_layouts(GLOBAL_BATCH, 4, process_bytes, budget, small_when_all_checkpointed)
    assert any(c.layout.micro_batch == 4 and c.margin == 0.0 for c in found)
    for candidate in found:
        assert candidate.margin == small_when_all_checkpointed(candidate.layout)
        assert candidate.process_bytes * (1 + candidate.margin) <= budget
    assert not any(c.layout.micro_batch == 4 for c in fitting_layouts(GLOBAL_BATCH, 4, process_bytes, budget, 0.5))


def test_the_kept_block_count_is_the_largest_that_fits_found_in_few_estimates():
    """The search over kept blocks on a 32-layer model whose peak grows unevenly with each kept block (as a
    forward-end peak overtakes a recompute peak): against brute force, at every budget between the extremes."""
    layers, step = 32, 2**20
    growth = [0] * 8 + [3] * 12 + [1] * 12   # per kept block, in MiB: flat, steep, shallow

    def peak(layout: Layout) -> int:
        if not layout.checkpointing:
            return (100 + sum(growth) + 50) * step
        return (100 + sum(growth[:layout.keep_blocks]) + (5 if layout.keep_attention else 0)) * step

    for budget_mib in range(100, 100 + sum(growth) + 50, 3):
        probed = []

        def counted(layout: Layout) -> int:
            probed.append(layout)
            return peak(layout)

        found = fitting_layouts(1, layers, counted, budget_mib * step, 0.0, attention_choices=(False,))
        fitting = [k for k in range(layers) if peak(Layout(1, 1, True, k)) <= budget_mib * step]
        assert [c.layout.keep_blocks for c in found] == [max(fitting)], budget_mib
        assert len(probed) <= 3 + math.ceil(math.log2(layers))   # whole, none kept, then the bisection
