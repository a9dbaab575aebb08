"""Training data: tokenize rows of any layout (layouts.py), mask their labels, and read whole files into examples.

A row is detected as one of the layouts in `layouts.LAYOUTS` (or forced with `format=`) and
becomes one of three samples:
  Text         loss on every token, EOS appended
  Completion   loss on the completion only, EOS appended
  Chat         rendered with the tokenizer's chat template, loss on the assistant turns
               (their text, tool calls and end-of-turn marker; never headers or tool results)
Files are JSONL, JSON, text, or tables (Parquet, CSV, `save_to_disk` folders) through the
optional `datasets` library (sources.py). Labels are aligned with input_ids (transformers'
convention); -100 marks "no loss". A bad row raises `DataError` naming the file and line
(`file:line:`), or the file and row for tables (`file:row N:`), so it can be fixed where it is.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

from ..nn.loss import IGNORE_INDEX
from .example import DataError, Example, Fields
from .layouts import Chat, Completion, Sample, Text, detect, function_name
from .readers import read_rows
from .sources import is_table_source
from .stats import DataStats, end_of_turn_ids


def _encode(tokenizer, text: str, special: bool) -> list[int]:
    return list(tokenizer(text, add_special_tokens=special)["input_ids"])


def _eos(tokenizer) -> list[int]:
    return [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []


def tokenize_row(row: Any, tokenizer, where: str = "row", fields: Fields | None = None,
                 format: str | None = None) -> Example:
    """Tokenize one row of any layout, with labels masked to where the loss belongs.

    Args:
        row: one row (a dict) of a data file.
        tokenizer: a transformers tokenizer (chat rows need its chat template).
        where: "file:line" for error messages and `Example.source`.
        fields: the row's field names where they differ from the layouts' own (text, prompt, ...).
        format: a layout name (layouts.FORMATS) to force, or None / "auto" to detect it from the fields.
    """
    f = fields or Fields()
    return tokenize_sample(detect(row, where, f, format).convert(row, f, where), tokenizer, where)


def tokenize_sample(sample: Sample, tokenizer, where: str = "row") -> Example:
    """Tokenize a Text, Completion or Chat sample (layouts.py) into ids and masked labels."""
    if isinstance(sample, Chat):
        if getattr(tokenizer, "chat_template", None):
            return _tokenize_chat(sample, tokenizer, where)
        if sample.plain is None:
            raise DataError(f"{where}: chat rows need a tokenizer with a chat template, and this tokenizer has none")
        sample = sample.plain
    if isinstance(sample, Completion):
        prompt = _encode(tokenizer, sample.prompt, special=True)
        completion = _encode(tokenizer, sample.completion, special=False) + _eos(tokenizer)
        return Example(prompt + completion, [IGNORE_INDEX] * len(prompt) + completion, where)
    assert isinstance(sample, Text), type(sample)
    ids = _encode(tokenizer, sample.text, special=True) + _eos(tokenizer)
    return Example(ids, list(ids), where)


def _tokenize_chat(chat: Chat, tokenizer, where: str) -> Example:
    from jinja2 import TemplateError

    messages = chat.messages

    def render(upto: int, generation_prompt: bool = False) -> str:
        if upto == 0:
            return ""
        try:
            return tokenizer.apply_chat_template(messages[:upto], tools=chat.tools, tokenize=False,
                                                 add_generation_prompt=generation_prompt)
        except TemplateError as err:   # the template's own raise_exception("...")
            raise DataError(f"{where}: the chat template refuses this conversation: {err}") from None

    # Render growing prefixes of the conversation: the text each message adds is the
    # difference; for a learned assistant turn the generation prompt (its header) gets no loss.
    ids: list[int] = []
    labels: list[int] = []
    done = ""
    for i, message in enumerate(messages):
        before = done
        learn = message["role"] == "assistant" and i >= chat.learn_from
        pieces = [(render(i, True), False), (render(i + 1), True)] if learn else [(render(i + 1), False)]
        for text, learned in pieces:
            if not text.startswith(done):
                raise DataError(f"{where}: the chat template does not render messages as growing prefixes; "
                                "qlowrank cannot mask it")
            # The template writes its own special tokens (BOS included where the model wants one).
            piece = _encode(tokenizer, text[len(done):], special=False)
            ids += piece
            labels += piece if learned else [IGNORE_INDEX] * len(piece)
            done = text
        _check_rendered(message, done[len(before):], f"{where}: messages[{i}]")
    for name in map(function_name, chat.tools or []):
        if name not in done:
            raise DataError(f"{where}: the chat template ignores the row's 'tools' (tool {name!r} is not in the "
                            "rendered text); use a model whose template renders tools, or drop the field")
    return Example(ids, labels, where)


def _check_rendered(message: dict, added: str, where: str) -> None:
    """A tool result or tool call that the template drops would train on a conversation that never happened."""
    for name in map(function_name, message.get("tool_calls", [])):
        if name not in added:
            raise DataError(f"{where}: the chat template drops the assistant's tool_calls (call {name!r} is not "
                            "in the rendered text); use a model whose template renders tool calls, or write the "
                            "call into 'content'")
    content = message["content"].strip()
    # Llama 3.1's template writes tool results through `tojson`: quoted, with newlines escaped.
    written = (content, json.dumps(content)[1:-1], json.dumps(content, ensure_ascii=False)[1:-1])
    if message["role"] == "tool" and content and not any(form in added for form in written):
        raise DataError(f"{where}: the chat template drops 'tool' messages; use a model whose template renders "
                        "them, or drop the tool turns")


def load_examples(
    paths: str | Path | Sequence[str | Path],
    tokenizer,
    seq_len: int,
    truncation: bool = True,
    fields: Fields | None = None,
    format: str | None = None,
    stats: DataStats | None = None,
) -> list[Example]:
    """Read and tokenize every row of one or more files.

    Args:
        paths: data file(s): .jsonl, .json, text, .parquet, .csv, or a `save_to_disk` folder.
        tokenizer: a transformers tokenizer.
        seq_len: the longest sequence a batch may hold.
        truncation: cut longer rows to seq_len (True) or raise DataError naming the row (False).
        fields: the row fields of each layout, if not their own names.
        format: force one layout (layouts.FORMATS) for every row; None or "auto" detects each row's.
        stats: filled with what happened to the rows (layouts, truncated, dropped, learned tokens).

    Returns:
        The examples; rows left with no loss token after truncation are dropped.
    """
    if isinstance(paths, (str, Path)):
        paths = [paths]
    f = fields or Fields()
    stats = stats if stats is not None else DataStats()
    stats.end_ids = end_of_turn_ids(tokenizer)
    examples = []
    for path in paths:
        table = Path(path).exists() and is_table_source(Path(path))
        for number, row in read_rows(path):
            where = f"{path}:row {number}" if table else f"{path}:{number}"
            layout = detect(row, where, f, format)
            example = tokenize_sample(layout.convert(row, f, where), tokenizer, where)
            stats.rows += 1
            stats.layouts[layout.name] += 1
            cut = len(example.input_ids) > seq_len
            if cut:
                if not truncation:
                    raise DataError(
                        f"{where}: row is {len(example.input_ids)} tokens, longer than seq_len={seq_len}; "
                        "raise --seq, shorten the row, or allow truncation"
                    )
                stats.truncated.append(where)
                example = Example(example.input_ids[:seq_len], example.labels[:seq_len], where)
            # The first label predicts nothing (no token comes before it): a row needs a later one.
            if any(label != IGNORE_INDEX for label in example.labels[1:]):
                examples.append(example)
                stats.keep(example)
            else:
                stats.drop(f"no token left to learn after truncation to seq_len={seq_len}" if cut
                           else "nothing to learn (no loss token after the first)", where)
    if not examples:
        why = "; ".join(f"{len(where)} rows dropped: {reason}" for reason, where in stats.dropped.items())
        raise DataError(f"{', '.join(map(str, paths))}: no usable rows ({why or 'empty file'})")
    return examples
