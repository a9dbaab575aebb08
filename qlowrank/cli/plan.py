"""`qlowrank train --dry-run` and `--batch auto`: the memory estimate of exactly the command's settings.

The estimate models what the trainer runs: the chunked loss (unless --chunk-tokens 0),
gradient checkpointing (unless --no-checkpointing), bf16 compute (unless --precision fp32),
the same optimizer, and sequences padded to --seq (the worst batch). No weights are loaded.
"""

from __future__ import annotations

import argparse

import torch

from ..memory.estimate import MemoryEstimate, estimate_memory
from ..memory.process import prediction_margin
from ..memory.report import format_bytes, parse_bytes
from . import options
from .estimate import process_lines


def estimate_for_args(args: argparse.Namespace, batch: int, grad_accum: int | None = None) -> MemoryEstimate:
    """estimate_memory for the train command's settings at micro-batch `batch` (cli/options.py translates
    them), with `grad_accum` micro-batches per step instead of --grad-accum when given."""
    arguments = options.estimate_arguments(args, batch, options.device(args).type)
    if grad_accum is not None:
        arguments["grad_accum"] = grad_accum
    return estimate_memory(args.model, **arguments)


def memory_budget(args: argparse.Namespace) -> int:
    """--max-memory, or what this process could grow to: free VRAM on CUDA; on CPU the
    available RAM plus what this process already holds (the estimate counts the whole process)."""
    if args.max_memory:
        return parse_bytes(args.max_memory)
    if options.device(args).type == "cuda":
        return int(torch.cuda.mem_get_info()[0])
    fields = {}
    with open("/proc/meminfo") as handle:
        for line in handle:
            key, value = line.split(":", 1)
            fields[key] = int(value.split()[0]) * 1024
    with open("/proc/self/status") as handle:
        rss = next(int(line.split()[1]) * 1024 for line in handle if line.startswith("VmRSS:"))
    return fields.get("MemAvailable", fields.get("MemFree", 0)) + rss


def choose_batch(args: argparse.Namespace) -> tuple[int, int]:
    """(micro-batch, grad-accum) for --batch auto: the largest micro-batch that divides the
    global batch and whose predicted process peak, plus the prediction's measured error
    (`memory/process.py`), fits the budget; prints the choice.

    Raises:
        ValueError: not even a micro-batch of 1 fits.
    """
    global_batch = args.global_batch or 4 * args.grad_accum
    if global_batch < 1:
        raise ValueError(f"--global-batch {global_batch} must be >= 1")
    budget = memory_budget(args)
    # Plan within the budget less the process model's measured error, so the real peak fits.
    margin = prediction_margin(options.device(args).type)
    usable = int(budget / (1 + margin))
    # Search with accumulation on (every LoRA gradient alive through the pass): what any micro-batch
    # below the global batch runs; the global batch in one micro-batch needs no more than that.
    one = estimate_for_args(args, 1, grad_accum=min(2, global_batch))
    largest = min(one.max_batch_size(usable), global_batch)
    if largest < 1:
        raise ValueError(f"--batch auto: even one sequence of {args.seq} tokens needs {format_bytes(one.process_bytes)} "
                         f"of process memory (+{margin:.0%} headroom), over the {format_bytes(budget)} budget; "
                         "lower --seq or use --bits 4")
    micro = max(b for b in range(1, largest + 1) if global_batch % b == 0)
    chosen = estimate_for_args(args, micro, grad_accum=global_batch // micro)   # the plan's own figure
    above = one.at_batch(largest + 1) if largest < global_batch else None
    note = (f"; micro-batch {largest + 1} would need {format_bytes(above.process_bytes)}" if above is not None
            else "; the whole global batch fits in one micro-batch")
    if micro != largest:
        note += f" (largest that fits: {largest}, not a divisor of {global_batch})"
    print(f"batch auto: micro-batch {micro} x grad-accum {global_batch // micro} = global batch {global_batch} "
          f"(predicted process peak {format_bytes(chosen.process_bytes)} + {margin:.0%} headroom for the prediction's "
          f"error, of a {format_bytes(budget)} budget{note})",
          flush=True)
    return micro, global_batch // micro


def dry_run(args: argparse.Namespace) -> int:
    """Print the estimate for exactly these settings (tensor table and process peak) and return 0."""
    estimate = estimate_for_args(args, int(args.batch))
    print(estimate.table())
    print(process_lines(estimate))
    if args.max_memory:
        budget = parse_bytes(args.max_memory)
        print(f"{'fits' if estimate.fits(budget) else 'does NOT fit'} in --max-memory {format_bytes(budget)}")
    print(f"--dry-run: micro-batch {args.batch} x grad-accum {args.grad_accum}; nothing was loaded or trained")
    return 0
