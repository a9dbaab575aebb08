"""Plan a run within a memory budget: the fastest micro-batch, accumulation and checkpointing that fit.

    plan = plan_run(RunSpec(model="path/to/model", seq_len=512), budget=16 * 2**30, global_batch=16)
    print(plan.table())
    trainer = Trainer(model, plan.spec, ...)     # the chosen run, as a spec

`search.py` finds the layouts that fit (with the estimator's process prediction and its margin:
`MemoryEstimate.fits`), `timing.py` times one block of the model on this machine to rank them, and
`compiling.py` decides whether the chosen layout compiles its blocks, from the run's length and the
block timed compiled.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

from ..config import RunSpec, spec_from_keywords
from ..memory.estimator import MemoryEstimate, estimate_memory
from ..memory.meta_model import layer_count, load_config
from ..memory.report import format_bytes
from ..memory.sampler import available_host_bytes
from ..model.compile import compiling_is_available
from ..model.offload import PINNED_ROUNDING
from .compiling import (
    COMPILE_GAIN_CEILING,
    COMPILE_SECONDS_FLOOR,
    CompileChoice,
    decide,
    worth_timing,
)
from .search import Candidate, Layout, RunPlan, block_modes, choose, fitting_layouts
from .timing import StepTimes, time_blocks, time_compiled

__all__ = ["Candidate", "CompileChoice", "Layout", "RunPlan", "StepTimes", "plan_run", "time_blocks"]

# plan_run's own options; its other keywords describe the run (estimate_memory's names)
_PLANNER_OPTIONS = ("global_batch", "timed", "progress", "steps", "compile", "offload", "host_budget")


def plan_run(run: RunSpec | object, budget: int, global_batch: int | None = None, **keywords) -> RunPlan:
    """The fastest layout of a run that fits `budget`, with the runner-up and every fitting candidate.

    Args:
        run: the run (`RunSpec`; its micro-batch, accumulation, checkpointing and offloading are what the
            planner chooses), or its model with the rest of the run as keywords (estimate_memory's names).
        budget: bytes the process may use (anonymous RSS on a CPU, what nvidia-smi shows on CUDA).
        global_batch: examples per optimizer step and process; micro-batch x accumulation make it up
            (default: the spec's micro-batch x accumulation).
        **keywords: the planner's options, as for `plan`, and (for a model) the run's fields.

    Returns:
        A RunPlan; `plan.spec` is the chosen run.

    Raises:
        ValueError: nothing fits the budget.
    """
    options = {k: keywords.pop(k) for k in _PLANNER_OPTIONS if k in keywords}
    options["global_batch"] = global_batch or options.get("global_batch")
    if isinstance(run, RunSpec):
        spec = spec_from_keywords(run.model, base=run, **keywords) if keywords else run
    else:
        spec = spec_from_keywords(run, base=RunSpec(device="cpu"), **keywords)
    return plan(spec, budget, **options)


def plan(
    spec: RunSpec,
    budget: int,
    global_batch: int | None = None,
    steps: int | None = None,
    compile: bool | None = None,
    offload: bool | None = None,
    timed: bool = True,
    progress: bool = True,
    host_budget: int | None = None,
) -> RunPlan:
    """The fastest layout of `spec` that fits `budget`; `RunPlan.spec` is `spec` with the chosen layout.

    Args:
        spec: the run. The planner chooses its micro-batch, accumulation, checkpointing (kept blocks
            and attention) and offloading; `spec.checkpointing=False` tries only layouts without it.
        budget: bytes the process may use (anonymous RSS on a CPU, what nvidia-smi shows on CUDA).
        global_batch: examples per optimizer step and process (default: the spec's batch x accumulation).
        steps: the run's optimizer steps, for deciding whether compiling pays back (None: unknown).
        compile: True / False: the run compiles its blocks or not, as asked. None: decide, when the run
            is timed and long enough that compiling could pay back, by timing the chosen layout's block
            compiled (the layout itself is chosen by eager timings; compiled memory is taken as eager's).
        offload: activation offloading (CUDA only): True: every layout offloads; False: none does;
            None: on CUDA both are candidates (offloading fits more in the GPU for host transfers, which
            the timed blocks price); on a CPU none.
        timed: rank by step times of timed blocks on this machine (False: by fewest recomputed
            blocks, then the largest micro-batch, the same on every process of a distributed run).
        progress: show a progress bar.
        host_budget: host memory the offloaded activations may take (default: what the machine has
            available now).

    Raises:
        ValueError: nothing fits the budget, or offloading asked for a run off CUDA.
    """
    from tqdm.auto import tqdm

    global_batch = global_batch or spec.train.batch_size * spec.train.grad_accum
    if global_batch < 1:
        raise ValueError(f"global_batch={global_batch} must be >= 1")
    if offload:
        spec.with_train(offload_activations=True)   # refuses offloading off CUDA, with the reason
    cuda = spec.device_type == "cuda"
    offload_choices = (offload,) if offload is not None else ((False, True) if cuda else (False,))
    config = load_config(spec.model)
    layers = layer_count(config)
    if not layers:
        raise ValueError(f"{spec.model}: its config names no decoder layer count (num_hidden_layers / n_layer)")
    bar = tqdm(desc="planning: estimating layouts", unit=" estimates", disable=not progress, leave=False)
    try:
        estimate = _estimates(spec, bar)
        host_room = host_budget if host_budget is not None or not max(offload_choices) else available_host_bytes()
        candidates = _search(estimate, spec, layers, budget, global_batch, offload_choices, timed, host_room)
        times = None
        if timed:
            trainable = estimate(candidates[0].layout).trainable_parameters
            times = time_blocks(config, spec, block_modes(candidates), trainable_parameters=trainable,
                                progress=bar.set_description)
        chosen = choose(candidates, times, budget, global_batch * spec.seq_len, layers)
        if compile is not None:
            choice = CompileChoice(compile, "asked for" if compile else "turned off")
        elif times is None:
            choice = CompileChoice(False, "not timed, so nothing shows it would pay back")
        else:
            choice = _compile_choice(chosen.chosen, times, steps, config, spec, bar.set_description)
    finally:
        bar.close()
    layout = chosen.chosen.layout
    return dataclasses.replace(chosen, compile=choice,
                               spec=with_layout(spec, layout).with_train(compile=choice.enabled))


def _estimates(spec: RunSpec, bar) -> Callable[[Layout], MemoryEstimate]:
    """A layout's estimate (each simulated once), counted on the progress bar."""
    estimates: dict[Layout, MemoryEstimate] = {}

    def estimate(layout: Layout) -> MemoryEstimate:
        if layout not in estimates:
            estimates[layout] = estimate_memory(with_layout(spec, layout))
            bar.update(1)
        return estimates[layout]
    return estimate


def _search(estimate, spec: RunSpec, layers: int, budget: int, global_batch: int, offload_choices: tuple[bool, ...],
            timed: bool, host_room: int | None) -> list[Candidate]:
    """The layouts that fit (fitting_layouts over the estimates); ValueError naming what would fit when none does."""
    def search(choices: tuple[bool, ...]) -> list[Candidate]:
        # without checkpointing no checkpointed layout is tried: no attention choice to make under it
        return fitting_layouts(global_batch, layers, lambda layout: estimate(layout).process_bytes, budget,
                               lambda layout: estimate(layout).prediction_margin,
                               attention_choices=(False, True) if spec.checkpointing else (),
                               offload_choices=choices, host_bytes=lambda layout: estimate(layout).host_offload_bytes,
                               host_budget=host_room)

    if not timed and offload_choices == (False, True):
        # untimed, an offloaded layout ranks after every other: search it only when nothing else fits
        candidates = search((False,)) or search((True,))
    else:
        candidates = search(offload_choices)
    if not candidates:
        raise ValueError(_nothing_fits(global_batch, spec.checkpointing, budget, estimate, max(offload_choices),
                                       host_room))
    return candidates


def with_layout(spec: RunSpec, layout: Layout) -> RunSpec:
    """`spec` with a layout's micro-batch, accumulation, checkpointing and offloading."""
    changed = dataclasses.replace(spec, checkpointing=layout.checkpointing,
                                  keep_blocks=layout.keep_blocks if layout.checkpointing else 0,
                                  keep_attention=layout.keep_attention if layout.checkpointing else None)
    return changed.with_train(batch_size=layout.micro_batch, grad_accum=layout.grad_accum,
                              offload_activations=layout.offload)


def _nothing_fits(global_batch: int, checkpointing: bool, budget: int, estimate, offload: bool = False,
                  host_room: int | None = None) -> str:
    """The error for a budget below every layout: it names the smallest budget that would do (or the host
    memory, when that is what the offloaded layouts lack)."""
    leanest = [Layout(1, global_batch, True, 0, keep, offload) for keep in (False, True)] if checkpointing else \
        [Layout(1, global_batch, False, offload=offload)]
    needed_mib = min(math.ceil(estimate(layout).required_bytes / 2**20) for layout in leanest)
    if offload and host_room is not None and needed_mib * 2**20 <= budget:
        host_mib = min(math.ceil(estimate(layout).host_offload_bytes * PINNED_ROUNDING / 2**20) for layout in leanest)
        return (f"nothing fits: the GPU budget ({format_bytes(budget)}) would take one sequence per micro-batch with "
                f"activations offloaded, but the host has {format_bytes(host_room)} for them and that needs "
                f"{host_mib} MiB ({PINNED_ROUNDING}x the bytes offloaded, for the pinned allocator's rounding); "
                f"give --max-host-memory {host_mib}MiB or more, or lower --seq")
    what = ("every block checkpointed" if checkpointing else "no checkpointing (--no-checkpointing)") + \
        (" and activations offloaded" if offload else "")
    return (f"nothing fits a {format_bytes(budget)} budget: one sequence per micro-batch with {what} needs "
            f"{needed_mib} MiB (its predicted process peak plus the headroom for the prediction's error); "
            f"give --max-memory {needed_mib}MiB or more, or lower --seq")


def _compile_choice(chosen: Candidate, times: StepTimes, steps: int | None, config, spec: RunSpec,
                    progress) -> CompileChoice:
    """Time the chosen layout's block compiled, when the run is long enough that it could pay back."""
    eager = chosen.step_seconds
    if steps is None:
        return CompileChoice(False, "the run's length is unknown (give its steps)", eager_step=eager)
    if not worth_timing(eager, steps):
        return CompileChoice(False, f"{steps} steps of {eager:.3g} s could save at most {COMPILE_GAIN_CEILING:.0%}, "
                             f"less than a compile takes (>= {COMPILE_SECONDS_FLOOR:.0f} s)", eager_step=eager,
                             steps=steps)
    if not compiling_is_available():
        return CompileChoice(False, "inductor finds no compiler here", eager_step=eager, steps=steps)
    layout = chosen.layout
    modes = block_modes([chosen])[layout.micro_batch]
    times.compiled = time_compiled(config, spec, layout.micro_batch, modes, progress=progress)
    compiled = times.step_seconds(layout.micro_batch, layout.grad_accum, layout.checkpointing, layout.keep_blocks,
                                  layout.keep_attention, compiled=True, offload=layout.offload)
    return decide(eager, compiled, times.compiled.compile_seconds, steps)
