"""Will it fit? Predicted peak training memory of Llama-3-8B, Llama-3-70B, Mistral-7B and Qwen2.5-14B.

What it shows: for full fine-tuning, LoRA on a bf16 base, 8-bit and 4-bit QLoRA (r=16 on every
linear layer, AdamW, gradient checkpointing, qlowrank's chunked loss, sequences of 2048 tokens, on
a CUDA GPU), the predicted process peak at batch 1 (what nvidia-smi would show) and the largest
batch that fits on 8, 12, 16, 24, 48 and 80 GiB devices, as a table and a plot (will_it_fit.png).
Only configs are read (examples/configs/*.json, the models' published config.json values); no
weights are downloaded or allocated.

How: each (model, method) is one `RunSpec`; `qlowrank.estimate_memory(spec)` runs one training step
on the meta device, every layer, and "fits" is `MemoryEstimate.fits`: the predicted process peak
plus the headroom for the prediction's error, the same test `qlowrank estimate --gpu`, `train
--dry-run --max-memory` and the planner make. The largest batch is `max_batch_size`: doubling, then
bisection, so it is the exact boundary of that test.

How long: a few minutes on 2 CPU cores (each simulation takes seconds at 70B depth); `--smoke` (one
model, one method, one device): ~20 s.

    python examples/will_it_fit.py [--out will_it_fit.png] [--models mistral-7b ...]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import qlowrank as ql
from qlowrank.config import RunSpec, TrainConfig

CONFIGS = Path(__file__).resolve().parent / "configs"
MODELS = ("llama-3-8b", "llama-3-70b", "mistral-7b", "qwen2.5-14b")
DEVICES_GIB = (8, 12, 16, 24, 48, 80)
SEQ = 2048
GiB = 2**30
LORA = ql.LoraConfig(r=16, alpha=32, target_modules="all-linear")
METHODS = {   # name -> (QuantConfig, LoraConfig or None for full fine-tuning)
    "full fine-tuning (bf16)": (ql.QuantConfig(bits=None), None),
    "LoRA, bf16 base": (ql.QuantConfig(bits=None), LORA),
    "QLoRA 8-bit": (ql.QuantConfig(bits=8), LORA),
    "QLoRA 4-bit (NF4)": (ql.QuantConfig(bits=4, quant_type="nf4", double_quant=True), LORA),
}


def run_spec(model: str, method: str) -> RunSpec:
    """The run of one (model, method) at batch 1: what the table's row describes."""
    quant, lora = METHODS[method]
    return RunSpec(model=str(CONFIGS / f"{model}.json"), quant=quant, lora=lora, seq_len=SEQ, device="cuda",
                   train=TrainConfig(batch_size=1, optimizer="adamw"))


def fits(spec: RunSpec, device_bytes: int) -> bool:
    """Whether a run fits a device of `device_bytes` (`MemoryEstimate.fits`: the process peak plus headroom)."""
    return ql.estimate_memory(spec).fits(device_bytes)


def predict(models: list[str], devices: tuple[int, ...], methods: list[str]) -> list[dict]:
    """One row per (model, method): predicted process peak at batch 1 and the largest batch per device size."""
    rows = []
    for model in models:
        for method in methods:
            estimate = ql.estimate_memory(run_spec(model, method))
            rows.append({"model": model, "method": method, "peak_batch1": estimate.process_bytes,
                         "largest_batch": {gib: estimate.max_batch_size(gib * GiB) for gib in devices}})
    return rows


def table(rows: list[dict], devices: tuple[int, ...]) -> str:
    head = f"{'model':<12} {'method':<24} {'peak, batch 1':>13} " + " ".join(f"{d:>5}G" for d in devices)
    lines = [f"largest batch at seq {SEQ} per device (-: does not fit, with the prediction's headroom)", head,
             "-" * len(head)]
    for row in rows:
        cells = " ".join(f"{row['largest_batch'][d] or '-':>6}" for d in devices)
        lines.append(f"{row['model']:<12} {row['method']:<24} {row['peak_batch1'] / GiB:>9.1f} GiB {cells}")
    return "\n".join(lines)


def plot(rows: list[dict], devices: tuple[int, ...], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(dict.fromkeys(row["model"] for row in rows))
    fig, ax = plt.subplots(figsize=(9, 1.2 + 1.3 * len(models)))
    methods = list(dict.fromkeys(row["method"] for row in rows))
    height = 0.8 / len(methods)
    for m, method in enumerate(methods):
        values = [next(r["peak_batch1"] for r in rows if r["model"] == model and r["method"] == method) / GiB
                  for model in models]
        ax.barh([i + (m - (len(methods) - 1) / 2) * height for i in range(len(models))], values, height, label=method)
    for gib in devices:
        ax.axvline(gib, color="grey", linestyle="--", linewidth=0.8)
        ax.text(gib, len(models) - 0.45, f"{gib} GiB", rotation=90, fontsize=7, va="bottom", ha="right")
    ax.set_xscale("log")
    ax.set_yticks(range(len(models)), models)
    ax.invert_yaxis()
    ax.set_xlabel(f"predicted process peak, GiB (batch 1, seq {SEQ}, AdamW, checkpointing)")
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    parser.add_argument("--out", default="will_it_fit.png", help="the plot")
    parser.add_argument("--smoke", action="store_true", help="Mistral-7B, 4-bit QLoRA, 24 GiB only (a quick check)")
    args = parser.parse_args(argv)
    models, devices = (["mistral-7b"], (24,)) if args.smoke else (args.models, DEVICES_GIB)
    methods = ["QLoRA 4-bit (NF4)"] if args.smoke else list(METHODS)
    start = time.perf_counter()
    rows = predict(models, devices, methods)
    print(table(rows, devices))
    plot(rows, devices, Path(args.out))
    print(f"\nplot: {args.out}; {time.perf_counter() - start:.1f} s. A batch fits when the predicted process peak "
          "(CUDA context, allocator reserve, tensors) plus the headroom for the prediction's error does.")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
