"""Data from where users keep it: Parquet, CSV and save_to_disk folders (through `datasets`), field mapping."""

from __future__ import annotations

import json

import datasets
import pytest
from conftest import tiny_tokenizer

from qlowrank.data import DataError, Fields, load_examples, tokenize_row

CHAT = [{"role": "user", "content": "What does pass do?"}, {"role": "assistant", "content": "Nothing at all."}]
ROWS = [
    {"prompt": "Q: what is assert?\nA:", "completion": " a debugging check"},
    {"prompt": "Q: what is del?\nA:", "completion": " it removes a binding"},
]


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


def _same(a, b):
    assert [(e.input_ids, e.labels) for e in a] == [(e.input_ids, e.labels) for e in b]


def _jsonl(tmp_path, rows, name="data.jsonl"):
    path = tmp_path / name
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.mark.parametrize("kind", ["parquet", "csv", "saved", "saved_dict"])
def test_tables_give_the_same_examples_as_jsonl(tmp_path, tok, kind):
    table = datasets.Dataset.from_list(ROWS)
    path = tmp_path / {"parquet": "d.parquet", "csv": "d.csv", "saved": "saved", "saved_dict": "dict"}[kind]
    if kind == "parquet":
        table.to_parquet(str(path))
    elif kind == "csv":
        table.to_csv(str(path), index=False)
    elif kind == "saved":
        table.save_to_disk(str(path))
    else:   # a DatasetDict: its 'train' split is read
        datasets.DatasetDict({"train": table, "test": table.select([0])}).save_to_disk(str(path))
    _same(load_examples(path, tok, seq_len=64), load_examples(_jsonl(tmp_path, ROWS), tok, seq_len=64))


def test_parquet_chat_column_and_mixed_formats(tmp_path, tok):
    # One table, two formats: the columns a row does not use are null and are ignored.
    rows = [{"messages": CHAT, "text": None}, {"messages": None, "text": "plain text row"}]
    path = tmp_path / "mixed.parquet"
    datasets.Dataset.from_list(rows).to_parquet(str(path))
    examples = load_examples(path, tok, seq_len=64)
    assert [e.input_ids for e in examples] == [tokenize_row({"messages": CHAT}, tok).input_ids,
                                               tokenize_row({"text": "plain text row"}, tok).input_ids]


def test_field_mapping_reads_other_column_names(tmp_path, tok):
    path = tmp_path / "renamed.csv"
    datasets.Dataset.from_list([{"question": r["prompt"], "answer": r["completion"]} for r in ROWS]).to_csv(
        str(path), index=False)
    with pytest.raises(DataError, match="none of the fields.*--prompt-field"):
        load_examples(path, tok, seq_len=64)
    mapped = load_examples(path, tok, seq_len=64, fields=Fields(prompt="question", completion="answer"))
    _same(mapped, load_examples(_jsonl(tmp_path, ROWS), tok, seq_len=64))
    chat = _jsonl(tmp_path, [{"conversation": CHAT}, {"body": "x y"}], "renamed.jsonl")
    examples = load_examples(chat, tok, seq_len=64, fields=Fields(messages="conversation", text="body"))
    assert examples[0].labels == tokenize_row({"messages": CHAT}, tok).labels


def test_bad_table_rows_name_file_and_row(tmp_path, tok):
    path = tmp_path / "bad.parquet"
    datasets.Dataset.from_list([ROWS[0], {"prompt": "only a prompt", "completion": None}]).to_parquet(str(path))
    with pytest.raises(DataError) as err:
        load_examples(path, tok, seq_len=64)
    assert str(err.value).startswith(f"{path}:row 2: missing field 'completion'")
    csv = tmp_path / "bad.csv"
    csv.write_text('prompt,completion\n"a","b"\n"c",\n')
    with pytest.raises(DataError, match=f"^{csv}:row 2: missing field 'completion'"):
        load_examples(csv, tok, seq_len=64)


def test_unreadable_tables_are_named(tmp_path, tok):
    (tmp_path / "broken.parquet").write_bytes(b"not parquet")
    with pytest.raises(DataError, match=r"broken.parquet: not a readable Parquet file"):
        load_examples(tmp_path / "broken.parquet", tok, seq_len=64)
    (tmp_path / "folder").mkdir()
    with pytest.raises(DataError, match=r"folder: a data folder must be a dataset saved with `save_to_disk`"):
        load_examples(tmp_path / "folder", tok, seq_len=64)
    table = datasets.Dataset.from_list(ROWS)
    datasets.DatasetDict({"a": table, "b": table}).save_to_disk(str(tmp_path / "two"))
    with pytest.raises(DataError, match=r"splits \['a', 'b'\] and no 'train'"):
        load_examples(tmp_path / "two", tok, seq_len=64)


def test_cli_train_reads_parquet_with_mapped_fields(tmp_path, tok, capsys):
    import torch
    import transformers

    from qlowrank.cli.main import main

    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                      num_attention_heads=2, num_key_value_heads=2)
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / "model")
    tok.save_pretrained(tmp_path / "model")
    rows = [{"question": f"Q{i}: what is assert?\nA:", "answer": " a debugging check" * (1 + i % 3)} for i in range(6)]
    datasets.Dataset.from_list(rows).to_parquet(str(tmp_path / "qa.parquet"))
    common = ["train", "--model", str(tmp_path / "model"), "--data", str(tmp_path / "qa.parquet"), "--steps", "1",
              "--batch", "2", "--seq", "32", "--r", "2", "--no-progress", "--device", "cpu"]
    assert main([*common, "--out", str(tmp_path / "bad")]) == 2   # default field names: the row is named
    assert f"qa.parquet:row 1: row has none of the fields 'text', 'prompt'/'completion'" in capsys.readouterr().err
    assert main([*common, "--out", str(tmp_path / "out"), "--prompt-field", "question",
                 "--completion-field", "answer"]) == 0
    assert (tmp_path / "out" / "adapter" / "adapter_model.safetensors").is_file()
