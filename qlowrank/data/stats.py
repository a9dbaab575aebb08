"""What the loss will learn from a data file: row, token and mask counts, and the end-of-turn tokens it learns."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from ..nn.loss import IGNORE_INDEX
from .example import Example

# An assistant answer no template writes by itself: what follows it in the rendering is the end of a turn.
_PROBE = "qlowrank-probe-answer"


def end_of_turn_ids(tokenizer) -> dict[int, str]:
    """{token id: token} of the tokens that end a turn: EOS, and the special token the chat template
    writes right after an assistant's answer (<|im_end|>, <|eot_id|>, <end_of_turn>), if it writes one."""
    ends = {}
    if tokenizer.eos_token_id is not None:
        ends[tokenizer.eos_token_id] = str(tokenizer.eos_token)
    if not getattr(tokenizer, "chat_template", None):
        return ends
    probe = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": _PROBE}]
    try:
        text = tokenizer.apply_chat_template(probe, tokenize=False)
    except Exception:   # a template that cannot render this minimal conversation has no end to find here: EOS only
        return ends
    special = set(tokenizer.all_special_ids) | {i for i, t in tokenizer.added_tokens_decoder.items() if t.special}
    after = text.split(_PROBE, 1)[1] if _PROBE in text else ""
    for token in tokenizer(after, add_special_tokens=False)["input_ids"]:
        if token in special:
            ends[token] = tokenizer.convert_ids_to_tokens(token)
            break
    return ends


@dataclass
class DataStats:
    """What `load_examples` did with its rows; `lines()` says it in words."""

    rows: int = 0                                          # rows read (kept or dropped)
    layouts: Counter = field(default_factory=Counter)      # layout name -> rows
    examples: int = 0                                      # rows kept
    tokens: int = 0                                        # tokens of the kept rows, after truncation
    learned: int = 0                                       # of those, the ones in the loss
    truncated: list[str] = field(default_factory=list)     # "file:line" of the rows cut to seq_len
    dropped: dict[str, list[str]] = field(default_factory=dict)   # reason -> "file:line" of the rows dropped
    end_ids: dict[int, str] = field(default_factory=dict)  # end_of_turn_ids(tokenizer)
    ends_learned: Counter = field(default_factory=Counter)  # end-of-turn token -> times it is in the loss

    def keep(self, example: Example) -> None:
        """Count a kept example's tokens, its learned tokens and its learned end-of-turn tokens."""
        learned = [label for label in example.labels[1:] if label != IGNORE_INDEX]   # the first predicts nothing
        self.examples += 1
        self.tokens += len(example.input_ids)
        self.learned += len(learned)
        self.ends_learned.update(self.end_ids[label] for label in learned if label in self.end_ids)

    def drop(self, reason: str, where: str) -> None:
        """Count a row that was dropped, and why."""
        self.dropped.setdefault(reason, []).append(where)

    def lines(self) -> list[str]:
        """The stats in words, one fact a line."""
        share = self.learned / self.tokens if self.tokens else 0.0
        layouts = ", ".join(f"{name} {count}" for name, count in self.layouts.most_common())
        out = [f"rows: {self.rows} ({layouts})", f"tokens: {self.tokens} in {self.examples} rows kept; "
               f"learned: {self.learned} ({share:.1%})"]
        if self.truncated:
            out.append(f"truncated: {len(self.truncated)} rows longer than seq_len were cut ({_some(self.truncated)})")
        for reason, where in self.dropped.items():
            out.append(f"dropped: {len(where)} rows, {reason} ({_some(where)})")
        if self.ends_learned:
            out.append("end of turn learned: " + ", ".join(f"{t} x{n}" for t, n in self.ends_learned.most_common()))
        return out

    def end_warning(self) -> str | None:
        """A warning when no end-of-turn / EOS token is ever in the loss (the tuned model would not stop)."""
        if self.ends_learned or not self.examples:
            return None
        looked = " or ".join(repr(t) for t in dict.fromkeys(self.end_ids.values())) or "none: the tokenizer has no EOS"
        hint = (f"; {len(self.truncated)} rows were cut to seq_len before their end: raise --seq" if self.truncated
                else "; check that the chat template ends assistant turns with a special token, or set the "
                     "tokenizer's EOS")
        return f"no end-of-turn token is ever learned (looked for {looked}): the tuned model will not learn to stop{hint}"


def _some(where: list[str], n: int = 3) -> str:
    return ", ".join(where[:n]) + (", ..." if len(where) > n else "")
