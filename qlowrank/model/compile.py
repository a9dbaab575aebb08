"""Regional torch.compile: compile each repeated block of a model, not the whole model.

One block type compiles once and serves every layer, so compile time does not grow with
depth; the embedding, the loss and bitsandbytes' kernels stay eager. What pays on a CPU is
inductor fusing a block's elementwise work (norms, rotary, activation, residuals), which
eager bf16 runs as dozens of separate passes over memory.

With gradient checkpointing the compile wraps the checkpoint (`model.patches.WRAP_ORDER`), where
dynamo breaks the graph and the blocks run eagerly; compiled inside the checkpoint they run compiled
but were slower on 2 shared CPU cores (benchmarks/RESULTS.md, "Regional compile under
checkpointing"). Without checkpointing the blocks compile (SmolLM2-135M at 4 x 512: 6.23 -> 6.15 s
a step after a cold compile of 39 s). The compile outweighs any gain in a short run, so it is
opt-in: `TrainConfig(compile=True)`, `qlowrank train --compile`, `qlowrank demo --compile`.
"""

from __future__ import annotations

import functools
from typing import Sequence

import torch
from torch import nn
from torch.utils._python_dispatch import _get_current_dispatch_mode

from .structure import repeated_blocks
from .patches import patched_blocks, unwrap_forward, wrap_forward

COMPILE = "compile"   # its name among a block's patches (model.patches)


def _eager_under_dispatch_modes(eager, compiled):
    # MemoryProfiler and the estimator watch every op through a TorchDispatchMode, which a
    # compiled graph hides; and a compiled function first called under such a mode is never
    # compiled afterwards (dynamo skips its code for good). So under a mode, run eagerly.
    @functools.wraps(eager)
    def forward(*args, **kwargs):
        if _get_current_dispatch_mode() is not None:
            return eager(*args, **kwargs)
        return compiled(*args, **kwargs)
    return forward


def compile_blocks(model: nn.Module, block_types: type | Sequence[type] | None = None, dynamic: bool | None = True) -> int:
    """Compile every repeated block of `model` in place with torch.compile (inductor).

    The compile wraps a block's checkpoint wrapper (`enable_gradient_checkpointing`, before or
    after this; `model.patches.WRAP_ORDER` says why and what dynamo makes of it today);
    `uncompile_blocks` takes the compile off again and leaves the other patches (`model.patches`).
    Under a TorchDispatchMode (MemoryProfiler, estimate_memory) the blocks run eagerly, so
    memory is still measured op by op.

    Args:
        model: a transformers model (blocks from `_no_split_modules`) or any nn.Module.
        block_types: the block class(es) to compile; default: the transformers blocks.
        dynamic: torch.compile's `dynamic`. True (default) compiles shape-generic code at
            once, so batches of varying length reuse one compile (None: the first shape
            exactly, then a second, generic compile at the next shape).

    Returns:
        The number of blocks compiled.
    """
    blocks = repeated_blocks(model, block_types, what="compile_blocks")
    for block in blocks:
        wrap_forward(model, block, COMPILE, functools.partial(_compiled, dynamic=dynamic))
    return len(blocks)


def uncompile_blocks(model: nn.Module) -> int:
    """Undo `compile_blocks`: the blocks run eagerly again; returns how many were compiled."""
    return sum(unwrap_forward(model, block, COMPILE) for block in patched_blocks(model, COMPILE))


def _compiled(eager, dynamic: bool | None):
    return _eager_under_dispatch_modes(eager, torch.compile(eager, dynamic=dynamic))


def compiling_is_available() -> bool:
    """Whether inductor can build kernels here (a C++ compiler on CPU; triton on CUDA)."""
    try:
        from torch._inductor import cpp_builder
        cpp_builder.get_cpp_compiler()
        return True
    except Exception:  # no compiler found, or an inductor without this helper
        return False
