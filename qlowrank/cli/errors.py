"""How every command reports a failure: a user error is one line, a fault inside the code shows where it was raised.

Three kinds, told apart by who raised what (see `kind_of`):

- a user error (a bad path, data row, flag value, config or adapter file; a budget too small): one line
  on stderr, exit 2. qlowrank's own checks raise these; the line names the thing and what to do.
- a failure qlowrank understands (a write that failed on a full disk or a read-only folder, a loss that
  became NaN, memory that ran out): one line, exit 1. Nothing is wrong with the input or the code; the
  line says what to do.
- anything else (a KeyError, a RuntimeError raised inside torch mid-step, a ValueError raised inside
  transformers): "internal error", the innermost frames of its traceback, exit 1.

`--debug` (on any command) or QLOWRANK_DEBUG=1 prints the full traceback, causes included, above the
line for every kind.
"""

from __future__ import annotations

import argparse
import os
import sys
import traceback
from pathlib import Path
from typing import Callable

# The package whose own checks raise user errors; a frame under this folder is qlowrank's code.
PACKAGE_DIR = Path(__file__).resolve().parents[1]
# Innermost frames an internal error prints: enough to show the library call and qlowrank's caller.
LAST_FRAMES = 4

USER, FAILED, INTERNAL = "user", "failed", "internal"
OUT_OF_MEMORY_HINT = ("`qlowrank train --dry-run` shows what the run needs; lower --batch or --seq, "
                      "or let --batch auto --max-memory pick a layout that fits")
EXIT_CODES = {USER: 2, FAILED: 1, INTERNAL: 1}


def one_line(err: BaseException) -> str:
    """The error's message on a single line (file contents quoted in it may hold newlines)."""
    # qlowrank's own write errors (atomic.staged_dir) explain themselves: no "[Errno 28]" prefix.
    text = err.strerror if isinstance(err, OSError) and hasattr(err, "cause") else str(err)
    return " ".join(str(text).split()) or type(err).__name__


def _in_qlowrank(frame: traceback.FrameSummary) -> bool:
    return Path(frame.filename).resolve().is_relative_to(PACKAGE_DIR)


def raised_in_qlowrank(err: BaseException) -> bool:
    """Whether the innermost Python frame of `err`'s traceback is qlowrank's code (its own check raised it)."""
    frames = traceback.extract_tb(err.__traceback__)
    return bool(frames) and _in_qlowrank(frames[-1])


def last_frames(err: BaseException) -> str:
    """The innermost LAST_FRAMES frames of `err`'s traceback, formatted; when none of them is qlowrank's
    code, the innermost frame that is goes first, since it says which call of qlowrank's led there."""
    frames = traceback.extract_tb(err.__traceback__)
    shown = traceback.format_list(frames[-LAST_FRAMES:])
    ours = [frame for frame in frames[:-LAST_FRAMES] if _in_qlowrank(frame)]
    if ours:
        shown = [*traceback.format_list(ours[-1:]), "  ...\n", *shown]
    return "".join(shown)


def kind_of(err: BaseException) -> str:
    """USER, FAILED or INTERNAL (module docstring).

    A ValueError is a user error only when qlowrank raised it: the same class raised inside torch or
    transformers means qlowrank handed it something it should not have. Where qlowrank relies on a
    library to reject a file (JSON, TOML, safetensors, tokenizers), the call site re-raises naming the file.
    """
    own_class = type(err).__module__.split(".")[0] == "qlowrank"
    if isinstance(err, (ValueError, FileNotFoundError, FileExistsError)) and (own_class or raised_in_qlowrank(err)):
        return USER
    if own_class or (isinstance(err, OSError) and err.errno is not None) or out_of_memory(err):
        return FAILED   # NaN loss, a write refused by the OS, a run too big: the message is the whole story
    return INTERNAL


def out_of_memory(err: BaseException) -> bool:
    """Python's MemoryError or torch's (CUDA) OutOfMemoryError: the run does not fit, nothing is broken."""
    torch = sys.modules.get("torch")   # not imported: torch raised nothing
    return isinstance(err, MemoryError) or (torch is not None and isinstance(err, torch.OutOfMemoryError))


def debugging(args: argparse.Namespace | None = None) -> bool:
    """Whether to print full tracebacks: `--debug` on the command line or QLOWRANK_DEBUG=1."""
    return bool(getattr(args, "debug", False)) or os.environ.get("QLOWRANK_DEBUG") == "1"


def report(command: str, err: BaseException, debug: bool = False) -> int:
    """Print `err` as its kind asks on stderr and return the exit code."""
    kind = kind_of(err)
    if debug:
        traceback.print_exception(err, file=sys.stderr)
    elif kind == INTERNAL:
        print("Traceback (innermost frames; --debug or QLOWRANK_DEBUG=1 prints all):", file=sys.stderr)
        print(last_frames(err), end="", file=sys.stderr)
    message = one_line(err)
    if kind == INTERNAL:
        named = f"{type(err).__name__}: {message}" if message != type(err).__name__ else message
        print(f"qlowrank {command}: internal error: {named}", file=sys.stderr)
    else:
        hint = f" (out of memory: {OUT_OF_MEMORY_HINT})" if out_of_memory(err) else ""
        print(f"qlowrank {command}: error: {message}{hint}", file=sys.stderr)
    return EXIT_CODES[kind]


def reporting_errors(command: str, body: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    """Wrap a command body so that any exception it raises is reported by `report` (KeyboardInterrupt passes)."""
    def run(args: argparse.Namespace) -> int:
        try:
            return body(args)
        except Exception as err:   # noqa: BLE001 - every error gets a kind; none leaves as a bare traceback
            return report(command, err, debugging(args))
    return run


# The name every command module registers its body with.
exit_2_on_bad_input = reporting_errors
