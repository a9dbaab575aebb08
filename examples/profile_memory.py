"""Profile the memory of QLoRA against LoRA against full fine-tuning on a small model.

What it shows: the same training steps (AdamW, gradient checkpointing, batch 2 x 256 tokens)
run three times under `ql.MemoryProfiler`, which records every tensor byte by category
(base weights, trainable parameters, gradients, optimizer states, activations, temporaries):
  - full fine-tuning of the bf16 model,
  - LoRA r=16 on every linear layer of the bf16 model,
  - QLoRA: the same LoRA on a 4-bit NF4 base.
It saves one timeline plot per run (memory_<run>.png) and prints the peak breakdowns side by
side, with each run's peak as a ratio of full fine-tuning's, and the estimate_memory
prediction for the same settings.

How long: ~1 min on 2 CPU cores with the default (the embedded SmolLM2-135M, 3 steps per run).

    python examples/profile_memory.py [--model DIR_OR_GGUF] [--batch 2] [--seq 256] [--steps 3] [--out DIR]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

import qlowrank as ql
from qlowrank.memory.profiler import profile_steps
from qlowrank.memory.report import format_bytes
from qlowrank.memory.tracker import CATEGORIES

LORA = ql.LoraConfig(r=16, alpha=32, target_modules="all-linear")
RUNS = {   # name -> (QuantConfig, LoraConfig or None for full fine-tuning)
    "full": (ql.QuantConfig(bits=None, compute_dtype=torch.bfloat16), None),
    "lora": (ql.QuantConfig(bits=None, compute_dtype=torch.bfloat16), LORA),
    "qlora": (ql.QuantConfig(bits=4, quant_type="nf4", double_quant=True, compute_dtype=torch.bfloat16), LORA),
}


def profile(path: str, name: str, batch: int, seq: int, steps: int, out: Path) -> tuple[ql.MemoryProfiler, int]:
    """Run `steps` training steps of one configuration; returns the profiler and the predicted peak."""
    quant, lora = RUNS[name]
    model = ql.load_model(path, quant=quant, lora=lora, dtype=torch.bfloat16, device="cpu", progress=False)
    if lora is None:   # full fine-tuning: every parameter trains
        for param in model.parameters():
            param.requires_grad_(True)
    ql.enable_gradient_checkpointing(model)
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    vocab = model.get_input_embeddings().num_embeddings
    tokens = torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(0))   # (B, T)
    prof = profile_steps(model, optimizer, tokens, steps, progress=False)
    prof.save_plot(out / f"memory_{name}.png", title=f"{name}: batch {batch} x {seq}, {steps} steps")
    # fp32 source weights (a GGUF is read in fp32) are dequantized back to fp32 in backward: tell the estimate.
    source = torch.float32 if Path(path).suffix == ".gguf" and quant.bits else None
    predicted = ql.estimate_memory(path, quant=quant, lora=lora, batch_size=batch, seq_len=seq, device="cpu",
                                   quantized_from=source).total_bytes
    del model, optimizer
    return prof, predicted


def ratio_table(results: dict[str, tuple[ql.MemoryProfiler, int]]) -> str:
    names = list(results)
    lines = [f"{'category':<18}" + "".join(f"{n:>12}" for n in names)]
    for category in CATEGORIES:
        lines.append(f"{category:<18}" + "".join(f"{format_bytes(results[n][0].breakdown[category]):>12}" for n in names))
    full = results["full"][0].peak_bytes
    lines.append(f"{'peak (measured)':<18}" + "".join(f"{format_bytes(results[n][0].peak_bytes):>12}" for n in names))
    lines.append(f"{'peak / full FT':<18}" + "".join(f"{results[n][0].peak_bytes / full:>12.2f}" for n in names))
    lines.append(f"{'estimate_memory':<18}" + "".join(f"{format_bytes(results[n][1]):>12}" for n in names))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="model directory or .gguf (default: the embedded SmolLM2-135M)")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--steps", type=int, default=3, help="steps per run (>= 2: the optimizer state appears in step 1)")
    parser.add_argument("--out", default="profile-memory", help="folder for the plots")
    args = parser.parse_args(argv)
    if args.model is None:
        from qlowrank.model.embedded import smollm2_gguf
        args.model = str(smollm2_gguf())
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    results = {name: profile(args.model, name, args.batch, args.seq, args.steps, out) for name in RUNS}
    print(f"{Path(args.model).name}: batch {args.batch} x {args.seq}, AdamW, gradient checkpointing, bf16\n")
    print(ratio_table(results))
    print(f"\nplots: {', '.join(str(out / f'memory_{n}.png') for n in RUNS)}; {time.perf_counter() - start:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
