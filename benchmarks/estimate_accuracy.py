"""Estimate-accuracy sweep: estimate_memory against MemoryProfiler on real training steps.

    flock /tmp/qlowrank-heavy.lock .venv/bin/python benchmarks/estimate_accuracy.py

bits none/8/4 x checkpointing on/off x r 8/64 x sequence 128/512 (24 configurations) on a
tiny Llama and on a random Llama the shape of SmolLM2-135M; batch 1, bf16 weights and
activations, LoRA on all linear layers, torch AdamW, 2 steps (the peak of step 2 includes
the optimizer state). A third step runs under torch.profiler, whose allocator-level
memory timeline is an independent measurement (it also sees buffers inside C++ kernels).
Prints a table and the median / worst relative errors against both, writes
benchmarks/estimate_accuracy.md, .json and .png.

    .venv/bin/python benchmarks/estimate_accuracy.py --json-from-md   # seconds: the .json of the last .md

`--json-from-md` measures nothing: it reads the table of the last run's estimate_accuracy.md
(errors rounded to 0.01%, as printed) and writes estimate_accuracy.json from it.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).parent
COLUMNS = ("model", "bits", "checkpointing", "r", "seq")


def model_configs(which: str) -> dict:
    import transformers

    configs = {
        "tiny-llama": transformers.LlamaConfig(
            vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=False),
        # SmolLM2-135M's shape (config of HuggingFaceTB/SmolLM2-135M), random weights
        "smollm2-135m-shape": transformers.LlamaConfig(
            vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
            num_key_value_heads=3, max_position_embeddings=2048, tie_word_embeddings=True, rope_theta=100000.0),
    }
    return configs if which == "all" else {which: configs[which]}


def run_case(config, bits, checkpointing, r, seq, steps=2):
    import torch
    import transformers

    import qlowrank as ql
    from qlowrank.memory import profile_steps
    from qlowrank.memory.crosscheck import allocator_peak_bytes

    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    if bits is not None:
        ql.quantize_model(model, ql.QuantConfig(bits=bits))
    ql.add_lora(model, ql.LoraConfig(r=r, alpha=2 * r))
    if checkpointing:
        ql.enable_gradient_checkpointing(model)
    model.train()
    optimizer = torch.optim.AdamW(ql.lora_parameters(model), lr=1e-4)
    tokens = torch.randint(0, config.vocab_size, (1, seq), generator=torch.Generator().manual_seed(1))
    started = time.perf_counter()
    prof = profile_steps(model, optimizer, tokens, steps, progress=False)
    seconds = time.perf_counter() - started

    def one_step():
        model(input_ids=tokens, labels=tokens).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    allocator = allocator_peak_bytes(one_step)
    estimate = ql.estimate_memory(config, ql.QuantConfig(bits=bits), ql.LoraConfig(r=r, alpha=2 * r), batch_size=1,
                                  seq_len=seq, gradient_checkpointing=checkpointing, device="cpu")
    del model, optimizer
    gc.collect()
    return prof, allocator, estimate, seconds


def write_json(errors: list[dict], source: str) -> None:
    """estimate_accuracy.json: each configuration's errors and the median / worst |error| of each."""
    summary = {label: {"median": statistics.median(abs(e[key]) for e in errors),
                       "worst": max(abs(e[key]) for e in errors)}
               for label, key in (("MemoryProfiler", "error_vs_profiler"),
                                  ("torch.profiler allocator", "error_vs_allocator"))}
    record = {"command": " ".join(["benchmarks/estimate_accuracy.py", *sys.argv[1:]]), "source": source,
              "configurations": len(errors), "summary": summary, "rows": errors}
    (HERE / "estimate_accuracy.json").write_text(json.dumps(record, indent=1) + "\n")


def json_from_md() -> None:
    """The .json of the table in estimate_accuracy.md (a finished run's output), without measuring."""
    errors = []
    for line in (HERE / "estimate_accuracy.md").read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) != 10 or not cells[-1].endswith("%"):
            continue   # the header, its rule, the summary line
        errors.append({**dict(zip(COLUMNS, cells[:5])), "error_vs_profiler": float(cells[8][:-1]) / 100,
                       "error_vs_allocator": float(cells[9][:-1]) / 100})
    write_json(errors, "estimate_accuracy.md (errors as printed, to 0.01%)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="all", choices=["all", "tiny-llama", "smollm2-135m-shape"])
    parser.add_argument("--json-from-md", action="store_true", help="write the .json of the last .md and stop")
    args = parser.parse_args()
    if args.json_from_md:
        json_from_md()
        return
    from qlowrank.memory import format_bytes
    from qlowrank.memory.report import atomic_write_text

    rows = []
    header = (f"{'model':<20}{'bits':>5}{'ckpt':>6}{'r':>4}{'seq':>5}{'profiler':>13}{'allocator':>13}"
              f"{'estimate':>13}{'err/prof':>9}{'err/alloc':>10}{'s/run':>7}")
    print(header)
    for name, config in model_configs(args.models).items():
        for bits in (None, 8, 4):
            for checkpointing in (True, False):
                for r in (8, 64):
                    for seq in (128, 512):
                        prof, alloc, est, seconds = run_case(config, bits, checkpointing, r, seq)
                        error = (est.total_bytes - prof.peak_bytes) / prof.peak_bytes
                        error_alloc = (est.total_bytes - alloc) / alloc
                        rows.append((name, bits, checkpointing, r, seq, prof.peak_bytes, est.total_bytes, error,
                                     alloc, error_alloc))
                        print(f"{name:<20}{str(bits):>5}{str(checkpointing):>6}{r:>4}{seq:>5}"
                              f"{format_bytes(prof.peak_bytes):>13}{format_bytes(alloc):>13}"
                              f"{format_bytes(est.total_bytes):>13}{100 * error:>+8.2f}%{100 * error_alloc:>+9.2f}%"
                              f"{seconds:>7.1f}", flush=True)
    summary = "; ".join(
        f"vs {label}: median |error| {100 * statistics.median(errs):.2f}%, worst {100 * max(errs):.2f}%"
        for label, errs in (("MemoryProfiler", [abs(row[7]) for row in rows]),
                            ("torch.profiler allocator", [abs(row[9]) for row in rows])))
    summary = f"{len(rows)} configurations: {summary}"
    print(summary)
    lines = ["| model | bits | checkpointing | r | seq | MemoryProfiler peak | torch.profiler allocator peak | estimate "
             "| error vs profiler | error vs allocator |", "|---|---|---|---|---|---|---|---|---|---|"]
    lines += [f"| {n} | {b} | {c} | {r} | {s} | {format_bytes(m)} | {format_bytes(a)} | {format_bytes(e)} | "
              f"{100 * err:+.2f}% | {100 * erra:+.2f}% |" for n, b, c, r, s, m, e, err, a, erra in rows]
    atomic_write_text(HERE / "estimate_accuracy.md", "\n".join(lines + ["", summary, ""]))
    write_json([{**dict(zip(COLUMNS, row[:5])), "profiler_peak": row[5], "estimate": row[6], "error_vs_profiler": row[7],
                 "allocator_peak": row[8], "error_vs_allocator": row[9]} for row in rows], "this run")
    plot(rows, summary)


def plot(rows, summary) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from qlowrank.memory.report import save_figure

    fig, ax = plt.subplots(figsize=(6.5, 6))
    for name, marker in (("tiny-llama", "o"), ("smollm2-135m-shape", "s")):
        points = [(row[5] / 2**20, row[6] / 2**20) for row in rows if row[0] == name]
        if points:
            ax.scatter(*zip(*points), marker=marker, label=name, alpha=0.8)
    lo = min(min(r[5], r[6]) for r in rows) / 2**20 * 0.8
    hi = max(max(r[5], r[6]) for r in rows) / 2**20 * 1.2
    ax.plot([lo, hi], [lo, hi], "k--", lw=1, label="estimate = measured")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("measured peak tensor memory, MiB (MemoryProfiler)")
    ax.set_ylabel("estimate_memory, MiB")
    ax.set_title("estimate vs measured (MemoryProfiler)\n" + summary.replace("; ", "\n"), fontsize=8)
    ax.legend()
    save_figure(fig, HERE / "estimate_accuracy.png")
    plt.close(fig)


if __name__ == "__main__":
    main()
