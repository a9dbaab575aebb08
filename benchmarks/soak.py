"""Soak: RSS per step over a long run of the demo's variable-length batches, for each candidate fix of issue 9's growth.

    flock /tmp/qlowrank-heavy.lock .venv/bin/python benchmarks/soak.py                 # the full comparison
    .venv/bin/python benchmarks/soak.py --steps 40 --policy pad1 --policy pad64         # a quick probe

Each policy runs in a fresh process: the demo's setting exactly (real SmolLM2-135M-Instruct,
NF4 + double quantization, LoRA r=16 all-linear, batch 4, sequences of at most 160 tokens
from the demo's chat data, bf16 autocast, chunked loss, checkpointing, AdamW) through
`qlowrank.train.Trainer`. After every step it records the process RSS, glibc's heap
statistics (in use vs free inside the heaps, mmapped bytes) and the step time. At the end
it calls malloc_trim(0) and records RSS again: memory that a trim gives back was free
inside the heaps (fragmentation); memory it cannot give back is live.

Policies (the candidates the issue names):
  pad1     each batch padded to its own longest example: what qlowrank did before (TrainConfig(pad_multiple=1))
  pad64    batch lengths rounded up to a multiple of 64 (at most the longest example): the default of issue 9
  grouped  length-grouped batches, lengths rounded up to 24 (an eighth of the demo's longest row): tried for
           issue 14 and not kept (+7.5% RSS in 120 steps); the default now groups by length and rounds to 64
  trim     pad1, plus glibc's malloc_trim(0) after every step (periodic trimming)
  mallopt  pad1, with glibc's mmap threshold fixed at 1 MiB (mallopt), so freed activations go back to the OS
By default pad1, pad64 and grouped run --steps steps (300) and trim and mallopt run --probe-steps (60).
Writes soak.json and soak.png to --out.
"""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

POLICIES = ("pad1", "pad64", "grouped", "trim", "mallopt")
FLAT_TOLERANCE = 0.05   # the target: after step 10, RSS within +5% of its step-10 value
M_MMAP_THRESHOLD = -3   # mallopt's parameter number, from glibc's <malloc.h>


LIBC = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
LIBC.malloc_trim.argtypes = [ctypes.c_size_t]
LIBC.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]


def _rss() -> int:
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def worker(policy: str, steps: int, out: Path) -> None:
    """One policy, one process: train the demo for `steps` steps and write per-step figures as JSON."""
    import torch

    from qlowrank import LoraConfig, QuantConfig, enable_gradient_checkpointing, load_model
    from qlowrank.cli.train import load_tokenizer
    from qlowrank.data.demo_rows import build_conversations
    from qlowrank.heap import heap_statistics as heap_stats
    from qlowrank.model.embedded import smollm2_gguf
    from qlowrank.train import Example, TrainConfig, Trainer, tokenize_row

    if policy == "mallopt" and LIBC.mallopt(M_MMAP_THRESHOLD, 1 << 20) != 1:
        raise SystemExit("mallopt(M_MMAP_THRESHOLD) failed")
    gguf = smollm2_gguf()
    tokenizer = load_tokenizer(gguf)
    rows, _ = build_conversations()
    train = []
    for n, row in enumerate(rows):
        example = tokenize_row(row, tokenizer, f"demo:{n}")
        train.append(Example(example.input_ids[:160], example.labels[:160], example.source))
    model = load_model(gguf, quant=QuantConfig(bits=4, compute_dtype=torch.bfloat16),
                       lora=LoraConfig(r=16, alpha=32), device="cpu", dtype=torch.bfloat16, progress=False, seed=0)
    enable_gradient_checkpointing(model)
    records: list[dict] = []
    last = [time.perf_counter()]

    def on_step(trainer, step, metrics):
        if policy == "trim":
            LIBC.malloc_trim(0)
        now = time.perf_counter()
        records.append({"step": step, "rss": _rss(), "heap": heap_stats(), "seconds": now - last[0],
                        "tokens": metrics["tokens"], "loss": metrics["loss"]})
        last[0] = now

    with tempfile.TemporaryDirectory() as run_dir:
        config = TrainConfig(out_dir=run_dir, steps=steps, batch_size=4, lr=1e-3, warmup_steps=max(1, steps // 10),
                             min_lr_ratio=0.1, precision="bf16", seed=0, progress=False, eval_every=0,
                             # pad1/pad64 are the orders the soak first measured (plain random batches);
                             # "grouped": length-grouped batches with a finer padding step (see above)
                             group_by_length=policy == "grouped",
                             pad_multiple={"pad64": 64, "grouped": 24}.get(policy, 1))
        Trainer(model, config, train, [], pad_token_id=tokenizer.eos_token_id, on_step=on_step).train()
    before_trim = _rss()
    LIBC.malloc_trim(0)
    result = {"policy": policy, "records": records, "rss_end": before_trim, "rss_after_trim": _rss(),
              "heap_end": heap_stats()}
    out.write_text(json.dumps(result))


def summarize(result: dict) -> dict:
    """RSS at step 10, its maximum after step 10, growth, the trim's give-back and seconds/step."""
    records = result["records"]
    rss = [r["rss"] for r in records]
    at10 = rss[min(9, len(rss) - 1)]
    after = max(rss[9:]) if len(rss) > 9 else at10
    seconds = [r["seconds"] for r in records[3:]] or [0.0]   # steps 1-2 run under MemoryProfiler
    heap = records[-1]["heap"] or {}
    return {"policy": result["policy"], "steps": len(records), "rss_step1": rss[0], "rss_step10": at10,
            "rss_max_after10": after, "rss_last": rss[-1], "growth": after / at10 - 1,
            "heap_free_last": heap.get("fordblks", 0), "heap_used_last": heap.get("uordblks", 0),
            "mmapped_last": heap.get("hblkhd", 0), "trim_gave_back": result["rss_end"] - result["rss_after_trim"],
            "s_per_step": sorted(seconds)[len(seconds) // 2]}


def plot(results: list[dict], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 4.5))
    for result in results:
        steps = [r["step"] for r in result["records"]]
        ax.plot(steps, [r["rss"] / 2**30 for r in result["records"]], label=result["policy"], lw=1.2)
        at10 = result["records"][min(9, len(steps) - 1)]["rss"] / 2**30
        ax.axhline(at10 * (1 + FLAT_TOLERANCE), color=ax.lines[-1].get_color(), lw=0.5, ls="--")
    ax.set_xlabel("training step")
    ax.set_ylabel("process RSS (GiB)")
    ax.set_title("demo (SmolLM2-135M, NF4, batch 4, seq <= 160): RSS per step; dashed = step 10 + 5%")
    ax.legend()
    fig.savefig(path, dpi=110, bbox_inches="tight")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=300, help="steps of the pad1, pad64 and grouped runs")
    parser.add_argument("--probe-steps", type=int, default=60, help="steps of the trim and mallopt runs")
    parser.add_argument("--policy", action="append", choices=POLICIES, help="run this policy (repeatable; default: all)")
    parser.add_argument("--out", default="benchmarks/soak", help="folder for soak.json and soak.png")
    parser.add_argument("--worker", nargs=2, metavar=("POLICY", "JSON"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.worker[0], args.steps, Path(args.worker[1]))
        return
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = []
    for policy in args.policy or list(POLICIES):
        steps = args.steps if policy in ("pad1", "pad64", "grouped") else args.probe_steps
        with tempfile.NamedTemporaryFile(suffix=".json") as handle:
            subprocess.run([sys.executable, __file__, "--steps", str(steps), "--worker", policy, handle.name], check=True)
            results.append(json.loads(Path(handle.name).read_text()))
        print(f"{policy}: done", flush=True)
    (out / "soak.json").write_text(json.dumps([{**summarize(r), "rss": [x["rss"] for x in r["records"]]}
                                               for r in results], indent=1))
    plot(results, out / "soak.png")
    mib = 2**20
    print(f"\n{'policy':<10}{'steps':>6}{'RSS s1':>9}{'s10':>9}{'max>10':>9}{'last':>9}{'growth':>8}"
          f"{'heap free':>10}{'trim gives':>11}{'s/step':>8}   (MiB)")
    for result in results:
        s = summarize(result)
        print(f"{s['policy']:<10}{s['steps']:>6}{s['rss_step1'] / mib:>9.0f}{s['rss_step10'] / mib:>9.0f}"
              f"{s['rss_max_after10'] / mib:>9.0f}{s['rss_last'] / mib:>9.0f}{100 * s['growth']:>+7.1f}%"
              f"{s['heap_free_last'] / mib:>10.0f}{s['trim_gave_back'] / mib:>11.0f}{s['s_per_step']:>8.2f}")
    print(f"\nwrote {out / 'soak.json'}, {out / 'soak.png'}")


if __name__ == "__main__":
    main()
