"""qlowrank vs PEFT + bitsandbytes on one GPU: 1B and 8B Llama-shaped random models.

    python benchmarks/gpu_vs_peft.py            # prepared for one GPU; ~7 minutes on an H200

The same recipe and worker as benchmarks/vs_peft.py (NF4 + double quant, bf16 compute,
LoRA r=16 all-linear, alpha 32, batch 4 x seq 512, checkpointing, torch AdamW), run on
CUDA: the random checkpoints are initialised on the GPU and written once to
benchmarks/_cache/, then each library loads them in a fresh process, alternating. The table
adds VRAM (torch.cuda max allocated / reserved) beside tokens/s. It refuses to run without
a GPU, since the CPU comparison is vs_peft.py's job.
"""

from __future__ import annotations

import json
import statistics
import sys
from argparse import Namespace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import vs_peft  # noqa: E402


def main() -> None:
    if not torch.cuda.is_available():
        raise SystemExit("gpu_vs_peft.py needs an NVIDIA GPU; on a CPU run benchmarks/vs_peft.py")
    args = Namespace(models=["llama1b", "llama8b"], steps=5, batch=4, seq=512, libs=["qlowrank", "peft"])
    results = []
    for model in args.models:
        vs_peft.prepare_model(model)
        runs = 2 if model == "llama1b" else 1   # the 8B loads dominate the time budget
        for run in range(runs):
            for lib in args.libs:
                r = vs_peft.run_worker_process(lib, model, args)
                results.append(r)
                print(f"{model} {lib}: {r['tokens_per_s']:.0f} tokens/s, max allocated "
                      f"{r['cuda_max_allocated'] / 2**30:.2f} GiB, reserved {r['cuda_max_reserved'] / 2**30:.2f} GiB, "
                      f"loss {r['final_loss']:.4f}", flush=True)
    print(f"\n{torch.cuda.get_device_name()}, batch {args.batch} x seq {args.seq}\n")
    print("| model | lib | tokens/s | VRAM max allocated GiB | reserved GiB | loss step N |\n|---|---|---|---|---|---|")
    for model in args.models:
        for lib in args.libs:
            rows = [r for r in results if r["model"] == model and r["lib"] == lib]
            med = {k: statistics.median(r[k] for r in rows)
                   for k in ("tokens_per_s", "cuda_max_allocated", "cuda_max_reserved", "final_loss")}
            print(f"| {model} | {lib} | {med['tokens_per_s']:.0f} | {med['cuda_max_allocated'] / 2**30:.2f} | "
                  f"{med['cuda_max_reserved'] / 2**30:.2f} | {med['final_loss']:.4f} |")
    out = Path(__file__).resolve().parent / "gpu_vs_peft.json"
    out.write_text(json.dumps({"device": torch.cuda.get_device_name(), "results": results}, indent=1))


if __name__ == "__main__":
    main()
