"""Trimming glibc's heaps during training at Llama-3-8B's widths: anonymous peak and step time, where the trim runs.

    flock /tmp/qlowrank-heavy.lock .venv/bin/python benchmarks/heap_trim.py [--base DIR] [--seq 2048] [--steps 3]

Each mode trains a random Llama with Llama-3-8B's widths and 4 layers (vocab 32000; written once
to --base with benchmarks/large_model.py's writer when absent), NF4, LoRA r=16 all-linear,
checkpointing, batch 1, AdamW, bf16 autocast, in its own fresh process, modes one after another:

- none:    QLOWRANK_HEAP_TRIM=0, no trim at all;
- library: qlowrank's default (`qlowrank/heap.py`: one trim before each checkpointed block's backward);
- before-backward: QLOWRANK_HEAP_TRIM=0 and one trim before each whole backward, by hand.

Prints the anonymous peak over the steps, the step times and glibc's arena figures (mallinfo2)
after the last step. Results: benchmarks/RESULTS.md, "Trimming the heaps".
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MODES = {"none": "0", "library": "1", "before-backward": "0"}


def worker(mode: str, base: str, seq: int, steps: int) -> dict:
    import torch

    import qlowrank as ql
    from qlowrank.heap import heap_statistics, release_free_heap
    from qlowrank.memory.sampler import StatusSampler
    from qlowrank.nn.loss import causal_lm_loss

    quant = ql.QuantConfig(bits=4, quant_type="nf4", double_quant=True, compute_dtype=torch.bfloat16)
    model = ql.load_model(base, quant=quant, lora=ql.LoraConfig(r=16, alpha=32, target_modules="all-linear"),
                          device="cpu", progress=False, seed=0)
    ql.enable_gradient_checkpointing(model)
    model.train()
    optimizer = torch.optim.AdamW(ql.lora_parameters(model), lr=1e-4)
    generator = torch.Generator().manual_seed(seq)
    vocab = model.config.vocab_size
    times = []
    with StatusSampler() as sampler:
        for _ in range(steps):
            started = time.perf_counter()
            ids = torch.randint(0, vocab, (1, seq), generator=generator)
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = causal_lm_loss(model, ids, ids)
            if mode == "before-backward":
                release_free_heap()   # not turned off by QLOWRANK_HEAP_TRIM=0 (that is the training trims only)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            times.append(time.perf_counter() - started)
    heap = heap_statistics()
    return {"mode": mode, "anon_peak": sampler.anon_peak, "step_s": times,
            "arena_free": heap["fordblks"], "arena_used": heap["uordblks"], "mmapped": heap["hblkhd"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", help="a checkpoint of the 4-layer 8B-width model (written here when absent)")
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--modes", default=",".join(MODES), type=lambda s: s.split(","))
    parser.add_argument("--worker", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        mode, base, seq, out = args.worker
        Path(out).write_text(json.dumps(worker(mode, base, int(seq), args.steps)))
        return
    here = Path(__file__).resolve().parent
    with tempfile.TemporaryDirectory() as scratch:
        base = args.base or str(Path(scratch) / "l8b-4l")
        if not (Path(base) / "config.json").is_file():
            subprocess.run([sys.executable, str(here / "large_model.py"), "--write-only", base, "--layers", "4",
                            "--vocab", "32000"], check=True)
        rows = []
        for mode in args.modes:
            out = Path(scratch) / f"{mode}.json"
            subprocess.run([sys.executable, __file__, "--steps", str(args.steps), "--worker", mode, base, str(args.seq),
                            str(out)], check=True, env={**os.environ, "QLOWRANK_HEAP_TRIM": MODES[mode]})
            rows.append(json.loads(out.read_text()))
            print(f"{mode}: {rows[-1]['anon_peak'] / 2**20:.0f} MiB", flush=True)
    print(f"\n4 layers of Llama-3-8B's widths, batch 1 x {args.seq}, {args.steps} steps, a fresh process per mode\n")
    print("| trim | anonymous peak | step times | arena free / in use / mmapped after |")
    print("|---|---:|---|---|")
    for r in rows:
        steps = ", ".join(f"{t:.1f}" for t in r["step_s"])
        print(f"| {r['mode']} | {r['anon_peak'] / 2**20:.0f} MiB | {steps} s | {r['arena_free'] >> 20} / "
              f"{r['arena_used'] >> 20} / {r['mmapped'] >> 20} MiB |")


if __name__ == "__main__":
    main()
