"""`qlowrank train --dry-run` and `--batch auto`: the memory estimate of exactly the command's settings.

The estimate models what the trainer runs: the chunked loss (unless --chunk-tokens 0),
gradient checkpointing (unless --no-checkpointing), bf16 compute (unless --precision fp32),
the same optimizer, and sequences padded to --seq (the worst batch). No weights are loaded.
"""

from __future__ import annotations

import argparse
import os

import torch

from ..memory.estimate import MemoryEstimate, estimate_memory
from ..memory.report import format_bytes, parse_bytes
from ..memory.sampler import available_host_bytes, read_status
from . import options


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
    return (available_host_bytes() or 0) + read_status().get("VmRSS", 0)


def host_budget(args: argparse.Namespace) -> int:
    """--max-host-memory, or this process's share of the host memory available now: shared by the machine's
    processes (torchrun's LOCAL_WORLD_SIZE), rounded down to a GiB so that ranks reading it moments apart agree."""
    if args.max_host_memory:
        return parse_bytes(args.max_host_memory)
    share = (available_host_bytes() or 0) // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    return share // 2**30 * 2**30


def plan_layout(args: argparse.Namespace, distributed: bool = False, steps: int | None = None):
    """The planner's layout for these settings within --max-memory (default: what is free), for
    --global-batch (default 4 x --grad-accum): micro-batch, accumulation and checkpointing, and
    whether to compile (--compile / --no-compile, or decided for a run of `steps` optimizer steps).

    `distributed` ranks without timings, so every process picks the same layout.

    Raises:
        ValueError: nothing fits.
    """
    from ..planner import plan_run

    global_batch = args.global_batch or 4 * args.grad_accum
    if global_batch < 1:
        raise ValueError(f"--global-batch {global_batch} must be >= 1")
    arguments = options.estimate_arguments(args, 1, options.device(args).type)
    for name in ("batch_size", "grad_accum", "gradient_checkpointing", "keep_blocks", "keep_attention",
                 "offload_activations"):
        arguments.pop(name)   # the planner chooses these
    arguments["lora"] = options.lora_config(args)   # an adapter, always: --r 0 is refused here as in train
    offload = options.offload_request(args)
    return plan_run(args.model, memory_budget(args), global_batch, timed=not distributed,
                    checkpointing=not args.no_checkpointing, progress=not getattr(args, "no_progress", False),
                    chunk_tokens=args.chunk_tokens, steps=steps, compile=options.compile_request(args),
                    offload=offload, host_budget=host_budget(args) if offload is not False else None, **arguments)


def apply_plan(args: argparse.Namespace, distributed: bool = False, steps: int | None = None) -> None:
    """--batch auto: plan the run of `steps` optimizer steps (`plan_layout`), print the plan, set the flags it chose."""
    plan = plan_layout(args, distributed, steps)
    layout = plan.chosen.layout
    args.compile, args.no_compile = plan.compile.enabled, not plan.compile.enabled
    print(plan.table(), flush=True)
    args.batch, args.grad_accum = layout.micro_batch, layout.grad_accum
    args.no_checkpointing = not layout.checkpointing
    args.keep_blocks = layout.keep_blocks if layout.checkpointing else 0
    args.keep_attention = "on" if layout.keep_attention else "off"
    args.offload_activations = layout.offload
    print(f"batch auto: micro-batch {layout.micro_batch} x grad-accum {layout.grad_accum} = global batch "
          f"{layout.micro_batch * layout.grad_accum}, {layout.describe(plan.layers)} (predicted process peak "
          f"{format_bytes(plan.chosen.process_bytes)} + {plan.chosen.margin:.0%} headroom, of a {format_bytes(plan.budget)} "
          f"budget{'' if distributed else '; ranked by timed blocks on this machine'})", flush=True)


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


def process_lines(estimate) -> str:
    """The two figures side by side: tensor peak (what MemoryProfiler counts) and process peak."""
    parts = dict(estimate.process_breakdown)
    if "load_peak" in parts:   # CPU: loading or training, whichever is larger
        load, training = parts.pop("load_peak"), parts.pop("training_peak")
        detail = (f"RSS; the larger of loading {format_bytes(load)} and training {format_bytes(training)} = "
                  + " + ".join(f"{k} {format_bytes(v)}" for k, v in parts.items()))
    else:
        detail = "nvidia-smi; " + " + ".join(f"{k} {format_bytes(v)}" for k, v in parts.items())
    return (f"tensor peak:  {format_bytes(estimate.total_bytes)}\n"
            f"process peak: {format_bytes(estimate.process_bytes)} ({detail})")
