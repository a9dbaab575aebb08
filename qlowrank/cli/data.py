"""`qlowrank data`: see what the loss will learn from a data file before training on it.

    qlowrank data --data train.jsonl --model PATH [--rows 3] [--format auto] [--seq 512]

Prints the first --rows rows as the model sees them, each token marked learned (in the loss)
or masked: coloured on a terminal, learned text between [[ and ]] otherwise. Then the stats
of every row of the files: rows per layout, tokens, rows truncated to --seq or dropped and
why, the share of learned tokens, and which end-of-turn / EOS tokens are learned. A data set
in which no end-of-turn token is ever learned gets a warning: a model tuned on it never
learns to stop. The rows are read exactly as `qlowrank train` reads them (same flags).
"""

from __future__ import annotations

import argparse
import os
import sys

from ..nn.loss import IGNORE_INDEX
from . import options
from .errors import exit_2_on_bad_input

LEARNED_MARKS = ("[[", "]]")                 # plain output: learned text between these
LEARNED_COLOUR, MASKED_COLOUR, RESET = "\x1b[1;32m", "\x1b[2m", "\x1b[0m"   # bold green, dim


def register(subparsers) -> None:
    parser = subparsers.add_parser("data", help="preview which tokens of a data file are learned, with stats",
                                   description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", nargs="+", required=True, help="data file(s), read as `qlowrank train --data` reads them")
    parser.add_argument("--model", default=None, help="model directory or .gguf file whose tokenizer and chat template "
                                                      "to use (default: the embedded SmolLM2-135M)")
    parser.add_argument("--rows", type=int, default=3, help="rows to preview (0: stats only) [default: 3]")
    seq = next(o for o in options.SHARED_OPTIONS if o.names == ("--seq",)).kwargs["default"]
    parser.add_argument("--seq", type=int, default=seq, help=f"longest sequence, as in train [default: {seq}]")
    options.add_data_options(parser.add_argument)
    parser.add_argument("--color", default="auto", choices=["auto", "always", "never"],
                        help="colour the preview (auto: on a terminal, unless NO_COLOR is set) [default: auto]")
    parser.set_defaults(func=exit_2_on_bad_input("data", run))


def learned_mask(example) -> list[bool]:
    """Per token: is it in the loss? (The first token never is: nothing comes before it to predict it.)"""
    return [i > 0 and label != IGNORE_INDEX for i, label in enumerate(example.labels)]


def render(example, tokenizer, colour: bool) -> str:
    """The example's text with its learned runs of tokens coloured (or between LEARNED_MARKS)."""
    mask, out, start = learned_mask(example), [], 0
    for end in range(1, len(mask) + 1):
        if end == len(mask) or mask[end] != mask[start]:
            text = tokenizer.decode(example.input_ids[start:end])
            if colour:
                out.append((LEARNED_COLOUR if mask[start] else MASKED_COLOUR) + text + RESET)
            else:
                out.append(LEARNED_MARKS[0] + text + LEARNED_MARKS[1] if mask[start] else text)
            start = end
    return "".join(out)


def run(args: argparse.Namespace) -> int:
    from ..data import DataError, DataStats, load_examples
    from .estimate import default_model
    from .train import load_tokenizer

    if args.rows < 0 or args.seq < 1:
        raise ValueError(f"--rows {args.rows} / --seq {args.seq}: give --rows >= 0 and --seq >= 1")
    tokenizer = load_tokenizer(default_model(args.model))
    stats = DataStats()
    try:
        examples = load_examples(args.data, tokenizer, args.seq, fields=options.data_fields(args), format=args.format,
                                 stats=stats)
    except DataError:
        if stats.examples == 0 and stats.rows:   # every row read was dropped: show what became of them
            print("\n".join(stats.lines()))
        raise
    colour = args.color == "always" or (args.color == "auto" and sys.stdout.isatty() and "NO_COLOR" not in os.environ)
    if args.rows:
        legend = (f"{LEARNED_COLOUR}learned{RESET} / {MASKED_COLOUR}masked{RESET}" if colour
                  else f"{LEARNED_MARKS[0]}learned{LEARNED_MARKS[1]}, the rest masked")
        print(f"preview of {min(args.rows, len(examples))} rows ({legend}):")
    cut = set(stats.truncated)
    for example in examples[:args.rows]:
        learned = sum(learned_mask(example))
        note = f", cut to --seq {args.seq}" if example.source in cut else ""
        print(f"--- {example.source}: {len(example.input_ids)} tokens, {learned} learned{note}")
        print(render(example, tokenizer, colour))
    print("\n".join(stats.lines()))
    warning = stats.end_warning()
    if warning:
        print(f"qlowrank data: warning: {warning}", file=sys.stderr)
    return 0
