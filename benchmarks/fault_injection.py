"""Crash safety under kill -9: SIGKILL `qlowrank train` and `qlowrank export` at random moments, inside their writes.

    flock /tmp/qlowrank-heavy.lock .venv/bin/python benchmarks/fault_injection.py [--runs 3] [--out DIR]

A tiny 4-bit Llama (hidden 256, 4 layers, LoRA r=64 on every linear layer: a 4.6 MB adapter,
a 9 MB optimizer state per checkpoint) trains for 24 steps with `--save-every 2` in fp32 on
the CPU. First one uninterrupted run gives the reference adapter. Then each faulty run is
started, SIGKILLed, and restarted with `--resume`, over and over, until it completes. Each
kill is aimed at one target:

  checkpoint  the moment a checkpoint's staging folder appears (+ 0-20 ms): inside its write
  adapter     the moment the final adapter's staging folder appears (+ 0-5 ms)
  random      a uniformly random moment of the process's life (start-up, training, writes)
  export      the moment `qlowrank export`'s staging folder appears (+ 0-150 ms), with and
              without an earlier complete export in place (--overwrite)

A kill "landed inside" a write when the write's staging folder is still there after the
process died (a completed write renames it away). After every kill: every checkpoint
folder must match its manifest (a half-written one would not), the adapter folder (if any)
must load, an export folder (if any) must equal the reference export byte for byte. At the
end each run's adapter must equal the reference exactly (fp32 on a CPU is deterministic),
and no staging folder may be left once a later write has run. Prints a table and writes
OUT/fault_injection.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from pydoc_data.topics import topics

import torch
import transformers
from safetensors.torch import load_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from qlowrank.adapter import read_adapter_config, read_adapter_weights
from qlowrank.train.checkpoint import list_checkpoints, verify_checkpoint

# 24 steps = 12 checkpoint writes per run: room for four checkpoint kills, each aimed at one of the
# next two writes of a resumed process (with 12 steps, 8 of 12 such kills found the run already done).
STEPS, SAVE_EVERY = 24, 2
QLOWRANK = [sys.executable, "-m", "qlowrank"]


def build_workdir(root: Path) -> None:
    """A random 4-layer Llama with a byte-level BPE tokenizer, and 48 prompt/completion rows."""
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    texts = [topics[k] for k in sorted(topics)[:20]]
    bpe.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=512, special_tokens=["<|endoftext|>"],
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|endoftext|>",
                                                     pad_token="<|endoftext|>")
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=len(tokenizer), hidden_size=256, intermediate_size=512,
                                      num_hidden_layers=4, num_attention_heads=4, tie_word_embeddings=False)
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(root / "model")
    tokenizer.save_pretrained(root / "model")
    with open(root / "data.jsonl", "w") as handle:
        for key in sorted(topics)[:48]:
            handle.write(json.dumps({"prompt": f"{key}:\n", "completion": topics[key][:300]}) + "\n")


def train_args(root: Path, out: Path, resume: bool) -> list[str]:
    return ["train", "--model", str(root / "model"), "--data", str(root / "data.jsonl"), "--out", str(out),
            "--bits", "4", "--r", "64", "--seq", "96", "--batch", "4", "--lr", "3e-3", "--dropout", "0.1",
            "--precision", "fp32", "--steps", str(STEPS), "--save-every", str(SAVE_EVERY), "--keep-checkpoints", "2",
            "--eval-fraction", "0", "--seed", "3", "--no-progress", *(["--resume"] if resume else [])]


def export_args(root: Path, adapter: Path, out: Path, overwrite: bool) -> list[str]:
    return ["export", "--model", str(root / "model"), "--adapter", str(adapter), "--out", str(out), "--dtype", "fp32",
            *(["--overwrite"] if overwrite else [])]


def staging(folder: Path, name: str) -> list[Path]:
    """Staging folders (`.<name>.partial-<pid>-*`) directly in `folder`."""
    if not folder.is_dir():
        return []
    return [p for p in folder.iterdir() if p.name.startswith(f".{name}.partial-")]


def run_until(args: list[str], watch, delay: float, kill_at: float | None, log: Path) -> dict:
    """Start a qlowrank process; SIGKILL it `delay` s after `watch()` returns true, or at `kill_at` s.

    Returns what happened: killed or its exit code, and the staging folders alive at the kill.
    """
    with open(log, "a") as handle:
        process = subprocess.Popen([*QLOWRANK, *args], stdout=handle, stderr=handle)
        start = time.perf_counter()
        while process.poll() is None:
            elapsed = time.perf_counter() - start
            if (kill_at is not None and elapsed >= kill_at) or (kill_at is None and watch()):
                if delay:
                    time.sleep(delay)
                if process.poll() is not None:
                    break
                process.send_signal(signal.SIGKILL)
                process.wait()
                return {"killed": True, "at_s": round(time.perf_counter() - start, 3)}
            time.sleep(0.0005)
        return {"killed": False, "code": process.returncode, "at_s": round(time.perf_counter() - start, 3)}


def check_training_state(out: Path, reference_adapter: dict) -> list[str]:
    """Invariants after a kill: every checkpoint intact, the adapter (if any) complete."""
    problems = []
    for checkpoint in list_checkpoints(out / "checkpoints"):
        problem = verify_checkpoint(checkpoint)
        if problem:
            problems.append(f"{checkpoint.name}: {problem}")
    if (out / "adapter").exists():
        try:
            read_adapter_config(out / "adapter")
            weights = read_adapter_weights(out / "adapter" / "adapter_model.safetensors")
            if set(weights) != set(reference_adapter):
                problems.append("adapter: keys differ")
        except (OSError, ValueError) as err:
            problems.append(f"adapter: {err}")
    return problems


def adapter_equal(adapter_dir: Path, reference: dict) -> bool:
    weights = load_file(adapter_dir / "adapter_model.safetensors")
    return weights.keys() == reference.keys() and all(torch.equal(weights[k], reference[k]) for k in reference)


def folder_bytes(folder: Path) -> dict[str, bytes]:
    """Every file of an export, except the report (it records the time the export took)."""
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.name != "qlowrank_export_report.json"}


def faulty_training_run(root: Path, out: Path, modes: list[str], reference: dict, rng: random.Random,
                        life_s: float, log: Path) -> tuple[list[dict], bool, list[str]]:
    """Kill one training run once per mode, resume after each, then let it finish."""
    kills, problems = [], []
    checkpoints = out / "checkpoints"
    for mode in modes + ["finish"]:
        resume = bool(list_checkpoints(checkpoints))
        args = train_args(root, out, resume)
        # Staging folders of earlier kills are still there until a write cleans them: only new ones count.
        old = {p.name for p in [*_all_step_staging(checkpoints), *staging(out, "adapter")]}

        def new_staging(found: list[Path]) -> bool:
            return any(p.name not in old for p in found)

        if mode == "checkpoint":
            # Aim at the 1st or 2nd checkpoint this process writes, so the run also moves on.
            nth, seen = rng.randint(1, 2), set()

            def nth_write() -> bool:
                seen.update(p.name for p in _all_step_staging(checkpoints) if p.name not in old)
                return len(seen) >= nth

            event = run_until(args, nth_write, rng.uniform(0, 0.02), None, log)
        elif mode == "adapter":
            event = run_until(args, lambda: new_staging(staging(out, "adapter")), rng.uniform(0, 0.005), None, log)
        elif mode == "random":
            event = run_until(args, lambda: False, 0, rng.uniform(0, life_s), log)
        else:
            event = run_until(args, lambda: False, 0, None, log)
        life_s = event["at_s"]   # the next random moment falls within what a process here lasts
        if not event["killed"]:
            if event["code"] != 0:
                problems.append(f"{mode}: exit code {event['code']} (see {log})")
            if mode != "finish":
                kills.append({"target": mode, "killed": False})
            continue
        inside = {"checkpoint": new_staging(_all_step_staging(checkpoints)), "adapter": new_staging(staging(out, "adapter"))}
        kills.append({"target": mode, "killed": True, "at_s": event["at_s"], "resumed_from_checkpoint": resume,
                      "inside_checkpoint_write": inside["checkpoint"], "inside_adapter_save": inside["adapter"]})
        problems += [f"after a {mode} kill: {p}" for p in check_training_state(out, reference)]
    finished = (out / "adapter").is_dir() and adapter_equal(out / "adapter", reference)
    leftovers = [p.name for p in [*_all_step_staging(checkpoints), *staging(out, "adapter")]]
    if leftovers:
        problems.append(f"staging folders left after the run completed: {leftovers}")
    return kills, finished, problems


def _all_step_staging(checkpoints: Path) -> list[Path]:
    if not checkpoints.is_dir():
        return []
    return [p for p in checkpoints.iterdir() if p.name.startswith(".step-") and ".partial-" in p.name]


def export_kills(root: Path, adapter: Path, folder: Path, n: int, rng: random.Random, log: Path) -> tuple[list, list]:
    """Kill `qlowrank export` inside its write n times (half over an existing export); re-run; compare."""
    reference_dir = folder / "reference"
    done = run_until(export_args(root, adapter, reference_dir, False), lambda: False, 0, None, log)
    assert done.get("code") == 0, f"reference export failed (see {log})"
    reference = folder_bytes(reference_dir)
    kills, problems = [], []
    for i in range(n):
        target = folder / f"merged{i}"
        overwrite = i % 2 == 1
        if overwrite:
            shutil.copytree(reference_dir, target)   # an earlier complete export that must survive
        event = run_until(export_args(root, adapter, target, overwrite), lambda: bool(staging(folder, target.name)),
                          rng.uniform(0, 0.15), None, log)
        inside = bool(staging(folder, target.name))
        kills.append({"target": "export", "killed": event["killed"], "at_s": event["at_s"], "over_existing": overwrite,
                      "inside_export_write": inside})
        if target.exists() and folder_bytes(target) != reference:
            problems.append(f"export {i}: {target.name} exists but is not the complete reference export")
        if not overwrite and target.exists() and event["killed"] and inside:
            problems.append(f"export {i}: killed inside its write, yet {target.name} appeared")
        again = run_until(export_args(root, adapter, target, True), lambda: False, 0, None, log)
        if again.get("code") != 0 or folder_bytes(target) != reference:
            problems.append(f"export {i}: the re-run export differs from the reference or failed")
        leftovers = [p.name for p in staging(folder, target.name)]
        if leftovers:
            problems.append(f"export {i}: staging folders left after the re-run: {leftovers}")
    return kills, problems


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=3, help="faulty training runs")
    parser.add_argument("--plan", default="checkpoint,checkpoint,checkpoint,checkpoint,adapter,random,random",
                        help="kill targets of each training run (shuffled per run)")
    parser.add_argument("--exports", type=int, default=6, help="killed exports")
    parser.add_argument("--seed", type=int, default=0, help="seeds the kill moments")
    parser.add_argument("--out", default="benchmarks", help="folder for fault_injection.json")
    args = parser.parse_args()
    rng = random.Random(args.seed)
    root = Path(tempfile.mkdtemp(prefix="qlowrank-faults-"))
    log = root / "processes.log"
    build_workdir(root)
    started = time.perf_counter()
    done = run_until(train_args(root, root / "reference", False), lambda: False, 0, None, log)
    life_s = done["at_s"]
    assert done.get("code") == 0, f"reference run failed (see {log})"
    reference = load_file(root / "reference" / "adapter" / "adapter_model.safetensors")

    # Each run: checkpoint kills, an adapter-save kill and random kills (--plan), shuffled.
    plan = args.plan.split(",")
    kills, problems, runs = [], [], []
    for run in range(args.runs):
        # Shuffled, but the final adapter save comes last: after it the run has nothing left to kill.
        modes = rng.sample([m for m in plan if m != "adapter"], len(plan) - plan.count("adapter"))
        modes += [m for m in plan if m == "adapter"]
        run_kills, equal, run_problems = faulty_training_run(root, root / f"run{run}", modes, reference, rng, life_s, log)
        kills += run_kills
        problems += [f"run {run}: {p}" for p in run_problems]
        runs.append({"modes": modes, "final_adapter_equals_reference": equal})
        print(f"run {run}: {sum(k['killed'] for k in run_kills)} kills, final adapter equals reference: {equal}",
              flush=True)
    export_list, export_problems = export_kills(root, root / "reference" / "adapter", root / "exports", args.exports,
                                                rng, log)
    kills += export_list
    problems += export_problems

    def count(target, key=None):
        chosen = [k for k in kills if k["target"] == target and k["killed"]]
        return len(chosen) if key is None else sum(bool(k.get(key)) for k in chosen)

    rows = [("checkpoint write", count("checkpoint"), count("checkpoint", "inside_checkpoint_write")),
            ("final adapter save", count("adapter"), count("adapter", "inside_adapter_save")),
            ("random moment", count("random"), count("random", "inside_checkpoint_write") + count("random", "inside_adapter_save")),
            ("qlowrank export", count("export"), count("export", "inside_export_write"))]
    total = sum(r[1] for r in rows)
    mismatches = sum(not r["final_adapter_equals_reference"] for r in runs)
    print(f"\n{'target':<20} {'kills':>6} {'landed inside a write':>22}")
    for name, n, inside in rows:
        print(f"{name:<20} {n:>6} {inside:>22}")
    print(f"{'total':<20} {total:>6}")
    print(f"\ntraining runs completed after kills + --resume: {len(runs)}; final adapter != reference: {mismatches}")
    print(f"invariant violations (damaged checkpoint, partial adapter/export picked up, leftovers): {len(problems)}")
    for problem in problems:
        print("  " + problem)
    print(f"{time.perf_counter() - started:.0f} s; reference run {life_s:.1f} s; processes' output in {log}")
    result = {"command": "benchmarks/fault_injection.py " + " ".join(sys.argv[1:]), "date": time.strftime("%Y-%m-%d"),
              "machine": f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}",
              "steps": STEPS, "save_every": SAVE_EVERY, "kills": kills, "runs": runs, "problems": problems,
              "table": [{"target": r[0], "kills": r[1], "inside_write": r[2]} for r in rows],
              "total_kills": total, "final_adapter_mismatches": mismatches}
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "fault_injection.json").write_text(json.dumps(result, indent=1) + "\n")
    shutil.rmtree(root, ignore_errors=True) if not problems else print(f"kept {root} for inspection")
    sys.exit(1 if problems or mismatches or total < 20 else 0)


if __name__ == "__main__":
    main()
