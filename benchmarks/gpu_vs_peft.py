"""qlowrank vs PEFT + bitsandbytes on one GPU: a 1B Llama, and Llama-3-8B beside torchtune's published QLoRA figure.

    python benchmarks/gpu_vs_peft.py            # one GPU; ~8 minutes on an H200
    python benchmarks/gpu_vs_peft.py --models llama1b --libs qlowrank,peft --json OUT.json   # gpu_all.sh's ~3 min

The same recipe and worker as benchmarks/vs_peft.py (NF4 + double quant, bf16 compute,
LoRA r=16 all-linear, alpha 32, checkpointing, torch AdamW), run on CUDA: the random
checkpoints are initialised on the GPU and written once to benchmarks/_cache/, then each
library loads them in a fresh process, alternating. Shapes:
  llama1b    Llama-3.2-1B-shaped, batch 4 x seq 512, 1 run per library
  llama3_8b  Llama-3-8B exactly (128,256-token vocabulary), QLoRA r=16, batch 2 x seq 2048, 1 run
Libraries: qlowrank (its defaults: attention outputs kept in checkpointed blocks from seq 256
on), ql-compile (plus regional torch.compile of the decoder blocks; its compile time is the
warm-up step) and PEFT. A lever that fails on the GPU is reported and skipped, not fatal.
The table adds VRAM (torch.cuda max allocated / reserved) beside tokens/s, and prints
torchtune's published Llama-3-8B QLoRA figure (7.4 GiB peak, 2,413 tokens/s on an RTX 4090,
as issue 14 quotes it) as a reference row: a different GPU,
so a yardstick, not a side-by-side measurement. It refuses to run without a GPU, since the CPU
comparison is vs_peft.py's job.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from argparse import Namespace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import vs_peft  # noqa: E402

# torchtune's published Llama-3-8B QLoRA figure as issue 14 quotes it (one RTX 4090, batch 2, seq
# 2048): 7.4 GiB peak memory, 2,413 tokens/s. Quoted, not measured here, and not re-checked
# against torchtune's README (its table was not among the stored copies this session could read).
TORCHTUNE = dict(gpu="RTX 4090", batch=2, seq=2048, peak_gib=7.4, tokens_per_s=2413)


SHAPES = {"llama1b": dict(batch=4, seq=512, runs=1), "llama3_8b": dict(batch=2, seq=2048, runs=1)}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default=",".join(SHAPES), type=lambda s: s.split(","), help="of " + ", ".join(SHAPES))
    parser.add_argument("--libs", default="qlowrank,ql-compile,peft", type=lambda s: s.split(","))
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--json", default=str(Path(__file__).resolve().parent / "gpu_vs_peft.json"))
    args = parser.parse_args()
    unknown = [m for m in args.models if m not in SHAPES]
    if unknown:
        raise SystemExit(f"gpu_vs_peft.py: unknown --models {unknown}; choose from {sorted(SHAPES)}")
    return args


def main() -> None:
    args = parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("gpu_vs_peft.py needs an NVIDIA GPU (torch sees none); on a CPU run benchmarks/vs_peft.py")
    shapes = SHAPES
    results = []
    for model in args.models:
        vs_peft.prepare_model(model)
        shape = Namespace(steps=args.steps, **shapes[model])
        for run in range(shape.runs):   # the 8B loads dominate the time budget: one run each
            for lib in args.libs:
                try:
                    r = {**vs_peft.run_worker_process(lib, model, shape), "batch": shape.batch, "seq": shape.seq}
                except SystemExit as failure:
                    if lib in ("qlowrank", "peft"):
                        raise
                    print(f"{model} {lib}: FAILED, skipped\n{failure}", flush=True)
                    continue
                results.append(r)
                print(f"{model} {lib}: {r['tokens_per_s']:.0f} tokens/s (warm-up step {r['warmup_s']:.1f} s), max allocated "
                      f"{r['cuda_max_allocated'] / 2**30:.2f} GiB, reserved {r['cuda_max_reserved'] / 2**30:.2f} GiB, "
                      f"loss {r['final_loss']:.4f}", flush=True)
    print(f"\n{torch.cuda.get_device_name()}\n")
    print("| model | batch x seq | lib | tokens/s | VRAM max allocated GiB | reserved GiB | loss step N |\n"
          "|---|---|---|---|---|---|---|")
    for model in args.models:
        for lib in args.libs:
            rows = [r for r in results if r["model"] == model and r["lib"] == lib]
            if not rows:
                continue
            med = {k: statistics.median(r[k] for r in rows)
                   for k in ("tokens_per_s", "cuda_max_allocated", "cuda_max_reserved", "final_loss")}
            print(f"| {model} | {shapes[model]['batch']} x {shapes[model]['seq']} | {lib} | {med['tokens_per_s']:.0f} | "
                  f"{med['cuda_max_allocated'] / 2**30:.2f} | {med['cuda_max_reserved'] / 2**30:.2f} | "
                  f"{med['final_loss']:.4f} |")
    print(f"| Llama-3-8B | {TORCHTUNE['batch']} x {TORCHTUNE['seq']} | torchtune QLoRA, published ({TORCHTUNE['gpu']}) | "
          f"{TORCHTUNE['tokens_per_s']} | {TORCHTUNE['peak_gib']} (peak) | - | - |")
    out = Path(args.json)
    out.write_text(json.dumps({"device": torch.cuda.get_device_name(), "results": results}, indent=1))


if __name__ == "__main__":
    main()
