"""The memory-budget planner: the fastest run that fits, over micro-batch, accumulation and checkpointing.

Given a budget and a global batch, every micro-batch that divides the global batch is a
candidate, with accumulation making up the rest. For each, the planner finds how much of the
model can keep its activations:

- the whole model (no checkpointing: the fastest), if that fits;
- otherwise, for the attention output kept and recomputed inside checkpointed blocks, the
  most trailing blocks kept whole (partial checkpointing). Memory grows with each kept block
  (offloaded, a kept block costs the GPU less than a recomputed one, but then no checkpointing,
  tried first, fits whenever every block checkpointed does), so the count is bisected between
  none kept and all, with exact estimates, starting where the chord between those two crosses
  the budget: at most 1 + log2(layers) estimates (each takes seconds at 8B), where stepping one
  block at a time from the chord took up to one per layer.

Every candidate's memory is the process model's prediction (`process_bytes`), required to fit
within the budget with the model's measured error on top (`prediction_margin`, which differs
between the regimes of the process model: heaps trimmed before the peak or not), by
`memory.estimator.fits_budget`, the test `MemoryEstimate.fits` makes too. Its time is the
calibrated step-time model (`timing.py`). The fastest candidate is chosen; the runner-up is
reported beside it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass

from ..config import RunSpec
from ..memory.estimator import fits_budget, required_bytes
from ..memory.report import format_bytes
from ..model.offload import PINNED_ROUNDING
from .compiling import CompileChoice
from .timing import KEEP_ATTENTION, OFFLOADED, PLAIN, RECOMPUTE, StepTimes


@dataclass(frozen=True)
class Layout:
    """How one run keeps its activations, and its batch shape."""

    micro_batch: int
    grad_accum: int
    checkpointing: bool
    keep_blocks: int = 0          # under checkpointing: trailing blocks not checkpointed
    keep_attention: bool = False  # under checkpointing: attention outputs kept, not recomputed
    offload: bool = False         # (CUDA) tensors saved for backward wait in host memory

    def describe(self, layers: int) -> str:
        offloaded = ", activations offloaded to host" if self.offload else ""
        if not self.checkpointing:
            return "no checkpointing" + offloaded
        kept = f"last {self.keep_blocks} of {layers} blocks kept" if self.keep_blocks else f"all {layers} blocks"
        return f"checkpointing ({kept}, attention {'kept' if self.keep_attention else 'recomputed'}){offloaded}"


@dataclass(frozen=True)
class Candidate:
    """A layout that fits, with its predicted process peak and step time."""

    layout: Layout
    process_bytes: int
    margin: float                  # the headroom kept above process_bytes (the prediction's measured error)
    step_seconds: float | None = None
    host_bytes: int = 0            # offloaded activations waiting in host memory, at most


@dataclass(frozen=True)
class RunPlan:
    """The planner's answer: the chosen layout, the runner-up, and every candidate it priced."""

    chosen: Candidate
    runner_up: Candidate | None
    candidates: tuple[Candidate, ...]
    budget: int
    layers: int
    tokens_per_step: int
    compile: CompileChoice | None = None   # set by plan
    spec: RunSpec | None = None            # the chosen run, set by plan

    def table(self) -> str:
        """Every candidate: layout, predicted process peak (with headroom) and time; the choice marked."""
        lines = [(f"plan for a {format_bytes(self.budget)} budget (each layout's process peak, plus headroom for its error, must fit), "
                  f"{self.tokens_per_step} tokens per optimizer step:"),
                 f"  {'':2} {'micro x accum':>13}  {'process peak':>12}  {'+headroom':>14}  {'s/step':>7}  {'tokens/s':>8}  layout"]
        for c in self.candidates:   # fastest first
            mark = "->" if c is self.chosen else ("2>" if c is self.runner_up else "")
            seconds = f"{c.step_seconds:7.2f}" if c.step_seconds is not None else f"{'?':>7}"
            rate = f"{self.tokens_per_step / c.step_seconds:8.0f}" if c.step_seconds else f"{'?':>8}"
            lines.append(f"  {mark:2} {c.layout.micro_batch:>5} x {c.layout.grad_accum:<5}  "
                         f"{format_bytes(c.process_bytes):>12}  "
                         f"{format_bytes(required_bytes(c.process_bytes, c.margin)) + f' ({c.margin:.0%})':>14}  "
                         f"{seconds}  {rate}  {c.layout.describe(self.layers)}"
                         + (f" ({format_bytes(c.host_bytes)} on the host)" if c.layout.offload else ""))
        if self.compile is not None:
            lines.append(f"  {self.compile.describe()}")
        return "\n".join(lines)


def divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def fitting_layouts(
    global_batch: int,
    layers: int,
    process_bytes: Callable[[Layout], int],
    budget: int,
    margin: float | Callable[[Layout], float],
    attention_choices: tuple[bool, ...] = (False, True),
    offload_choices: tuple[bool, ...] = (False,),
    host_bytes: Callable[[Layout], int] | None = None,
    host_budget: int | None = None,
) -> list[Candidate]:
    """For every micro-batch dividing `global_batch`: the layouts that keep the most activations
    and still fit `budget` with `margin` on top (one per attention choice; only "no checkpointing" where it fits),
    for each offload choice.

    Args:
        global_batch: sequences per optimizer step.
        layers: decoder blocks of the model.
        process_bytes: a layout's predicted process peak (the estimator's `process_bytes`).
        budget: bytes the process may use.
        margin: the prediction's relative error to keep free, or a layout's (the process model's
            error differs between its regimes).
        attention_choices: keep_attention values to consider under checkpointing (empty: no
            checkpointed layout, for a run that keeps every activation).
        offload_choices: activation offloading off / on (on only for CUDA runs; it fits more in the
            device's memory at the cost of host transfers, which the timed blocks price).
        host_bytes, host_budget: an offloading layout's host bytes (the estimator's `host_offload_bytes`),
            times PINNED_ROUNDING, must fit `host_budget` too (None: not checked).
    """
    margin_of = margin if callable(margin) else (lambda layout: margin)

    def priced(layout: Layout) -> Candidate:
        host = host_bytes(layout) if layout.offload and host_bytes is not None else 0
        return Candidate(layout, process_bytes(layout), margin_of(layout), host_bytes=host)

    def fits(candidate: Candidate) -> bool:
        host_fits = host_budget is None or candidate.host_bytes * PINNED_ROUNDING <= host_budget
        return fits_budget(candidate.process_bytes, candidate.margin, budget) and host_fits

    def at_micro_batch(micro: int, accum: int, offload: bool) -> list[Candidate]:
        whole = priced(Layout(micro, accum, checkpointing=False, offload=offload))
        if fits(whole) and not offload:
            return [whole]
        # every block recomputed: the leanest on the GPU and, offloaded, the fewest bytes to the host
        leanest = [c for c in (priced(Layout(micro, accum, True, 0, keep_attention, offload))
                               for keep_attention in attention_choices) if fits(c)]
        if fits(whole):
            return [whole] + leanest   # offloaded: the leanest are candidates too
        found = []
        for low in leanest:
            # The peak grows with each kept block: bisect between none kept (fits) and all (does not),
            # probing first where the chord between the two crosses the budget (usually at or next to it)
            usable = budget / (1 + max(low.margin, whole.margin))
            chord = int((usable - low.process_bytes) / max(1, whole.process_bytes - low.process_bytes) * layers)
            best, too_many = low, layers
            probe = min(layers - 1, max(1, chord))
            while best.layout.keep_blocks + 1 < too_many:
                candidate = priced(dataclasses.replace(low.layout, keep_blocks=probe))
                if fits(candidate):
                    best = candidate
                else:
                    too_many = probe
                probe = (best.layout.keep_blocks + too_many) // 2
            found.append(best)
        return found + [c for c in leanest if offload and c not in found]

    found = []
    for micro in divisors(global_batch):
        here = [c for offload in offload_choices for c in at_micro_batch(micro, global_batch // micro, offload)]
        if not here:
            break   # larger micro-batches need more
        found += here
    return found


def block_modes(candidates: list[Candidate]) -> dict[int, set[str]]:
    """Which block modes the step-time model must time at which micro-batch for these candidates."""
    modes: dict[int, set[str]] = {}
    for c in candidates:
        layout = c.layout
        needed = modes.setdefault(layout.micro_batch, set())
        suffix = OFFLOADED if layout.offload else ""
        if not layout.checkpointing or layout.keep_blocks:
            needed.add(PLAIN + suffix)
        if layout.checkpointing:
            needed.add((KEEP_ATTENTION if layout.keep_attention else RECOMPUTE) + suffix)
    return modes


def untimed_order(candidate: Candidate, layers: int) -> tuple[bool, int, int, int]:
    """Without timings: no offloading first (a GPU's host link moves bytes far slower than it computes),
    then the fewest bytes offloaded per optimizer step, then fewer recomputed blocks per step, then
    larger micro-batches (fewer dequantizations)."""
    layout = candidate.layout
    recomputed = 0 if not layout.checkpointing else (layers - layout.keep_blocks)
    return (layout.offload, candidate.host_bytes * layout.grad_accum, recomputed * layout.grad_accum,
            -layout.micro_batch)


def choose(candidates: list[Candidate], times: StepTimes | None, budget: int, tokens_per_step: int,
           layers: int) -> RunPlan:
    """The fastest candidate by the step-time model (None: by `untimed_order`), and the runner-up.

    Raises:
        ValueError: no candidate (nothing fits the budget).
    """
    if not candidates:
        raise ValueError(f"nothing fits a {format_bytes(budget)} budget (with the prediction's headroom), not even one "
                         "sequence per micro-batch with every block checkpointed; lower --seq or raise --max-memory")
    if times is None:
        ranked = sorted(candidates, key=lambda c: untimed_order(c, layers))
    else:
        ranked = sorted((dataclasses.replace(c, step_seconds=times.step_seconds(
                            c.layout.micro_batch, c.layout.grad_accum, c.layout.checkpointing, c.layout.keep_blocks,
                            c.layout.keep_attention, offload=c.layout.offload))
                         for c in candidates), key=lambda c: c.step_seconds)
    return RunPlan(chosen=ranked[0], runner_up=ranked[1] if len(ranked) > 1 else None, candidates=tuple(ranked),
                   budget=budget, layers=layers, tokens_per_step=tokens_per_step)
