"""Short sequences on a CPU: step time against batch width, and the attention kernels by length.

    .venv/bin/python benchmarks/short_seq.py        # ~4 min on 2 cores

Two measurements behind issue 14's demo figures (benchmarks/RESULTS.md):
1. Step time of the real SmolLM2-135M QLoRA recipe (vs_peft.py's `qlowrank`: NF4, LoRA r=16
   all-linear, checkpointing, AdamW) at batch 4 and widths 96, 120, 128, 136, each in a
   fresh process, two rounds alternating; median of 5 steps after 2 warm-up steps. The
   slope and intercept of a line through them split a step into per-token and fixed cost.
2. Attention forward + backward, batch 4, 9 query / 3 key-value heads, head dim 64, causal,
   bf16: PyTorch's CPU flash kernel against the math backend, times 30 layers.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

HERE = Path(__file__).resolve().parent
WIDTHS = (96, 120, 128, 136)


def step_worker(width: int) -> dict:
    sys.path.insert(0, str(HERE))
    from vs_peft import build, prepare_model, token_batches

    folder = prepare_model("smollm2")
    batches = token_batches(folder, 4, width, 7)
    torch.manual_seed(0)
    model, params, loss_fn = build("qlowrank", folder)
    model.train()
    optimizer = torch.optim.AdamW(params, lr=2e-4)
    times = []
    for x in batches[:7]:
        started = time.perf_counter()
        loss_fn(model, x).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - started)
    return {"width": width, "step_s": statistics.median(times[2:])}


def attention_times(lengths=(64, 128, 160, 256, 512), reps: int = 20) -> list[dict]:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    rows = []
    for length in lengths:
        q = torch.randn(4, 9, length, 64, dtype=torch.bfloat16, requires_grad=True)   # (B, H, T, d)
        k = torch.randn(4, 3, length, 64, dtype=torch.bfloat16, requires_grad=True)   # (B, H_kv, T, d)
        v = torch.randn(4, 3, length, 64, dtype=torch.bfloat16, requires_grad=True)
        row = {"seq": length}
        for name, backend in (("flash", SDPBackend.FLASH_ATTENTION), ("math", SDPBackend.MATH)):
            def forward_backward():
                with sdpa_kernel([backend]):
                    out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
                out.sum().backward()
            for _ in range(3):
                forward_backward()
            times = []
            for _ in range(reps):
                started = time.perf_counter()
                forward_backward()
                times.append(time.perf_counter() - started)
            row[name] = statistics.median(times)
        rows.append(row)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--out", default=str(HERE / "short_seq.json"))
    parser.add_argument("--worker", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(step_worker(args.worker)))
        return
    steps = []
    for _ in range(args.rounds):
        for width in WIDTHS:
            out = subprocess.run([sys.executable, __file__, "--worker", str(width)], capture_output=True, text=True,
                                 check=True, env={**os.environ, "TQDM_DISABLE": "1"})
            steps.append(json.loads(out.stdout.strip().splitlines()[-1]))
    attention = attention_times()
    Path(args.out).write_text(json.dumps({"steps": steps, "attention": attention}, indent=1) + "\n")
    print("| width (batch 4) | s/step, each round | median |\n|---|---|---|")
    medians = {}
    for width in WIDTHS:
        values = [s["step_s"] for s in steps if s["width"] == width]
        medians[width] = statistics.median(values)
        print(f"| {width} | {', '.join(f'{v:.2f}' for v in values)} | {medians[width]:.2f} |")
    tokens = [4 * w for w in WIDTHS]
    slope, intercept = statistics.linear_regression(tokens, [medians[w] for w in WIDTHS])
    print(f"\nline through the medians: {intercept:.2f} s fixed + {1000 * slope:.2f} ms per token\n")
    print("| seq | flash fwd+bwd ms | math fwd+bwd ms | x30 layers: flash s | math s |\n|---|---|---|---|---|")
    for row in attention:
        print(f"| {row['seq']} | {1e3 * row['flash']:.2f} | {1e3 * row['math']:.2f} | "
              f"{30 * row['flash']:.3f} | {30 * row['math']:.3f} |")


if __name__ == "__main__":
    main()
