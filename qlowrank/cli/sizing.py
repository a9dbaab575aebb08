"""`qlowrank train --dry-run` and `--batch auto`: the memory estimate of exactly the command's settings.

The estimate models what the trainer runs: the chunked loss (unless --chunk-tokens 0),
gradient checkpointing (unless --no-checkpointing), bf16 compute (unless --precision fp32),
the same optimizer, and sequences padded to --seq (the worst batch). No weights are loaded.
"""

from __future__ import annotations

import argparse
import os

import torch

from ..config import RunSpec
from ..memory.estimator import MemoryEstimate, estimate_memory
from ..memory.report import format_bytes, parse_bytes
from ..memory.sampler import available_host_bytes, read_status
from . import options


def estimate_for_args(args: argparse.Namespace, batch: int | None = None,
                      grad_accum: int | None = None) -> MemoryEstimate:
    """The estimate of the run the train command's options describe (`options.run_spec`), at micro-batch
    `batch` and `grad_accum` micro-batches per step when given."""
    spec = options.run_spec(args, allow_full=True)
    changes = {k: v for k, v in (("batch_size", batch), ("grad_accum", grad_accum)) if v is not None}
    return estimate_memory(spec.with_train(**changes) if changes else spec)


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


def plan_layout(args: argparse.Namespace, spec: RunSpec, distributed: bool = False, steps: int | None = None):
    """The planner's layout of `spec` within --max-memory (default: what is free), for --global-batch
    (default 4 x --grad-accum): micro-batch, accumulation and checkpointing, and whether to compile
    (--compile / --no-compile, or decided for a run of `steps` optimizer steps).

    `distributed` ranks without timings, so every process picks the same layout.

    Raises:
        ValueError: nothing fits, or full fine-tuning (--r 0: the planner plans adapters).
    """
    from ..planner import plan

    if spec.lora is None:
        raise ValueError("--r 0 (full fine-tuning) cannot be planned: the planner lays out LoRA runs; give --r >= 1")
    offload = options.offload_request(args)
    return plan(spec, memory_budget(args), global_batch=args.global_batch or 4 * args.grad_accum, steps=steps,
                compile=options.compile_request(args), offload=offload, timed=not distributed,
                progress=not getattr(args, "no_progress", False),
                host_budget=host_budget(args) if offload is not False else None)


def apply_plan(args: argparse.Namespace, spec: RunSpec, distributed: bool = False, steps: int | None = None) -> RunSpec:
    """--batch auto: plan the run of `steps` optimizer steps (`plan_layout`), print the plan, return the chosen run."""
    plan = plan_layout(args, spec, distributed, steps)
    layout = plan.chosen.layout
    print(plan.table(), flush=True)
    print(f"batch auto: micro-batch {layout.micro_batch} x grad-accum {layout.grad_accum} = global batch "
          f"{layout.micro_batch * layout.grad_accum}, {layout.describe(plan.layers)} (predicted process peak "
          f"{format_bytes(plan.chosen.process_bytes)} + {plan.chosen.margin:.0%} headroom, of a {format_bytes(plan.budget)} "
          f"budget{'' if distributed else '; ranked by timed blocks on this machine'})", flush=True)
    return plan.spec


def dry_run(args: argparse.Namespace, spec: RunSpec) -> int:
    """Print the estimate of exactly this run (tensor table and process peak) and return 0."""
    estimate = estimate_memory(spec)
    print(estimate.table())
    print(process_lines(estimate))
    if args.max_memory:
        budget = parse_bytes(args.max_memory)
        print(verdict(estimate, budget, "--max-memory"))
    ranks = f" on each of {spec.processes} processes" if spec.processes > 1 else ""
    print(f"--dry-run: micro-batch {spec.train.batch_size} x grad-accum {spec.train.grad_accum}{ranks}; "
          "nothing was loaded or trained")
    return 0


def verdict(estimate: MemoryEstimate, budget: int, name: str) -> str:
    """Whether the run fits `budget` (`MemoryEstimate.fits`: the process peak plus its margin), in words."""
    need = f"needs {format_bytes(estimate.required_bytes)}: process peak {format_bytes(estimate.process_bytes)} + " \
           f"{estimate.prediction_margin:.0%} headroom for the prediction's error"
    return f"{'fits' if estimate.fits(budget) else 'does NOT fit'} in {name} {format_bytes(budget)} ({need})"


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
