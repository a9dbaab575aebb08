"""Plan a run within a memory budget: the fastest micro-batch, accumulation and checkpointing that fit.

    plan = plan_run("path/to/model", budget=16 * 2**30, global_batch=16, quant=..., lora=..., seq_len=512)
    print(plan.table())

`search.py` finds the layouts that fit (with the estimator's process prediction), `timing.py`
times one block of the model on this machine to rank them, and `compiling.py` decides whether
the chosen layout compiles its blocks, from the run's length and the block timed compiled.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import torch
import transformers

from ..config import DEFAULT_CHUNK_TOKENS, LoraConfig, QuantConfig, parse_dtype
from ..memory.estimate import estimate_memory
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
from .timing import StepTimes, calibrate, time_compiled

__all__ = ["Candidate", "CompileChoice", "Layout", "RunPlan", "StepTimes", "calibrate", "plan_run"]


def plan_run(
    path_or_config: str | Path | transformers.PretrainedConfig,
    budget: int,
    global_batch: int,
    quant: QuantConfig,
    lora: LoraConfig,
    seq_len: int,
    device: str = "cpu",
    timed: bool = True,
    checkpointing: bool = True,
    progress: bool = True,
    chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
    steps: int | None = None,
    compile: bool | None = None,
    offload: bool | None = None,
    host_budget: int | None = None,
    **estimate_arguments,
) -> RunPlan:
    """The fastest layout of a run that fits `budget`, with the runner-up and every fitting candidate.

    Args:
        path_or_config: what `estimate_memory` takes (a model folder, config.json, .gguf or a config).
        budget: bytes the process may use (anonymous RSS on a CPU, what nvidia-smi shows on CUDA).
        global_batch: sequences per optimizer step; micro-batch x accumulation make it up.
        quant, lora, seq_len, device: the run's base, adapters, sequence length and device type.
        timed: rank by step times of timed blocks on this machine (False: by fewest recomputed
            blocks, then the largest micro-batch, the same on every process of a distributed run).
        checkpointing: False keeps every activation (only layouts without checkpointing are tried).
        progress: show a progress bar.
        chunk_tokens: the run's loss chunk (0: the model's own loss), for the timed blocks; pass the
            matching `loss_fn` among `estimate_arguments` for the memory side.
        steps: the run's optimizer steps, for deciding whether compiling pays back (None: unknown).
        compile: True / False: the run compiles its blocks or not, as asked. None: decide, when the run
            is timed and long enough that compiling could pay back, by timing the chosen layout's block
            compiled (the layout itself is chosen by eager timings; compiled memory is taken as eager's).
        offload: activation offloading (CUDA only): True: every layout offloads; False: none does;
            None: on CUDA both are candidates (offloading fits more in the GPU for host transfers, which
            the timed blocks price); on a CPU none.
        host_budget: host memory the offloaded activations may take (default: what the machine has
            available now).
        **estimate_arguments: the rest of `estimate_memory`'s arguments for the run (optimizer,
            dtype, loss_fn, packing, ...; not batch_size, grad_accum or the checkpointing ones).

    Raises:
        ValueError: nothing fits the budget.
    """
    from tqdm.auto import tqdm

    if global_batch < 1:
        raise ValueError(f"global_batch={global_batch} must be >= 1")
    if offload and device != "cuda":
        raise ValueError("activation offloading moves activations from a GPU to host memory; plan a CUDA run "
                         "for it, or drop --offload-activations")
    offload_choices = (offload,) if offload is not None else ((False, True) if device == "cuda" else (False,))
    config = load_config(path_or_config)
    layers = layer_count(config)
    if not layers:
        raise ValueError(f"{path_or_config}: its config names no decoder layer count (num_hidden_layers / n_layer)")
    bar = tqdm(desc="planning: estimating layouts", unit=" estimates", disable=not progress, leave=False)
    estimates = {}

    def estimate(layout: Layout):
        if layout not in estimates:
            estimates[layout] = estimate_memory(
                path_or_config, quant=quant, lora=lora, seq_len=seq_len, device=device,
                batch_size=layout.micro_batch, grad_accum=layout.grad_accum, gradient_checkpointing=layout.checkpointing,
                keep_blocks=layout.keep_blocks, keep_attention=layout.keep_attention,
                offload_activations=layout.offload, **estimate_arguments)
            bar.update(1)
        return estimates[layout]

    def process_bytes(layout: Layout) -> int:
        return estimate(layout).process_bytes

    def host_bytes(layout: Layout) -> int:
        return estimate(layout).host_offload_bytes

    def margin(layout: Layout) -> float:
        return estimate(layout).prediction_margin

    dtype = parse_dtype(estimate_arguments.get("dtype", torch.bfloat16), "dtype")
    run_shape = dict(device=device, dtype=dtype, autocast_dtype=None if dtype == torch.float32 else dtype,
                     chunk_tokens=chunk_tokens, progress=bar.set_description)
    try:
        host_room = host_budget if host_budget is not None or not max(offload_choices) else available_host_bytes()

        def search(choices: tuple[bool, ...]) -> list[Candidate]:
            # without checkpointing no checkpointed layout is tried: no attention choice to make under it
            return fitting_layouts(global_batch, layers, process_bytes, budget, margin,
                                   attention_choices=(False, True) if checkpointing else (),
                                   offload_choices=choices, host_bytes=host_bytes, host_budget=host_room)

        if not timed and offload_choices == (False, True):
            # untimed, an offloaded layout ranks after every other: search it only when nothing else fits
            candidates = search((False,)) or search((True,))
        else:
            candidates = search(offload_choices)
        if not candidates:
            raise ValueError(_nothing_fits(global_batch, checkpointing, budget, process_bytes, margin,
                                           max(offload_choices), host_bytes, host_room))
        times = None
        if timed and candidates:
            trainable = estimate(candidates[0].layout).trainable_parameters
            times = calibrate(config, quant, lora, seq_len, block_modes(candidates), trainable_parameters=trainable,
                              **run_shape)
        plan = choose(candidates, times, budget, global_batch * seq_len, layers)
        if compile is not None:
            choice = CompileChoice(compile, "asked for" if compile else "turned off")
        elif times is None:
            choice = CompileChoice(False, "not timed, so nothing shows it would pay back")
        else:
            choice = _compile_choice(plan.chosen, times, steps, config, quant, lora, seq_len, run_shape)
    finally:
        bar.close()
    return dataclasses.replace(plan, compile=choice)


def _nothing_fits(global_batch: int, checkpointing: bool, budget: int, process_bytes, margin,
                  offload: bool = False, host_bytes=None, host_room: int | None = None) -> str:
    """The error for a budget below every layout: it names the smallest budget that would do (or the host
    memory, when that is what the offloaded layouts lack)."""
    leanest = [Layout(1, global_batch, True, 0, keep, offload) for keep in (False, True)] if checkpointing else \
        [Layout(1, global_batch, False, offload=offload)]
    needed_mib = min(math.ceil(process_bytes(layout) * (1 + margin(layout)) / 2**20) for layout in leanest)
    if offload and host_room is not None and needed_mib * 2**20 <= budget:
        host_mib = min(math.ceil(host_bytes(layout) * PINNED_ROUNDING / 2**20) for layout in leanest)
        return (f"nothing fits: the GPU budget ({format_bytes(budget)}) would take one sequence per micro-batch with "
                f"activations offloaded, but the host has {format_bytes(host_room)} for them and that needs "
                f"{host_mib} MiB ({PINNED_ROUNDING}x the bytes offloaded, for the pinned allocator's rounding); "
                f"give --max-host-memory {host_mib}MiB or more, or lower --seq")
    what = ("every block checkpointed" if checkpointing else "no checkpointing (--no-checkpointing)") + \
        (" and activations offloaded" if offload else "")
    return (f"nothing fits a {format_bytes(budget)} budget: one sequence per micro-batch with {what} needs "
            f"{needed_mib} MiB (its predicted process peak plus the headroom for the prediction's error); "
            f"give --max-memory {needed_mib}MiB or more, or lower --seq")


def _compile_choice(chosen: Candidate, times: StepTimes, steps: int | None, config, quant, lora, seq_len,
                    run_shape: dict) -> CompileChoice:
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
    times.compiled = time_compiled(config, quant, lora, seq_len, layout.micro_batch, modes, **run_shape)
    compiled = times.step_seconds(layout.micro_batch, layout.grad_accum, layout.checkpointing, layout.keep_blocks,
                                  layout.keep_attention, compiled=True, offload=layout.offload)
    return decide(eager, compiled, times.compiled.compile_seconds, steps)
