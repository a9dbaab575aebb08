"""Read rows from data files: JSONL, a JSON array, plain text, or tables (Parquet, CSV, saved datasets)."""

from __future__ import annotations

import codecs
import json
from pathlib import Path
from typing import Any, Iterator

from .example import DataError
from .sources import TABLE_SUFFIXES, SourceError, is_table_source, read_table_rows

TEXT_SUFFIXES = (".txt", ".md", ".text")


def read_rows(path: str | Path) -> Iterator[tuple[int, Any]]:
    """Yield (line or row number, row) from a data file or saved dataset.

    .jsonl, .json (an array of objects) and text files give line numbers; a text file yields
    one {"text": ...} row per blank-line-separated block. Parquet, CSV and `save_to_disk`
    folders (through `datasets`) give 1-based row numbers.
    """
    path = Path(path)
    if path.exists() and is_table_source(path):
        try:
            yield from read_table_rows(path)
        except SourceError as err:
            raise DataError(str(err)) from None
        return
    if not path.is_file():
        raise DataError(f"{path}: no such data file or saved dataset folder")
    if path.suffix not in (".jsonl", ".json", *TEXT_SUFFIXES):
        raise DataError(f"{path}: unknown data format {path.suffix!r}; use .jsonl, .json, {', '.join(TABLE_SUFFIXES)}, "
                        f"a saved dataset folder, or a text file ({', '.join(TEXT_SUFFIXES)})")
    text = _read_text(path)
    # Lines end at "\n" only (str.splitlines would also split at U+2028, \x85 and other
    # characters that JSON strings may hold raw), with a "\r" before it dropped.
    lines = [line.removesuffix("\r") for line in text.split("\n")]
    if path.suffix == ".jsonl":
        for number, line in enumerate(lines, 1):
            if line.strip():
                yield number, _parse_json(line, path, number)
    elif path.suffix == ".json":
        yield from _json_array_rows(text, path)
    else:   # a text file
        block, first = [], 0
        for number, line in enumerate(lines + [""], 1):
            if line.strip():
                first = first or number
                block.append(line)
            elif block:
                yield first, {"text": "\n".join(block)}
                block, first = [], 0


def _read_text(path: Path) -> str:
    """The file as text: UTF-8, a leading byte-order mark dropped; bad bytes reported by line."""
    raw = path.read_bytes().removeprefix(codecs.BOM_UTF8)
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as err:
        line = raw.count(b"\n", 0, err.start) + 1
        raise DataError(f"{path}:{line}: not UTF-8 text (byte {raw[err.start]:#04x} at offset {err.start}: "
                        f"{err.reason}); re-encode the file as UTF-8") from None


def _parse_json(line: str, path: Path, number: int) -> Any:
    try:
        return json.loads(line)
    except json.JSONDecodeError as err:
        raise DataError(f"{path}:{number}: invalid JSON ({err.msg} at column {err.colno})") from None
    except ValueError as err:   # e.g. an integer literal longer than Python's 4300-digit limit
        raise DataError(f"{path}:{number}: unreadable JSON value ({err})") from None
    except RecursionError:
        raise DataError(f"{path}:{number}: JSON nested too deeply to be a data row") from None


def _json_array_rows(text: str, path: Path) -> Iterator[tuple[int, Any]]:
    # Decode the array one element at a time so every row knows the line it starts on.
    decoder = json.JSONDecoder()
    pos = _skip_space(text, 0)
    if not text.startswith("[", pos):
        raise DataError(f"{path}:1: a .json data file must hold an array of row objects (use .jsonl for one row per line)")
    pos = _skip_space(text, pos + 1)
    while not text.startswith("]", pos):
        line = text.count("\n", 0, pos) + 1
        try:
            row, pos = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as err:
            raise DataError(f"{path}:{err.lineno}: invalid JSON ({err.msg})") from None
        except ValueError as err:
            raise DataError(f"{path}:{line}: unreadable JSON value ({err})") from None
        except RecursionError:
            raise DataError(f"{path}:{line}: JSON nested too deeply to be a data row") from None
        yield line, row
        pos = _skip_space(text, pos)
        if text.startswith(",", pos):
            pos = _skip_space(text, pos + 1)
        elif not text.startswith("]", pos):
            raise DataError(f"{path}:{text.count(chr(10), 0, pos) + 1}: expected ',' or ']' between rows")


def _skip_space(text: str, pos: int) -> int:
    while pos < len(text) and text[pos].isspace():
        pos += 1
    return pos
