"""The units of training data: Example (ids + labels), Fields (which columns hold what), DataError."""

from __future__ import annotations

from dataclasses import dataclass


class DataError(ValueError):
    """A data row or file that cannot be used; the message starts with `file:line:` (or `file:row N:`)."""


@dataclass(frozen=True)
class Fields:
    """Which row fields (columns) hold each format's parts; the defaults are the format's own names."""

    text: str = "text"               # whole text, loss on every token
    prompt: str = "prompt"           # prompt of a prompt/completion row (no loss)
    completion: str = "completion"   # completion (loss)
    messages: str = "messages"       # chat: a list of {"role", "content"}
    conversations: str = "conversations"   # ShareGPT: a list of {"from", "value"}
    instruction: str = "instruction"       # alpaca: the task (no loss) ...
    input: str = "input"                   # ... its optional context, joined to it ...
    output: str = "output"                 # ... and the answer (loss)
    system: str = "system"                 # alpaca / ShareGPT: an optional system prompt
    tools: str = "tools"                   # chat: tool (function) schemas for the template


@dataclass
class Example:
    """One tokenized training sequence: ids and per-token labels (-100 = no loss)."""

    input_ids: list[int]
    labels: list[int]
    source: str = ""   # "file:line" the example came from (for error messages)
    segments: tuple[int, ...] = ()   # lengths of the whole examples packed into this one (pack_examples)
