"""Preference pairs: `prompt` / `chosen` / `rejected` rows (TRL's standard and conversational formats), tokenized, collated.

A row is detected against `PAIR_LAYOUTS` with the same `layouts.detect` as supervised rows:
  preference        {"prompt": "...", "chosen": "...", "rejected": "..."}        plain strings
  chat-preference   {"prompt": [messages], "chosen": [assistant message(s)], "rejected": [...]}
Each side becomes the sample a prompt-completion (or chat-prompt-completion) row would, so
the loss masks are the supervised ones: loss on the completion (and its end of turn) only.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch

from ..nn.loss import IGNORE_INDEX
from .batch import collate
from .example import DataError, Example, Fields
from .layouts import Chat, Completion, Layout, Sample, chat_messages, detect, string_field
from .readers import read_rows
from .sources import is_table_source
from .encode import tokenize_sample

CHOSEN, REJECTED = "chosen", "rejected"   # TRL's field names for the two completions


@dataclass(frozen=True)
class PairSample:
    """The two samples of one preference row: the same prompt with the preferred and the other completion."""

    chosen: Sample
    rejected: Sample


@dataclass
class Pair(Example):
    """A tokenized preference pair: `input_ids` / `labels` hold the chosen sequence (so the sampler and
    the padding helpers treat a pair as its chosen side), `rejected_ids` / `rejected_labels` the other."""

    rejected_ids: list[int] = ()
    rejected_labels: list[int] = ()


def _plain_pair(row: dict, f: Fields, where: str) -> PairSample:
    prompt = string_field(row, f.prompt, where)
    return PairSample(Completion(prompt, string_field(row, CHOSEN, where)),
                      Completion(prompt, string_field(row, REJECTED, where)))


def _chat_pair(row: dict, f: Fields, where: str) -> PairSample:
    for name in (f.prompt, CHOSEN, REJECTED):
        if not isinstance(row.get(name), list):
            raise DataError(f"{where}: field {name!r} must be a list of messages, as the others of "
                            f"{f.prompt!r}/{CHOSEN!r}/{REJECTED!r} are (or give all three as strings)")
    prompt = chat_messages(row[f.prompt], where, f.prompt, need_assistant=False)
    sides = [Chat(prompt + chat_messages(row[name], where, name), learn_from=len(prompt)) for name in (CHOSEN, REJECTED)]
    return PairSample(*sides)


def _lists(row: dict, f: Fields) -> bool:
    return any(isinstance(row.get(name), list) for name in (f.prompt, CHOSEN, REJECTED))


# First match wins; a pair needs both completions, so `chosen` alone identifies the table's rows.
PAIR_LAYOUTS: tuple[Layout, ...] = (
    Layout("chat-preference", lambda f: (CHOSEN, REJECTED), _chat_pair,
           {"prompt": [{"role": "user", "content": "What is the capital of France?"}],
            "chosen": [{"role": "assistant", "content": "Paris."}],
            "rejected": [{"role": "assistant", "content": "Lyon."}]}, fits=_lists),
    Layout("preference", lambda f: (CHOSEN, REJECTED), _plain_pair,
           {"prompt": "The capital of France is", "chosen": " Paris.", "rejected": " Lyon."}),
)


def tokenize_pair(row: Any, tokenizer, where: str = "row", fields: Fields | None = None,
                  format: str | None = None) -> Pair:
    """One preference row as a Pair: both sides tokenized and masked as supervised samples are."""
    f = fields or Fields()
    sample = detect(row, where, f, format, layouts=PAIR_LAYOUTS).convert(row, f, where)
    chosen, rejected = (tokenize_sample(side, tokenizer, where) for side in (sample.chosen, sample.rejected))
    return Pair(chosen.input_ids, chosen.labels, where, rejected_ids=rejected.input_ids,
                rejected_labels=rejected.labels)


def _learns(labels: Sequence[int]) -> bool:
    return any(label != IGNORE_INDEX for label in labels[1:])   # the first label predicts nothing


def load_pairs(paths: str | Path | Sequence[str | Path], tokenizer, seq_len: int, truncation: bool = True,
               fields: Fields | None = None, format: str | None = None) -> list[Pair]:
    """Read and tokenize every preference row of one or more files (see `load_examples` for the arguments).

    A side longer than seq_len is cut to it (or, with truncation=False, a DataError names the
    row); a pair with a side left with no loss token is dropped.

    Raises:
        DataError: a row that is not a preference pair (file and line or row named), or no usable pair.
    """
    if isinstance(paths, (str, Path)):
        paths = [paths]
    pairs, dropped = [], 0
    for path in paths:
        table = Path(path).exists() and is_table_source(Path(path))
        for number, row in read_rows(path):
            where = f"{path}:row {number}" if table else f"{path}:{number}"
            pair = tokenize_pair(row, tokenizer, where, fields, format)
            longest = max(len(pair.input_ids), len(pair.rejected_ids))
            if longest > seq_len and not truncation:
                raise DataError(f"{where}: a side of this pair is {longest} tokens, longer than seq_len={seq_len}; "
                                "raise --seq, shorten the row, or allow truncation")
            pair = Pair(pair.input_ids[:seq_len], pair.labels[:seq_len], where,
                        rejected_ids=pair.rejected_ids[:seq_len], rejected_labels=pair.rejected_labels[:seq_len])
            if _learns(pair.labels) and _learns(pair.rejected_labels):
                pairs.append(pair)
            else:
                dropped += 1
    if not pairs:
        raise DataError(f"{', '.join(map(str, paths))}: no usable preference pairs "
                        f"({dropped} dropped: a side with no completion token left at seq_len={seq_len})")
    return pairs


def collate_pairs(pairs: Sequence[Example], pad_token_id: int, multiple: int = 1,
                  cap: int | None = None) -> dict[str, torch.Tensor]:
    """A (2B, T) batch: the B chosen sequences, then the B rejected ones in the same order (TRL's layout).

    A plain Example among them (the sampler's fully masked filler for a rank left without
    pairs) stands for a pair with nothing to learn on either side.
    """
    chosen = [Example(p.input_ids, p.labels, p.source) for p in pairs]
    rejected = [Example(p.rejected_ids, p.rejected_labels, p.source) if isinstance(p, Pair)
                else Example(p.input_ids, [IGNORE_INDEX] * len(p.input_ids), p.source) for p in pairs]
    return collate(chosen + rejected, pad_token_id, multiple, cap)


def longest_side(examples: Sequence[Example]) -> int:
    """The longest sequence among examples and, for pairs, their rejected sides."""
    return max(max(len(e.input_ids), len(getattr(e, "rejected_ids", ()))) for e in examples)
