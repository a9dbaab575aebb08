"""Row layouts (text, prompt/completion, alpaca, ShareGPT, messages, TRL conversational) and what their loss learns.

Every layout is checked on four chat templates: the tiny ChatML one, SmolLM2's real one (its
tokenizer read from the embedded GGUF once and cached), and a Llama-3-style and a Gemma-style
template written here. The end of each turn (EOS, or the template's end-of-turn token) must be
inside the loss; the masks of alpaca and ShareGPT rows are checked token by token against the
character spans of the answers in the rendered text.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import datasets
import pytest
from conftest import tiny_tokenizer

from qlowrank.data import LAYOUTS, DataError, DataStats, detect, end_of_turn_ids, load_examples, tokenize_row
from qlowrank.nn.loss import IGNORE_INDEX

# Llama 3.1's manner: tool schemas up front, calls as JSON, tool results ("ipython") through tojson.
LLAMA3_TEMPLATE = (
    "{{ bos_token }}"
    "{% if tools %}<|start_header_id|>system<|end_header_id|>\n\nYou may call these functions:\n"
    "{% for t in tools %}{{ t | tojson }}\n{% endfor %}<|eot_id|>{% endif %}"
    "{% for m in messages %}"
    "{% if m.role == 'assistant' and m.tool_calls %}<|start_header_id|>assistant<|end_header_id|>\n\n"
    "{% for c in m.tool_calls %}{\"name\": \"{{ c.function.name }}\", \"parameters\": "
    "{{ c.function.arguments | tojson }}}{% endfor %}<|eot_id|>"
    "{% else %}<|start_header_id|>{{ 'ipython' if m.role == 'tool' else m.role }}<|end_header_id|>\n\n"
    "{% if m.role == 'tool' %}{{ m.content | tojson }}{% else %}{{ m.content | trim }}{% endif %}<|eot_id|>{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)
# Gemma 3's manner: no system turn (its text opens the first user turn), "model" for the
# assistant, and no tool role at all.
GEMMA_TEMPLATE = (
    "{{ bos_token }}"
    "{% if messages[0]['role'] == 'system' %}{% set first = messages[0]['content'] + '\n\n' %}"
    "{% set turns = messages[1:] %}{% else %}{% set first = '' %}{% set turns = messages %}{% endif %}"
    "{% for m in turns %}"
    "{% if m['role'] == 'tool' %}{{ raise_exception('Gemma templates have no tool role') }}{% endif %}"
    "<start_of_turn>{{ 'model' if m['role'] == 'assistant' else m['role'] }}\n"
    "{{ (first if loop.first else '') + m['content'] | trim }}<end_of_turn>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)
END_OF_TURN = {"chatml": "<|im_end|>", "smollm2": "<|im_end|>", "llama3": "<|eot_id|>", "gemma": "<end_of_turn>"}
EOS = {"chatml": "<|endoftext|>", "smollm2": "<|im_end|>", "llama3": "<|eot_id|>", "gemma": "<eos>"}
ANSWER = "Paris."   # every example row of LAYOUTS answers this
TOOL_CALL = {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}
WEATHER_TOOL = {"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
                                                 "parameters": {"type": "object",
                                                                "properties": {"city": {"type": "string"}}}}}


def _with_template(specials: dict, template: str):
    tok = tiny_tokenizer()
    tok.add_special_tokens(specials)
    tok.chat_template = template
    return tok


def _smollm2(tmp_path_factory):
    """SmolLM2-135M-Instruct's tokenizer: read from the GGUF (~15 s) once, then from a saved copy (~0.5 s)."""
    import transformers

    try:
        from qlowrank.model.embedded import smollm2_gguf
        gguf = smollm2_gguf()
    except FileNotFoundError as err:
        pytest.skip(str(err))
    stat = gguf.stat()
    cache = tmp_path_factory.getbasetemp().parent / f"qlowrank-smollm2-tokenizer-{stat.st_size}-{int(stat.st_mtime)}"
    if not (cache / "tokenizer.json").is_file():
        staging = cache.with_name(f"{cache.name}.{os.getpid()}.partial")
        transformers.AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name).save_pretrained(staging)
        try:
            staging.rename(cache)     # atomic: a concurrent run sees all of it or none
        except OSError:               # another run cached it first
            pass
    return transformers.AutoTokenizer.from_pretrained(cache)


@pytest.fixture(scope="module")
def toks(tmp_path_factory):
    return {
        "chatml": tiny_tokenizer(),
        "smollm2": _smollm2(tmp_path_factory),
        "llama3": _with_template({"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>",
                                  "additional_special_tokens": ["<|start_header_id|>", "<|end_header_id|>"]},
                                 LLAMA3_TEMPLATE),
        "gemma": _with_template({"bos_token": "<bos>", "eos_token": "<eos>",
                                 "additional_special_tokens": ["<start_of_turn>", "<end_of_turn>"]}, GEMMA_TEMPLATE),
    }


def _learned(tok, example) -> str:
    return tok.decode([t for t, label in zip(example.input_ids, example.labels) if label != IGNORE_INDEX])


def test_every_example_row_is_detected_as_its_own_layout():
    assert [detect(layout.example, "x").name for layout in LAYOUTS] == [layout.name for layout in LAYOUTS]


@pytest.mark.parametrize("template", list(END_OF_TURN))
@pytest.mark.parametrize("layout", LAYOUTS, ids=lambda layout: layout.name)
def test_the_end_of_the_turn_is_learned(toks, template, layout):
    tok = toks[template]
    ends = end_of_turn_ids(tok)
    end, eos = tok.convert_tokens_to_ids(END_OF_TURN[template]), tok.convert_tokens_to_ids(EOS[template])
    assert ends == {eos: EOS[template], end: END_OF_TURN[template]}   # found from the template, not from a list
    example = tokenize_row(layout.example, tok)
    learned = _learned(tok, example)
    if layout.name == "text":
        assert learned == layout.example["text"] + EOS[template]
    elif layout.name == "prompt-completion":
        assert learned == " " + ANSWER + EOS[template]
    else:   # a chat: the answer and the template's end of turn (and the newline some templates write after it)
        assert learned in (ANSWER + END_OF_TURN[template], ANSWER + END_OF_TURN[template] + "\n"), learned
    learned_ids = [label for label in example.labels[1:] if label != IGNORE_INDEX]
    assert end in learned_ids or eos in learned_ids
    stats = DataStats(end_ids=ends)
    stats.keep(example)
    assert stats.end_warning() is None and sum(stats.ends_learned.values()) == 1


def _answer_spans(text: str, header: str, end: str) -> list[tuple[int, int]]:
    """Character spans of every assistant answer in a rendered conversation: after `header`, through `end` + newline."""
    spans, pos = [], 0
    while (start := text.find(header, pos)) >= 0:
        start += len(header)
        stop = text.index(end, start) + len(end)
        stop += text.startswith("\n", stop)
        spans.append((start, stop))
        pos = stop
    return spans


def _check_mask_token_by_token(tok, example, messages, header, end):
    """ids are the rendered conversation's tokens; a token is learned exactly when it lies in an answer's span."""
    text = tok.apply_chat_template(messages, tokenize=False)
    encoded = tok(text, add_special_tokens=False, return_offsets_mapping=True)
    assert example.input_ids == encoded["input_ids"]
    spans = _answer_spans(text, header, end)
    assert len(spans) == sum(m["role"] == "assistant" for m in messages)
    for token, label, (a, b) in zip(example.input_ids, example.labels, encoded["offset_mapping"]):
        inside = any(start <= a and b <= stop for start, stop in spans)
        assert label == (token if inside else IGNORE_INDEX), (tok.decode([token]), a, b, spans)


SHAREGPT_ROW = {"system": "Be terse.", "conversations": [
    {"from": "human", "value": "Capital of France?"}, {"from": "gpt", "value": "Paris."},
    {"from": "human", "value": "And of Italy?"}, {"from": "gpt", "value": "Rome."}]}
SHAREGPT_MESSAGES = [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "Capital of France?"},
                     {"role": "assistant", "content": "Paris."}, {"role": "user", "content": "And of Italy?"},
                     {"role": "assistant", "content": "Rome."}]
ALPACA_ROWS = [  # (row, the conversation it means)
    ({"instruction": "Name the capital of this country.", "input": "France", "output": "Paris."},
     [{"role": "user", "content": "Name the capital of this country.\n\nFrance"},
      {"role": "assistant", "content": "Paris."}]),
    ({"instruction": "Say hello.", "input": "", "output": "Hello!", "system": "Be friendly."},
     [{"role": "system", "content": "Be friendly."}, {"role": "user", "content": "Say hello."},
      {"role": "assistant", "content": "Hello!"}]),
]


@pytest.mark.parametrize("template", ["chatml", "smollm2"])
def test_alpaca_and_sharegpt_masks_token_by_token(toks, template):
    tok = toks[template]
    header, end = "<|im_start|>assistant\n", "<|im_end|>"
    for row, messages in [*ALPACA_ROWS, (SHAREGPT_ROW, SHAREGPT_MESSAGES)]:
        _check_mask_token_by_token(tok, tokenize_row(row, tok), messages, header, end)


def test_gemma_and_llama3_masks_token_by_token(toks):
    _check_mask_token_by_token(toks["gemma"], tokenize_row(SHAREGPT_ROW, toks["gemma"]), SHAREGPT_MESSAGES,
                               "<start_of_turn>model\n", "<end_of_turn>")
    _check_mask_token_by_token(toks["llama3"], tokenize_row(SHAREGPT_ROW, toks["llama3"]), SHAREGPT_MESSAGES,
                               "<|start_header_id|>assistant<|end_header_id|>\n\n", "<|eot_id|>")


def test_alpaca_without_a_chat_template_is_stanford_alpacas_prompt():
    tok = tiny_tokenizer()
    tok.chat_template = None
    example = tokenize_row(ALPACA_ROWS[0][0], tok)
    prompt = ("Below is an instruction that describes a task, paired with an input that provides further context. "
              "Write a response that appropriately completes the request.\n\n### Instruction:\nName the capital of "
              "this country.\n\n### Input:\nFrance\n\n### Response:\n")
    assert tok.decode(example.input_ids) == prompt + "Paris.<|endoftext|>"
    assert _learned(tok, example) == "Paris.<|endoftext|>"
    with pytest.raises(DataError, match="x:1: chat rows need a tokenizer with a chat template"):
        tokenize_row(SHAREGPT_ROW, tok, "x:1")


def test_conversational_prompt_completion_learns_only_the_completion(toks):
    tok = toks["chatml"]
    shots = [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"},
             {"role": "user", "content": "3+3?"}]
    example = tokenize_row({"prompt": shots, "completion": [{"role": "assistant", "content": "6"}]}, tok)
    assert _learned(tok, example) == "6<|im_end|>\n"   # the few-shot answer "4" is prompt: masked
    as_messages = tokenize_row({"messages": [*shots, {"role": "assistant", "content": "6"}]}, tok)
    assert as_messages.input_ids == example.input_ids and _learned(tok, as_messages) == "4<|im_end|>\n6<|im_end|>\n"


def _tool_conversation():
    return [{"role": "user", "content": "Weather in Paris?"},
            {"role": "assistant", "content": None, "tool_calls": [TOOL_CALL]},
            {"role": "tool", "name": "get_weather", "content": "sunny\n24 C"},
            {"role": "assistant", "content": "It is sunny."}]


def test_tool_calls_are_learned_and_tool_results_are_not(toks):
    tok = toks["llama3"]
    example = tokenize_row({"messages": _tool_conversation(), "tools": [WEATHER_TOOL]}, tok)
    assert _learned(tok, example) == ('{"name": "get_weather", "parameters": {"city": "Paris"}}<|eot_id|>'
                                      "It is sunny.<|eot_id|>")
    masked = tok.decode([t for t, label in zip(example.input_ids, example.labels) if label == IGNORE_INDEX])
    assert '<|start_header_id|>ipython<|end_header_id|>\n\n"sunny\\n24 C"<|eot_id|>' in masked
    assert '"description": "Weather in a city"' in masked   # the tool schema reached the template
    # tools given as a JSON string (how tables keep them) mean the same
    again = tokenize_row({"messages": _tool_conversation(), "tools": json.dumps([WEATHER_TOOL])}, tok)
    assert again == example


def test_templates_that_cannot_render_tools_are_named(toks):
    # SmolLM2's template writes role and content only: a call would vanish from the training text.
    with pytest.raises(DataError, match=r"x:2: messages\[1\]: the chat template drops the assistant's tool_calls"):
        tokenize_row({"messages": _tool_conversation()}, toks["smollm2"], "x:2")
    with pytest.raises(DataError, match="x:2: the chat template ignores the row's 'tools'"):
        tokenize_row({"messages": _tool_conversation()[:1] + [{"role": "assistant", "content": "Hm."}],
                      "tools": [WEATHER_TOOL]}, toks["smollm2"], "x:2")
    text_only = [m for m in _tool_conversation() if "tool_calls" not in m]
    with pytest.raises(DataError, match="x:2: the chat template refuses this conversation: Gemma templates have no tool"):
        tokenize_row({"messages": text_only}, toks["gemma"], "x:2")
    # Tool results in text form pass through ChatML and are masked.
    example = tokenize_row({"messages": text_only}, toks["smollm2"])
    assert _learned(toks["smollm2"], example) == "It is sunny.<|im_end|>\n"
    assert "<|im_start|>tool\nsunny\n24 C<|im_end|>" in toks["smollm2"].decode(example.input_ids)


@pytest.mark.parametrize("row, message", [
    ({"conversations": [{"from": "bot", "value": "hi"}]}, r"conversations\[0\] is from 'bot'; use one of"),
    ({"conversations": [{"from": "human", "value": 3}]}, r"conversations\[0\] must be an object with string 'from'"),
    ({"conversations": [{"from": "human", "value": "hi"}]}, "no assistant message"),
    ({"instruction": "do it"}, "missing field 'output'"),
    ({"prompt": [{"role": "user", "content": "q"}], "completion": "a"}, "field 'completion' must be a list of messages"),
    ({"messages": [{"role": "assistant", "content": None}]}, r"messages\[0\] must be an object with string 'role'"),
    ({"messages": [{"role": "assistant", "tool_calls": "f()"}]}, r"messages\[0\].tool_calls must be a non-empty list"),
    ({"body": "x"}, "none of the fields 'text', 'prompt'/'completion', 'messages', 'conversations', "
                    "'instruction'/'output' .layouts: text, prompt-completion, messages, sharegpt, alpaca, "
                    "chat-prompt-completion; keys: \\['body'\\]"),
])
def test_bad_rows_of_each_layout_name_file_line_and_what_is_wrong(tmp_path, toks, row, message):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps({"text": "fine"}) + "\n" + json.dumps(row) + "\n")
    with pytest.raises(DataError, match=message) as err:
        load_examples(path, toks["chatml"], seq_len=64)
    assert str(err.value).startswith(f"{path}:2: ")


def test_format_forces_a_layout(tmp_path, toks):
    tok = toks["chatml"]
    row = {"text": "Paris is in France.", "instruction": "Where is Paris?", "output": "In France."}
    assert detect(row, "x").name == "alpaca"   # structured beats pre-formatted
    assert _learned(tok, tokenize_row(row, tok, format="text")) == "Paris is in France.<|endoftext|>"
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps(row) + "\n" + json.dumps({"text": "only text"}) + "\n")
    with pytest.raises(DataError, match=f"^{path}:2: missing field 'instruction'"):
        load_examples(path, tok, seq_len=64, format="alpaca")
    with pytest.raises(DataError, match="unknown --format 'dpo'"):
        load_examples(path, tok, seq_len=64, format="dpo")


def test_tables_hold_every_layout_as_jsonl_does(tmp_path, toks):
    tok = toks["llama3"]
    tool_row = {"messages": [{**m, "content": m["content"] or ""} for m in _tool_conversation()],
                "tools": json.dumps([WEATHER_TOOL])}
    # `Dataset.from_list` takes its columns from the first row: every row names them all (null where unused)
    groups = {"alpaca": [{"system": None, **row} for row, _ in ALPACA_ROWS], "sharegpt": [SHAREGPT_ROW, SHAREGPT_ROW],
              "tools": [tool_row, {"messages": SHAREGPT_MESSAGES, "tools": None}]}
    for name, rows in groups.items():
        jsonl = tmp_path / f"{name}.jsonl"
        jsonl.write_text("".join(json.dumps(r) + "\n" for r in rows))
        expected = [(e.input_ids, e.labels) for e in load_examples(jsonl, tok, seq_len=256)]
        # Parquet gives each message every key of its column, None where it has none (a user turn's tool_calls)
        datasets.Dataset.from_list(rows).to_parquet(str(tmp_path / f"{name}.parquet"))
        datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / f"{name}-saved"))
        for path in (tmp_path / f"{name}.parquet", tmp_path / f"{name}-saved"):
            assert [(e.input_ids, e.labels) for e in load_examples(path, tok, seq_len=256)] == expected, path
    csv = tmp_path / "alpaca.csv"   # flat layouts only: CSV cells are strings
    datasets.Dataset.from_list(groups["alpaca"]).to_csv(str(csv), index=False)
    stats = DataStats()
    rows = load_examples(csv, tok, seq_len=256, stats=stats)
    assert [(e.input_ids, e.labels) for e in rows] == [(e.input_ids, e.labels) for e in
                                                       load_examples(tmp_path / "alpaca.jsonl", tok, seq_len=256)]
    assert stats.layouts == {"alpaca": 2} and stats.rows == 2


def test_stats_count_truncated_and_dropped_rows_and_warn_when_no_end_is_learned(tmp_path, toks):
    tok = toks["chatml"]
    path = tmp_path / "d.jsonl"
    long_answer = " ".join(["word"] * 60)
    rows = [{"instruction": "Talk.", "output": long_answer}, {"prompt": " ".join(["p"] * 40), "completion": "c"},
            {"text": "short"}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    stats = DataStats()
    examples = load_examples(path, tok, seq_len=24, stats=stats)
    assert [e.source for e in examples] == [f"{path}:1", f"{path}:3"]
    assert stats.rows == 3 and stats.layouts == {"alpaca": 1, "prompt-completion": 1, "text": 1}
    assert stats.truncated == [f"{path}:1", f"{path}:2"]
    assert stats.dropped == {"no token left to learn after truncation to seq_len=24": [f"{path}:2"]}
    assert stats.tokens == sum(len(e.input_ids) for e in examples)
    assert stats.learned == sum(label != IGNORE_INDEX for e in examples for label in e.labels[1:])
    assert stats.ends_learned == {"<|endoftext|>": 1}   # only the text row got to its end
    assert stats.end_warning() is None
    path.write_text(json.dumps(rows[0]) + "\n")
    cut = DataStats()
    load_examples(path, tok, seq_len=24, stats=cut)
    assert "no end-of-turn token is ever learned (looked for '<|endoftext|>' or '<|im_end|>')" in cut.end_warning()
    assert "1 rows were cut to seq_len before their end: raise --seq" in cut.end_warning()


def test_docs_show_one_row_of_every_layout_and_each_is_detected_as_it():
    docs = (Path(__file__).resolve().parents[1] / "docs" / "data.md").read_text()
    shown = dict(re.findall(r"^### (\S+)\n\n```json\n(.*?)```", docs, flags=re.S | re.M))
    assert sorted(shown) == sorted(layout.name for layout in LAYOUTS)
    for name, row in shown.items():
        assert detect(json.loads(row), "docs").name == name
