"""Training data: read JSONL / JSON / text / Parquet / CSV files or saved datasets, tokenize, mask, pack, batch.

Row formats (one per row; a file may mix them):
  {"text": ...}                          loss on every token
  {"prompt": ..., "completion": ...}     loss on the completion only
  {"messages": [{"role", "content"}]}    rendered with the tokenizer's chat template,
                                         loss on the assistant turns only
The field names can be remapped (`Fields(text="content")`, CLI `--text-field content`).
Parquet, CSV and `save_to_disk` folders are read through the optional `datasets` library
(sources.py). Labels are aligned with input_ids (transformers' convention); -100 marks "no
loss". A bad row raises `DataError` naming the file and line (`file:line:`), or the file and
row for tables (`file:row N:`), so it can be fixed where it is.
"""

from __future__ import annotations

import codecs
import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch

from ..nn.loss import IGNORE_INDEX
from .sources import TABLE_SUFFIXES, SourceError, is_table_source, read_table_rows

TEXT_SUFFIXES = (".txt", ".md", ".text")
_ROLES = ("system", "user", "assistant", "tool")


class DataError(ValueError):
    """A data row or file that cannot be used; the message starts with `file:line:` (or `file:row N:`)."""


@dataclass(frozen=True)
class Fields:
    """Which row fields (columns) hold each format's parts; the defaults are the format's own names."""

    text: str = "text"               # whole text, loss on every token
    prompt: str = "prompt"           # prompt of a prompt/completion row (no loss)
    completion: str = "completion"   # completion (loss)
    messages: str = "messages"       # chat: a list of {"role", "content"}


@dataclass
class Example:
    """One tokenized training sequence: ids and per-token labels (-100 = no loss)."""

    input_ids: list[int]
    labels: list[int]
    source: str = ""   # "file:line" the example came from (for error messages)
    segments: tuple[int, ...] = ()   # lengths of the whole examples packed into this one (pack_examples)


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


def _field(row: dict, name: str, where: str) -> str:
    if name not in row:
        raise DataError(f"{where}: missing field {name!r} (row keys: {_keys(row)})")
    if not isinstance(row[name], str):
        raise DataError(f"{where}: field {name!r} must be a string, got {type(row[name]).__name__}")
    _check_unicode(row[name], where, repr(name))
    return row[name]


def _keys(row: dict) -> str:
    """A row's keys for an error message, short even when a key is a megabyte long."""
    names = [repr(k[:40] + "..." if len(k) > 40 else k) for k in sorted(row)[:10]]
    return "[" + ", ".join(names) + (", ..." if len(row) > 10 else "") + "]"


def _check_unicode(text: str, where: str, what: str) -> None:
    # JSON's \ud800 escapes can make strings that are not Unicode; tokenizers reject them.
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        raise DataError(f"{where}: {what} holds an unpaired surrogate ({text[err.start]!r}), which is not "
                        "valid Unicode") from None


def _encode(tokenizer, text: str, special: bool) -> list[int]:
    return list(tokenizer(text, add_special_tokens=special)["input_ids"])


def _eos(tokenizer) -> list[int]:
    return [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []


def tokenize_row(row: Any, tokenizer, where: str = "row", fields: Fields | None = None) -> Example:
    """Tokenize one row of any supported format, with labels masked to where the loss belongs.

    `fields` names the row's fields when they differ from text / prompt / completion / messages.
    """
    f = fields or Fields()
    if not isinstance(row, dict):
        raise DataError(f"{where}: a row must be a JSON object, got {type(row).__name__}")
    if f.messages in row:
        return _tokenize_messages(row[f.messages], tokenizer, where, f.messages)
    if f.prompt in row or f.completion in row:
        prompt = _encode(tokenizer, _field(row, f.prompt, where), special=True)
        completion = _encode(tokenizer, _field(row, f.completion, where), special=False) + _eos(tokenizer)
        return Example(prompt + completion, [IGNORE_INDEX] * len(prompt) + completion, where)
    if f.text in row:
        ids = _encode(tokenizer, _field(row, f.text, where), special=True) + _eos(tokenizer)
        return Example(ids, list(ids), where)
    raise DataError(f"{where}: row has none of the fields {f.text!r}, {f.prompt!r}/{f.completion!r}, {f.messages!r} "
                    f"(keys: {_keys(row)}); map other names with --text-field / --prompt-field / "
                    "--completion-field / --messages-field")


def _tokenize_messages(messages: Any, tokenizer, where: str, name: str = "messages") -> Example:
    if not isinstance(messages, list) or not messages:
        raise DataError(f"{where}: field {name!r} must be a non-empty list of {{'role', 'content'}} objects")
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str) or not isinstance(message.get("content"), str):
            raise DataError(f"{where}: messages[{i}] must be an object with string 'role' and 'content'")
        if message["role"] not in _ROLES:
            raise DataError(f"{where}: messages[{i}] has role {message['role'][:50]!r}; use one of {_ROLES}")
        _check_unicode(message["content"], where, f"messages[{i}].content")
    if not any(m["role"] == "assistant" for m in messages):
        raise DataError(f"{where}: no assistant message, so nothing to learn; add one or drop the row")
    if not getattr(tokenizer, "chat_template", None):
        raise DataError(f"{where}: 'messages' rows need a tokenizer with a chat template, and this tokenizer has none")

    def render(upto: int, generation_prompt: bool = False) -> str:
        if upto == 0:
            return ""
        return tokenizer.apply_chat_template(messages[:upto], tokenize=False, add_generation_prompt=generation_prompt)

    # Render growing prefixes of the conversation: the text each message adds is the
    # difference; for an assistant turn the generation prompt (its header) gets no loss.
    ids: list[int] = []
    labels: list[int] = []
    done = ""
    for i, message in enumerate(messages):
        pieces = [(render(i, True), False), (render(i + 1), True)] if message["role"] == "assistant" else [(render(i + 1), False)]
        for text, learn in pieces:
            if not text.startswith(done):
                raise DataError(f"{where}: the chat template does not render messages as growing prefixes; qlowrank cannot mask it")
            # The template writes its own special tokens (BOS included where the model wants one).
            piece = _encode(tokenizer, text[len(done):], special=False)
            ids += piece
            labels += piece if learn else [IGNORE_INDEX] * len(piece)
            done = text
    return Example(ids, labels, where)


def load_examples(
    paths: str | Path | Sequence[str | Path],
    tokenizer,
    seq_len: int,
    truncation: bool = True,
    fields: Fields | None = None,
) -> list[Example]:
    """Read and tokenize every row of one or more files.

    Args:
        paths: data file(s): .jsonl, .json, text, .parquet, .csv, or a `save_to_disk` folder.
        tokenizer: a transformers tokenizer.
        seq_len: the longest sequence a batch may hold.
        truncation: cut longer rows to seq_len (True) or raise DataError naming the row (False).
        fields: the row fields holding text / prompt / completion / messages, if not those names.

    Returns:
        The examples; rows left with no loss token after truncation are dropped.
    """
    if isinstance(paths, (str, Path)):
        paths = [paths]
    examples = []
    for path in paths:
        table = Path(path).exists() and is_table_source(Path(path))
        for number, row in read_rows(path):
            example = tokenize_row(row, tokenizer, f"{path}:row {number}" if table else f"{path}:{number}", fields)
            if len(example.input_ids) > seq_len:
                if not truncation:
                    raise DataError(
                        f"{example.source}: row is {len(example.input_ids)} tokens, longer than seq_len={seq_len}; "
                        "raise --seq, shorten the row, or allow truncation"
                    )
                example = Example(example.input_ids[:seq_len], example.labels[:seq_len], example.source)
            if any(label != IGNORE_INDEX for label in example.labels[1:]):
                examples.append(example)
    if not examples:
        raise DataError(f"{', '.join(map(str, paths))}: no usable rows (empty file, or every row lost its loss tokens)")
    return examples


def pack_examples(examples: Sequence[Example], seq_len: int) -> list[Example]:
    """Pack whole examples into windows of at most seq_len tokens, without cross-attention.

    Examples are placed first-fit in decreasing length (deterministic). An example longer than
    seq_len is first cut into seq_len pieces (load_examples has usually truncated it already);
    every other example stays whole. Each window records its segment lengths; `collate` turns them into position ids that restart
    at every example, which transformers' attention turns into a block-diagonal causal mask,
    so a packed example sees only itself. The first label of every segment after the first
    is masked, so no example is asked to predict another's first token: each example's loss
    is what it would be alone.
    """
    if seq_len < 1:
        raise ValueError(f"seq_len={seq_len} must be >= 1")
    pieces = [Example(e.input_ids[i:i + seq_len], e.labels[i:i + seq_len], e.source)
              for e in examples for i in range(0, len(e.input_ids), seq_len)]
    windows: list[list[Example]] = []
    room: list[int] = []
    for example in sorted(pieces, key=lambda e: len(e.input_ids), reverse=True):
        n = len(example.input_ids)
        slot = next((i for i, free in enumerate(room) if free >= n), None)
        if slot is None:
            windows.append([])
            room.append(seq_len)
            slot = len(windows) - 1
        windows[slot].append(example)
        room[slot] -= n
    packed = []
    for number, window in enumerate(windows):
        ids = [t for e in window for t in e.input_ids]
        labels = list(window[0].labels) + [t for e in window[1:] for t in [IGNORE_INDEX, *e.labels[1:]]]
        packed.append(Example(ids, labels, f"packed[{number}]", tuple(len(e.input_ids) for e in window)))
    return packed


def split_examples(examples: Sequence[Example], eval_fraction: float, seed: int) -> tuple[list[Example], list[Example]]:
    """A deterministic (train, eval) split holding out `eval_fraction` of the examples."""
    if not 0 <= eval_fraction < 1:
        raise ValueError(f"eval_fraction={eval_fraction} must be in [0, 1)")
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    n_eval = round(len(examples) * eval_fraction)
    held = set(order[:n_eval])
    return [e for i, e in enumerate(examples) if i not in held], [examples[i] for i in sorted(held)]


LENGTH_GROUP_WINDOW = 64   # batches sorted together: wide enough to find neighbours, small enough to stay random


def epoch_order(lengths: Sequence[int], group: int, rng: random.Random, by_length: bool = True) -> list[int]:
    """One epoch's example order, drawn from `rng`; with `by_length`, each run of `group`
    consecutive examples has similar lengths, so a batch of them needs little padding.

    Length grouping shuffles, sorts each window of LENGTH_GROUP_WINDOW groups by length, cuts it
    into groups and shuffles the groups (a short final group stays last, so every group starts
    at a multiple of `group`). Every example still appears once per epoch.
    """
    order = list(range(len(lengths)))
    rng.shuffle(order)
    if not by_length or group < 2:
        return order
    span = group * LENGTH_GROUP_WINDOW
    groups: list[list[int]] = []
    for start in range(0, len(order), span):
        window = sorted(order[start:start + span], key=lambda i: lengths[i], reverse=True)
        groups += [window[i:i + group] for i in range(0, len(window), group)]
    short = [groups.pop()] if groups and len(groups[-1]) < group else []
    rng.shuffle(groups)
    return [i for g in groups + short for i in g]


def batch_width(longest: int, multiple: int = 1, cap: int | None = None) -> int:
    """The padded width of a batch: `longest` rounded up to `multiple`, but never above `cap`
    (the longest example of the run), and never below `longest`."""
    width = -(-longest // multiple) * multiple
    return max(longest, min(width, cap)) if cap is not None else width


def collate(examples: Sequence[Example], pad_token_id: int, multiple: int = 1,
            cap: int | None = None) -> dict[str, torch.Tensor]:
    """Right-pad to the longest example (rounded up to `multiple`, at most `cap`): input_ids,
    labels (-100 on padding), and either an attention_mask or, for packed examples,
    position_ids that restart at every segment.

    Packed batches carry no attention_mask: transformers builds the block-diagonal causal mask
    from the restarting position ids only when the 2D mask is absent. Right padding needs no
    mask for causal attention (no real token attends to a later position) and its labels are -100.
    Rounding the width keeps the number of distinct batch shapes small; see TrainConfig.pad_multiple.
    """
    width = batch_width(max(len(e.input_ids) for e in examples), multiple, cap)
    input_ids = torch.full((len(examples), width), pad_token_id, dtype=torch.long)   # (B, T)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)      # (B, T)
    mask = torch.zeros((len(examples), width), dtype=torch.long)                      # (B, T)
    positions = torch.arange(width).repeat(len(examples), 1)                          # (B, T)
    for i, e in enumerate(examples):
        n = len(e.input_ids)
        input_ids[i, :n] = torch.tensor(e.input_ids)
        labels[i, :n] = torch.tensor(e.labels)
        mask[i, :n] = 1
        start = 0
        for length in e.segments:
            positions[i, start:start + length] = torch.arange(length)
            start += length
        positions[i, start:] = torch.arange(width - start)   # padding: a segment of its own
    if any(len(e.segments) > 1 for e in examples):
        return {"input_ids": input_ids, "labels": labels, "position_ids": positions}
    return {"input_ids": input_ids, "labels": labels, "attention_mask": mask}
