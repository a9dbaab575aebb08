"""`qlowrank data` (mask preview and stats) and `qlowrank train` on alpaca and ShareGPT files, in-process."""

from __future__ import annotations

import json
import math

import pytest
from conftest import tiny_tokenizer
from safetensors.torch import load_file

from qlowrank.cli.main import build_parser, main
from qlowrank.cli.train import examples, load_tokenizer, resolve_options
from qlowrank.data import DataStats, load_examples
from qlowrank.nn.loss import IGNORE_INDEX

CAPITALS = [("France", "Paris"), ("Italy", "Rome"), ("Spain", "Madrid"), ("Japan", "Tokyo"),
            ("Egypt", "Cairo"), ("Peru", "Lima"), ("Chile", "Santiago"), ("Kenya", "Nairobi")]


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("layouts")
    alpaca = [{"instruction": "Name the capital of this country.", "input": country, "output": f"{city}."}
              for country, city in CAPITALS]
    sharegpt = [{"conversations": [{"from": "human", "value": f"Capital of {country}?"},
                                   {"from": "gpt", "value": f"{city}."}]} for country, city in CAPITALS]
    return {"alpaca": _jsonl(root / "alpaca.jsonl", alpaca), "sharegpt": _jsonl(root / "sharegpt.jsonl", sharegpt)}


def test_data_shows_the_mask_and_the_stats(workdir, files, capsys):
    model = workdir / "model"
    assert main(["data", "--data", str(files["alpaca"]), str(files["sharegpt"]), "--model", str(model), "--rows", "2",
                 "--color", "never"]) == 0
    out, err = capsys.readouterr()
    assert err == ""   # no warning: every answer's <|im_end|> is learned
    first = ("<|im_start|>user\nName the capital of this country.\n\nFrance<|im_end|>\n<|im_start|>assistant\n"
             "[[Paris.<|im_end|>\n]]")
    assert f"--- {files['alpaca']}:1: " in out and first in out
    assert "[[Rome.<|im_end|>\n]]" in out and "Madrid" not in out   # two rows previewed, not three
    stats = DataStats()
    kept = load_examples([files["alpaca"], files["sharegpt"]], load_tokenizer(model), 512, stats=stats)
    learned = sum(label != IGNORE_INDEX for e in kept for label in e.labels[1:])
    tokens = sum(len(e.input_ids) for e in kept)
    assert "rows: 16 (alpaca 8, sharegpt 8)" in out
    assert f"tokens: {tokens} in 16 rows kept; learned: {learned} ({learned / tokens:.1%})" in out
    assert "end of turn learned: <|im_end|> x16" in out

    assert main(["data", "--data", str(files["sharegpt"]), "--model", str(model), "--rows", "1",
                 "--color", "always"]) == 0
    assert "\x1b[1;32mParis.<|im_end|>\n\x1b[0m" in capsys.readouterr().out


def test_data_warns_when_no_end_of_turn_is_ever_learned(workdir, files, tmp_path, capsys):
    # Cut at 30 tokens (answers start at 26-28, their <|im_end|> at 31-36), every answer loses its end: the tuned model would never learn to stop.
    assert main(["data", "--data", str(files["sharegpt"]), "--model", str(workdir / "model"), "--seq", "30",
                 "--rows", "1", "--color", "never"]) == 0
    out, err = capsys.readouterr()
    assert "truncated: 8 rows longer than seq_len were cut" in out and ", cut to --seq 30" in out
    assert err.startswith("qlowrank data: warning: no end-of-turn token is ever learned (looked for "
                          "'<|endoftext|>' or '<|im_end|>')")
    # A tokenizer with no EOS: text rows end with nothing to learn as their end.
    tok = tiny_tokenizer()
    tok.eos_token, tok.chat_template = None, None
    tok.save_pretrained(tmp_path / "no-eos")
    text = _jsonl(tmp_path / "t.jsonl", [{"text": "The pass statement does nothing."}])
    assert main(["data", "--data", str(text), "--model", str(tmp_path / "no-eos"), "--rows", "0"]) == 0
    assert "(looked for none: the tokenizer has no EOS)" in capsys.readouterr().err


def test_data_bad_input_exits_2_with_one_line(workdir, tmp_path, capsys):
    bad = _jsonl(tmp_path / "bad.jsonl", [{"text": "fine"}, {"question": "q", "answer": "a"}])
    model = str(workdir / "model")
    assert main(["data", "--data", str(bad), "--model", model]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"qlowrank data: error: {bad}:2: row has none of the fields")
    assert "layouts: text, prompt-completion, messages, sharegpt, alpaca, chat-prompt-completion" in err
    assert main(["data", "--data", str(tmp_path / "missing.jsonl"), "--model", model]) == 2
    assert "missing.jsonl: no such data file" in capsys.readouterr().err
    assert main(["data", "--data", str(bad), "--model", model, "--format", "alpaca"]) == 2
    assert f"{bad}:1: missing field 'instruction'" in capsys.readouterr().err


@pytest.mark.parametrize("layout", ["alpaca", "sharegpt"])
def test_train_on_alpaca_and_sharegpt_files(workdir, files, tmp_path, layout, capsys):
    model, out = workdir / "model", tmp_path / "out"
    argv = ["train", "--model", str(model), "--data", str(files[layout]), "--steps", "2", "--batch", "4", "--seq", "64",
            "--r", "2", "--lr", "1e-2", "--no-progress", "--device", "cpu", "--out", str(out)]
    # What the run trains on, mask included: each row's answer and its end of turn, nothing else.
    tok = load_tokenizer(model)
    train, held = examples(resolve_options(build_parser().parse_args(argv)), tok)
    assert held == [] and len(train) == len(CAPITALS)   # fewer than 20 rows: none held out
    for example, (_, city) in zip(train, CAPITALS):
        assert tok.decode([t for t, label in zip(example.input_ids, example.labels) if label != IGNORE_INDEX]) == \
            f"{city}.<|im_end|>\n"
    capsys.readouterr()
    assert main(argv) == 0, capsys.readouterr().err
    assert "data: 8 training sequences, 0 held out" in capsys.readouterr().out
    losses = [m["loss"] for m in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "loss" in m]
    assert len(losses) == 2 and all(math.isfinite(loss) for loss in losses)
    adapter = load_file(out / "adapter" / "adapter_model.safetensors")
    assert any(float(v.abs().sum()) > 0 for k, v in adapter.items() if "lora_B" in k)   # the steps moved B off zero
