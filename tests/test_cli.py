"""`qlowrank train` then `qlowrank export` in subprocesses: config file + flags, outputs, resume, bad data."""

from __future__ import annotations

import json
import subprocess
import sys

import transformers
from safetensors.torch import load_file

from qlowrank.cli.main import main

QLOWRANK = [sys.executable, "-m", "qlowrank"]   # the same entry point as the `qlowrank` script


def _run(*args, cwd):
    return subprocess.run([*QLOWRANK, *map(str, args)], cwd=cwd, capture_output=True, text=True, timeout=300)


def test_train_from_config_with_flag_override_then_resume_and_export(workdir):
    # The config file says 50 steps; the flag says 2 and wins.
    done = _run("train", "--config", workdir / "run.json", "--steps", "2", "--save-every", "1", cwd=workdir)
    assert done.returncode == 0, done.stderr[-3000:]
    out = workdir / "out"
    assert {"adapter", "checkpoints", "metrics.jsonl", "memory.json", "memory.txt"} <= {p.name for p in out.iterdir()}
    assert "base_weights" in done.stdout and "optimizer_states" in done.stdout   # the memory table
    steps = [json.loads(line).get("step") for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == [0, 1, 2, 2]   # eval before, two steps, eval after
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-000001", "step-000002"]

    # The adapter the run wrote goes through `qlowrank export` to a plain checkpoint.
    done = _run("export", "--model", workdir / "model", "--adapter", out / "adapter", "--out", workdir / "exported",
                cwd=workdir)
    assert done.returncode == 0, done.stderr[-3000:]
    exported = transformers.AutoModelForCausalLM.from_pretrained(workdir / "exported")
    lora_b = load_file(out / "adapter" / "adapter_model.safetensors")["base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"]
    assert lora_b.abs().sum() > 0   # two steps moved B away from zero, so the export carries an update
    assert exported.config.num_hidden_layers == 2

    done = _run("train", "--config", workdir / "run.json", "--steps", "3", "--resume", "--export", cwd=workdir)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in lines if "loss" in m] == [1, 2, 3]   # resumed at 3, nothing repeated
    merged = transformers.AutoModelForCausalLM.from_pretrained(out / "merged")
    tok = transformers.AutoTokenizer.from_pretrained(out / "merged")
    ids = tok("Topic assert:\n", return_tensors="pt").input_ids
    assert merged.generate(ids, max_new_tokens=4, do_sample=False).shape == (1, ids.shape[1] + 4)


# The error paths run in-process (same argv handling, without a 7 s interpreter start-up).
def test_bad_row_is_reported_with_file_and_line(workdir, tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "completion": "b"}\n{"prompt": "no completion"}\n')
    code = main(["train", "--model", str(workdir / "model"), "--data", str(bad), "--out", str(tmp_path / "o")])
    assert code == 2
    assert f"{bad}:2: missing field 'completion'" in capsys.readouterr().err


def test_unknown_config_option_is_named(tmp_path, capsys):
    config = tmp_path / "c.json"
    config.write_text(json.dumps({"model": "m", "data": "d", "learning_rate": 1}))
    assert main(["train", "--config", str(config)]) == 2
    assert f"{config}: unknown options ['learning_rate']" in capsys.readouterr().err
