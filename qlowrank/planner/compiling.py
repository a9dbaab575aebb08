"""Whether a run should compile its blocks: only when the steps it saves pay back the compile.

Regional torch.compile made steps 7-15% faster on a CPU (SmolLM2-135M 4.71 -> 4.00 s, a 554M
Llama 9.85 -> 9.13 s, 2026-11-29) after a one-off compile of ~16-38 s cold (benchmarks/RESULTS.md);
on 2026-12-07 a cold compile of SmolLM2-135M's block took 39 s without checkpointing and gained
~1%, and checkpointed blocks ran eagerly (benchmarks/compile_speed.json). So a 50-step demo loses time by compiling and a run of hours can
gain. The gain depends on the width, the layout and the machine, so it is timed
(`timing.time_compiled`, which runs `compile_blocks` as the run does), but only for runs long
enough that the largest gain ever measured could pay back the cheapest compile ever measured:
timing a compile costs about one compile.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

# The largest share of a step compiling saved here: 15% (SmolLM2-135M at 4 x 512), rounded up.
COMPILE_GAIN_CEILING = 0.20
# The cheapest cold compile of one block type measured here: 15.7 s (the 554M Llama), rounded down.
COMPILE_SECONDS_FLOOR = 15.0


@dataclass(frozen=True)
class CompileChoice:
    """Whether the run compiles, and why: its step time each way and the one-off cost."""

    enabled: bool
    reason: str
    eager_step: float | None = None      # predicted seconds per optimizer step, eager
    compiled_step: float | None = None   # the same, compiled
    compile_seconds: float | None = None
    steps: int | None = None

    def describe(self) -> str:
        return f"compile: {'yes' if self.enabled else 'no'} ({self.reason})"


def worth_timing(step_seconds: float, steps: int) -> bool:
    """Whether a run of `steps` steps of `step_seconds` could gain from compiling at all."""
    return steps * step_seconds * COMPILE_GAIN_CEILING > COMPILE_SECONDS_FLOOR


def decide(eager_step: float, compiled_step: float, compile_seconds: float, steps: int) -> CompileChoice:
    """Compile when `steps` steps save more than the compile costs; the reason says after how many steps it pays."""
    saving = eager_step - compiled_step
    timing = (f"{compiled_step:.3g} s/step compiled against {eager_step:.3g} eager, after a "
              f"{compile_seconds:.0f} s compile")
    if saving <= 0:
        return CompileChoice(False, f"{timing}: no faster here", eager_step, compiled_step, compile_seconds, steps)
    payback = math.ceil(compile_seconds / saving)
    enabled = steps > payback
    verdict = f"pays back after {payback} steps, the run has {steps}"
    return CompileChoice(enabled, f"{timing}; {verdict}", eager_step, compiled_step, compile_seconds, steps)
