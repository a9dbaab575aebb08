"""Length grouping on rows of very different lengths: tokens/s with and without, same run otherwise.

    .venv/bin/python benchmarks/grouping.py            # 2 runs each, A B A B (~6 min on 2 cores)

`qlowrank train` on the real SmolLM2-135M (the embedded GGUF, NF4, LoRA r=16 all-linear),
20 steps of batch 4 at --seq 512 on Python's docs topics (rows of 20-512 tokens: the
demo's chat rows are too alike to show anything), each run a fresh process, alternating
`--no-group-by-length` and the default. Tokens/s counts real tokens over steps 4-20 (steps
1-2 run under MemoryProfiler). Prints a table; raw figures in grouping.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent


def write_rows(path: Path) -> None:
    from pydoc_data.topics import topics

    # Whole topics, so row lengths follow the docs: many short ones, some past 512 tokens (cut).
    path.write_text("".join(json.dumps({"text": topics[key]}) + "\n" for key in sorted(topics)))


def run(data: Path, grouped: bool, steps: int, work: Path) -> dict:
    from qlowrank.model.embedded import smollm2_gguf

    out = work / ("grouped" if grouped else "plain")
    command = [sys.executable, "-m", "qlowrank", "train", "--model", str(smollm2_gguf()), "--data", str(data),
               "--seq", "512", "--batch", "4", "--steps", str(steps), "--lr", "1e-3", "--no-progress",
               "--out", str(out), "--eval-fraction", "0.1", "--seed", "0"]
    if not grouped:
        command.append("--no-group-by-length")
    subprocess.run(command, check=True, capture_output=True, text=True)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps_rows = [r for r in rows if "seconds" in r]
    timed = steps_rows[3:]
    evals = [r["eval_loss"] for r in rows if "eval_loss" in r]
    return {"grouped": grouped, "tokens_per_s": sum(r["tokens"] for r in timed) / sum(r["seconds"] for r in timed),
            "s_per_step": statistics.median(r["seconds"] for r in timed),
            "tokens_per_step": statistics.mean(r["tokens"] for r in timed),
            "eval_before": evals[0], "eval_after": evals[-1]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=2)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--out", default=str(HERE / "grouping.json"))
    args = parser.parse_args()
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        data = work / "topics.jsonl"
        write_rows(data)
        for number in range(args.runs):
            for grouped in (False, True):
                results.append(run(data, grouped, args.steps, work / str(number)))
                r = results[-1]
                print(f"run {number + 1} {'grouped' if grouped else 'plain  '}: {r['tokens_per_s']:.0f} tokens/s, "
                      f"{r['s_per_step']:.2f} s/step, eval {r['eval_before']:.4f} -> {r['eval_after']:.4f}", flush=True)
    Path(args.out).write_text(json.dumps(results, indent=1) + "\n")
    print("\n| batches | tokens/s (median) | s/step | real tokens/step | eval loss after |\n|---|---|---|---|---|")
    for grouped in (False, True):
        rows = [r for r in results if r["grouped"] == grouped]
        print(f"| {'length-grouped (default)' if grouped else 'random (--no-group-by-length)'} | "
              f"{statistics.median(r['tokens_per_s'] for r in rows):.0f} | "
              f"{statistics.median(r['s_per_step'] for r in rows):.2f} | "
              f"{statistics.median(r['tokens_per_step'] for r in rows):.0f} | "
              f"{statistics.median(r['eval_after'] for r in rows):.4f} |")


if __name__ == "__main__":
    main()
