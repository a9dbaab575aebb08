"""The demo's data set: chat Q/A pairs about Python, answered from the standard library's own docs.

`pydoc_data.topics.topics` (present on every Python install) holds 79 reference topics,
e.g. 'The "assert" statement', each with sections. Every section becomes one conversation:
a user question naming the section ("Explain augmented assignment statements in Python.")
and the assistant's answer, the section's opening prose (code and grammar blocks dropped),
cut at a sentence end. Whole topics are held out for evaluation, so the eval loss measures
how well the model learned the documentation's manner of answering, not memorized text.
"""

from __future__ import annotations

import re
from pydoc_data.topics import topics

_UNDERLINE = re.compile(r"^([*=\-~^\"])\1{2,}$")
_QUESTIONS = (
    "Explain {} in Python.",
    "What does the Python reference say about {}?",
    "Tell me about {} in Python.",
    "Describe {} in Python.",
)


def _sections(text: str) -> list[tuple[str, str]]:
    """(heading, body) pairs of a topic: a heading is a line underlined with ***, ===, ---."""
    lines = text.splitlines()
    starts = [i for i in range(len(lines) - 1) if lines[i].strip() and _UNDERLINE.match(lines[i + 1].strip())]
    sections = []
    for n, start in enumerate(starts):
        end = starts[n + 1] if n + 1 < len(starts) else len(lines)
        sections.append((lines[start].strip(), "\n".join(lines[start + 2:end])))
    return sections


def _prose(body: str, max_chars: int) -> str:
    """The body's leading prose paragraphs (no indented code or grammar), cut at a sentence end."""
    paragraphs = [p for p in re.split(r"\n\s*\n", body) if p.strip() and not p.startswith((" ", "\t"))]
    text = " ".join(" ".join(p.split()) for p in paragraphs)
    if len(text) <= max_chars:
        return text
    cut = text.rfind(". ", 0, max_chars)
    return text[: cut + 1] if cut > max_chars // 3 else text[:max_chars].rsplit(" ", 1)[0] + " ..."


def _subject(heading: str) -> str:
    # 'The "assert" statement' -> 'the "assert" statement'; keep acronyms and quoted names.
    return heading[0].lower() + heading[1:] if heading[:2] != heading[:2].upper() else heading


def build_conversations(
    eval_every: int = 5, max_answer_chars: int = 320, min_answer_chars: int = 60
) -> tuple[list[dict], list[dict]]:
    """(train, eval) rows in the `{"messages": [...]}` format, from pydoc_data's topics.

    Args:
        eval_every: every n-th topic (in sorted order) is held out entirely.
        max_answer_chars: answers are cut at a sentence end before this length.
        min_answer_chars: sections with less prose than this are skipped.
    """
    train, held = [], []
    for index, key in enumerate(sorted(topics)):
        rows = held if index % eval_every == 0 else train
        for n, (heading, body) in enumerate(_sections(topics[key])):
            answer = _prose(body, max_answer_chars)
            if len(answer) < min_answer_chars:
                continue
            question = _QUESTIONS[(index + n) % len(_QUESTIONS)].format(_subject(heading))
            rows.append({"messages": [{"role": "user", "content": question},
                                      {"role": "assistant", "content": answer}], "topic": key})
    return train, held
