"""`qlowrank estimate`: predicted peak training memory from a config, whether it fits, the largest batch."""

from __future__ import annotations

import argparse
import json
import sys

from ..memory.report import format_bytes, parse_bytes
from . import options
from .errors import exit_2_on_bad_input


def add_model_arguments(parser: argparse.ArgumentParser, defaults: dict | None = None,
                        model_help: str = " (default: the embedded SmolLM2-135M GGUF)") -> None:
    """What `estimate` and `profile` accept: the model, every flag of `train` that changes memory
    (cli/options.py), the batch, the optimizer and the dtype."""
    parser.add_argument("--model", default=None, help="model directory, config.json or .gguf" + model_help)
    options.add_shared_options(parser.add_argument, {"seq": 2048, **(defaults or {})})
    parser.add_argument("--batch", type=int, default=(defaults or {}).get("batch", 1), help="sequences per micro-batch")
    parser.add_argument("--dtype", default="bf16", help="dtype of float weights and activations (bf16, fp32; "
                        "fp16 on CUDA only)")


def default_model(path: str | None) -> str:
    """The --model argument, or the embedded SmolLM2-135M GGUF when none is given."""
    if path:
        return path
    from ..model.embedded import smollm2_gguf
    return str(smollm2_gguf())


def register(subparsers) -> None:
    parser = subparsers.add_parser("estimate", help="predict peak training memory from a config (no weights loaded)",
                                   description=__doc__)
    add_model_arguments(parser, model_help=" (required)")
    parser.add_argument("--gpu", default=None, help="device memory to check against, e.g. 24GiB or 80GB")
    parser.add_argument("--device", default=None, choices=["cuda", "cpu"],
                        help="whose kernels to imitate (default: cuda if present, as for train)")
    parser.add_argument("--processes", type=int, default=1, help="training processes (torchrun --nproc-per-node): "
                        "the figures are one rank's (with --sharding fsdp each holds a share of the model)")
    parser.add_argument("--full-logits-loss", action="store_true",
                        help="model the model's own loss over full fp32 logits (default: the trainer's chunked loss)")
    parser.add_argument("--chunked-loss", action="store_true", help=argparse.SUPPRESS)   # the default now; kept for old scripts
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.add_argument("--plan", action="store_true", help="plan the fastest micro-batch x accumulation and "
                        "checkpointing that fit --max-memory for --global-batch (times one block of the model here)")
    parser.add_argument("--max-memory", default=None, help="with --plan: the budget, e.g. 16GiB (default: free RAM / VRAM)")
    parser.add_argument("--no-progress", action="store_true", help="with --plan: no progress bar")
    parser.add_argument("--global-batch", type=int, default=None, help="with --plan: sequences per optimizer step "
                        "(default: 4 x --grad-accum)")
    parser.add_argument("--steps", type=int, default=None, help="with --plan: the run's optimizer steps (the planner "
                        "compiles when they pay the compile back)")
    parser.add_argument("--calibrate", action="store_true", help="measure the process peak instead of modelling it: "
                        "train the model cut to 1 and 2 blocks (random weights, real widths) in fresh processes here "
                        "and extrapolate by depth (CPU; seconds, or minutes at 8B widths). Experimental: it did not beat the "
                        "analytic figure where measured (benchmarks/RESULTS.md)")
    parser.set_defaults(func=exit_2_on_bad_input("estimate", _run))


def _run(args: argparse.Namespace) -> int:
    from ..memory.estimator import estimate_memory
    from .sizing import process_lines, verdict

    if args.full_logits_loss:
        args.chunk_tokens = 0
    if not args.model:   # an estimate of the wrong model looks like an answer
        raise ValueError("qlowrank estimate needs --model (a model folder, its config.json or a .gguf file); "
                         "`qlowrank demo` runs the bundled SmolLM2-135M")
    spec = options.run_spec(args, allow_full=True)
    if args.plan:
        return _plan(args, spec)
    estimate = estimate_memory(spec)
    if args.calibrate:
        return _calibrated(args, spec, estimate)
    result = estimate.to_dict()
    if args.gpu:
        device_bytes = parse_bytes(args.gpu)
        result["device_bytes"] = device_bytes
        result["fits"] = estimate.fits(device_bytes)
        result["required_bytes"] = estimate.required_bytes
        result["max_batch_size"] = estimate.max_batch_size(device_bytes)
    if args.json:
        print(json.dumps(result, indent=1))
        return 0
    print(estimate.table())
    print(process_lines(estimate))
    if args.gpu:
        print(f"\n{verdict(estimate, device_bytes, '--gpu')}; largest batch that fits at seq {args.seq}: "
              f"{result['max_batch_size']}")
    return 0


def _calibrated(args: argparse.Namespace, spec, estimate) -> int:
    """`estimate --calibrate`: the stand-ins' measured training peak, extrapolated, beside the analytic figure."""
    from ..memory.calibrate import calibrate_training_peak, stand_in_run
    from ..memory.estimator import estimate_memory
    from ..memory.meta_model import load_config

    import dataclasses

    run = stand_in_run(spec)
    calibration = calibrate_training_peak(load_config(spec.model), estimate.total_bytes,
                                          lambda config: estimate_memory(dataclasses.replace(spec, model=config)), run)
    load_peak = estimate.process_breakdown["load_peak"]
    calibrated = max(calibration.training_bytes, load_peak)
    if args.json:
        print(json.dumps({"calibrated_process_bytes": calibrated, "calibrated_training_bytes": calibration.training_bytes,
                          "analytic_process_bytes": estimate.process_bytes, "load_peak": load_peak,
                          "stand_in_anon_peaks": calibration.anon_peaks, "stand_in_tensor_peaks": calibration.tensor_peaks,
                          "per_block_bytes": calibration.per_block, "total_bytes": estimate.total_bytes}, indent=1))
        return 0
    print(estimate.table())
    stand_ins = ", ".join(f"{d} block{'s' if d > 1 else ''} {format_bytes(calibration.anon_peaks[d])} "
                          f"(tensors {format_bytes(calibration.tensor_peaks[d])})" for d in sorted(calibration.anon_peaks))
    print(f"calibrated process peak: {format_bytes(calibrated)} (training {format_bytes(calibration.training_bytes)}: "
          f"tensors {format_bytes(estimate.total_bytes)} + what the stand-ins held beyond theirs, "
          f"{format_bytes(calibration.per_block)} a block beyond the second; loading {format_bytes(load_peak)})\n"
          f"stand-ins measured here: {stand_ins}\n"
          f"analytic process peak:   {format_bytes(estimate.process_bytes)}")
    return 0


def _plan(args: argparse.Namespace, spec) -> int:
    """`estimate --plan`: the planner's table for these settings (timed here when --device is this machine's)."""
    import torch

    from .sizing import plan_layout

    here = spec.device_type == "cpu" or torch.cuda.is_available()
    if not here and not args.max_memory:
        raise ValueError("--plan for --device cuda on a machine without one needs --max-memory (the GPU's memory)")
    plan = plan_layout(args, spec, distributed=not here, steps=args.steps)
    print(plan.table())
    layout = plan.chosen.layout
    flags = (f"--batch {layout.micro_batch} --grad-accum {layout.grad_accum} "
             + (f"--keep-blocks {layout.keep_blocks} --keep-attention {'on' if layout.keep_attention else 'off'}"
                if layout.checkpointing else "--no-checkpointing")
             + (" --offload-activations" if layout.offload else "")
             + (" --compile" if plan.compile.enabled else ""))
    print(f"chosen: {flags}" + ("" if here else " (ranked without timings: no such device here)"))
    return 0
