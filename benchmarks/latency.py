"""Inference latency: the merged export against the untouched base, and the unmerged LoRA model.

    .venv/bin/python benchmarks/latency.py [--reps 15] [--tokens 128]

The LoRA paper (arXiv 2106.09685, section 4) claims no added inference latency once B A is
merged into W. We check it on the real SmolLM2-135M: a qlowrank 4-bit LoRA model with
trained-looking (non-zero) B is exported as a merged bf16 checkpoint, then the export and
the original bf16 checkpoint are both loaded with plain transformers and timed on the
same prompt, interleaved (base, merged, base, merged, ...) so machine noise hits both.
The unmerged models (LoRA over a bf16 base, and over the 4-bit base) are timed beside them.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parent))
from vs_peft import prepare_model  # noqa: E402  (same cached bf16 SmolLM2 checkpoint)

import qlowrank as ql  # noqa: E402

# Merged and base models have identical architectures and dtypes, so any difference is
# noise; 3% is the tolerance for "no added latency".
NO_LATENCY_TOLERANCE = 0.03


def lora_model(folder: Path, bits: int | None) -> torch.nn.Module:
    model = ql.load_model(folder, quant=ql.QuantConfig(bits=bits), lora=ql.LoraConfig(r=16, alpha=32),
                          device="cpu", progress=False)
    generator = torch.Generator().manual_seed(0)
    for _, layer in ql.lora_layers(model):  # stand-in for training: B != 0 so the merge matters
        layer.lora_B.weight.data.copy_(torch.randn(layer.lora_B.weight.shape, generator=generator) * 0.01)
    return model.eval()


def time_forward(model, tokens: torch.Tensor) -> float:
    t0 = time.perf_counter()
    with torch.no_grad():
        model(tokens, use_cache=False)
    return time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reps", type=int, default=15)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--batch", type=int, default=1)
    args = parser.parse_args()
    torch.manual_seed(0)
    folder = prepare_model("smollm2")
    with tempfile.TemporaryDirectory() as tmp:
        trained = lora_model(folder, bits=4)
        ql.export_merged(trained, Path(tmp) / "merged", dtype=torch.bfloat16, progress=False)
        models = {
            "base (plain transformers, bf16)": AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16).eval(),
            "merged export (plain transformers, bf16)": AutoModelForCausalLM.from_pretrained(
                Path(tmp) / "merged", dtype=torch.bfloat16).eval(),
            "unmerged LoRA, bf16 base": lora_model(folder, bits=None),
            "unmerged LoRA, 4-bit base": trained,
        }
        tokens = torch.randint(0, 49152, (args.batch, args.tokens))
        times: dict[str, list[float]] = {name: [] for name in models}
        for rep in range(args.reps + 2):
            for name, model in models.items():
                elapsed = time_forward(model, tokens)
                if rep >= 2:  # two warm-up rounds
                    times[name].append(elapsed)
    base = statistics.median(times["base (plain transformers, bf16)"])
    print(f"forward of batch {args.batch} x {args.tokens} tokens, median of {args.reps} interleaved reps\n")
    print("| model | ms | vs base |\n|---|---|---|")
    for name, values in times.items():
        median = statistics.median(values)
        print(f"| {name} | {1000 * median:.1f} | {median / base:.3f} |")
    ratio = statistics.median(times["merged export (plain transformers, bf16)"]) / base
    verdict = "met" if abs(ratio - 1) <= NO_LATENCY_TOLERANCE else "MISSED"
    print(f"\nmerged / base = {ratio:.3f} (target 1.00 +/- {NO_LATENCY_TOLERANCE:.2f}): {verdict}")


if __name__ == "__main__":
    main()
