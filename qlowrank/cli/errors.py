"""How every command reports a failure: one line on stderr, exit 2 for bad input, 1 for a failed write.

The traceback is kept from users, since the line names the file and what to do. Set
QLOWRANK_TRACEBACK=1 to print it above the line, e.g. for an error raised inside torch or
transformers mid-step, where the line alone cannot say where.
"""

from __future__ import annotations

import argparse
import os
import sys
import traceback
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
            return _report(command, err, 2)
        except OSError as err:
            return _report(command, err, 1)
    return run


def _report(command: str, err: BaseException, code: int) -> int:
    if os.environ.get("QLOWRANK_TRACEBACK") == "1":
        traceback.print_exception(err, file=sys.stderr)
    print(f"qlowrank {command}: error: {one_line(err)}", file=sys.stderr)
    return code
