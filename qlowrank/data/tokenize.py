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

from pathlib import Path
from typing import Any, Sequence

from ..nn.loss import IGNORE_INDEX
from .example import DataError, Example, Fields
from .readers import read_rows
from .sources import is_table_source

_ROLES = ("system", "user", "assistant", "tool")


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
