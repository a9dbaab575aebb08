"""`qlowrank estimate`: predicted peak training memory from a config, whether it fits, the largest batch."""

from __future__ import annotations

import argparse
import json

import torch

from ..config import LoraConfig, QuantConfig, parse_dtype
from ..memory.report import format_bytes, parse_bytes
from .errors import exit_2_on_bad_input


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """The arguments `estimate` and `profile` share: model, quantization, LoRA, batch shape, optimizer."""
    parser.add_argument("--model", default=None,
                        help="model directory, config.json or .gguf (default: the embedded SmolLM2-135M GGUF)")
    parser.add_argument("--bits", default="4", choices=["4", "8", "none"], help="base storage (none: float base)")
    parser.add_argument("--quant-type", default="nf4", choices=["nf4", "fp4"])
    parser.add_argument("--no-double-quant", action="store_true", help="keep the 4-bit block scales in fp32")
    parser.add_argument("--r", type=int, default=16, help="LoRA rank (0 with --bits none: full fine-tuning)")
    parser.add_argument("--alpha", type=float, default=None, help="LoRA alpha (default 2 * r)")
    parser.add_argument("--targets", default="all-linear", help="all-linear, or comma-separated names (q_proj,v_proj)")
    parser.add_argument("--batch", type=int, default=1, help="sequences per step")
    parser.add_argument("--seq", type=int, default=2048, help="tokens per sequence")
    parser.add_argument("--no-checkpointing", action="store_true", help="keep all activations (no recomputation)")
    parser.add_argument("--optimizer", default="adamw", choices=["adamw", "adamw8bit", "sgd"])
    parser.add_argument("--dtype", default="bf16", help="dtype of float weights and activations (bf16, fp32)")


def configs_from_args(args: argparse.Namespace) -> tuple[QuantConfig, LoraConfig | None, torch.dtype]:
    """QuantConfig, LoraConfig (None: full fine-tuning) and dtype from the shared arguments."""
    dtype = parse_dtype(args.dtype, "--dtype")
    bits = None if args.bits == "none" else int(args.bits)
    compute = dtype if dtype != torch.float16 else torch.bfloat16
    quant = QuantConfig(bits=bits, quant_type=args.quant_type, double_quant=not args.no_double_quant,
                        compute_dtype=compute)
    if args.r == 0:
        if bits is not None:
            raise SystemExit("--r 0 (full fine-tuning) needs --bits none: a quantized base cannot be trained")
        return quant, None, dtype
    targets = args.targets if args.targets == "all-linear" else [t.strip() for t in args.targets.split(",") if t.strip()]
    alpha = args.alpha if args.alpha is not None else 2 * args.r
    return quant, LoraConfig(r=args.r, alpha=alpha, target_modules=targets), dtype


def default_model(path: str | None) -> str:
    """The --model argument, or the embedded SmolLM2-135M GGUF when none is given."""
    if path:
        return path
    from ..model.embedded import smollm2_gguf
    return str(smollm2_gguf())


def register(subparsers) -> None:
    parser = subparsers.add_parser("estimate", help="predict peak training memory from a config (no weights loaded)",
                                   description=__doc__)
    add_model_arguments(parser)
    parser.add_argument("--gpu", default=None, help="device memory to check against, e.g. 24GiB or 80GB")
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"], help="whose kernels to imitate")
    parser.add_argument("--full-logits-loss", action="store_true",
                        help="model the model's own loss over full fp32 logits (default: the trainer's chunked loss)")
    parser.add_argument("--chunked-loss", action="store_true", help=argparse.SUPPRESS)   # the default now; kept for old scripts
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.set_defaults(func=exit_2_on_bad_input("estimate", _run))


def _run(args: argparse.Namespace) -> int:
    from ..memory.estimate import estimate_memory

    quant, lora, dtype = configs_from_args(args)
    estimate = estimate_memory(default_model(args.model), quant=quant, lora=lora, batch_size=args.batch,
                               seq_len=args.seq, gradient_checkpointing=not args.no_checkpointing,
                               optimizer=args.optimizer, dtype=dtype, device=args.device,
                               chunked_loss=not args.full_logits_loss)
    result = estimate.to_dict()
    if args.gpu:
        device_bytes = parse_bytes(args.gpu)
        result["device_bytes"] = device_bytes
        result["fits"] = estimate.fits(device_bytes)
        result["max_batch_size"] = estimate.max_batch_size(device_bytes)
    if args.json:
        print(json.dumps(result, indent=1))
        return 0
    print(estimate.table())
    print(process_lines(estimate))
    if args.gpu:
        verdict = "fits" if result["fits"] else "does NOT fit"
        print(f"\nprocess peak {format_bytes(estimate.process_bytes)} {verdict} in {format_bytes(device_bytes)}; "
              f"largest batch that fits at seq {args.seq}: {result['max_batch_size']}")
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
