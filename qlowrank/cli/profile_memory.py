"""`qlowrank profile`: run real training steps under MemoryProfiler; write the table, JSON and PNG."""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from pathlib import Path

import torch

from ..memory.report import atomic_write_text, format_bytes
from . import options
from .errors import exit_2_on_bad_input
from .estimate import add_model_arguments, default_model


def register(subparsers) -> None:
    parser = subparsers.add_parser("profile", help="measure memory of real training steps (table, JSON, PNG)",
                                   description=__doc__)
    add_model_arguments(parser, {"batch": 2, "seq": 128})
    parser.add_argument("--steps", type=int, default=3, help="training steps to run (the peak is over all)")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda if present)")
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--out", default="memory-profile", help="folder for memory.txt, memory.json, memory.png")
    parser.set_defaults(func=exit_2_on_bad_input("profile", _run))


def quantized_source_dtype(model: torch.nn.Module) -> torch.dtype | None:
    """The dtype 4-bit weights were quantized from (bitsandbytes dequantizes back to it), if any."""
    for module in model.modules():
        state = getattr(getattr(module, "weight", None), "quant_state", None)
        if getattr(state, "dtype", None) is not None:
            return state.dtype
    return None


def comparison_lines(estimate, prof, device_type: str) -> list[str]:
    """The estimate for the same settings beside what the profiler measured (tensor and process peaks)."""
    error = 100.0 * (estimate.total_bytes - prof.peak_bytes) / max(prof.peak_bytes, 1)
    # The profiler sees the training steps: compare with the estimate's training peak (on a
    # CPU the process peak may be the loading one, printed beside it).
    parts = estimate.process_breakdown
    training = parts.get("training_peak", estimate.process_bytes)
    process_error = 100.0 * (training - prof.process_peak_bytes) / max(prof.process_peak_bytes, 1)
    lines = [(f"estimate_memory for the same settings: {format_bytes(estimate.total_bytes)} "
              f"({error:+.1f}% vs measured {format_bytes(prof.peak_bytes)})"),
             (f"estimated process peak while training: {format_bytes(training)} "
              f"({process_error:+.1f}% vs measured {format_bytes(prof.process_peak_bytes)}, "
              f"{'nvidia-smi' if device_type == 'cuda' else 'RSS'})")]
    if "load_peak" in parts:
        lines.append(f"estimated process peak while loading: {format_bytes(parts['load_peak'])} "
                     f"(the whole process peaks at the larger: {format_bytes(estimate.process_bytes)})")
    return lines


def accumulated(loss_fn: Callable, grad_accum: int) -> Callable:
    """`loss_fn` over one optimizer step of `grad_accum` micro-batches, as the trainer runs it: the
    first grad_accum - 1 go backward here (their gradients add up in .grad), the last is returned."""
    if grad_accum == 1:
        return loss_fn

    def step_loss(model: torch.nn.Module, tokens: torch.Tensor) -> torch.Tensor:
        for _ in range(grad_accum - 1):
            (loss_fn(model, tokens) / grad_accum).backward()
        return loss_fn(model, tokens) / grad_accum
    return step_loss


def offloaded(loss_fn: Callable[[torch.nn.Module, torch.Tensor], torch.Tensor]
              ) -> Callable[[torch.nn.Module, torch.Tensor], torch.Tensor]:
    """The loss with its forward under activation offloading, as the trainer runs it with --offload-activations."""
    from ..model.offload import OffloadActivations

    def offloaded_loss(model: torch.nn.Module, tokens: torch.Tensor) -> torch.Tensor:
        with OffloadActivations(tokens.device.type):
            return loss_fn(model, tokens)
    return offloaded_loss


def _run(args: argparse.Namespace) -> int:
    from ..memory.estimator import estimate_memory, loss_for
    from ..memory.profiler import profile_steps
    from ..model.checkpointing import enable_gradient_checkpointing
    from ..model.load import load_model
    from ..train.optim import make_optimizer

    if args.packing:   # no silent difference between what is measured and what is estimated
        raise ValueError("qlowrank profile measures unpacked batches of random tokens, so --packing would not be "
                         "measured; estimate it with `qlowrank estimate --packing` or `qlowrank train --dry-run --packing`")
    if args.objective != "sft" or args.sharding != "none":   # the same: only what is measured is estimated
        raise ValueError("qlowrank profile measures one process of supervised steps on random tokens; estimate "
                         "--objective / --sharding runs with `qlowrank estimate` or `qlowrank train --dry-run`")
    args.model = default_model(args.model)
    spec = options.run_spec(args, allow_full=True, processes=1)   # refuses offloading off CUDA, before loading
    device = torch.device(spec.device_type)
    model_path = args.model
    model = load_model(model_path, quant=spec.quant, lora=spec.lora, device=device, dtype=spec.dtype)
    if spec.lora is None:  # full fine-tuning: every parameter trains
        for param in model.parameters():
            param.requires_grad_(True)
    if spec.checkpointing:
        enable_gradient_checkpointing(model, **options.checkpointing(spec))
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = make_optimizer(args.optimizer, params, lr=args.lr)
    generator = torch.Generator().manual_seed(0)
    vocab = model.get_input_embeddings().num_embeddings
    tokens = torch.randint(0, vocab, (args.batch, args.seq), generator=generator).to(device)
    started = time.perf_counter()
    # the run's loss (the trainer's chunked cross-entropy at --chunk-tokens), as the estimate models it
    loss_fn = loss_for(spec.train.chunk_tokens)
    loss_fn = offloaded(loss_fn) if spec.train.offload_activations else loss_fn
    prof = profile_steps(model, optimizer, tokens, args.steps, loss_fn=accumulated(loss_fn, args.grad_accum))
    seconds = time.perf_counter() - started
    estimate = estimate_memory(spec, quantized_from=quantized_source_dtype(model))
    out = Path(args.out)
    header = (f"{model_path}: bits={args.bits} r={args.r} batch={args.batch} seq={args.seq} "
              f"checkpointing={not args.no_checkpointing} optimizer={args.optimizer} dtype={args.dtype} "
              f"device={device.type}, {args.steps} steps in {seconds:.1f} s")
    text = "\n".join([header, "", prof.table(), "", *comparison_lines(estimate, prof, device.type)])
    print(text)
    atomic_write_text(out / "memory.txt", text + "\n")
    prof.to_json(out / "memory.json")
    prof.save_plot(out / "memory.png", title=f"{Path(model_path).name}: bits={args.bits} r={args.r} "
                                             f"batch={args.batch}x{args.seq}")
    print(f"wrote {out / 'memory.txt'}, {out / 'memory.json'}, {out / 'memory.png'}")
    return 0
