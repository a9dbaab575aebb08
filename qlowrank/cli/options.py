"""The one translator from command-line options to configs.

`train`, `train --dry-run`, `train --batch auto`, `estimate` and `profile` describe a run with
the same flags. Those flags are declared here once (`SHARED_OPTIONS`) and turned into
`QuantConfig`, `LoraConfig`, `TrainConfig` and `estimate_memory`'s arguments here once, so an
estimate always describes the adapter, base and loss that the run would train.
"""

from __future__ import annotations

import argparse
import functools
from dataclasses import dataclass, field
from typing import Callable

import torch

from ..config import LoraConfig, QuantConfig, parse_dtype
from ..nn.loss import DEFAULT_CHUNK_TOKENS


@dataclass(frozen=True)
class Option:
    """One flag: its names and argparse's keyword arguments (dest, type, default, choices, action, help)."""

    names: tuple[str, ...]
    kwargs: dict = field(default_factory=dict)


# What every command that describes a training run accepts. Every long name is unambiguous
# for launchers that take abbreviations from the script's own arguments (torchrun's `--r`).
SHARED_OPTIONS: tuple[Option, ...] = (
    # the frozen base
    Option(("--bits",), dict(default="4", choices=["4", "8", "none"], help="base storage (none: float base)")),
    Option(("--quant-type",), dict(default="nf4", choices=["nf4", "fp4"])),
    Option(("--no-double-quant",), dict(action="store_true", help="keep the 4-bit block scales in fp32")),
    # the adapter
    Option(("--lora-rank", "--r"), dict(dest="r", type=int, default=16, help="LoRA rank r")),
    Option(("--lora-alpha", "--alpha"), dict(dest="alpha", type=float, default=None, help="LoRA alpha (default 2 * r)")),
    Option(("--dropout",), dict(type=float, default=0.0, help="dropout on the LoRA branch")),
    Option(("--target", "--targets"), dict(dest="target", default="all-linear",
                                           help="all-linear, or comma-separated module names (q_proj,v_proj)")),
    Option(("--rslora",), dict(action="store_true", help="scale by alpha / sqrt(r)")),
    Option(("--init",), dict(default="kaiming", choices=["kaiming", "gaussian", "loftq", "pissa"],
                             help="LoRA init; loftq / pissa are quantization-aware (computed from the float weights "
                                  "while loading)")),
    Option(("--loftq-iters",), dict(type=int, default=1, help="LoftQ alternations (> 1 also changes the frozen base)")),
    Option(("--dora",), dict(action="store_true", help="DoRA: a trainable magnitude per output row")),
    Option(("--train-modules",), dict(default=None, help="comma-separated modules trained whole in float32 (PEFT's "
                                                         "modules_to_save), e.g. lm_head,embed_tokens")),
    # the step's shape and what it keeps
    Option(("--seq",), dict(type=int, default=512, help="longest sequence (tokens)")),
    Option(("--grad-accum",), dict(type=int, default=1, help="micro-batches per optimizer step")),
    Option(("--packing",), dict(action="store_true", help="pack short examples into --seq windows")),
    Option(("--chunk-tokens",), dict(type=int, default=DEFAULT_CHUNK_TOKENS,
                                     help="rows of logits per chunk of the loss (0: naive full logits)")),
    Option(("--no-checkpointing",), dict(action="store_true", help="keep activations instead of recomputing them")),
    Option(("--compile",), dict(action="store_true", help="torch.compile each decoder block: 7-15%% faster steps on a "
                                                          "CPU after a one-off compile of ~20 s")),
)


def add_shared_options(add: Callable[..., object], defaults: dict | None = None) -> None:
    """Declare `SHARED_OPTIONS` through `add` (a parser's add_argument, or `train`'s config-aware adder).

    Args:
        add: called as add(*names, **kwargs) for each option.
        defaults: per-command defaults by dest (e.g. {"seq": 2048} for `estimate`).
    """
    for option in SHARED_OPTIONS:
        kwargs = dict(option.kwargs)
        dest = kwargs.get("dest", option.names[0].lstrip("-").replace("-", "_"))
        if defaults and dest in defaults:
            kwargs["default"] = defaults[dest]
        add(*option.names, **kwargs)


def compute_dtype(args: argparse.Namespace) -> torch.dtype:
    """The compute dtype: `train --precision` (auto / bf16: bf16, fp32), or `estimate --dtype`."""
    precision = getattr(args, "precision", None)
    if precision is not None:
        return torch.float32 if precision == "fp32" else torch.bfloat16
    dtype = parse_dtype(getattr(args, "dtype", "bf16"), "--dtype")
    return dtype if dtype != torch.float16 else torch.bfloat16   # fp16 compute is refused on CPUs


def quant_config(args: argparse.Namespace) -> QuantConfig:
    """The base's QuantConfig (--bits, --quant-type, --no-double-quant, the compute dtype)."""
    bits = None if str(args.bits) == "none" else int(args.bits)
    return QuantConfig(bits=bits, quant_type=args.quant_type, double_quant=not args.no_double_quant,
                       compute_dtype=compute_dtype(args))


def _names(text: str | None) -> list[str]:
    return [name.strip() for name in (text or "").split(",") if name.strip()]


def lora_config(args: argparse.Namespace, allow_full: bool = False) -> LoraConfig | None:
    """The adapter the flags describe; None for `--r 0` where full fine-tuning is allowed (estimate, profile).

    Raises:
        ValueError: `--r 0` with a quantized base (a quantized base cannot be trained), or where
            full fine-tuning is not offered.
    """
    if args.r == 0 and allow_full:
        if str(args.bits) != "none":
            raise ValueError("--r 0 (full fine-tuning) needs --bits none: a quantized base cannot be trained")
        return None
    target = args.target if args.target == "all-linear" else _names(args.target)
    return LoraConfig(r=args.r, alpha=args.alpha if args.alpha is not None else 2 * args.r, dropout=args.dropout,
                      target_modules=target, use_rslora=args.rslora, init=args.init, loftq_iters=args.loftq_iters,
                      use_dora=args.dora, modules_to_save=_names(args.train_modules))


def train_config(args: argparse.Namespace):
    """The TrainConfig the `train` options describe."""
    from ..train import TrainConfig

    return TrainConfig(
        out_dir=args.out, steps=args.steps, epochs=args.epochs, batch_size=args.batch, grad_accum=args.grad_accum,
        lr=args.lr, lora_plus_ratio=args.lora_plus_ratio, optimizer=args.optimizer, weight_decay=args.weight_decay,
        warmup_steps=args.warmup_steps, min_lr_ratio=args.min_lr_ratio, max_grad_norm=args.max_grad_norm or None,
        precision=args.precision, chunk_tokens=args.chunk_tokens or None, eval_every=args.eval_every,
        save_every=args.save_every, keep_checkpoints=args.keep_checkpoints, seed=args.seed,
        pad_multiple=args.pad_multiple, compile=args.compile, group_by_length=not args.no_group_by_length,
        sharding=None if args.sharding in (None, "none") else args.sharding,
        progress=not args.no_progress,
    )


def estimate_arguments(args: argparse.Namespace, batch: int, device: str) -> dict:
    """`estimate_memory`'s keyword arguments for the run the flags describe, at micro-batch `batch`.

    The same quantization, adapter (DoRA, init, modules to save), compute dtype, optimizer
    states, loss (chunked, with --chunk-tokens) and checkpointing as the run itself.
    """
    # paged_adamw8bit keeps the same 8-bit states as adamw8bit (paging only moves them under pressure)
    optimizer = "adamw8bit" if args.optimizer in ("adamw8bit", "paged_adamw8bit") else args.optimizer
    chunk = args.chunk_tokens
    loss_fn = None
    if chunk and chunk != DEFAULT_CHUNK_TOKENS:
        loss_fn = functools.partial(_chunked_loss, chunk_tokens=chunk)
    return dict(quant=quant_config(args), lora=lora_config(args, allow_full=True), batch_size=batch, seq_len=args.seq,
                gradient_checkpointing=not args.no_checkpointing, optimizer=optimizer, dtype=compute_dtype(args),
                device=device, chunked_loss=bool(chunk), loss_fn=loss_fn, grad_accum=args.grad_accum,
                packing=args.packing)


def _chunked_loss(model, tokens, chunk_tokens: int):
    from ..nn.loss import causal_lm_loss

    return causal_lm_loss(model, tokens, tokens, chunk_tokens=chunk_tokens)
