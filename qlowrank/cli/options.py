"""The one translator from command-line options (and `--config` files) to configs.

`train`, `train --dry-run`, `train --batch auto`, `estimate` and `profile` describe a run with
the same flags. Those flags are declared here once (`SHARED_OPTIONS`, their defaults read off
`RunSpec` and its configs) and turned into one `RunSpec` here once (`run_spec`), so an estimate
always describes the adapter, base, loss and layout that the run would train.
`LayeredOptions` layers a command's defaults < a JSON / TOML config file < the typed flags.
"""

from __future__ import annotations

import argparse
import json
import math
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..config import (
    DEFAULT_CHUNK_TOKENS,
    OBJECTIVES,
    TRAIN_OPTIMIZERS,
    LoraConfig,
    QuantConfig,
    RunSpec,
    TrainConfig,
    parse_dtype,
)
from ..data import FORMATS, Fields


@dataclass(frozen=True)
class Option:
    """One flag: its names and argparse's keyword arguments (dest, type, default, choices, action, help)."""

    names: tuple[str, ...]
    kwargs: dict = field(default_factory=dict)


def default_of(config: type, name: str) -> object:
    """The default of field `name` of dataclass `config`: flags take their defaults from the configs, not a copy."""
    found = config.__dataclass_fields__[name]
    return found.default_factory() if callable(found.default_factory) else found.default


# What every command that describes a training run accepts. Every long name is unambiguous
# for launchers that take abbreviations from the script's own arguments (torchrun's `--r`).
SHARED_OPTIONS: tuple[Option, ...] = (
    # the frozen base
    Option(("--bits",), {"default": "4", "choices": ["4", "8", "none"], "help": "base storage (none: float base)"}),
    Option(("--quant-type",), {"default": default_of(QuantConfig, "quant_type"), "choices": ["nf4", "fp4"]}),
    Option(("--no-double-quant",), {"action": "store_true", "help": "keep the 4-bit block scales in fp32"}),
    # the adapter
    Option(("--lora-rank", "--r"), {"dest": "r", "type": int, "default": default_of(LoraConfig, "r"), "help": "LoRA rank r"}),
    Option(("--lora-alpha", "--alpha"), {"dest": "alpha", "type": float, "default": None,
                                         "help": "LoRA alpha (default 2 * r)"}),
    Option(("--dropout",), {"type": float, "default": default_of(LoraConfig, "dropout"), "help": "dropout on the LoRA branch"}),
    Option(("--target", "--targets"), {"dest": "target", "default": "all-linear",
                                       "help": "all-linear, or comma-separated module names (q_proj,v_proj)"}),
    Option(("--target-parameters",), {"default": None,
                                      "help": "MoE parameters to adapt too: 'experts' (all expert stacks), "
                                              "'router' (all routers), or comma-separated PEFT names "
                                              "(mlp.experts.gate_up_proj,mlp.gate.weight)"}),
    Option(("--rslora",), {"action": "store_true", "help": "scale by alpha / sqrt(r)"}),
    Option(("--init",), {"default": default_of(LoraConfig, "init"), "choices": ["kaiming", "gaussian", "loftq", "pissa"],
                         "help": "LoRA init; loftq / pissa are quantization-aware (computed from the float weights "
                                 "while loading)"}),
    Option(("--loftq-iters",), {"type": int, "default": default_of(LoraConfig, "loftq_iters"),
                                "help": "LoftQ alternations (> 1 also changes the frozen base)"}),
    Option(("--dora",), {"action": "store_true", "help": "DoRA: a trainable magnitude per output row"}),
    Option(("--train-modules",), {"default": None, "help": "comma-separated modules trained whole in float32 "
                                                           "(PEFT's modules_to_save), e.g. lm_head,embed_tokens"}),
    # the step's shape and what it keeps
    Option(("--seq",), {"type": int, "default": default_of(RunSpec, "seq_len"), "help": "longest sequence (tokens)"}),
    Option(("--grad-accum",), {"type": int, "default": default_of(TrainConfig, "grad_accum"),
                               "help": "micro-batches per optimizer step"}),
    Option(("--objective",), {"default": default_of(TrainConfig, "objective"), "choices": list(OBJECTIVES),
                              "help": "sft: supervised rows; dpo / orpo: preference pairs (prompt / chosen / rejected "
                                      "rows, two sequences each; docs/preference.md)"}),
    Option(("--optimizer",), {"default": default_of(TrainConfig, "optimizer"), "choices": list(TRAIN_OPTIMIZERS),
                              "help": "adamw (fp32 states), adamw8bit / paged_adamw8bit (bitsandbytes 8-bit states), "
                                      "sgd (no state)"}),
    Option(("--sharding",), {"default": "none", "choices": ["none", "fsdp"],
                             "help": "several processes: none (DDP, each holds the model) or fsdp (the frozen base "
                                     "is sharded across them; estimates are one rank's)"}),
    Option(("--packing",), {"action": "store_true", "help": "pack short examples into --seq windows"}),
    Option(("--chunk-tokens",), {"type": int, "default": DEFAULT_CHUNK_TOKENS,
                                 "help": "rows of logits per chunk of the loss (0: naive full logits)"}),
    Option(("--no-checkpointing",), {"action": "store_true", "help": "keep activations instead of recomputing them"}),
    Option(("--keep-blocks",), {"type": int, "default": default_of(RunSpec, "keep_blocks"), "help": "partial checkpointing: the last N decoder blocks "
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
    Option(("--compile",), {"action": "store_true", "help": "torch.compile each decoder block (a one-off compile of "
                                                            "~40 s on a CPU; under checkpointing the blocks run "
                                                            "eagerly, so it gains nothing there)"}),
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
        ValueError: both given (offloading off CUDA is refused by the RunSpec).
    """
    if args.offload_activations and args.no_offload:
        raise ValueError("--offload-activations and --no-offload contradict each other: give one")
    return True if args.offload_activations else (False if args.no_offload else None)


# TrainConfig fields whose flag has another name or form (the rest: the field's name, dashes for underscores)
_TRAIN_FLAGS: dict[str, Callable[[argparse.Namespace], object]] = {
    "out_dir": lambda args: args.out,
    "batch_size": lambda args: args.batch,
    "max_grad_norm": lambda args: args.max_grad_norm or None,
    "chunk_tokens": lambda args: args.chunk_tokens or None,
    "group_by_length": lambda args: not args.no_group_by_length,
    "progress": lambda args: not args.no_progress,
    "sharding": lambda args: None if args.sharding in (None, "none") else args.sharding,
}


def train_config(args: argparse.Namespace) -> TrainConfig:
    """The TrainConfig the options describe; a command without some loop flags (estimate) gets their defaults."""
    values = {}
    for name in TrainConfig.__dataclass_fields__:
        read = _TRAIN_FLAGS.get(name, lambda args, name=name: getattr(args, name))
        try:
            values[name] = read(args)
        except AttributeError:   # not a flag of this command: TrainConfig's default
            continue
    if not isinstance(values.get("batch_size", 1), int):   # --batch auto, before the planner chose
        values.pop("batch_size")
    return TrainConfig(**values)


def run_spec(args: argparse.Namespace, allow_full: bool = False, processes: int | None = None) -> RunSpec:
    """The run the options describe: the one translation `train`, `--dry-run`, `--batch auto`, `estimate`
    and `profile` share, so an estimate describes the base, adapter, loss and layout the run trains.

    Args:
        args: the parsed (and resolved) options.
        allow_full: `--r 0` means full fine-tuning of a float base (estimate, profile).
        processes: training processes (default: --processes, else torchrun's WORLD_SIZE, else 1).
    """
    processes = processes or getattr(args, "processes", None) or int(os.environ.get("WORLD_SIZE", "1"))
    # offloaded, a kept attention output stays on the GPU (checkpoint stores it, not the offloading hooks):
    # automatic then means recomputed, which is what offloading is for
    automatic = False if args.offload_activations else None
    device = getattr(args, "device", None)
    return RunSpec(model=args.model, quant=quant_config(args), lora=lora_config(args, allow_full),
                   train=train_config(args), seq_len=args.seq, packing=args.packing,
                   checkpointing=not args.no_checkpointing, keep_blocks=args.keep_blocks,
                   keep_attention={"auto": automatic, "on": True, "off": False}[args.keep_attention],
                   processes=processes, device=torch.device(device).type if device else None)


def checkpointing(spec: RunSpec) -> dict:
    """`enable_gradient_checkpointing`'s keep_blocks / keep_attention for the run."""
    return {"keep_blocks": spec.keep_blocks, "keep_attention": spec.keep_attention}


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
