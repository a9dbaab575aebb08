"""`qlowrank train`: fine-tune a model's LoRA factors on a data file; options from flags or a config file.

    qlowrank train --model PATH --data FILE --bits 4 --r 16 --alpha 32 --target all-linear \\
        --seq 512 --batch 4 --grad-accum 4 --lr 2e-4 --steps 100 --out DIR [--resume] [--export]

A config file (--config run.json or run.toml) holds the same options by name (dashes or
underscores); flags given on the command line override it. The output folder gets the
adapter, checkpoints/, metrics.jsonl, memory.json / memory.txt, and merged/ with --export.
"""

from __future__ import annotations

import argparse
import json
import math
import os
from pathlib import Path

from ..config import parse_dtype
from . import options
from .errors import exit_2_on_bad_input
from .options import add_shared_options


def register(subparsers) -> None:
    parser = subparsers.add_parser("train", help="fine-tune LoRA factors on a frozen 4/8-bit base", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
    add_train_arguments(parser)
    parser.set_defaults(func=exit_2_on_bad_input("train", run))


DEFAULTS: dict = {}   # option name -> default, applied under the config file and the flags
_KINDS: dict = {}     # option name -> (type, choices, nargs, action): how a config file value is checked


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    """Every `qlowrank train` option (also what a --config file may set).

    The parser itself has no defaults (argparse.SUPPRESS): the namespace holds only the
    flags the user typed, so `resolve_options` can layer defaults < config file < flags.
    """
    def add(*names, default=None, action=None, **kwargs):
        dest = kwargs.pop("dest", names[0].lstrip("-").replace("-", "_"))
        DEFAULTS[dest] = False if action == "store_true" else default
        _KINDS[dest] = (kwargs.get("type", str), kwargs.get("choices"), kwargs.get("nargs"), action)
        if default not in (None, False):
            kwargs["help"] = f"{kwargs.get('help', '')} [default: {default}]".strip()
        parser.add_argument(*names, dest=dest, default=argparse.SUPPRESS, action=action, **kwargs)
    # Every option has a long name that no launcher option (torchrun, accelerate launch) starts
    # with: their parsers take abbreviations from the script's own arguments (`--r` is
    # ambiguous to torchrun, `--config` a prefix of accelerate's `--config_file`).
    add("--config", "--train-config", dest="config", help="JSON or TOML file with any of these options; flags override it")
    add("--model", help="model directory (safetensors) or .gguf file")
    add_shared_options(add)   # base, adapter, step shape, loss, checkpointing: as estimate has them
    add("--data", nargs="+", help="training data: .jsonl / .json / .parquet / .csv / text file(s) or save_to_disk folders")
    add("--eval-data", nargs="+", help="held-out data file(s) (default: --eval-fraction of --data)")
    add("--text-field", default="text", help="row field (column) holding whole texts")
    add("--prompt-field", default="prompt", help="row field holding prompts (no loss)")
    add("--completion-field", default="completion", help="row field holding completions (loss)")
    add("--messages-field", default="messages", help="row field holding chat messages")
    add("--eval-fraction", type=float, default=0.05, help="share of --data held out when --eval-data is absent")
    add("--out", default="qlowrank-out", help="output folder")
    add("--no-truncation", action="store_true", help="a row longer than --seq is an error instead of being cut")
    add("--pad-multiple", type=int, default=64, help="pad each batch's length up to a multiple of this (at most the "
        "longest example): few batch shapes keep the CPU kernels' memory flat (1: pad to the batch's longest only)")
    add("--no-group-by-length", action="store_true", help="batch examples in plain random order instead of "
        "grouping similar lengths (grouping spends less compute on padding)")
    add("--batch", type=_batch_value, default=4,
        help="sequences per micro-batch, per process (global batch: batch x processes x grad-accum), or 'auto': "
        "the largest that fits --max-memory (keeping --global-batch)")
    add("--global-batch", type=int, default=None, help="with --batch auto: sequences per optimizer step "
        "(default: 4 x --grad-accum)")
    add("--max-memory", default=None, help="with --batch auto: the process memory budget, e.g. 6GiB "
        "(default: the free RAM, or the free VRAM on CUDA)")
    add("--dry-run", action="store_true", help="print the memory estimate (tensor and process) for these settings and exit")
    add("--lr", type=float, default=2e-4)
    add("--lora-plus-ratio", type=float, default=1.0, help="LoRA+: lora_B trains at lr * ratio (16 in the paper)")
    add("--optimizer", default="adamw", choices=["adamw", "adamw8bit", "paged_adamw8bit"])
    add("--weight-decay", type=float, default=0.0)
    add("--warmup-steps", type=int, default=0)
    add("--min-lr-ratio", type=float, default=0.0, help="the cosine ends at lr * this")
    add("--max-grad-norm", type=float, default=1.0, help="gradient clipping (0: off)")
    add("--steps", type=int, default=None, help="optimizer steps (default: --epochs)")
    add("--epochs", type=float, default=1.0)
    add("--precision", default="auto", choices=["auto", "bf16", "fp32"], help="autocast dtype of the compute")
    add("--eval-every", type=int, default=0, help="evaluate every N steps (always before and after)")
    add("--save-every", type=int, default=0, help="checkpoint every N steps (always at the end)")
    add("--keep-checkpoints", type=int, default=2)
    add("--seed", type=int, default=0, help="seeds LoRA init, dropout, data order and the eval split")
    add("--device", default=None, help="cpu or cuda (default: cuda if present)")
    add("--resume", action="store_true", help="continue from the newest checkpoint in --out")
    add("--export", action="store_true", help="write the merged, dequantized model to OUT/merged at the end")
    add("--export-dtype", default="bf16", help="dtype of the merged export (bf16, fp16, fp32)")
    add("--no-progress", action="store_true", help="no progress bar")
    add("--sharding", default="none", choices=["none", "fsdp"],
        help="several processes: none (DDP, each holds the model) or fsdp (the frozen base is sharded across them)")


def _batch_value(text: str) -> int | str:
    """--batch: a positive integer or 'auto'."""
    if str(text).strip().lower() == "auto":
        return "auto"
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--batch {text!r}: give a number of sequences or 'auto'") from None


def resolve_options(args: argparse.Namespace) -> argparse.Namespace:
    """Defaults, then the --config file (JSON or TOML, dashes or underscores), then the typed flags."""
    typed = {k: v for k, v in vars(args).items() if k in DEFAULTS}
    values = dict(DEFAULTS)
    if typed.get("config"):
        path = Path(typed["config"])
        if not path.is_file():
            raise FileNotFoundError(f"--config {path}: no such file")
        loaded = _read_config_file(path)
        unknown = sorted(set(loaded) - set(DEFAULTS))
        if unknown:
            raise ValueError(f"--config {path}: unknown options {unknown}; use the flag names of `qlowrank train --help`")
        for key, value in loaded.items():
            _check_config_value(path, key, value)
        values.update(loaded)
    values.update(typed)
    return argparse.Namespace(**{**vars(args), **values})


def _read_config_file(path: Path) -> dict:
    """The options of a JSON or TOML config file, keys with underscores; ValueError naming the file if malformed."""
    try:
        text = path.read_text(encoding="utf-8-sig")
        if path.suffix == ".toml":
            import tomllib
            loaded = tomllib.loads(text)
        else:
            loaded = json.loads(text)
    except UnicodeDecodeError as err:
        raise ValueError(f"--config {path}: not UTF-8 text (byte {err.start}: {err.reason})") from None
    except ValueError as err:   # json.JSONDecodeError and tomllib.TOMLDecodeError are ValueErrors
        kind = "TOML" if path.suffix == ".toml" else "JSON"
        raise ValueError(f"--config {path}: not valid {kind} ({err})") from None
    if not isinstance(loaded, dict):
        raise ValueError(f"--config {path}: must hold an object of options, got {type(loaded).__name__}")
    return {str(k).replace("-", "_"): v for k, v in loaded.items()}


def _check_config_value(path: Path, key: str, value) -> None:
    """A config file value must have the type its flag parses to (no silent conversions)."""
    kind, choices, nargs, action = _KINDS[key]
    if value is None:
        return
    if action == "store_true":
        ok = isinstance(value, bool)
    elif nargs == "+":
        ok = isinstance(value, str) or (isinstance(value, list) and bool(value) and all(isinstance(v, str) for v in value))
    elif kind is _batch_value:
        ok = value == "auto" or (isinstance(value, int) and not isinstance(value, bool))
    elif kind is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif kind is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    else:
        ok = isinstance(value, (str, int)) and not isinstance(value, bool)   # "--bits": 4 or "4"
    if ok and choices is not None:
        ok = str(value) in choices
    if not ok:
        wanted = ("true or false" if action == "store_true" else "a file name or a list of them" if nargs == "+"
                  else f"one of {choices}" if choices else {int: "an integer", float: "a finite number", _batch_value: "an integer or 'auto'"}.get(kind, "a string"))
        raise ValueError(f"--config {path}: option {key!r} is {value!r:.80}; it must be {wanted}")


def load_tokenizer(model_path: str | Path):
    """The tokenizer of a model directory or of a .gguf file."""
    from ..model.load import load_tokenizer as load

    return load(model_path)


def data_fields(args: argparse.Namespace):
    """The row field names the --*-field options give."""
    from ..train import Fields

    return Fields(text=args.text_field, prompt=args.prompt_field, completion=args.completion_field,
                  messages=args.messages_field)


def run(args: argparse.Namespace) -> int:
    from ..model.checkpointing import enable_gradient_checkpointing
    from ..model.load import load_model
    from ..train import Trainer, load_examples, pack_examples, split_examples
    from ..train.parallel import local_device

    args = resolve_options(args)
    if not args.model or (not args.data and not args.dry_run):
        raise ValueError("qlowrank train needs --model and --data (as flags or in --config)")
    if args.batch == "auto" or args.dry_run:
        from .plan import choose_batch, dry_run
        if args.batch == "auto":
            args.batch, args.grad_accum = choose_batch(args)
        if args.dry_run:
            return dry_run(args)
    try:
        config = options.train_config(args)
        quant, lora = options.quant_config(args), options.lora_config(args)
    except ValueError as err:   # a value out of range: say where it may have come from
        raise ValueError(f"{err}" + (f" (options from --config {args.config} and the flags)" if args.config else "")) from None
    compute = quant.compute_dtype
    tokenizer = load_tokenizer(args.model)
    fields = data_fields(args)
    examples = load_examples(args.data, tokenizer, args.seq, truncation=not args.no_truncation, fields=fields)
    held = (load_examples(args.eval_data, tokenizer, args.seq, truncation=not args.no_truncation, fields=fields)
            if args.eval_data else [])
    if args.eval_data:
        train = examples
    else:
        train, held = split_examples(examples, args.eval_fraction if len(examples) >= 20 else 0.0, args.seed)
    if args.packing:
        train = pack_examples(train, args.seq)
    main_process = int(os.environ.get("RANK", "0")) == 0   # under torchrun / accelerate launch
    if main_process:
        print(f"data: {len(train)} training sequences, {len(held)} held out", flush=True)
    model = load_model(args.model, quant=quant, lora=lora, device=local_device(args.device), dtype=compute,
                       seed=args.seed)
    if not args.no_checkpointing:
        enable_gradient_checkpointing(model)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    # SIGTERM / SIGINT end training with TrainingInterrupted; cli.main turns it into 143 / 130.
    trainer = Trainer(model, config, train, held, pad_token_id=pad)
    result = trainer.train(resume=args.resume)
    if args.export:   # every rank takes part (FSDP gathers the base one block at a time); rank 0 writes
        merged = Path(args.out) / "merged"
        trainer.export_merged(merged, dtype=parse_dtype(args.export_dtype, "--export-dtype"), tokenizer=tokenizer,
                              overwrite=True)
    if not trainer.is_main:
        return 0
    if result.memory_table and args.no_progress:  # with a progress bar the trainer printed it
        print(result.memory_table)
    if result.evals:
        first, last = result.evals[0], result.evals[-1]
        print(f"eval loss: step {first['step']} {first['eval_loss']:.4f} -> step {last['step']} {last['eval_loss']:.4f}")
    print(f"adapter: {result.adapter_dir}\ncheckpoint: {result.checkpoint}\nmetrics: {Path(args.out) / 'metrics.jsonl'}")
    if args.export:
        print(f"merged model: {merged}")
    return 0
