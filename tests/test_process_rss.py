"""Process memory against the OS: `qlowrank train` in fresh processes, measured peak RSS vs `process_bytes`."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path
from pydoc_data.topics import topics

import pytest
import torch
import transformers
from conftest import tiny_tokenizer

from qlowrank.cli.main import build_parser
from qlowrank.cli.plan import estimate_for_args
from qlowrank.cli.train import resolve_options
from qlowrank.memory.process import CPU_PREDICTION_MARGIN

# Relative tolerance of the predicted whole-process peak against the measured one: the
# process model's measured error, derived in qlowrank/memory/process.py (worst held-out error
# of benchmarks/process_memory.py plus this module's run-to-run spread), which is also the
# headroom `--batch auto` keeps.
PROCESS_RSS_TOLERANCE = CPU_PREDICTION_MARGIN

# The child runs `qlowrank train` and reports the whole process's peak RSS. The trainer's
# MemoryProfiler resets the kernel's high-water mark (VmHWM, which ru_maxrss reads) when
# training starts, so a thread samples VmHWM every 20 ms: between resets VmHWM only grows,
# so the largest sample is the peak of loading, and the last one (after the run) the peak
# of training. ru_maxrss at the end is reported too.
CHILD = r"""
import resource, sys, threading, time
from qlowrank.cli.main import main

def hwm():
    with open("/proc/self/status") as handle:
        return next(int(line.split()[1]) * 1024 for line in handle if line.startswith("VmHWM:"))

peak = [hwm()]
def sample():
    while True:
        peak[0] = max(peak[0], hwm())
        time.sleep(0.02)

threading.Thread(target=sample, daemon=True).start()
code = main(sys.argv[1:])
peak[0] = max(peak[0], hwm())
print(f"PEAK_RSS {peak[0]} RU_MAXRSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}", flush=True)
sys.exit(code)
"""

# Tiny Llamas from configs; in "mid" (28M parameters) tensors are a sixth to a third of the process.
MODELS = {
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4),
    "mid": dict(vocab_size=16384, hidden_size=512, intermediate_size=1376, num_hidden_layers=4, num_attention_heads=8),
}


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    """bf16 safetensors checkpoints of the MODELS with a real BPE tokenizer, and a text data file."""
    root = tmp_path_factory.mktemp("rss")
    tok = tiny_tokenizer()
    for name, shape in MODELS.items():
        torch.manual_seed(0)
        config = transformers.LlamaConfig(**{"vocab_size": len(tok), **shape}, num_key_value_heads=2,
                                          tie_word_embeddings=False)
        transformers.LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(root / name)
        tok.save_pretrained(root / name)
    with open(root / "data.jsonl", "w") as handle:
        for key in sorted(topics):   # rows longer than any --seq here: every batch is --seq long, as estimated
            if len(topics[key]) >= 4000:
                handle.write(json.dumps({"text": topics[key][:4000]}) + "\n")
    return root


def train_args(root: Path, model: str, out: str, *extra: str) -> list[str]:
    """`qlowrank train` arguments: rows cut to --seq (every batch is --seq long, as the estimate assumes), 2 steps."""
    return ["train", "--model", str(root / model), "--data", str(root / "data.jsonl"), "--out", str(root / out),
            "--steps", "2", "--no-progress", "--eval-fraction", "0", *extra]


def start(root: Path, args: list[str]) -> subprocess.Popen:
    # Through a shell that forks the child rather than exec'ing it straight from pytest: an
    # exec'd child starts with its parent's high-water mark in ru_maxrss (Linux keeps the
    # larger of the pre-exec memory's peak and its own), i.e. it would report pytest's RSS.
    return subprocess.Popen(["/bin/sh", "-c", '"$@"; exit $?', "sh", sys.executable, "-c", CHILD, *args],
                            cwd=root, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(process: subprocess.Popen) -> tuple[str, int, int]:
    """(stdout, whole-process peak RSS, ru_maxrss at exit) of a started child."""
    out, err = process.communicate(timeout=600)
    assert process.returncode == 0, err[-3000:]
    found = re.search(r"PEAK_RSS (\d+) RU_MAXRSS (\d+)", out)
    return out, int(found[1]), int(found[2])


def predicted(args: list[str]):
    """The estimate `qlowrank train --dry-run` prints for exactly these arguments."""
    parsed = resolve_options(build_parser().parse_args(args))
    return estimate_for_args(parsed, int(parsed.batch))


CONFIGS = {
    "tiny 4-bit b2 s64": ("tiny", "--bits", "4", "--batch", "2", "--seq", "64"),
    "mid 8-bit no-ckpt b4 s256": ("mid", "--bits", "8", "--batch", "4", "--seq", "256", "--no-checkpointing"),
    "mid float b4 s256": ("mid", "--bits", "none", "--batch", "4", "--seq", "256"),
}
# --batch auto, global batch 4, with a budget 1 MiB under what micro-batch 5 needs with the
# headroom --batch auto keeps: it must choose 4, and 4 must fit. (A larger global batch would
# accumulate gradients, which adds RSS the estimate does not model: README, limitations.)
AUTO = ("mid", "--bits", "4", "--seq", "512", "--no-checkpointing", "--batch", "auto", "--global-batch", "4")


def with_batch(args: list[str], batch: int) -> list[str]:
    at = args.index("--batch")
    return [*args[:at + 1], str(batch), *args[at + 2:]]


@pytest.fixture(scope="module")
def runs(workdir) -> dict:
    """Every fresh-process run of this module, started side by side (RSS is per process) and finished once."""
    plan = {name: train_args(workdir, model, f"out-{i}", *extra) for i, (name, (model, *extra)) in enumerate(CONFIGS.items())}
    auto = train_args(workdir, AUTO[0], "out-auto", *AUTO[1:])
    budget = int(predicted(with_batch(auto, 5)).process_bytes * (1 + CPU_PREDICTION_MARGIN)) - 2**20
    plan["auto"] = [*auto, "--max-memory", str(budget)]
    children = {name: start(workdir, args) for name, args in plan.items()}
    return {name: (plan[name], *finish(child)) for name, child in children.items()} | {"budget": budget}


def test_process_bytes_predicts_the_peak_rss_of_real_training(runs):
    """Three `qlowrank train` runs, each in a fresh process: whole-process peak RSS vs the prediction."""
    errors = {}
    for name in CONFIGS:
        args, _, peak, ru_maxrss = runs[name]
        estimate = predicted(args)
        errors[name] = estimate.process_bytes / peak - 1
        print(f"{name}: predicted {estimate.process_bytes / 2**20:.0f} MiB, peak RSS {peak / 2**20:.0f} MiB, "
              f"ru_maxrss {ru_maxrss / 2**20:.0f} MiB, tensor peak {estimate.total_bytes / 2**20:.0f} MiB")
    assert all(abs(e) <= PROCESS_RSS_TOLERANCE for e in errors.values()), errors


def test_batch_auto_fits_the_budget_and_the_next_batch_would_not(runs):
    args, out, peak, _ = runs["auto"]
    budget = runs["budget"]
    chosen = int(re.search(r"batch auto: micro-batch (\d+) x grad-accum 1 = global batch 4", out)[1])
    print(f"--max-memory {budget / 2**20:.0f} MiB: micro-batch {chosen}, measured peak RSS {peak / 2**20:.0f} MiB, "
          f"predicted {predicted(with_batch(args, chosen)).process_bytes / 2**20:.0f} MiB")
    assert chosen == 4                                            # the largest that fits with the headroom
    assert peak <= budget                                         # and it fits, measured
    assert predicted(with_batch(args, chosen + 1)).process_bytes * (1 + CPU_PREDICTION_MARGIN) > budget
