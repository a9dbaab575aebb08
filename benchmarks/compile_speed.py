"""Does `--compile` pay at a real width, with and without checkpointing, and in which wrap order?

    flock /tmp/qlowrank-heavy.lock .venv/bin/python benchmarks/compile_speed.py [--steps 4] [--rounds 1]
    ... compile_speed.py --append [--variants "A;B"]     # another round into the same JSON

SmolLM2-135M (the bundled GGUF, converted once to bf16 safetensors by benchmarks/vs_peft.py), NF4 +
double quantization, bf16 compute, LoRA r=16 alpha 32 on all linear layers, AdamW, batch 4 x 512 of
Python's docs, as vs_peft.py runs it. Each variant runs in its own process with an empty
TORCHINDUCTOR_CACHE_DIR (so its compile is cold and no variant reuses another's code):

- eager / compiled without checkpointing;
- eager with checkpointing, attention kept (the default from seq 256) and recomputed;
- `compile_blocks` around the checkpoint and inside it (model.patches' WRAP_ORDER set for that
  process), with attention kept and recomputed.

One warm-up step holds the compile; the median of `--steps` timed steps is the steady state and
`compile_s` is the warm-up less that median. One more step runs under torch.profiler, which counts
inductor's compiled-graph calls and eager `aten::linear` calls (compile_order.py's technique), and
dynamo's graph breaks are listed. Losses of the timed steps are compared with the eager checkpointed
run's. Variants alternate within a round, so drift on the shared cores hits them alike.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

# name -> (checkpointing, keep_attention, compile, wrap order innermost first)
VARIANTS = {
    "eager, no checkpointing": (False, None, False, None),
    "compiled, no checkpointing": (False, None, True, None),
    "eager, checkpointed (attention kept)": (True, True, False, None),
    "compile around the checkpoint (attention kept)": (True, True, True, ("checkpoint", "compile")),
    "compile inside the checkpoint (attention kept)": (True, True, True, ("compile", "checkpoint")),
    "eager, checkpointed (attention recomputed)": (True, False, False, None),
    "compile around the checkpoint (attention recomputed)": (True, False, True, ("checkpoint", "compile")),
    "compile inside the checkpoint (attention recomputed)": (True, False, True, ("compile", "checkpoint")),
}
REFERENCE = "eager, checkpointed (attention kept)"


def measure(name: str, steps: int, batch: int, seq: int) -> dict:
    import torch
    from torch._dynamo.utils import counters

    import qlowrank as ql
    from compile_order import break_reason, count_calls
    from qlowrank.model import patches
    from qlowrank.model.compile import compile_blocks
    from qlowrank.nn.loss import causal_lm_loss
    from vs_peft import prepare_model, token_batches

    checkpointed, keep_attention, compiled, order = VARIANTS[name]
    if order:
        patches.WRAP_ORDER = order
    folder = prepare_model("smollm2")
    batches = token_batches(folder, batch, seq, steps + 2)
    torch.manual_seed(0)
    quant = ql.QuantConfig(bits=4, quant_type="nf4", double_quant=True, compute_dtype=torch.bfloat16)
    model = ql.load_model(folder, quant=quant, lora=ql.LoraConfig(r=16, alpha=32, target_modules="all-linear"),
                          device="cpu", progress=False)
    if checkpointed:
        ql.enable_gradient_checkpointing(model, keep_attention=keep_attention)
    if compiled:
        compile_blocks(model)
    model.train()
    optimizer = torch.optim.AdamW(ql.lora_parameters(model), lr=2e-4)

    def step(x):
        loss = causal_lm_loss(model, x, x)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.item()

    started = time.perf_counter()
    losses = [step(batches[0])]   # the compile happens here
    warmup = time.perf_counter() - started
    frames = counters["frames"]["ok"]
    times = []
    for x in batches[1:steps + 1]:
        started = time.perf_counter()
        losses.append(step(x))
        times.append(time.perf_counter() - started)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profile:
        step(batches[steps + 1])
    step_s = statistics.median(times)
    return {"variant": name, "checkpointing": checkpointed, "keep_attention": keep_attention, "compile": compiled,
            "wrap_order": list(order) if order else None, "step_s": step_s, "step_times": times,
            "warmup_s": warmup, "compile_s": max(0.0, warmup - step_s) if compiled else None,
            "tokens_per_s": batch * seq / step_s, "losses": losses, "threads": torch.get_num_threads(),
            "compiles_in_timed_steps": counters["frames"]["ok"] - frames, "load_average": os.getloadavg(),
            "graph_breaks": sorted({break_reason(text) for text in counters["graph_break"]}),
            **count_calls(profile)}


def run_child(name: str, args) -> dict:
    with tempfile.TemporaryDirectory(prefix="inductor-") as cache:
        env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=cache)
        command = [sys.executable, __file__, "--variant", name, "--steps", str(args.steps), "--batch",
                   str(args.batch), "--seq", str(args.seq)]
        out = subprocess.run(command, capture_output=True, text=True, env=env)
    if out.returncode:
        raise SystemExit(f"{name} failed:\n{out.stderr[-4000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def summarize(runs: list[dict]) -> dict:
    """Per variant: the median over rounds of each figure, and its losses against the reference's."""
    reference = [r for r in runs if r["variant"] == REFERENCE]
    table = {}
    for name in VARIANTS:
        mine = [r for r in runs if r["variant"] == name]
        if not mine:
            continue
        row = {key: statistics.median(r[key] for r in mine)
               for key in ("step_s", "tokens_per_s", "compiled_graph_calls", "eager_linear_calls")}
        compiles = [r["compile_s"] for r in mine if r["compile_s"] is not None]
        row["compile_s"] = statistics.median(compiles) if compiles else None
        row["step_s_runs"] = [r["step_s"] for r in mine]
        row["graph_breaks"] = sorted({b for r in mine for b in r["graph_breaks"]})
        if reference:
            row["largest_loss_difference"] = max(abs(a - b) for r, ref in zip(mine, reference)
                                                 for a, b in zip(r["losses"], ref["losses"]))
            row["vs_reference"] = row["step_s"] / statistics.median(r["step_s"] for r in reference) - 1
        table[name] = row
    return table


def print_table(table: dict) -> None:
    print(f"{'variant':54} {'s/step':>7} {'vs ref':>7} {'compile s':>9} {'graphs':>6} {'eager lin':>9} {'dloss':>8}")
    for name, row in table.items():
        compile_s = f"{row['compile_s']:.1f}" if row["compile_s"] is not None else "-"
        print(f"{name:54} {row['step_s']:7.2f} {row.get('vs_reference', 0):+7.1%} {compile_s:>9} "
              f"{row['compiled_graph_calls']:6.0f} {row['eager_linear_calls']:9.0f} "
              f"{row.get('largest_loss_difference', 0):8.1e}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=4, help="timed steps per variant (after one warm-up)")
    parser.add_argument("--rounds", type=int, default=1, help="times each variant runs, alternating")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--variants", help="a subset of the variants, separated by semicolons (default: all)")
    parser.add_argument("--out", type=Path, default=HERE / "compile_speed.json")
    parser.add_argument("--append", action="store_true", help="add this call's runs to those --out holds (another round)")
    parser.add_argument("--variant", choices=sorted(VARIANTS), help=argparse.SUPPRESS)   # one child's run
    args = parser.parse_args()
    if args.variant:
        print(json.dumps(measure(args.variant, args.steps, args.batch, args.seq)))
        return
    names = args.variants.split(";") if args.variants else list(VARIANTS)
    unknown = set(names) - set(VARIANTS)
    if unknown:
        raise SystemExit(f"unknown --variants {sorted(unknown)}: choose from {list(VARIANTS)}")
    earlier = json.loads(args.out.read_text()) if args.append else {}
    if "date" in earlier:   # written before rounds were appended
        earlier["dates"], earlier["load_averages_before"] = [earlier["date"]], [earlier["load_average_before"]]
    runs, load = list(earlier.get("runs", [])), os.getloadavg()
    for _ in range(args.rounds):
        for name in names:
            runs.append(run_child(name, args))
            print(f"{name}: {runs[-1]['step_s']:.2f} s/step", flush=True)
    table = summarize(runs)
    print_table(table)
    now = datetime.now(timezone.utc).isoformat(timespec="minutes")
    result = {"dates": earlier.get("dates", []) + [now], "machine": platform.processor() or platform.machine(),
              "cpus": os.cpu_count(), "load_averages_before": earlier.get("load_averages_before", []) + [load],
              "settings": {"model": "SmolLM2-135M", "bits": 4, "lora_r": 16, "batch": args.batch, "seq": args.seq,
                           "steps": args.steps},
              "table": table, "runs": runs}
    args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
