"""`qlowrank train`: fine-tune a model's LoRA factors on a data file; options from flags or a config file.

    qlowrank train --model PATH --data FILE --bits 4 --r 16 --alpha 32 --target all-linear \\
        --seq 512 --batch 4 --grad-accum 4 --lr 2e-4 --steps 100 --out DIR [--resume] [--export]

A config file (--config run.json or run.toml) holds the same options by name (dashes or
underscores); flags given on the command line override it. The output folder gets the
adapter, checkpoints/, metrics.jsonl, memory.json / memory.txt, and merged/ with --export.
"""

from __future__ import annotations

import argparse
import functools
import math
import os
import sys
from pathlib import Path

from ..config import RunSpec, TrainConfig, parse_dtype
from . import options
from .errors import exit_2_on_bad_input
from .options import add_shared_options


def default(name: str) -> object:
    """TrainConfig's default for a field: the flags restate no default."""
    return options.default_of(TrainConfig, name)


def register(subparsers) -> None:
    parser = subparsers.add_parser("train", help="fine-tune LoRA factors on a frozen 4/8-bit base", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
    add_train_arguments(parser)
    parser.set_defaults(func=exit_2_on_bad_input("train", run))


# `train`'s options: defaults < --config file < flags (a module-level table, filled when the parser is built)
TRAIN_OPTIONS = options.LayeredOptions("train")


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    """Every `qlowrank train` option (also what a --config file may set), declared through
    `TRAIN_OPTIONS` so that `resolve_options` can layer defaults < config file < flags."""
    add = TRAIN_OPTIONS.adder(parser)
    # Every option has a long name that no launcher option (torchrun, accelerate launch) starts
    # with: their parsers take abbreviations from the script's own arguments (`--r` is
    # ambiguous to torchrun, `--config` a prefix of accelerate's `--config_file`).
    add("--config", "--train-config", dest="config", help="JSON or TOML file with any of these options; flags override it")
    add("--model", help="model directory (safetensors) or .gguf file")
    add_shared_options(add)   # base, adapter, step shape, loss, checkpointing: as estimate has them
    add("--data", nargs="+", help="training data: .jsonl / .json / .parquet / .csv / text file(s) or save_to_disk folders")
    add("--eval-data", nargs="+", help="held-out data file(s) (default: --eval-fraction of --data)")
    options.add_data_options(add)   # --format, --text-field, ...: as `qlowrank data` has them
    add("--eval-fraction", type=float, default=0.05, help="share of --data held out when --eval-data is absent")
    add("--out", default=default("out_dir"), help="output folder")
    add("--no-truncation", action="store_true", help="a row longer than --seq is an error instead of being cut")
    add("--pad-multiple", type=int, default=default("pad_multiple"), help="pad each batch's length up to a multiple of this (at most the "
        "longest example): few batch shapes keep the CPU kernels' memory flat (1: pad to the batch's longest only)")
    add("--no-group-by-length", action="store_true", help="batch examples in plain random order instead of "
        "grouping similar lengths (grouping spends less compute on padding)")
    add("--batch", type=options.batch_value, default=default("batch_size"),
        help="sequences per micro-batch, per process (global batch: batch x processes x grad-accum), or 'auto': "
        "plan micro-batch, accumulation and checkpointing (--keep-blocks, --keep-attention) for the fastest run "
        "that fits --max-memory, keeping --global-batch")
    add("--global-batch", type=int, default=None, help="with --batch auto: sequences per optimizer step "
        "(default: 4 x --grad-accum)")
    add("--max-memory", default=None, help="with --batch auto: the process memory budget to plan in, e.g. 6GiB "
        "(default: the free RAM, or the free VRAM on CUDA)")
    add("--dry-run", action="store_true", help="print the memory estimate (tensor and process) for these settings and exit")
    add("--beta", type=float, default=default("beta"), help="DPO: how far the policy may move from the reference")
    add("--label-smoothing", type=float, default=default("label_smoothing"),
        help="DPO: assumed share of flipped preferences (cDPO)")
    add("--orpo-lambda", type=float, default=default("orpo_lambda"),
        help="ORPO: weight of the odds-ratio term beside the NLL")
    add("--lr", type=float, default=default("lr"))
    add("--lora-plus-ratio", type=float, default=default("lora_plus_ratio"),
        help="LoRA+: lora_B trains at lr * ratio (16 in the paper)")
    add("--weight-decay", type=float, default=default("weight_decay"))
    add("--warmup-steps", type=int, default=default("warmup_steps"))
    add("--min-lr-ratio", type=float, default=default("min_lr_ratio"), help="the cosine ends at lr * this")
    add("--max-grad-norm", type=float, default=default("max_grad_norm"), help="gradient clipping (0: off)")
    add("--steps", type=int, default=default("steps"), help="optimizer steps (default: --epochs)")
    add("--epochs", type=float, default=default("epochs"))
    add("--precision", default=default("precision"), choices=["auto", "bf16", "fp32"],
        help="autocast dtype of the compute")
    add("--eval-every", type=int, default=default("eval_every"), help="evaluate every N steps (always before and after)")
    add("--save-every", type=int, default=default("save_every"), help="checkpoint every N steps (always at the end)")
    add("--keep-checkpoints", type=int, default=default("keep_checkpoints"))
    add("--seed", type=int, default=default("seed"), help="seeds LoRA init, dropout, data order and the eval split")
    add("--device", default=None, help="cpu or cuda (default: cuda if present)")
    add("--resume", action="store_true", help="continue from the newest checkpoint in --out")
    add("--export", action="store_true", help="write the merged, dequantized model to OUT/merged at the end")
    add("--export-dtype", default="bf16", help="dtype of the merged export (bf16, fp16, fp32)")
    add("--no-progress", action="store_true", help="no progress bar")


def resolve_options(args: argparse.Namespace) -> argparse.Namespace:
    """Defaults, then the --config file (JSON or TOML, dashes or underscores), then the typed flags."""
    return TRAIN_OPTIONS.resolve(args)


def load_tokenizer(model_path: str | Path):
    """The tokenizer of a model directory or of a .gguf file."""
    from ..model.load import load_tokenizer as load

    return load(model_path)


def run_spec(args: argparse.Namespace) -> RunSpec:
    """The run the options describe (cli/options.py); a value out of range names where it may have come from."""
    try:
        return options.run_spec(args)
    except ValueError as err:
        raise ValueError(f"{err}" + (f" (options from --config {args.config} and the flags)" if args.config else "")) from None


def examples(args: argparse.Namespace, tokenizer) -> tuple[list, list]:
    """(training, held-out) examples: --data, and --eval-data or a seeded --eval-fraction of --data; packed with --packing."""
    from ..data import DataStats
    from ..data.pairs import load_pairs
    from ..train import load_examples, pack_examples, split_examples

    pairs = args.objective != "sft"
    if pairs and args.packing:
        raise ValueError(f"--packing with --objective {args.objective}: the two sides of a pair are scored as "
                         "whole sequences and cannot be packed yet; drop --packing")
    read = functools.partial(load_pairs if pairs else load_examples, tokenizer=tokenizer, seq_len=args.seq, truncation=not args.no_truncation,
                             fields=options.data_fields(args), format=args.format)
    stats = DataStats()
    counted = {} if pairs else {"stats": stats}   # pairs are counted as pairs (no per-layout token statistics)
    if args.eval_data:
        train, held = read(args.data, **counted), read(args.eval_data)
    else:
        rows = read(args.data, **counted)
        train, held = split_examples(rows, args.eval_fraction if len(rows) >= 20 else 0.0, args.seed)
    if args.packing:
        train = pack_examples(train, args.seq)
    if int(os.environ.get("RANK", "0")) == 0:   # the main process under torchrun / accelerate launch
        print(f"data: {len(train)} training {'pairs' if pairs else 'sequences'}, {len(held)} held out", flush=True)
        warning = stats.end_warning()
        if warning:   # the usual silent bug: a model that never learns to stop (see `qlowrank data`)
            print(f"qlowrank train: warning: --data: {warning}", file=sys.stderr, flush=True)
    return train, held


def planned_steps(args: argparse.Namespace, sequences: int, world: int) -> int:
    """The optimizer steps of a --batch auto run: --steps, or --epochs over `sequences` at --global-batch."""
    if args.steps:
        return args.steps
    global_batch = (args.global_batch or 4 * args.grad_accum) * world
    return max(1, math.ceil(args.epochs * sequences / global_batch))


def run(args: argparse.Namespace) -> int:
    from ..model.load import load_model
    from ..train import Trainer
    from ..train.parallel import local_device

    args = resolve_options(args)
    if not args.model or (not args.data and not args.dry_run):
        raise ValueError("qlowrank train needs --model and --data (as flags or in --config)")
    options.offload_request(args)
    spec = run_spec(args)   # refuses what cannot run (offloading off CUDA, ...) before anything loads
    world = spec.processes
    if args.dry_run:
        from .sizing import apply_plan, dry_run
        if args.batch == "auto":
            spec = apply_plan(args, spec, distributed=world > 1, steps=args.steps)
        return dry_run(args, spec)
    tokenizer = load_tokenizer(args.model)
    train, held = examples(args, tokenizer)
    if args.batch == "auto":   # after the data: whether compiling pays depends on how many steps it makes
        from .sizing import apply_plan
        spec = apply_plan(args, spec, distributed=world > 1, steps=planned_steps(args, len(train), world))
    model = load_model(spec.model, quant=spec.quant, lora=spec.lora, device=local_device(args.device),
                       dtype=spec.dtype, seed=spec.train.seed)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    # SIGTERM / SIGINT end training with TrainingInterrupted; cli.main turns it into 143 / 130.
    trainer = Trainer(model, spec, train, held, pad_token_id=pad)   # checkpoints the blocks as the spec says
    result = trainer.train(resume=args.resume)
    merged = Path(args.out) / "merged" if args.export else None
    if merged is not None:   # every rank takes part (FSDP gathers the base one block at a time); rank 0 writes
        trainer.export_merged(merged, dtype=parse_dtype(args.export_dtype, "--export-dtype"), tokenizer=tokenizer,
                              overwrite=True)
    if trainer.is_main:
        print_result(result, args, merged)
    return 0


def print_result(result, args: argparse.Namespace, merged: Path | None) -> None:
    """The end of a run: memory table (when no progress bar printed it), eval losses, where things are."""
    if result.memory_table and args.no_progress:  # with a progress bar the trainer printed it
        print(result.memory_table)
    if result.evals:
        first, last = result.evals[0], result.evals[-1]
        print(f"eval loss: step {first['step']} {first['eval_loss']:.4f} -> step {last['step']} {last['eval_loss']:.4f}")
    print(f"adapter: {result.adapter_dir}\ncheckpoint: {result.checkpoint}\nmetrics: {Path(args.out) / 'metrics.jsonl'}")
    if merged is not None:
        print(f"merged model: {merged}")
