"""The `qlowrank` command line: one entry point, one sub-command module per job."""

from __future__ import annotations

import argparse
import importlib
import sys

from ..version import __version__
from .errors import reporting_errors

# Each of these modules of qlowrank/cli/ defines register(subparsers), which adds its command's
# parser and sets `func` (args -> exit code); `profile_memory` is `qlowrank profile` (a module named
# `profile` would shadow the standard library's). Add a module here when its command is ready.
COMMAND_MODULES: list[str] = ["estimate", "profile_memory", "train", "demo", "export", "generate", "data"]
DEBUG_HELP = "print the full traceback of any error (also QLOWRANK_DEBUG=1)"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="qlowrank",
        description="Quantized, low-memory LoRA fine-tuning: train, estimate, profile, export, generate, demo, data.",
    )
    parser.add_argument("--version", action="version", version=f"qlowrank {__version__}")
    parser.add_argument("--debug", action="store_true", help=DEBUG_HELP)
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(f"qlowrank.cli.{name}").register(subparsers)
    for command in subparsers.choices.values():
        # Also after the command name; SUPPRESS keeps a sub-command's unset flag from
        # overwriting `qlowrank --debug train ...`'s.
        command.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=DEBUG_HELP)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    try:
        # Commands wrap their own bodies too; this catches what a command without the wrapper raises.
        return int(reporting_errors(args.command, args.func)(args) or 0)
    except KeyboardInterrupt as err:
        # Training turns SIGTERM / SIGINT into TrainingInterrupted (exit_code 143 / 130) after
        # checkpointing; a Ctrl-C anywhere else exits 130 too, without a traceback.
        print(f"qlowrank {args.command}: interrupted", file=sys.stderr)
        return getattr(err, "exit_code", 130)


if __name__ == "__main__":
    sys.exit(main())
