"""Process memory against the OS: `qlowrank train` in fresh processes, measured anonymous peak vs `process_bytes`."""

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
from conftest import planned_flags, tiny_tokenizer

from qlowrank.cli.main import build_parser
from qlowrank.cli.sizing import estimate_for_args
from qlowrank.cli.train import resolve_options
from qlowrank.memory.process import CPU_PREDICTION_MARGIN

# Relative tolerance of the predicted whole-process peak against the measured one for the three
# CONFIGS: the worst seen here over five runs (mid 8-bit without checkpointing, -9% to -13%)
# plus the 5% spread of one command's peak between runs, rounded up.
PROCESS_RSS_TOLERANCE = 0.18

# The child runs `qlowrank train` and reports the whole process's anonymous peak (RssAnon,
# sampled every 10 ms by a thread: the kernel keeps no high-water mark for it) and its
# file-backed peak (RssFile: libraries and the mapped checkpoint), loading and training alike.
CHILD = r"""
import sys
from qlowrank.cli.main import main
from qlowrank.memory.sampler import StatusSampler

with StatusSampler() as sampler:
    code = main(sys.argv[1:])
print(f"ANON_PEAK {sampler.anon_peak} FILE_PEAK {sampler.file_peak}", flush=True)
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
    return subprocess.Popen([sys.executable, "-c", CHILD, *args], cwd=root, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def finish(process: subprocess.Popen) -> tuple[str, int, int]:
    """(stdout, anonymous peak, file-backed peak) of a started child."""
    out, err = process.communicate(timeout=600)
    assert process.returncode == 0, err[-3000:]
    found = re.search(r"ANON_PEAK (\d+) FILE_PEAK (\d+)", out)
    return out, int(found[1]), int(found[2])


def predicted(args: list[str], **overrides):
    """The estimate `qlowrank train --dry-run` prints for exactly these arguments."""
    parsed = resolve_options(build_parser().parse_args(args))
    return estimate_for_args(parsed, int(parsed.batch), **overrides)


CONFIGS = {
    "tiny 4-bit b2 s64": ("tiny", "--bits", "4", "--batch", "2", "--seq", "64"),
    "mid 8-bit no-ckpt b4 s256": ("mid", "--bits", "8", "--batch", "4", "--seq", "256", "--no-checkpointing"),
    "mid float b4 s256": ("mid", "--bits", "none", "--batch", "4", "--seq", "256"),
}
# --batch auto with a global batch of 8 and a budget halfway between what micro-batches 1 and 8
# are predicted to need (with the headroom): the search has to pick a micro-batch below 8.
# (Checkpointing on: without it, at seq >= 512 and this small width, the model runs 10-13% low,
# past the headroom; benchmarks/RESULTS.md, "Process memory, anonymous".)
AUTO = ("mid", "--bits", "4", "--seq", "512", "--batch", "auto", "--global-batch", "8")
AUTO_GLOBAL_BATCH = 8


def with_batch(args: list[str], batch: int) -> list[str]:
    at = args.index("--batch")
    return [*args[:at + 1], str(batch), *args[at + 2:]]


def auto_budget(auto: list[str]) -> int:
    """Halfway between the headroomed predictions of micro-batches 1 and AUTO_GLOBAL_BATCH."""
    one, whole = (predicted(with_batch(auto, b)).process_bytes for b in (1, AUTO_GLOBAL_BATCH))
    return int((one + whole) / 2 * (1 + CPU_PREDICTION_MARGIN))


@pytest.fixture(scope="module")
def runs(workdir) -> dict:
    """Every fresh-process run of this module, one after another.

    Not side by side: four trainings on two cores raised the `auto` run's anonymous peak from
    546 MiB alone to 601 MiB here and 644 MiB on CI. Preempted threads hold glibc's arena locks, so
    the other threads open new arenas, and each keeps its own freed blocks. A user's run is alone.
    """
    plan = {name: train_args(workdir, model, f"out-{i}", *extra) for i, (name, (model, *extra)) in enumerate(CONFIGS.items())}
    auto = train_args(workdir, AUTO[0], "out-auto", *AUTO[1:])
    budget = auto_budget(auto)
    plan["auto"] = [*auto, "--max-memory", str(budget)]
    return {name: (args, *finish(start(workdir, args))) for name, args in plan.items()} | {"budget": budget}


def test_process_bytes_predicts_the_anonymous_peak_of_real_training(runs):
    """Three `qlowrank train` runs, each in a fresh process: the anonymous peak vs the prediction;
    the file-backed pages (libraries, the mapped checkpoint) come on top and are not predicted as anonymous."""
    errors = {}
    for name in CONFIGS:
        args, _, anon, file_backed = runs[name]
        estimate = predicted(args)
        errors[name] = estimate.process_bytes / anon - 1
        print(f"{name}: predicted {estimate.process_bytes / 2**20:.0f} MiB, anonymous peak {anon / 2**20:.0f} MiB, "
              f"file-backed {file_backed / 2**20:.0f} MiB (bound {estimate.file_backed_bytes / 2**20:.0f}), "
              f"tensor peak {estimate.total_bytes / 2**20:.0f} MiB")
    assert all(abs(e) <= PROCESS_RSS_TOLERANCE for e in errors.values()), errors


def test_batch_auto_plans_a_layout_that_fits_the_budget_measured(runs):
    """The planner under a budget that forces a choice: the layout it picks is predicted (with the
    headroom) within the budget, and measures within it in a fresh process."""
    args, out, anon, _ = runs["auto"]
    budget = runs["budget"]
    flags = planned_flags(out)
    micro, accum = int(flags[1]), int(flags[3])
    chosen = [*args[:args.index("--batch")], *flags]
    estimate = predicted(chosen)
    print(f"--max-memory {budget / 2**20:.0f} MiB: {' '.join(flags)}, measured anonymous peak {anon / 2**20:.0f} MiB, "
          f"predicted {estimate.process_bytes / 2**20:.0f} MiB")
    assert micro * accum == AUTO_GLOBAL_BATCH
    # 2 steps cannot pay back a compile: the planner says so without compiling anything to find out
    assert re.search(r"compile: no \(2 steps of \S+ s could save at most", out)
    assert estimate.process_bytes * (1 + CPU_PREDICTION_MARGIN) <= budget     # what the planner promised
    assert anon <= budget                                                      # and it holds, measured
    # the whole global batch in one micro-batch without checkpointing is what the budget rules out
    assert predicted(with_batch(args, AUTO_GLOBAL_BATCH) + ["--no-checkpointing"]).process_bytes > budget


# The target for the worst held-out configuration (issue 20): the process model's error
# on the 8B-width phases, which none of its constants was fitted on (benchmarks/RESULTS.md).
LARGE_MODEL_TOLERANCE = 0.10


@pytest.mark.slow
def test_large_model_benchmark_at_four_layers_of_8b_width(tmp_path):
    """benchmarks/large_model.py at Llama-3-8B's widths with 4 layers (vocab 32000: 1.14B
    parameters, 2.2 GB of shards), in a fresh process: every phase with a prediction (loading,
    training at seq 512, 512 x 4 accumulated, 2048) measures within LARGE_MODEL_TOLERANCE of it.
    Run it under `flock /tmp/qlowrank-heavy.lock nice -n 10` (minutes, ~4 GiB)."""
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "large_model.py"
    out = tmp_path / "large.json"
    done = subprocess.run([sys.executable, str(script), "--layers", "4", "--vocab", "32000", "--skip-export",
                           "--dir", str(tmp_path), "--json", str(out)], capture_output=True, text=True, timeout=3600)
    assert done.returncode == 0, done.stderr[-3000:]
    phases = [p for p in json.loads(out.read_text())["phases"] if p["predicted_anon"]]
    assert len(phases) == 4
    errors = {p["name"]: p["predicted_anon"] / p["measured"]["RssAnon"] - 1 for p in phases}
    print(done.stdout[-3000:])
    assert all(abs(e) <= LARGE_MODEL_TOLERANCE for e in errors.values()), errors
