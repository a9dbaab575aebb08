"""Several processes on the CPU (gloo, torchrun): DDP and FSDP compute what one process computes; resume across
process counts; SIGTERM to the launcher; every `qlowrank train` option survives the launchers' parsers.

The launches run in two rounds of concurrent processes (each process spends ~5 s importing
torch and transformers): round 1 trains 10 steps as 2 processes x batch 2 (DDP, every option
given), 2 processes x batch 1 x 2 accumulation (FSDP) and 1 process x batch 4; round 2
resumes the DDP run's step-5 checkpoint on 1 and on 2 processes, and stops a third
2-process run with SIGTERM to torchrun.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from pydoc_data.topics import topics

import pytest
import torch
import transformers
from conftest import TORCHRUN as LAUNCH_TWO
from conftest import child_pids, children_anon_peaks, finish_process, run_metrics, start_process
from safetensors.torch import load_file

import qlowrank as ql
from qlowrank.cli.train import add_train_arguments
from qlowrank.memory.process import CPU_PREDICTION_MARGIN
from qlowrank.train import list_checkpoints, verify_checkpoint

TORCHRUN = [*LAUNCH_TWO, "-m", "qlowrank"]
ONE = [sys.executable, "-m", "qlowrank"]

# Per-step losses (fp32 compute, AdamW lr 1e-3) of 2 ranks against 1 process. The ranks pad
# to their own longest row and each sums its tokens' losses in float32 before the sums are
# added: the same sum in another order. A float32 sum of n terms of size ~L has a typical
# rounding error of sqrt(n) * 2^-24 * L; with n ~ 240 predicted tokens per step and L ~ 7,
# sqrt(240) * 6e-8 * 7 = 6.5e-6. Measured: 7.8e-7 (DDP and FSDP alike). The bound is 2e-5
# (3x the estimate). At lr 1e-2 AdamW amplifies such differences to ~3e-2 by step 10
# (elements whose gradient is near 0 can flip the sign of m / sqrt(v)), hence lr 1e-3.
LOSS_ATOL = 2e-5
# Final LoRA factors: each AdamW step moves a weight by at most ~lr, and a relative gradient
# difference eps ~ 1e-6 changes that move by ~lr * eps; over 10 steps 10 * 1e-3 * 1e-6 = 1e-8.
# Measured 3.4e-8 (largest factor entry 0.13). The bound 1e-6 allows 30x.
ADAPTER_ATOL = 1e-6

# Launcher options (torchrun's and accelerate launch's parsers) that a qlowrank option must not abbreviate.
EXEMPT = {"-h", "--help"}


def _launcher_options() -> set[str]:
    from accelerate.commands.launch import launch_command_parser
    from torch.distributed.run import get_args_parser

    names = set()
    for parser in (get_args_parser(), launch_command_parser()):
        for action in parser._actions:
            names.update(s for s in action.option_strings if s.startswith("--"))
    return names


def _train_options() -> dict[str, list[str]]:
    parser = argparse.ArgumentParser()
    add_train_arguments(parser)
    return {action.dest: [s for s in action.option_strings if s.startswith("--")] for action in parser._actions
            if action.dest != "help"}


def test_every_train_option_has_a_long_name_no_launcher_option_starts_with():
    launcher = _launcher_options()
    clash = {dest: names for dest, names in _train_options().items()
             if not any(not any(opt.startswith(name) for opt in launcher) for name in names)}
    assert not clash, f"these options have no name safe under torchrun / accelerate launch: {clash}"
    assert {"--lora-rank", "--r"} <= set(_train_options()["r"]) and {"--lora-alpha", "--alpha"} <= set(_train_options()["alpha"])


@pytest.fixture(scope="module")
def work(workdir):
    """test_cli's tiny Llama (real BPE tokenizer) and data.jsonl, plus a held-out file and a config file."""
    with open(workdir / "eval.jsonl", "w") as handle:
        for key in sorted(topics)[24:29]:
            handle.write(json.dumps({"prompt": f"Topic {key}:\n", "completion": topics[key][:120]}) + "\n")
    (workdir / "dist.json").write_text(json.dumps({"keep_checkpoints": 5}))
    return workdir


def _full_flags(work: Path, out: Path) -> list[str]:
    """Every `qlowrank train` option by its launcher-safe long name (--resume and --no-checkpointing: round 2)."""
    flags = {
        "--train-config": work / "dist.json", "--model": work / "model", "--data": work / "data.jsonl",
        "--eval-data": work / "eval.jsonl", "--eval-fraction": 0.1, "--text-field": "text", "--prompt-field": "prompt",
        "--completion-field": "completion", "--messages-field": "messages", "--out": out, "--bits": 4, "--quant-type": "nf4",
        "--lora-rank": 4, "--lora-alpha": 8, "--dropout": 0.0, "--target": "all-linear", "--rslora": None,
        "--seq": 128, "--no-truncation": None, "--packing": None, "--pad-multiple": 16, "--batch": 2, "--grad-accum": 1, "--lr": 1e-3,
        "--lora-plus-ratio": 2.0, "--optimizer": "adamw", "--weight-decay": 0.01, "--warmup-steps": 2,
        "--min-lr-ratio": 0.1, "--max-grad-norm": 1.0, "--steps": 10, "--epochs": 1, "--precision": "fp32",
        "--chunk-tokens": 16, "--eval-every": 5, "--save-every": 5, "--keep-checkpoints": 5, "--seed": 3,
        "--device": "cpu", "--export": None, "--export-dtype": "fp32", "--no-progress": None, "--sharding": "none",
    }
    later = {"--resume", "--no-checkpointing"}
    # Planning options end before training (--dry-run) or only act with --batch auto; the
    # launcher-prefix test above covers their names, and test_process_memory their behaviour.
    planning = {"--dry-run", "--global-batch", "--max-memory", "--no-compile", "--no-offload", "--max-host-memory"}
    # Adapter variants (issue 12) change what is trained, not how it is distributed; their
    # names are covered by the launcher-prefix test, their behaviour by test_adapter_variants.
    # --no-double-quant changes how the base is stored, not how it is distributed, and the
    # estimate compared below assumes the default double quantization.
    # --target-parameters trains LoRA on fused MoE expert stacks, which this dense model has none of
    # (tests/test_moe.py covers it).
    variants = {"--init", "--loftq-iters", "--dora", "--train-modules", "--no-double-quant", "--target-parameters"}
    # Speed options: --compile changes how fast, not what (tests/test_speed_levers.py; a compile
    # per process would cost ~40 s here); so do --keep-blocks / --keep-attention (tests/test_checkpointing.py). Length grouping is on by default, so this run also
    # checks that it groups by the global batch, which 1 and 2 processes share.
    speed = {"--compile", "--no-group-by-length", "--keep-blocks", "--keep-attention"}
    # --offload-activations is CUDA-only and refused on a CPU run (tests/test_offload.py).
    cuda_only = {"--offload-activations"}
    # --format picks how rows are read (tests/test_layouts.py), not how they are distributed; auto reads these rows.
    data_layout = {"--format"}
    # Preference objectives read pairs, not this run's rows (tests/test_preference.py); their loss rides
    # on the same Stepper normalisation over ranks that this SFT run checks.
    objectives = {"--objective", "--beta", "--label-smoothing", "--orpo-lambda"}
    known = set(flags) | later | planning | variants | speed | cuda_only | data_layout | objectives
    missing = [names[0] for names in _train_options().values() if not known & set(names)]
    assert not missing, f"add these new options to _full_flags (every option must be launched once): {missing}"
    return [str(part) for flag, value in flags.items() for part in ((flag,) if value is None else (flag, value))]


def _with(flags: list[str], **changes) -> list[str]:
    flags = list(flags)
    for name, value in changes.items():
        flag = "--" + name.replace("_", "-")
        i = flags.index(flag)
        if value is None:
            del flags[i:i + (2 if i + 1 < len(flags) and not flags[i + 1].startswith("--") else 1)]
        else:
            flags[i + 1] = str(value)
    return flags


@pytest.fixture(scope="module")
def round1(work):
    base = _full_flags(work, work / "ddp")
    runs = {
        "ddp": start_process([*TORCHRUN, "train", *base], work),
        "fsdp": start_process([*TORCHRUN, "train", *_with(base, out=work / "fsdp", sharding="fsdp", batch=1, grad_accum=2)],
                       work),
        "one": start_process([*ONE, "train", *_with(base, out=work / "one", batch=4)], work),
    }
    rank_peaks = children_anon_peaks(runs["fsdp"])   # while the three run: each FSDP rank's anonymous peak
    finished = {name: finish_process(process) for name, process in runs.items()}
    return {**finished, "fsdp_rank_anon_peaks": rank_peaks}


def test_two_processes_ddp_and_fsdp_equal_one_process(work, round1):
    assert "global batch: 2 per process x 2 processes x 1 accumulation = 4 sequences per step" in round1["ddp"]
    one = run_metrics(work / "one")
    assert sorted(one) == list(range(1, 11))
    for name in ("ddp", "fsdp"):
        losses = run_metrics(work / name)
        assert sorted(losses) == sorted(one)
        diff = max(abs(losses[s] - one[s]) for s in one)
        assert diff <= LOSS_ATOL, (name, diff)
        # sharded over ranks, then summed
        evals, one_evals = run_metrics(work / name, "eval_loss"), run_metrics(work / "one", "eval_loss")
        assert sorted(evals) == [0, 5, 10] and max(abs(evals[s] - one_evals[s]) for s in evals) <= LOSS_ATOL
        adapter, reference = (load_file(work / d / "adapter" / "adapter_model.safetensors") for d in (name, "one"))
        assert max(float((adapter[k] - reference[k]).abs().max()) for k in reference) <= ADAPTER_ATOL
        # Rank 0 alone wrote the outputs, once (a second writer would have left staging folders or extra files).
        assert [p.name for p in list_checkpoints(work / name / "checkpoints")] == ["step-000005", "step-000010"]
        assert not [p for p in (work / name).rglob(".*partial*")]
        merged, merged_one = (load_file(next((work / d / "merged").glob("*.safetensors"))) for d in (name, "one"))
        assert merged.keys() == merged_one.keys()
        assert max(float((merged[k] - merged_one[k]).abs().max()) for k in merged) <= ADAPTER_ATOL
    # FSDP: each rank holds half of the base (+ the whole quantization state), DDP each all of it.
    fsdp = json.loads((work / "fsdp" / "memory.json").read_text())["ranks"]
    one_base = json.loads((work / "one" / "memory.json").read_text())["breakdown"]["base_weights"]
    for rank in fsdp:
        assert rank["quant_state"] > 0
        assert abs(rank["base_weights"] - one_base / 2) <= rank["quant_state"] + 0.02 * one_base, (rank, one_base)
    ddp = json.loads((work / "ddp" / "memory.json").read_text())["ranks"]
    assert [r["breakdown"]["base_weights"] for r in ddp] == [one_base, one_base]
    # The estimator predicts one rank's share from the config alone.
    config = transformers.AutoConfig.from_pretrained(work / "model")
    quant, lora = ql.QuantConfig(bits=4, compute_dtype=torch.float32), ql.LoraConfig(r=4, alpha=8)
    per_rank = ql.estimate_memory(config, quant=quant, lora=lora, batch_size=1, seq_len=128, dtype=torch.float32,
                                  device="cpu", chunked_loss=True, processes=2, sharding="fsdp").breakdown
    single = ql.estimate_memory(config, quant=quant, lora=lora, batch_size=1, seq_len=128, dtype=torch.float32,
                                device="cpu", chunked_loss=True).breakdown
    assert single["base_weights"] == one_base
    for rank in fsdp:
        assert per_rank["base_weights"] == pytest.approx(rank["base_weights"] + rank["quant_state"], rel=0.01)
        assert per_rank["trainable_params"] == pytest.approx(rank["trainable_params"], rel=0.01)


# `train --dry-run` of a run is within this share of what that run's processes measure (RssAnon). The
# process model's documented accuracy on the CPU (benchmarks/RESULTS.md, process memory): 10%. Measured
# here: the FSDP ranks' peaks 308-314 MiB against a per-rank prediction of 329 MiB (+5%).
PROCESS_MODEL_ACCURACY = 0.10


def _printed_process_peak(out: str) -> int:
    from qlowrank.memory import parse_bytes

    return parse_bytes(re.search(r"process peak: (\S+ \S+)", out).group(1))


def test_fsdp_dry_run_under_two_processes_predicts_each_ranks_measured_peak(work, round1):
    """The run's spec reaches the estimate: `--sharding fsdp` under two processes is one rank's figure."""
    flags = _with(_full_flags(work, work / "fsdp"), sharding="fsdp", batch=1, grad_accum=2)
    printed = {}
    for sharding in ("fsdp", "none"):   # the dry-run reads the process count as torchrun gives it
        dry = subprocess.run([*ONE, "train", *_with(flags, sharding=sharding), "--dry-run"], cwd=work,
                             env={**os.environ, "WORLD_SIZE": "2"}, capture_output=True, text=True, timeout=300)
        assert dry.returncode == 0, dry.stderr[-3000:]
        assert "on each of 2 processes" in dry.stdout
        printed[sharding] = _printed_process_peak(dry.stdout)
    assert printed["fsdp"] < printed["none"]   # each rank holds half of the base
    measured = round1["fsdp_rank_anon_peaks"]
    assert len(measured) == 2
    for peak in measured:
        assert abs(printed["fsdp"] - peak) / peak <= PROCESS_MODEL_ACCURACY, (printed, measured)
    assert CPU_PREDICTION_MARGIN > PROCESS_MODEL_ACCURACY   # what "fits" keeps above the figure covers the error


@pytest.fixture(scope="module")
def round2(work, round1):
    for name in ("resume1", "resume2"):
        (work / name / "checkpoints").mkdir(parents=True)
        shutil.copytree(work / "ddp" / "checkpoints" / "step-000005", work / name / "checkpoints" / "step-000005")
    base = _full_flags(work, work / "ddp")
    one = _with(base, out=work / "resume1", batch=4, export=None)
    two = _with(base, out=work / "resume2", export=None)
    term = _with(base, out=work / "term", steps=100000, save_every=0, eval_every=0, export=None)
    runs = {
        "resume1": start_process([*ONE, "train", *one, "--resume"], work),
        "resume2": start_process([*TORCHRUN, "train", *two, "--resume", "--no-checkpointing"], work),
        "term": start_process([*TORCHRUN, "train", *term], work),
    }
    yield runs
    for process in runs.values():
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)


def test_a_two_process_checkpoint_resumes_on_one_and_on_two_processes(work, round2):
    ddp = run_metrics(work / "ddp")
    for name in ("resume1", "resume2"):
        finish_process(round2[name])
        resumed = run_metrics(work / name)
        assert sorted(resumed) == list(range(6, 11))   # the data order continues at example 20 of the epoch
        assert max(abs(resumed[s] - ddp[s]) for s in resumed) <= LOSS_ATOL, name
    # The same process count continues bit for bit.
    assert run_metrics(work / "resume2") == {s: ddp[s] for s in range(6, 11)}


def test_sigterm_to_the_launcher_checkpoints_once_and_every_rank_exits(work, round2):
    process, out = round2["term"], work / "term"
    deadline = time.time() + 240
    while not ((out / "metrics.jsonl").is_file() and len(run_metrics(out)) >= 2):
        assert process.poll() is None and time.time() < deadline, process.communicate()[1][-4000:]
        time.sleep(0.1)
    ranks = child_pids(process.pid)
    assert len(ranks) == 2
    process.send_signal(signal.SIGTERM)
    _, err = process.communicate(timeout=120)   # no rank hangs
    assert process.returncode != 0   # torchrun reports the signal itself (exit 1 with its SignalException)
    assert err.count("qlowrank: SIGTERM received") == 2   # torchrun passed it on to both ranks
    last = max(run_metrics(out))
    saved = list_checkpoints(out / "checkpoints")
    assert [p.name for p in saved] == [f"step-{last:06d}"]   # one checkpoint, of the last completed step
    assert verify_checkpoint(saved[0]) is None
    time.sleep(0.5)
    assert not [pid for pid in ranks if Path(f"/proc/{pid}").exists()]   # every rank is gone
