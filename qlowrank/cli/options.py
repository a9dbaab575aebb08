"""The one translator from command-line options (and `--config` files) to configs.

`train`, `train --dry-run`, `train --batch auto`, `estimate` and `profile` describe a run with
the same flags. Those flags are declared here once (`SHARED_OPTIONS`) and turned into
`QuantConfig`, `LoraConfig`, `TrainConfig`, the loss and `estimate_memory`'s arguments here
once, so an estimate always describes the adapter, base and loss that the run would train.
`LayeredOptions` layers a command's defaults < a JSON / TOML config file < the typed flags.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..config import (
    DEFAULT_CHUNK_TOKENS,
    ESTIMATE_OPTIMIZERS,
    TRAIN_OPTIMIZERS,
    LoraConfig,
    QuantConfig,
    TrainConfig,
    parse_dtype,
)
from ..data import FORMATS, Fields


@dataclass(frozen=True)
class Option:
    """One flag: its names and argparse's keyword arguments (dest, type, default, choices, action, help)."""

    names: tuple[str, ...]
    kwargs: dict = field(default_factory=dict)


# What every command that describes a training run accepts. Every long name is unambiguous
# for launchers that take abbreviations from the script's own arguments (torchrun's `--r`).
SHARED_OPTIONS: tuple[Option, ...] = (
    # the frozen base
    Option(("--bits",), {"default": "4", "choices": ["4", "8", "none"], "help": "base storage (none: float base)"}),
    Option(("--quant-type",), {"default": "nf4", "choices": ["nf4", "fp4"]}),
    Option(("--no-double-quant",), {"action": "store_true", "help": "keep the 4-bit block scales in fp32"}),
    # the adapter
    Option(("--lora-rank", "--r"), {"dest": "r", "type": int, "default": 16, "help": "LoRA rank r"}),
    Option(("--lora-alpha", "--alpha"), {"dest": "alpha", "type": float, "default": None,
                                         "help": "LoRA alpha (default 2 * r)"}),
    Option(("--dropout",), {"type": float, "default": 0.0, "help": "dropout on the LoRA branch"}),
    Option(("--target", "--targets"), {"dest": "target", "default": "all-linear",
                                       "help": "all-linear, or comma-separated module names (q_proj,v_proj)"}),
    Option(("--target-parameters",), {"default": None,
                                      "help": "MoE parameters to adapt too: 'experts' (all expert stacks), "
                                              "'router' (all routers), or comma-separated PEFT names "
                                              "(mlp.experts.gate_up_proj,mlp.gate.weight)"}),
    Option(("--rslora",), {"action": "store_true", "help": "scale by alpha / sqrt(r)"}),
    Option(("--init",), {"default": "kaiming", "choices": ["kaiming", "gaussian", "loftq", "pissa"],
                         "help": "LoRA init; loftq / pissa are quantization-aware (computed from the float weights "
                                 "while loading)"}),
    Option(("--loftq-iters",), {"type": int, "default": 1,
                                "help": "LoftQ alternations (> 1 also changes the frozen base)"}),
    Option(("--dora",), {"action": "store_true", "help": "DoRA: a trainable magnitude per output row"}),
    Option(("--train-modules",), {"default": None, "help": "comma-separated modules trained whole in float32 "
                                                           "(PEFT's modules_to_save), e.g. lm_head,embed_tokens"}),
    # the step's shape and what it keeps
    Option(("--seq",), {"type": int, "default": 512, "help": "longest sequence (tokens)"}),
    Option(("--grad-accum",), {"type": int, "default": 1, "help": "micro-batches per optimizer step"}),
    Option(("--packing",), {"action": "store_true", "help": "pack short examples into --seq windows"}),
    Option(("--chunk-tokens",), {"type": int, "default": DEFAULT_CHUNK_TOKENS,
                                 "help": "rows of logits per chunk of the loss (0: naive full logits)"}),
    Option(("--no-checkpointing",), {"action": "store_true", "help": "keep activations instead of recomputing them"}),
    Option(("--keep-blocks",), {"type": int, "default": 0, "help": "partial checkpointing: the last N decoder blocks "
                                "keep their activations (faster, more memory; 0: recompute every block)"}),
    Option(("--keep-attention",), {"default": "auto", "choices": ["auto", "on", "off"],
                                   "help": "checkpointed blocks keep their attention output (auto: from 256 tokens)"}),
    Option(("--offload-activations",), {"action": "store_true", "help": "CUDA: tensors saved for backward wait in "
                                        "host memory (with checkpointing the GPU holds about one block's activations; "
                                        "--keep-attention auto then means off)"}),
    Option(("--no-offload",), {"action": "store_true", "help": "with --batch auto / --plan on CUDA: never offload "
                                                               "activations (otherwise the planner may, when it must)"}),
    Option(("--max-host-memory",), {"default": None, "help": "with --batch auto / --plan on CUDA: host memory offloaded "
                                                             "activations may pin, per process (default: what is "
                                                             "available, shared by this machine's processes)"}),
    Option(("--compile",), {"action": "store_true", "help": "torch.compile each decoder block: 7-15%% faster steps "
                                                            "on a CPU after a one-off compile of ~20 s"}),
    Option(("--no-compile",), {"action": "store_true", "help": "with --batch auto / --plan: never compile (otherwise "
                                                               "the planner compiles when the run is long enough to "
                                                               "pay the compile back)"}),
)

# How data rows are read: `train` and `data` take the same flags (layouts: qlowrank/data/layouts.py, docs/data.md).
DATA_OPTIONS: tuple[Option, ...] = (
    Option(("--format", "--data-format"), {"dest": "format", "default": "auto", "choices": ["auto", *FORMATS],
                                           "help": "row layout (auto: detected per row from its fields)"}),
    Option(("--text-field",), {"default": "text", "help": "row field (column) holding whole texts"}),
    Option(("--prompt-field",), {"default": "prompt", "help": "row field holding prompts (no loss)"}),
    Option(("--completion-field",), {"default": "completion", "help": "row field holding completions (loss)"}),
    Option(("--messages-field",), {"default": "messages", "help": "row field holding chat messages"}),
)


def add_data_options(add: Callable[..., object]) -> None:
    """Declare `DATA_OPTIONS` through `add` (a parser's add_argument, or `LayeredOptions.adder`)."""
    for option in DATA_OPTIONS:
        add(*option.names, **option.kwargs)


def data_fields(args: argparse.Namespace) -> Fields:
    """The row field names the --*-field options give."""
    return Fields(text=args.text_field, prompt=args.prompt_field, completion=args.completion_field,
                  messages=args.messages_field)


# `train --optimizer` builds these; `estimate` / `profile` also model SGD (full fine-tuning comparisons).
ESTIMATE_OPTIMIZER_CHOICES: list[str] = list(dict.fromkeys(TRAIN_OPTIMIZERS + ESTIMATE_OPTIMIZERS))


def add_shared_options(add: Callable[..., object], defaults: dict | None = None) -> None:
    """Declare `SHARED_OPTIONS` through `add` (a parser's add_argument, or `LayeredOptions.adder`).

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


def batch_value(text: str) -> int | str:
    """`train --batch`: a positive integer or 'auto'."""
    if str(text).strip().lower() == "auto":
        return "auto"
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--batch {text!r}: give a number of sequences or 'auto'") from None


def device(args: argparse.Namespace) -> torch.device:
    """--device, or cuda when one is present, else cpu."""
    return torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))


# --- from options to configs ---------------------------------------------------------------

def compute_dtype(args: argparse.Namespace) -> torch.dtype:
    """The compute dtype: `train --precision` (auto / bf16: bf16, fp32), or `estimate --dtype`."""
    precision = getattr(args, "precision", None)
    if precision is not None:
        return torch.float32 if precision == "fp32" else torch.bfloat16
    dtype = parse_dtype(getattr(args, "dtype", "bf16"), "--dtype")
    on = getattr(args, "device", None) or ("cuda" if torch.cuda.is_available() else "cpu")
    if dtype == torch.float16 and not str(on).startswith("cuda"):
        # Said, not swapped for bf16 behind the user's back: fp16 matmuls are ~3000x slower than bf16 on a CPU.
        raise ValueError("--dtype fp16: fp16 compute is refused on a CPU; use bf16 (or fp32), or --device cuda")
    return dtype


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
                      use_dora=args.dora, modules_to_save=_names(args.train_modules),
                      target_parameters=_names(getattr(args, "target_parameters", None)))


def compile_request(args: argparse.Namespace) -> bool | None:
    """--compile (True), --no-compile (False), or neither: None, the planner decides."""
    forbidden = getattr(args, "no_compile", False)
    if args.compile and forbidden:
        raise ValueError("--compile and --no-compile contradict each other: give one")
    return True if args.compile else (False if forbidden else None)


def offload_request(args: argparse.Namespace) -> bool | None:
    """--offload-activations (True), --no-offload (False), or neither: None, the planner decides (on CUDA).

    Raises:
        ValueError: both given, or offloading asked for a run that is not on CUDA.
    """
    if args.offload_activations and args.no_offload:
        raise ValueError("--offload-activations and --no-offload contradict each other: give one")
    if args.offload_activations and device(args).type != "cuda":
        raise ValueError("--offload-activations moves activations from a GPU to host memory; on a CPU they are in "
                         "host memory already: drop it (or give --device cuda)")
    return True if args.offload_activations else (False if args.no_offload else None)


def train_config(args: argparse.Namespace) -> TrainConfig:
    """The TrainConfig the `train` options describe."""
    return TrainConfig(
        out_dir=args.out, steps=args.steps, epochs=args.epochs, batch_size=args.batch, grad_accum=args.grad_accum,
        lr=args.lr, lora_plus_ratio=args.lora_plus_ratio, optimizer=args.optimizer, weight_decay=args.weight_decay,
        warmup_steps=args.warmup_steps, min_lr_ratio=args.min_lr_ratio, max_grad_norm=args.max_grad_norm or None,
        precision=args.precision, chunk_tokens=args.chunk_tokens or None, eval_every=args.eval_every,
        save_every=args.save_every, keep_checkpoints=args.keep_checkpoints, seed=args.seed,
        pad_multiple=args.pad_multiple, compile=args.compile, offload_activations=args.offload_activations,
        group_by_length=not args.no_group_by_length,
        sharding=None if args.sharding in (None, "none") else args.sharding,
        progress=not args.no_progress, objective=args.objective, beta=args.beta,
        label_smoothing=args.label_smoothing, orpo_lambda=args.orpo_lambda,
    )


def loss_fn(args: argparse.Namespace) -> Callable[[torch.nn.Module, torch.Tensor], torch.Tensor]:
    """The step's loss `(model, tokens) -> loss`: the trainer's chunked loss at --chunk-tokens, or
    the model's own loss over full fp32 logits for --chunk-tokens 0 (what the estimate and the
    profiler both run)."""
    from ..memory.estimate import chunked_loss_fn, default_loss

    if not args.chunk_tokens:
        return default_loss
    if args.chunk_tokens == DEFAULT_CHUNK_TOKENS:
        return chunked_loss_fn
    return functools.partial(_chunked_loss, chunk_tokens=args.chunk_tokens)


def _chunked_loss(model: torch.nn.Module, tokens: torch.Tensor, chunk_tokens: int) -> torch.Tensor:
    from ..nn.loss import causal_lm_loss

    return causal_lm_loss(model, tokens, tokens, chunk_tokens=chunk_tokens)


def checkpointing(args: argparse.Namespace) -> dict:
    """`enable_gradient_checkpointing`'s keep_blocks / keep_attention for --keep-blocks / --keep-attention."""
    # offloaded, a kept attention output stays on the GPU (checkpoint stores it, not the offloading hooks):
    # automatic then means recomputed, which is what offloading is for
    automatic = False if args.offload_activations else None
    return {"keep_blocks": args.keep_blocks,
            "keep_attention": {"auto": automatic, "on": True, "off": False}[args.keep_attention]}


def estimate_arguments(args: argparse.Namespace, batch: int, device_type: str) -> dict:
    """`estimate_memory`'s keyword arguments for the run the flags describe, at micro-batch `batch`.

    The same quantization, adapter (DoRA, init, modules to save), compute dtype, optimizer
    states, loss (`loss_fn`), checkpointing, accumulation and packing as the run itself.
    """
    # paged_adamw8bit keeps the same 8-bit states as adamw8bit (paging only moves them under pressure)
    optimizer = "adamw8bit" if args.optimizer in ("adamw8bit", "paged_adamw8bit") else args.optimizer
    return {"quant": quant_config(args), "lora": lora_config(args, allow_full=True), "batch_size": batch, "seq_len": args.seq,
                "gradient_checkpointing": not args.no_checkpointing, "optimizer": optimizer, "dtype": compute_dtype(args),
                "device": device_type, "chunked_loss": bool(args.chunk_tokens), "loss_fn": loss_fn(args),
                "grad_accum": args.grad_accum, "packing": args.packing,
                "offload_activations": args.offload_activations, **checkpointing(args)}


# --- defaults < config file < flags --------------------------------------------------------

@dataclass(frozen=True)
class OptionKind:
    """How a config file value for one option is checked: what its flag would parse it to."""

    type: Callable = str
    choices: tuple | None = None
    nargs: str | None = None
    flag: bool = False          # store_true: the value must be true or false

    def accepts(self, value: object) -> bool:
        """True when `value` (from JSON / TOML) is what the flag parses to (no silent conversions)."""
        def number(kinds: tuple) -> bool:
            return isinstance(value, kinds) and not isinstance(value, bool)
        if self.flag:
            ok = isinstance(value, bool)
        elif self.nargs == "+":
            ok = isinstance(value, str) or (isinstance(value, list) and bool(value)
                                            and all(isinstance(v, str) for v in value))
        elif self.type is batch_value:
            ok = value == "auto" or number((int,))
        elif self.type is int:
            ok = number((int,))
        elif self.type is float:
            ok = number((int, float)) and math.isfinite(value)
        else:
            ok = number((str, int))   # "--bits": 4 or "4"
        return ok and (self.choices is None or str(value) in self.choices)

    def wanted(self) -> str:
        """What a valid value is, in words."""
        if self.flag:
            return "true or false"
        if self.nargs == "+":
            return "a file name or a list of them"
        if self.choices:
            return f"one of {list(self.choices)}"
        return {int: "an integer", float: "a finite number", batch_value: "an integer or 'auto'"}.get(self.type, "a string")


@dataclass
class LayeredOptions:
    """A command's options whose values layer: defaults < a --config file (JSON or TOML) < the typed flags.

    Declare the options through `adder(parser)`: the parser then gets no defaults
    (argparse.SUPPRESS), so its namespace holds only the flags the user typed, and `resolve`
    adds the config file's values and the defaults under them.
    """

    command: str                                   # for messages: `qlowrank <command> --help`
    defaults: dict = field(default_factory=dict)   # dest -> default
    kinds: dict = field(default_factory=dict)      # dest -> OptionKind

    def adder(self, parser: argparse.ArgumentParser) -> Callable[..., None]:
        """An add_argument(*names, **kwargs) for `parser` that records each option's default and kind."""
        def add(*names: str, default=None, action=None, **kwargs) -> None:
            dest = kwargs.pop("dest", names[0].lstrip("-").replace("-", "_"))
            self.defaults[dest] = False if action == "store_true" else default
            choices = kwargs.get("choices")
            self.kinds[dest] = OptionKind(kwargs.get("type", str), tuple(choices) if choices else None,
                                          kwargs.get("nargs"), action == "store_true")
            if default not in (None, False):
                kwargs["help"] = f"{kwargs.get('help', '')} [default: {default}]".strip()
            parser.add_argument(*names, dest=dest, default=argparse.SUPPRESS, action=action, **kwargs)
        return add

    def resolve(self, args: argparse.Namespace) -> argparse.Namespace:
        """Defaults, then the --config file (JSON or TOML, dashes or underscores), then the typed flags."""
        typed = {k: v for k, v in vars(args).items() if k in self.defaults}
        values = dict(self.defaults)
        if typed.get("config"):
            values.update(self.read(Path(typed["config"])))
        values.update(typed)
        return argparse.Namespace(**{**vars(args), **values})

    def read(self, path: Path) -> dict:
        """The options of config file `path`, checked; ValueError naming the file and the option otherwise."""
        if not path.is_file():
            raise FileNotFoundError(f"--config {path}: no such file")
        loaded = read_config_file(path)
        unknown = sorted(set(loaded) - set(self.defaults))
        if unknown:
            raise ValueError(f"--config {path}: unknown options {unknown}; use the flag names of "
                             f"`qlowrank {self.command} --help`")
        for key, value in loaded.items():
            kind = self.kinds[key]
            if value is not None and not kind.accepts(value):   # null: this option's default
                raise ValueError(f"--config {path}: option {key!r} is {value!r:.80}; it must be {kind.wanted()}")
        return loaded


def read_config_file(path: Path) -> dict:
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
