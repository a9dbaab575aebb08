"""How every command reports a failure: one line on stderr, exit 2 for bad input, 1 for a failed write; never a traceback."""

from __future__ import annotations

import argparse
import sys
from typing import Callable


def one_line(err: BaseException) -> str:
    """The error's message on a single line (file contents quoted in it may hold newlines)."""
    # qlowrank's own write errors (atomic.staged_dir) explain themselves: no "[Errno 28]" prefix.
    text = err.strerror if isinstance(err, OSError) and hasattr(err, "cause") else str(err)
    return " ".join(str(text).split()) or type(err).__name__


def exit_2_on_bad_input(command: str, body: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    """Wrap a command body: a missing or malformed input (file, config, data, adapter) prints
    one line and exits 2; a write that fails (full disk, read-only folder) prints one line and exits 1."""
    def run(args: argparse.Namespace) -> int:
        try:
            return body(args)
        except (FileNotFoundError, FileExistsError, ValueError) as err:   # DataError, CheckpointError, JSON, TOML, UTF-8
            print(f"qlowrank {command}: error: {one_line(err)}", file=sys.stderr)
            return 2
        except OSError as err:
            print(f"qlowrank {command}: error: {one_line(err)}", file=sys.stderr)
            return 1
    return run
