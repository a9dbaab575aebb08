"""How the CLI reports a failure: user errors one line and exit 2, internal errors their last frames and exit 1, --debug all."""

from __future__ import annotations

import errno
import json
import struct
import subprocess
import sys
from pathlib import Path

import datasets
import pytest
import torch
import transformers

from qlowrank import LoraConfig
from qlowrank.cli.errors import FAILED, INTERNAL, LAST_FRAMES, OUT_OF_MEMORY_HINT, USER, kind_of, report
from qlowrank.cli.main import main
from qlowrank.data.example import DataError
from qlowrank.train import NonFiniteLossError

from conftest import tiny_tokenizer

QLOWRANK = [sys.executable, "-m", "qlowrank"]   # the same entry point as the `qlowrank` script


def _raised(make) -> BaseException:
    """The exception `make()` raises, with its real traceback."""
    try:
        make()
    except Exception as err:   # noqa: BLE001 - the test looks at whatever was raised
        return err
    raise AssertionError(f"{make} raised nothing")


def _no_such_key():
    return {}["key"]


def _disk_full():
    raise OSError(errno.ENOSPC, "No space left on device", "/out/adapter")


def test_kind_follows_who_raised_it():
    assert kind_of(_raised(lambda: LoraConfig(r=0))) == USER                 # qlowrank's own check
    assert kind_of(_raised(lambda: json.loads("{"))) == INTERNAL              # a ValueError from inside json
    assert kind_of(_raised(lambda: torch.zeros(2).view(3))) == INTERNAL       # a RuntimeError from inside torch
    assert kind_of(_raised(_no_such_key)) == INTERNAL
    assert kind_of(_raised(_disk_full)) == FAILED                             # the OS refused a write
    assert kind_of(DataError("rows.jsonl:3: bad row")) == USER                # qlowrank's error types, wherever raised
    assert kind_of(NonFiniteLossError("the loss is nan at step 4")) == FAILED
    assert kind_of(_raised(lambda: bytearray(2**62))) == FAILED               # out of memory: the run does not fit
    assert kind_of(torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")) == FAILED


def test_out_of_memory_is_one_line_saying_how_to_fit(capsys):
    assert report("train", torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")) == 1
    assert capsys.readouterr().err == ("qlowrank train: error: CUDA out of memory. Tried to allocate 2.00 GiB "
                                       f"(out of memory: {OUT_OF_MEMORY_HINT})\n")


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """A model whose tokenizer has ids past its 16 embedding rows (torch fails mid-forward), a folder with no
    tokenizer, and a config.json that is not JSON."""
    root = tmp_path_factory.mktemp("faults")
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=16, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                      num_attention_heads=2, num_key_value_heads=1)
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(root / "mismatched")
    tiny_tokenizer().save_pretrained(root / "mismatched")
    (root / "no-tokenizer").mkdir()
    (root / "no-tokenizer" / "config.json").write_text(config.to_json_string())
    (root / "broken").mkdir()
    (root / "broken" / "config.json").write_text('{"model_type": "llama", ')
    (root / "rows.jsonl").write_text('{"text": "The pass statement does nothing."}\n')
    return root


def _run(*args, env=None):
    return subprocess.run([*QLOWRANK, *map(str, args)], capture_output=True, text=True, timeout=300, env=env)


def _frames(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.lstrip().startswith('File "')]


def test_user_error_is_one_line_exit_2_without_traceback(folders):
    done = _run("estimate", "--model", folders / "broken", "--seq", "32")
    assert done.returncode == 2
    assert done.stderr == f"qlowrank estimate: error: {folders / 'broken' / 'config.json'} is not valid JSON: " \
                          "Expecting property name enclosed in double quotes: line 1 column 25 (char 24)\n"


def _damaged_dataset(root: Path) -> Path:
    datasets.Dataset.from_dict({"text": ["a", "b"]}).save_to_disk(root / "saved")
    arrow = next((root / "saved").glob("*.arrow"))
    arrow.write_bytes(arrow.read_bytes()[:100])
    return root / "saved"


def _corrupt_gguf(root: Path) -> Path:
    # Version 3, no tensors, one key whose length field says 2**63 bytes.
    (root / "corrupt.gguf").write_bytes(b"GGUF" + struct.pack("<IQQQ", 3, 0, 1, 2**63))
    return root / "corrupt.gguf"


def test_a_library_refusing_a_users_file_is_named_as_a_user_error(folders, capsys):
    # transformers / datasets raise inside themselves; qlowrank's call site names the file, so it stays a user error.
    rows, no_tokenizer = str(folders / "rows.jsonl"), folders / "no-tokenizer"
    cases = [(["data", "--data", rows, "--model", str(no_tokenizer)],
              f"qlowrank data: error: {no_tokenizer}: transformers cannot load a tokenizer"),
             (["data", "--data", str(_damaged_dataset(folders)), "--model", str(folders / "mismatched")],
              f"qlowrank data: error: {folders / 'saved'}: not a readable saved dataset (ArrowInvalid"),
             (["estimate", "--model", str(_corrupt_gguf(folders))],   # a length past the file's end: not an OverflowError
              f"qlowrank estimate: error: {folders / 'corrupt.gguf'}: truncated GGUF header")]
    capsys.readouterr()   # save_to_disk's progress bar
    for argv, line in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith(line), err


def test_internal_error_shows_its_last_frames_and_exits_1(folders):
    done = _run("generate", "--model", folders / "mismatched", "--prompt", "hello world", "--raw",
                "--max-new-tokens", "2")
    assert done.returncode == 1, done.stderr[-3000:]
    lines = done.stderr.strip().splitlines()
    assert lines[-1] == "qlowrank generate: internal error: IndexError: index out of range in self"
    assert lines[0] == "Traceback (innermost frames; --debug or QLOWRANK_DEBUG=1 prints all):"
    frames = _frames(done.stderr)
    # The innermost frames (torch's embedding raised it), led by the qlowrank call that got there.
    assert len(frames) == LAST_FRAMES + 1
    assert "qlowrank/cli/generate.py" in frames[0] and "torch/nn/functional.py" in frames[-1]


def test_debug_prints_the_full_traceback(folders, capsys, monkeypatch):
    done = _run("generate", "--model", folders / "mismatched", "--prompt", "hello world", "--raw",
                "--max-new-tokens", "2", "--debug")
    assert done.returncode == 1, done.stderr[-3000:]
    assert "Traceback (most recent call last):" in done.stderr
    frames = _frames(done.stderr)
    assert "qlowrank/cli/errors.py" in frames[0] and "torch/nn/functional.py" in frames[-1]   # outermost to innermost
    assert len(frames) > LAST_FRAMES + 1
    assert done.stderr.strip().splitlines()[-1] == "qlowrank generate: internal error: IndexError: index out of range in self"

    # A user error too, and the flag before the command or QLOWRANK_DEBUG=1 do the same; the exit code stays 2.
    broken = str(folders / "broken")
    for argv in (["--debug", "estimate", "--model", broken], ["estimate", "--model", broken, "--debug"]):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert "Traceback (most recent call last):" in err and "qlowrank/memory/meta_model.py" in err
        assert err.strip().splitlines()[-1].startswith("qlowrank estimate: error:")
    monkeypatch.setenv("QLOWRANK_DEBUG", "1")
    assert main(["estimate", "--model", broken]) == 2
    assert "Traceback (most recent call last):" in capsys.readouterr().err


def test_a_loss_that_becomes_nan_is_one_line_exit_1(workdir, tmp_path, capsys):
    # lr 1e30 drives the first update's weights to inf, so step 2's loss is NaN: a real run, stopped.
    argv = ["train", "--model", str(workdir / "model"), "--data", str(workdir / "data.jsonl"), "--out",
            str(tmp_path / "out"), "--steps", "3", "--seq", "32", "--batch", "2", "--lr", "1e30", "--no-progress"]
    assert main(argv) == 1
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines[-1].startswith("qlowrank train: error: the loss is nan at step 2; training stopped before applying it")
    assert not any("Traceback" in line for line in lines)
