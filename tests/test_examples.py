"""Every script in examples/ runs: tiny sizes in the default suite, the real SmolLM2 runs under `slow`."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path
from pydoc_data.topics import topics

import pytest
import torch
import transformers
from conftest import tiny_tokenizer

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def example(name: str):
    """Import examples/<name>.py as a module (its main(argv) is the script)."""
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def tiny_chat_model(tmp_path_factory):
    """A tiny random Llama with a real BPE tokenizer and a ChatML chat template, as a Hugging Face folder."""
    folder = tmp_path_factory.mktemp("examples") / "tiny"
    tok = tiny_tokenizer()
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False,
                                      eos_token_id=tok.eos_token_id)
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def test_will_it_fit_smoke(tmp_path, capsys):
    assert example("will_it_fit").main(["--smoke", "--out", str(tmp_path / "fit.png")]) == 0
    out = capsys.readouterr().out
    row = re.search(r"mistral-7b\s+QLoRA 4-bit \(NF4\)\s+([\d.]+) GiB\s+(\d+)", out)
    assert row and 3 < float(row.group(1)) < 8 and int(row.group(2)) >= 1   # 7B in NF4 is ~4 GiB of weights
    assert (tmp_path / "fit.png").stat().st_size > 10_000


def test_finetune_chat_on_a_tiny_model(tiny_chat_model, tmp_path, capsys):
    code = example("finetune_chat").main(["--model", str(tiny_chat_model), "--steps", "4", "--seq", "64", "--lr", "1e-2",
                                          "--out", str(tmp_path), "--max-new-tokens", "4"])
    out = capsys.readouterr().out
    assert code == 0, out   # 0 means the held-out loss fell
    assert re.search(r"held-out loss [\d.]+ -> [\d.]+", out) and "answer:" in out
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()


def test_profile_memory_on_a_tiny_model(tiny_chat_model, tmp_path, capsys):
    assert example("profile_memory").main(["--model", str(tiny_chat_model), "--batch", "2", "--seq", "32",
                                           "--steps", "2", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    measured, predicted = _byte_row(out, "peak (measured)"), _byte_row(out, "estimate_memory")
    full, lora, qlora = measured
    assert qlora < lora < full   # the frozen base costs less in 4 bits, and LoRA keeps no full-size Adam states
    ratios = [float(x) for x in re.search(r"peak / full FT\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)", out).groups()]
    assert ratios == pytest.approx([1.0, lora / full, qlora / full], abs=0.006)   # printed with two decimals
    for seen, told, tolerance in zip(measured, predicted, (FULL_FT_TOLERANCE, ESTIMATE_TOLERANCE, ESTIMATE_TOLERANCE)):
        assert abs(told - seen) <= tolerance * seen, (told, seen)
    assert {p.name for p in tmp_path.glob("memory_*.png")} == {"memory_full.png", "memory_lora.png", "memory_qlora.png"}



UNITS = {"B": 1, "KiB": 2**10, "MiB": 2**20, "GiB": 2**30}
# The tensor estimate and the profiler agree to the byte on the categories they share; on this
# tiny model the printed peaks differ by ~0.5 KiB of ~800 KiB (0.06%: the profiler's view of
# allocator-rounded transients). 1% is that with room, and 10x below the 12% LoRA vs QLoRA gap.
ESTIMATE_TOLERANCE = 0.01
# Full fine-tuning on this tiny model: estimated 1.03 MiB against 1006 KiB measured (+4.8%, the
# printed figures, run on 2026-12-04); 6% bounds it. Not yet explained; the LoRA runs are exact.
FULL_FT_TOLERANCE = 0.06


def _byte_row(out: str, label: str) -> list[float]:
    """The three byte figures of one row of the example's table (full, lora, qlora)."""
    row = re.search(rf"^{re.escape(label)}\s+(.*)$", out, flags=re.M).group(1)
    return [float(v) * UNITS[u] for v, u in re.findall(r"([\d.]+) (B|KiB|MiB|GiB)", row)]


def test_export_and_generate_on_a_tiny_model(tiny_chat_model, tmp_path, capsys):
    code = example("export_and_generate").main(["--model", str(tiny_chat_model), "--out", str(tmp_path),
                                                "--max-new-tokens", "4"])
    out = capsys.readouterr().out
    assert code == 0, out   # 0 means PEFT's logits equal qlowrank's
    assert out.count("assistant:") == 2
    assert transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged").dtype == torch.bfloat16


def _run_script(name: str, *args: str, cwd: Path) -> str:
    done = subprocess.run([sys.executable, str(EXAMPLES / f"{name}.py"), *args], cwd=cwd, capture_output=True,
                          text=True, timeout=1800)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout


@pytest.mark.slow
def test_will_it_fit_full(tmp_path):
    out = _run_script("will_it_fit", cwd=tmp_path)
    assert len(re.findall(r"^(llama-3-8b|llama-3-70b|mistral-7b|qwen2.5-14b) ", out, flags=re.M)) == 16


@pytest.mark.slow
def test_finetune_chat_smollm2(tmp_path):
    out = _run_script("finetune_chat", cwd=tmp_path)
    before, after = map(float, re.search(r"held-out loss ([\d.]+) -> ([\d.]+)", out).groups())
    assert after < before - 0.3


@pytest.mark.slow
def test_profile_memory_smollm2(tmp_path):
    out = _run_script("profile_memory", cwd=tmp_path)
    ratios = [float(x) for x in re.search(r"peak / full FT\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)", out).groups()]
    assert ratios[2] < ratios[1] < 1.0


@pytest.mark.slow
def test_export_and_generate_smollm2(tmp_path):
    out = _run_script("export_and_generate", cwd=tmp_path)
    assert out.count("assistant:") == 2 and "relative difference" in out


def test_multi_process_script_trains_on_two_processes(tiny_chat_model, tmp_path):
    """examples/multi_process.sh: accelerate launch, 2 processes (gloo on this CPU), one adapter from rank 0."""
    env = {**os.environ, "PYTHON": sys.executable}
    run = subprocess.run(["bash", str(EXAMPLES / "multi_process.sh"), str(tiny_chat_model), str(tmp_path), "2"],
                         capture_output=True, text=True, env=env, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "2 processes" in run.stdout, run.stdout[-2000:]      # the global batch line names both ranks
    assert (tmp_path / "run" / "adapter" / "adapter_model.safetensors").is_file()
    losses = [line for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines() if '"loss"' in line]
    assert len(losses) == 2    # rank 0 alone writes the metrics: one line per step, not two


def test_preference_pairs_hold_out_whole_topics(tmp_path):
    from qlowrank.data.demo_rows import build_conversations

    preference = example("preference")
    train, held = build_conversations(eval_every=preference.HOLD_OUT_EVERY)
    topics_of = {}
    for row in train + held:
        topics_of.setdefault(row["messages"][1]["content"], set()).add(row["topic"])
    for rows in (train, held):
        for row, pair in zip(rows, preference.pydoc_pairs(rows)):
            assert pair["prompt"] == row["messages"][:1] and pair["chosen"] == row["messages"][1:]
            assert row["topic"] not in topics_of[pair["rejected"][0]["content"]]   # the answer to another topic
    files = preference.write_data(tmp_path)
    rows = {name: [json.loads(line) for line in path.read_text().splitlines()] for name, path in files.items()}
    assert len(rows["pairs"]) == len(rows["sft"]) == len(train)
    trained = {json.dumps(m) for r in rows["sft"] + rows["pairs"] for side in r.values() for m in side}
    held_texts = {json.dumps(m) for r in rows["pairs_eval"] for m in r["prompt"] + r["chosen"]}
    assert len(rows["pairs_eval"]) > 30 and not held_texts & trained   # no held-out question or answer was trained on


def test_preference_logp_accuracy_counts_each_pair(tiny_chat_model):
    from qlowrank.data.pairs import tokenize_pair

    preference = example("preference")
    tok = transformers.AutoTokenizer.from_pretrained(tiny_chat_model)
    model = transformers.AutoModelForCausalLM.from_pretrained(tiny_chat_model)
    keys = sorted(topics)[:10]
    rows = [{"prompt": f"Topic {k}:\n", "chosen": topics[k][:30 + 9 * i], "rejected": topics[keys[i - 3]][:70 - 4 * i]}
            for i, k in enumerate(keys)]
    pairs = [tokenize_pair(r, tok) for r in rows]

    def summed(ids, labels):   # one sequence, no padding, through the model's own logits
        with torch.no_grad():
            logp = model(torch.tensor([ids])).logits[0, :-1].log_softmax(-1)
        return sum(float(logp[t, y]) for t, y in enumerate(labels[1:]) if y != -100)

    wins = [summed(p.input_ids, p.labels) > summed(p.rejected_ids, p.rejected_labels) for p in pairs]
    assert 0 < sum(wins) < len(wins)   # both outcomes occur, so a swapped or constant count would fail
    assert preference.logp_accuracy(model, pairs, tok.pad_token_id, batch=4) == sum(wins) / len(wins)


def test_preference_on_a_tiny_model(tiny_chat_model, tmp_path, capsys):
    out = tmp_path / "figures.json"
    example("preference").main(["--model", str(tiny_chat_model), "--work", str(tmp_path), "--out", str(out),
                                "--sft-steps", "1", "--dpo-steps", "2", "--seq", "128", "--dpo-lr", "1e-2"])
    figures = json.loads(out.read_text())
    dpo = figures["dpo"]
    assert dpo["held_out_pairs"] == 65 and dpo["train_pairs"] == 130   # pydoc_data, every 4th topic held out
    # A fresh adapter: the policy is the reference, so every reward is exactly 0 before DPO.
    assert dpo["before"]["eval_rewards/margins"] == 0.0 and dpo["before"]["eval_rewards/accuracies"] == 0.0
    assert dpo["after"]["eval_rewards/margins"] != 0.0
    assert 0.0 <= dpo["logp_accuracy_before"] <= 1.0 and 0.0 <= dpo["logp_accuracy_after"] <= 1.0
    assert figures["export"]["argmax_agreement"] > 0.9
    merged = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    assert merged.dtype == torch.bfloat16
    assert "held-out pairs: reward margin" in capsys.readouterr().out


@pytest.mark.slow
def test_preference_smollm2(tmp_path):
    _run_script("preference", "--work", str(tmp_path), "--out", str(tmp_path / "figures.json"), cwd=tmp_path)
    dpo = json.loads((tmp_path / "figures.json").read_text())["dpo"]
    assert dpo["after"]["eval_rewards/margins"] > dpo["before"]["eval_rewards/margins"] + 0.1
    assert dpo["after"]["eval_rewards/accuracies"] > 0.5
