"""Adapter quality on a quantized base: held-out eval loss of LoRA variants on the real SmolLM2-135M.

    flock /tmp/qlowrank-heavy.lock .venv/bin/python benchmarks/quality.py          # ~1 h on 2 cores
    .venv/bin/python benchmarks/quality.py --steps 3 --seeds 0 --eval-every 1 --out /tmp/q.json   # smoke
    .venv/bin/python benchmarks/quality.py --report                                   # table + plot from the JSON

The demo's task (chat Q/A pairs from the standard library's pydoc topics, 27 pairs from 16
topics held out), the same data, batches and schedule for every variant: LoRA r=16,
alpha 32 on all linear layers, batch 4 x <= 160 tokens, AdamW lr 1e-3, 10% warmup, cosine to
0.1x, bf16 autocast, gradient checkpointing, held-out eval every `--eval-every` steps. Seeds
change the data order and the LoRA init. Variants:

    bf16        LoRA on the bf16 base
    nf4         QLoRA: NF4 + double quantization
    nf4_loftq   NF4, LoftQ init (5 iterations)
    nf4_pissa   NF4, PiSSA init (the quantized residual)
    nf4_dora    NF4, DoRA
    int8        LLM.int8 base

Each run is its own process (fresh allocator, no state carried over). Results are written
to the JSON after every run, so an interrupted benchmark still leaves its finished runs.
Note: SmolLM2 ships here only as a Q4_1 GGUF; the "bf16" base is that file dequantized, so
every variant starts from already-quantized weights, and NF4 quantizes them a second time.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
DEFAULT_OUT = HERE / "quality.json"
VARIANTS = {
    "bf16": dict(bits=None),
    "nf4": dict(bits=4),
    "nf4_loftq": dict(bits=4, init="loftq", loftq_iters=5),
    "nf4_dora": dict(bits=4, use_dora=True),
    "int8": dict(bits=8),
    "nf4_pissa": dict(bits=4, init="pissa"),
}
LABELS = {
    "bf16": "LoRA, bf16 base", "nf4": "QLoRA (NF4)", "nf4_loftq": "NF4 + LoftQ (5 iter)",
    "nf4_pissa": "NF4 + PiSSA", "nf4_dora": "NF4 DoRA", "int8": "LLM.int8 LoRA",
}


def worker(variant: str, seed: int, steps: int, eval_every: int) -> dict:
    """One training run in this process; returns its eval curve and timings."""
    import torch

    import qlowrank as ql
    from qlowrank.cli.train import load_tokenizer
    from qlowrank.data.demo_rows import build_conversations
    from qlowrank.model.embedded import smollm2_gguf
    from qlowrank.train import TrainConfig, Trainer, load_examples

    spec = dict(VARIANTS[variant])
    bits = spec.pop("bits")
    gguf = smollm2_gguf()
    tokenizer = load_tokenizer(gguf)
    work = Path(tempfile.mkdtemp(prefix=f"quality-{variant}-{seed}-"))
    train_rows, eval_rows = build_conversations()
    for name, rows in (("train", train_rows), ("eval", eval_rows)):
        (work / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    train = load_examples(work / "train.jsonl", tokenizer, 160)
    held = load_examples(work / "eval.jsonl", tokenizer, 160)
    torch.manual_seed(seed)
    quant = ql.QuantConfig(bits=bits, compute_dtype=torch.bfloat16)
    lora = ql.LoraConfig(r=16, alpha=32, target_modules="all-linear", **spec)
    started = time.perf_counter()
    model = ql.load_model(gguf, quant=quant, lora=lora, device="cpu", dtype=torch.bfloat16, progress=False, seed=seed)
    load_seconds = time.perf_counter() - started
    ql.enable_gradient_checkpointing(model)
    config = TrainConfig(out_dir=str(work / "run"), steps=steps, batch_size=4, lr=1e-3,
                         warmup_steps=max(1, steps // 10), min_lr_ratio=0.1, precision="bf16", seed=seed,
                         eval_every=eval_every, profile_memory=False, progress=False, keep_checkpoints=1,
                         # seed 0's runs predate length bucketing: keep every run on the same batch shapes
                         pad_multiple=1, group_by_length=False)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    started = time.perf_counter()
    result = Trainer(model, config, train, held, pad_token_id=pad).train()
    train_seconds = time.perf_counter() - started
    return {
        "variant": variant, "seed": seed, "steps": result.final_step,
        "evals": [(e["step"], e["eval_loss"]) for e in result.evals],
        "final_eval_loss": result.evals[-1]["eval_loss"], "first_eval_loss": result.evals[0]["eval_loss"],
        "train_losses": result.losses, "load_seconds": load_seconds,
        "seconds_per_step": train_seconds / max(1, result.final_step),
        "trainable": ql.count_parameters(model).trainable,
    }


def _save(path: Path, data: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=1) + "\n")
    os.replace(tmp, path)


def run_all(args) -> None:
    out = Path(args.out)
    data = json.loads(out.read_text()) if out.is_file() and args.resume else {"runs": []}
    data["settings"] = {"steps": args.steps, "seeds": args.seeds, "eval_every": args.eval_every,
                        "variants": args.variants, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    done = {(r["variant"], r["seed"]) for r in data["runs"]}
    # Seed-major order: if the run is cut short, every variant has at least its first seed.
    for seed in args.seeds:
        for variant in args.variants:
            if (variant, seed) in done:
                continue
            print(f"[{time.strftime('%H:%M:%S')}] {variant} seed {seed} ...", flush=True)
            cmd = [sys.executable, __file__, "--worker", variant, "--seed", str(seed), "--steps", str(args.steps),
                   "--eval-every", str(args.eval_every)]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode != 0:
                print(proc.stdout[-2000:], proc.stderr[-4000:], file=sys.stderr)
                data["runs"].append({"variant": variant, "seed": seed, "error": proc.stderr[-1000:]})
            else:
                run = json.loads(proc.stdout.strip().splitlines()[-1])
                data["runs"].append(run)
                print(f"    eval {run['first_eval_loss']:.4f} -> {run['final_eval_loss']:.4f}, "
                      f"{run['seconds_per_step']:.2f} s/step, load {run['load_seconds']:.1f} s", flush=True)
            _save(out, data)
    report(out)


def summarize(data: dict) -> list[dict]:
    rows = []
    by_variant: dict[str, list[dict]] = {}
    for run in data["runs"]:
        if "error" not in run:
            by_variant.setdefault(run["variant"], []).append(run)
    reference = by_variant.get("bf16")
    ref_mean = statistics.mean(r["final_eval_loss"] for r in reference) if reference else None
    for variant in VARIANTS:
        runs = by_variant.get(variant)
        if not runs:
            continue
        finals = [r["final_eval_loss"] for r in runs]
        mean = statistics.mean(finals)
        rows.append({
            "variant": variant, "label": LABELS[variant], "seeds": len(runs), "mean": mean,
            "spread": (max(finals) - min(finals)) / 2, "std": statistics.stdev(finals) if len(finals) > 1 else 0.0,
            "finals": finals, "start": statistics.mean(r["first_eval_loss"] for r in runs),
            "gap": (mean / ref_mean - 1) if ref_mean else None,
            "s_per_step": statistics.mean(r["seconds_per_step"] for r in runs),
            "load_s": statistics.mean(r["load_seconds"] for r in runs),
        })
    return rows


def report(path: Path) -> None:
    data = json.loads(Path(path).read_text())
    rows = summarize(data)
    print("| variant | seeds | eval loss before | final eval loss, mean ± half-range | per seed | vs bf16 LoRA | "
          "s/step | load s |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        gap = f"{100 * r['gap']:+.2f}%" if r["gap"] is not None else "-"
        print(f"| {r['label']} | {r['seeds']} | {r['start']:.4f} | {r['mean']:.4f} ± {r['spread']:.4f} | "
              f"{', '.join(f'{x:.4f}' for x in r['finals'])} | {gap} | {r['s_per_step']:.2f} | {r['load_s']:.1f} |")
    errors = [f"{r['variant']} seed {r['seed']}" for r in data["runs"] if "error" in r]
    if errors:
        print(f"failed runs: {errors}")
    plot(data, Path(path).with_suffix(".png"))


def plot(data: dict, out: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    colors = dict(zip(VARIANTS, ["black", "tab:blue", "tab:green", "tab:red", "tab:orange", "tab:purple"]))
    labelled = set()
    for run in data["runs"]:
        if "error" in run:
            continue
        steps, losses = zip(*run["evals"])
        v = run["variant"]
        ax.plot(steps, losses, color=colors[v], alpha=0.8, linestyle="-" if run["seed"] == 0 else "--",
                label=LABELS[v] if v not in labelled else None)
        labelled.add(v)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("held-out eval loss")
    ax.set_title("SmolLM2-135M, LoRA r=16 all-linear, demo task (solid: seed 0, dashed: seed 1)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    print(f"plot: {out}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated, from " + ",".join(VARIANTS))
    parser.add_argument("--seeds", default="0,1")
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--eval-every", type=int, default=10)
    parser.add_argument("--out", default=str(DEFAULT_OUT))
    parser.add_argument("--resume", action="store_true", help="keep the finished runs already in --out")
    parser.add_argument("--report", action="store_true", help="only print the table and plot from --out")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.seed, args.steps, args.eval_every)))
        return
    if args.report:
        report(Path(args.out))
        return
    args.variants = [v for v in args.variants.split(",") if v]
    unknown = [v for v in args.variants if v not in VARIANTS]
    if unknown:
        raise SystemExit(f"unknown variants {unknown}; choose from {list(VARIANTS)}")
    args.seeds = [int(s) for s in str(args.seeds).split(",")]
    run_all(args)


if __name__ == "__main__":
    main()
