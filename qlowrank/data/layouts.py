"""Row layouts: the shapes training rows come in, detected from their fields, each turned into one of three samples.

A layout is a row of `LAYOUTS` (first match wins): its name (`--format NAME`), the fields that
identify it, a converter to a `Text`, `Completion` or `Chat` sample, and one example row (the
docs show it; the tests detect it). tokenize.py masks the three samples; a later layout table
(preference pairs: prompt / chosen / rejected) can reuse `detect` and `chat_messages` with its own rows.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

from .example import DataError, Fields

ROLES = ("system", "user", "assistant", "tool")
# ShareGPT's speaker names ("from") and the chat roles they mean; user / assistant appear in some exports.
SHAREGPT_ROLES = {"human": "user", "gpt": "assistant", "system": "system", "tool": "tool",
                  "user": "user", "assistant": "assistant"}
# Stanford Alpaca's own prompts: what an alpaca row means to a tokenizer with no chat template.
ALPACA_PREAMBLE = ("Below is an instruction that describes a task{}. "
                   "Write a response that appropriately completes the request.")
ALPACA_WITH_INPUT = ", paired with an input that provides further context"


@dataclass(frozen=True)
class Text:
    """Whole text: loss on every token (and on the EOS appended to it)."""

    text: str


@dataclass(frozen=True)
class Completion:
    """Plain prompt (no loss) and completion (loss, EOS appended), joined with no separator."""

    prompt: str
    completion: str


@dataclass(frozen=True)
class Chat:
    """Messages rendered by the chat template; loss on assistant turns from `learn_from` on (headers excluded)."""

    messages: list[dict]
    learn_from: int = 0                  # assistant messages before this index are context (TRL's prompt)
    tools: list | None = None            # tool definitions for the template (`apply_chat_template(tools=)`)
    plain: Completion | None = None      # what the row means when the tokenizer has no chat template


Sample = Text | Completion | Chat


@dataclass(frozen=True)
class Layout:
    """One row layout: how to recognise it and what it becomes."""

    name: str                                             # --format NAME
    fields: Callable[[Fields], tuple[str, ...]]           # the identifying fields, under the row's field names
    convert: Callable[[dict, Fields, str], Sample]        # (row, fields, "file:line") -> sample
    example: dict = field(default_factory=dict)           # one row of this layout (docs, tests)
    fits: Callable[[dict, Fields], bool] | None = None    # refines "has one of `fields`" where fields are shared

    def matches(self, row: dict, f: Fields) -> bool:
        """True when `row` holds one of this layout's identifying fields (and fits it)."""
        return any(name in row for name in self.fields(f)) and (self.fits is None or self.fits(row, f))


# --- checks shared by the converters -------------------------------------------------------

def keys_of(row: dict) -> str:
    """A row's keys for an error message, short even when a key is a megabyte long."""
    names = [repr(k[:40] + "..." if len(k) > 40 else k) for k in sorted(row)[:10]]
    return "[" + ", ".join(names) + (", ..." if len(row) > 10 else "") + "]"


def check_unicode(text: str, where: str, what: str) -> None:
    """DataError for a string that is not valid Unicode (JSON's lone \\ud800 escapes make such strings)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        raise DataError(f"{where}: {what} holds an unpaired surrogate ({text[err.start]!r}), which is not "
                        "valid Unicode") from None


def string_field(row: dict, name: str, where: str) -> str:
    """row[name], which must be present and a string."""
    if name not in row:
        raise DataError(f"{where}: missing field {name!r} (row keys: {keys_of(row)})")
    value = row[name]
    if not isinstance(value, str):
        raise DataError(f"{where}: field {name!r} must be a string, got {type(value).__name__}")
    check_unicode(value, where, repr(name))
    return value


def _optional_string(row: dict, name: str, where: str) -> str:
    return string_field(row, name, where) if row.get(name) is not None else ""


def chat_messages(value: Any, where: str, name: str = "messages", need_assistant: bool = True) -> list[dict]:
    """Validated copies of a list of chat messages ({"role", "content"}, assistants' "tool_calls").

    Keys set to None are dropped: Parquet and `datasets` give every message of a column the
    union of their keys, None where a message has none (a user turn gets "tool_calls": None).
    """
    if not isinstance(value, list) or not value:
        raise DataError(f"{where}: field {name!r} must be a non-empty list of {{'role', 'content'}} objects")
    messages = []
    for i, message in enumerate(value):
        if not isinstance(message, dict):
            raise DataError(f"{where}: {name}[{i}] must be an object with string 'role' and 'content'")
        message = {key: item for key, item in message.items() if item is not None}
        role = message.get("role")
        calls = message.get("tool_calls")
        if role == "assistant" and calls is not None:
            if not isinstance(calls, list) or not calls or not all(isinstance(c, dict) for c in calls):
                raise DataError(f"{where}: {name}[{i}].tool_calls must be a non-empty list of call objects "
                                "({'type': 'function', 'function': {'name', 'arguments'}})")
            message.setdefault("content", "")   # a call alone has no text; templates expect a string
        if not isinstance(role, str) or not isinstance(message.get("content"), str):
            raise DataError(f"{where}: {name}[{i}] must be an object with string 'role' and 'content'")
        if role not in ROLES:
            raise DataError(f"{where}: {name}[{i}] has role {role[:50]!r}; use one of {ROLES}")
        check_unicode(message["content"], where, f"{name}[{i}].content")
        messages.append(message)
    if need_assistant and not any(m["role"] == "assistant" for m in messages):
        raise DataError(f"{where}: no assistant message, so nothing to learn; add one or drop the row")
    return messages


def function_name(entry: dict) -> str:
    """The function name of a tool call or a tool schema: OpenAI's nested {"function": {"name"}} or a flat {"name"}."""
    return str((entry.get("function") if isinstance(entry.get("function"), dict) else entry).get("name", ""))


def _tools(row: dict, f: Fields, where: str) -> list | None:
    value = row.get(f.tools)
    if value is None:
        return None
    if isinstance(value, str):   # tables often keep the tool schemas as one JSON string
        try:
            value = json.loads(value)
        except ValueError:
            raise DataError(f"{where}: field {f.tools!r} holds a string that is not JSON") from None
    if not isinstance(value, list) or not all(isinstance(t, dict) for t in value):
        raise DataError(f"{where}: field {f.tools!r} must be a list of tool (function schema) objects")
    return value


# --- the layouts -----------------------------------------------------------------------------

def _text(row: dict, f: Fields, where: str) -> Sample:
    return Text(string_field(row, f.text, where))


def _completion(row: dict, f: Fields, where: str) -> Sample:
    return Completion(string_field(row, f.prompt, where), string_field(row, f.completion, where))


def _messages(row: dict, f: Fields, where: str) -> Sample:
    return Chat(chat_messages(row[f.messages], where, f.messages), tools=_tools(row, f, where))


def _chat_completion(row: dict, f: Fields, where: str) -> Sample:
    for name in (f.prompt, f.completion):
        if not isinstance(row.get(name), list):
            raise DataError(f"{where}: field {name!r} must be a list of messages, as the other of "
                            f"{f.prompt!r}/{f.completion!r} is (or give both as strings)")
    prompt = chat_messages(row[f.prompt], where, f.prompt, need_assistant=False)
    completion = chat_messages(row[f.completion], where, f.completion)
    return Chat(prompt + completion, learn_from=len(prompt), tools=_tools(row, f, where))


def _sharegpt(row: dict, f: Fields, where: str) -> Sample:
    turns = row[f.conversations]
    if not isinstance(turns, list) or not turns:
        raise DataError(f"{where}: field {f.conversations!r} must be a non-empty list of {{'from', 'value'}} objects")
    system = _optional_string(row, f.system, where)   # LLaMA-Factory's ShareGPT keeps it beside the turns
    messages = [{"role": "system", "content": system}] if system else []
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict) or not isinstance(turn.get("from"), str) or not isinstance(turn.get("value"), str):
            raise DataError(f"{where}: {f.conversations}[{i}] must be an object with string 'from' and 'value'")
        if turn["from"] not in SHAREGPT_ROLES:
            raise DataError(f"{where}: {f.conversations}[{i}] is from {turn['from'][:50]!r}; use one of "
                            f"{tuple(SHAREGPT_ROLES)} (human: user, gpt: assistant)")
        messages.append({"role": SHAREGPT_ROLES[turn["from"]], "content": turn["value"]})
    return Chat(chat_messages(messages, where, f.conversations), tools=_tools(row, f, where))


def _alpaca(row: dict, f: Fields, where: str) -> Sample:
    instruction, output = string_field(row, f.instruction, where), string_field(row, f.output, where)
    extra, system = _optional_string(row, f.input, where), _optional_string(row, f.system, where)
    prompt = f"{instruction}\n\n{extra}" if extra else instruction
    messages = ([{"role": "system", "content": system}] if system else []) + [
        {"role": "user", "content": prompt}, {"role": "assistant", "content": output}]
    preamble = system or ALPACA_PREAMBLE.format(ALPACA_WITH_INPUT if extra else "")
    plain = f"{preamble}\n\n### Instruction:\n{instruction}\n\n" + (f"### Input:\n{extra}\n\n" if extra else "")
    return Chat(messages, plain=Completion(plain + "### Response:\n", output))


def _lists(row: dict, f: Fields) -> bool:
    return isinstance(row.get(f.prompt), list) or isinstance(row.get(f.completion), list)


# First match wins: a row with both "messages" and "text" columns is a chat.
LAYOUTS: tuple[Layout, ...] = (
    Layout("messages", lambda f: (f.messages,), _messages,
           {"messages": [{"role": "system", "content": "Answer briefly."},
                         {"role": "user", "content": "What is the capital of France?"},
                         {"role": "assistant", "content": "Paris."}]}),
    Layout("sharegpt", lambda f: (f.conversations,), _sharegpt,
           {"conversations": [{"from": "human", "value": "What is the capital of France?"},
                              {"from": "gpt", "value": "Paris."}]}),
    Layout("chat-prompt-completion", lambda f: (f.prompt, f.completion), _chat_completion,
           {"prompt": [{"role": "user", "content": "What is the capital of France?"}],
            "completion": [{"role": "assistant", "content": "Paris."}]}, fits=_lists),
    Layout("prompt-completion", lambda f: (f.prompt, f.completion), _completion,
           {"prompt": "The capital of France is", "completion": " Paris."}),
    Layout("alpaca", lambda f: (f.instruction, f.output), _alpaca,
           {"instruction": "Name the capital of this country.", "input": "France", "output": "Paris."}),
    Layout("text", lambda f: (f.text,), _text, {"text": "Paris is the capital of France."}),
)

FORMATS: tuple[str, ...] = tuple(layout.name for layout in LAYOUTS)   # --format's choices (and "auto")
# The order people meet them in (docs/data.md, error messages): the oldest and plainest first.
READING_ORDER = ("text", "prompt-completion", "messages", "sharegpt", "alpaca", "chat-prompt-completion")


def detect(row: Any, where: str, fields: Fields | None = None, format: str | None = None,
           layouts: Sequence[Layout] = LAYOUTS) -> Layout:
    """The layout of `row`: `format` when given (not "auto"), else the first of `layouts` that matches.

    Raises:
        DataError: `row` is not an object, `format` is unknown, or no layout matches (the message
            names the layouts and their fields, and the row's keys).
    """
    f = fields or Fields()
    if not isinstance(row, dict):
        raise DataError(f"{where}: a row must be a JSON object, got {type(row).__name__}")
    if format not in (None, "auto"):
        named = [layout for layout in layouts if layout.name == format]
        if not named:
            raise DataError(f"unknown --format {format!r}; use auto or one of {[layout.name for layout in layouts]}")
        return named[0]
    for layout in layouts:
        if layout.matches(row, f):
            return layout
    ordered = sorted(layouts, key=lambda l: READING_ORDER.index(l.name) if l.name in READING_ORDER else len(layouts))
    names = ", ".join(dict.fromkeys("/".join(map(repr, layout.fields(f))) for layout in ordered))
    raise DataError(f"{where}: row has none of the fields {names} (layouts: {', '.join(l.name for l in ordered)}; "
                    f"keys: {keys_of(row)}); map other names with --text-field / --prompt-field / "
                    "--completion-field / --messages-field, or force a layout with --format")
