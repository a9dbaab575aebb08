"""Data: the three row formats, label masking, packing, and bad rows named by file and line."""

from __future__ import annotations

import json

import pytest

from qlowrank.data import (
    DataError,
    collate,
    load_examples,
    pack_examples,
    read_rows,
    split_examples,
    tokenize_row,
)
from qlowrank.nn.loss import IGNORE_INDEX


def _ids(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


def test_text_row_learns_every_token_and_ends_with_eos(tok):
    ex = tokenize_row({"text": "assert x"}, tok)
    assert ex.input_ids == _ids(tok, "assert x") + [tok.eos_token_id]
    assert ex.labels == ex.input_ids


def test_prompt_completion_masks_exactly_the_prompt(tok):
    ex = tokenize_row({"prompt": "Q: what is pass?\nA:", "completion": " a null operation"}, tok)
    prompt, completion = _ids(tok, "Q: what is pass?\nA:"), _ids(tok, " a null operation")
    assert ex.input_ids == prompt + completion + [tok.eos_token_id]
    assert ex.labels == [IGNORE_INDEX] * len(prompt) + completion + [tok.eos_token_id]


def test_chat_labels_cover_assistant_content_only(tok):
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What is pass?"},
        {"role": "assistant", "content": "A null operation."},
        {"role": "user", "content": "And break?"},
        {"role": "assistant", "content": "It ends a loop."},
    ]
    ex = tokenize_row({"messages": messages}, tok)
    full = tok.apply_chat_template(messages, tokenize=False)
    assert tok.decode(ex.input_ids) == full
    learned = [(i, t) for i, (t, label) in enumerate(zip(ex.input_ids, ex.labels)) if label != IGNORE_INDEX]
    assert all(ex.labels[i] == t for i, t in learned)
    # The learned tokens are exactly the two answers, each with its end-of-turn marker.
    learned_text = tok.decode([t for _, t in learned])
    assert learned_text == "A null operation.<|im_end|>\nIt ends a loop.<|im_end|>\n"
    # Masked: everything else, including the "<|im_start|>assistant\n" headers.
    masked_text = tok.decode([t for t, label in zip(ex.input_ids, ex.labels) if label == IGNORE_INDEX])
    assert masked_text.count("<|im_start|>assistant\n") == 2 and "null" not in masked_text


def _write(tmp_path, name, lines):
    path = tmp_path / name
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.mark.parametrize("line, message", [
    ('{"prompt": "p"}', "missing field 'completion'"),
    ('{"text": 3}', "field 'text' must be a string, got int"),
    ('{"txt": "a"}', "none of the fields"),
    ('{"messages": [{"role": "user", "content": "hi"}]}', "no assistant message"),
    ('{"messages": [{"role": "bot", "content": "hi"}]}', "role 'bot'"),
    ('{"text": "a", ', "invalid JSON"),
    ('[1, 2]', "must be a JSON object"),
])
def test_bad_jsonl_row_names_file_and_line(tmp_path, tok, line, message):
    path = _write(tmp_path, "data.jsonl", ['{"text": "fine"}', "", line])
    with pytest.raises(DataError, match=message) as err:
        load_examples(path, tok, seq_len=64)
    assert str(err.value).startswith(f"{path}:3:")


def test_over_long_row_without_truncation_names_line_and_truncates_otherwise(tmp_path, tok):
    long_text = " ".join(["statement"] * 80)
    path = _write(tmp_path, "data.jsonl", ['{"text": "short"}', json.dumps({"text": long_text})])
    with pytest.raises(DataError, match=r"data.jsonl:2: row is \d+ tokens, longer than seq_len=32"):
        load_examples(path, tok, seq_len=32, truncation=False)
    examples = load_examples(path, tok, seq_len=32)
    assert [len(e.input_ids) for e in examples] == [len(_ids(tok, "short")) + 1, 32]


def test_json_array_rows_know_their_line(tmp_path, tok):
    path = tmp_path / "data.json"
    path.write_text('[\n  {"text": "a"},\n\n  {"prompt": "b"}\n]\n')
    assert [n for n, _ in read_rows(path)] == [2, 4]
    with pytest.raises(DataError, match=r"data.json:4: missing field 'completion'"):
        load_examples(path, tok, seq_len=64)


def test_text_file_rows_are_paragraphs(tmp_path, tok):
    path = _write(tmp_path, "notes.txt", ["first line", "still first", "", "", "second"])
    assert list(read_rows(path)) == [(1, {"text": "first line\nstill first"}), (5, {"text": "second"})]
    assert len(load_examples(path, tok, seq_len=64)) == 2


def test_packing_keeps_whole_examples_and_masks_each_segment_start(tok):
    rows = [{"prompt": f"q{i}", "completion": f" answer {i}" * (1 + i % 3)} for i in range(9)]
    examples = [tokenize_row(r, tok) for r in rows]
    seq = max(len(e.input_ids) for e in examples) + 3
    packed = pack_examples(examples, seq_len=seq)
    assert len(packed) < len(examples) and all(len(p.input_ids) <= seq for p in packed)
    pieces = []
    for p in packed:
        assert sum(p.segments) == len(p.input_ids)
        start = 0
        for k, length in enumerate(p.segments):
            ids, labels = p.input_ids[start:start + length], p.labels[start:start + length]
            if k:   # the previous example's last token must not be trained to predict this one's first
                assert labels[0] == -100
            pieces.append((tuple(ids), tuple(labels[1:])))
            start += length
    assert sorted(pieces) == sorted((tuple(e.input_ids), tuple(e.labels[1:])) for e in examples)
    assert pack_examples(examples, seq_len=seq) == packed   # deterministic
    longest = max(examples, key=lambda e: len(e.input_ids))
    cut = pack_examples([longest], seq_len=len(longest.input_ids) - 2)   # too long: cut into window-sized pieces
    assert [p.input_ids for p in cut] == [longest.input_ids[:-2], longest.input_ids[-2:]]


def test_collate_gives_packed_rows_restarting_positions_and_no_mask(tok):
    examples = [tokenize_row({"text": "a b"}, tok), tokenize_row({"text": "c d e"}, tok)]
    [packed] = pack_examples(examples, seq_len=64)
    batch = collate([packed, examples[0]], pad_token_id=0)
    assert "attention_mask" not in batch
    lengths = packed.segments
    expected = list(range(lengths[0])) + list(range(lengths[1]))
    assert batch["position_ids"][0, :len(expected)].tolist() == expected
    assert batch["position_ids"][1, :len(examples[0].input_ids)].tolist() == list(range(len(examples[0].input_ids)))
    assert "position_ids" not in collate(examples, pad_token_id=0)

def test_collate_pads_with_ignored_labels_and_split_is_deterministic(tok):
    a, b = tokenize_row({"text": "a b c d e"}, tok), tokenize_row({"text": "x"}, tok)
    batch = collate([a, b], pad_token_id=tok.pad_token_id)
    n = len(b.input_ids)
    assert batch["input_ids"].shape == (2, len(a.input_ids))
    assert batch["labels"][1, n:].eq(IGNORE_INDEX).all() and batch["attention_mask"][1, n:].eq(0).all()
    assert batch["attention_mask"][1, :n].eq(1).all() and batch["labels"][1, :n].tolist() == b.labels
    examples = [tokenize_row({"text": str(i)}, tok) for i in range(20)]
    train, held = split_examples(examples, 0.25, seed=3)
    assert len(held) == 5 and len(train) == 15
    assert held == split_examples(examples, 0.25, seed=3)[1] != split_examples(examples, 0.25, seed=4)[1]
