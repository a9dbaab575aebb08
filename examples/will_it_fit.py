"""Will it fit? Predicted peak training memory of Llama-3-8B, Llama-3-70B, Mistral-7B and Qwen2.5-14B.

What it shows: for full fine-tuning, LoRA on a bf16 base, 8-bit and 4-bit QLoRA (r=16 on every
linear layer, AdamW, gradient checkpointing, qlowrank's chunked loss, sequences of 2048 tokens),
the predicted peak at batch 1 and the largest batch that fits on 8, 12, 16, 24, 48 and 80 GiB
devices, as a table and a plot (will_it_fit.png). Only configs are read (examples/configs/*.json,
the models' published config.json values); no weights are downloaded or allocated.

How: `qlowrank.estimate_memory` runs one training step on the meta device. A model's blocks
are identical, so the peak is exactly linear in the number of layers: each figure simulates the
real widths with 2 and 3 layers and extrapolates (`--exact` simulates every layer instead and
prints both; they agree to the byte). The largest batch follows the linear trend of batch 1 and 2
(the chunked loss works on fixed 256-token chunks, so what grows with the batch is the
activations, linearly); then each answer is simulated around the trend's guess, so it is the
exact boundary (the trend alone was off by one for full fine-tuning of Llama-3-8B on 80 GiB:
33 vs 32; `--no-verify` skips this).

How long: ~30 s on 2 idle CPU cores (`--exact`: about as long again per model); `--smoke` (one model, one method): ~2 s.

    python examples/will_it_fit.py [--out will_it_fit.png] [--models mistral-7b ...] [--exact] [--no-verify]
"""

from __future__ import annotations

import argparse
import copy
import time
from pathlib import Path

import qlowrank as ql
from qlowrank.memory.meta_model import load_config

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


def with_layers(config, layers: int):
    """The config with `layers` decoder blocks (per-layer lists cut to match)."""
    config = copy.deepcopy(config)
    config.num_hidden_layers = layers
    if getattr(config, "layer_types", None):
        config.layer_types = config.layer_types[:layers]
    return config


class Predictor:
    """Peak bytes of one (model, method) at any batch size, simulations cached."""

    def __init__(self, config, method: str, exact: bool = False, verify: bool = False) -> None:
        self.config, self.exact, self.verify = config, exact, verify
        self.quant, self.lora = METHODS[method]
        self.cache: dict[int, int] = {}
        self.phase: dict[int, str] = {}   # where the peak falls: "forward/backward" or "optimizer"

    def _simulate(self, config, batch: int) -> int:
        estimate = ql.estimate_memory(config, quant=self.quant, lora=self.lora, batch_size=batch, seq_len=SEQ,
                                      gradient_checkpointing=True, optimizer="adamw", device="cuda", chunked_loss=True)
        self.phase[batch] = estimate.peak_phase
        return estimate.total_bytes

    def peak(self, batch: int) -> int:
        if batch not in self.cache:
            layers = self.config.num_hidden_layers
            if self.exact or layers <= 3:
                self.cache[batch] = self._simulate(self.config, batch)
            else:   # identical blocks: exactly linear in the layer count
                two, three = (self._simulate(with_layers(self.config, n), batch) for n in (2, 3))
                self.cache[batch] = two + (layers - 2) * (three - two)
        return self.cache[batch]

    def largest_batch(self, device_bytes: int, limit: int = 4096) -> int:
        """The largest batch whose predicted peak fits (0: not even one sequence)."""
        one = self.peak(1)
        if one > device_bytes:
            return 0
        low = 1
        # A peak in the optimizer step (full fine-tuning) does not grow with the batch until the
        # activations overtake it: double until the peak moves into forward/backward, then
        # follow the linear trend of two batches there (what grows is activations, linearly).
        while self.peak(2 * low) <= device_bytes and self.phase[2 * low] == "optimizer" and 4 * low < limit:
            low *= 2
        a, b = 2 * low, 4 * low
        slope = max((self.peak(b) - self.peak(a)) // (b - a), 1)
        batch = min(limit, max(low, a + (device_bytes - self.peak(a)) // slope))
        if self.verify:   # the trend can be off by one or two: settle on the simulated boundary
            while batch > 1 and self.peak(batch) > device_bytes:
                batch -= max(1, batch // 50)
            while batch < limit and self.peak(batch + 1) <= device_bytes:
                batch += 1
        return batch


def predict(models: list[str], devices: tuple[int, ...], methods: list[str], exact: bool = False,
            verify: bool = False) -> list[dict]:
    """One row per (model, method): peak at batch 1 and the largest batch per device size."""
    rows = []
    for model in models:
        config = load_config(CONFIGS / f"{model}.json")
        for method in methods:
            predictor = Predictor(config, method, exact, verify)
            rows.append({"model": model, "method": method, "peak_batch1": predictor.peak(1),
                         "largest_batch": {gib: predictor.largest_batch(gib * GiB) for gib in devices}})
    return rows


def table(rows: list[dict], devices: tuple[int, ...]) -> str:
    head = f"{'model':<12} {'method':<24} {'peak, batch 1':>13} " + " ".join(f"{d:>5}G" for d in devices)
    lines = [f"largest batch at seq {SEQ} per device (-: does not fit)", head, "-" * len(head)]
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
    ax.set_xlabel(f"predicted peak memory, GiB (batch 1, seq {SEQ}, AdamW, checkpointing)")
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    parser.add_argument("--out", default="will_it_fit.png", help="the plot")
    parser.add_argument("--exact", action="store_true", help="simulate every layer (minutes) and compare")
    parser.add_argument("--verify", action=argparse.BooleanOptionalAction, default=True,
                        help="simulate around each largest batch so it is the exact boundary (default; --no-verify: "
                        "the linear trend alone, which can be off by one)")
    parser.add_argument("--smoke", action="store_true", help="Mistral-7B, 4-bit QLoRA, 24 GiB only (a quick check)")
    args = parser.parse_args(argv)
    models, devices = (["mistral-7b"], (24,)) if args.smoke else (args.models, DEVICES_GIB)
    methods = ["QLoRA 4-bit (NF4)"] if args.smoke else list(METHODS)
    start = time.perf_counter()
    rows = predict(models, devices, methods, verify=args.verify)
    print(table(rows, devices))
    if args.exact:
        exact = predict(models, devices, methods, exact=True, verify=args.verify)
        same = all(a["peak_batch1"] == b["peak_batch1"] and a["largest_batch"] == b["largest_batch"]
                   for a, b in zip(rows, exact))
        print(f"\nevery layer simulated: {'identical' if same else 'DIFFERENT'}\n{table(exact, devices)}")
    plot(rows, devices, Path(args.out))
    print(f"\nplot: {args.out}; {time.perf_counter() - start:.1f} s. Tensor memory only: add ~0.5-1 GiB for the "
          "CUDA context and allocator caching.")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
