"""Planner quality: the planner's choice against a measured grid of layouts, at several budgets.

    flock /tmp/qlowrank-heavy.lock nice -n 10 .venv/bin/python benchmarks/planner.py                 # SmolLM2, seq 512
    flock /tmp/qlowrank-heavy.lock nice -n 10 .venv/bin/python benchmarks/planner.py --model 8b-width --seq 2048
    # re-plan a saved run's budgets against its measured grid (after a planner change); off-grid choices are measured
    ... benchmarks/planner.py --model 8b-width --seq 2048 --global-batch 2 --steps 2 --replan saved.json
    # only these layouts, predicted against measured (no budgets); --env sets a variable in the workers
    ... benchmarks/planner.py --model 8b-width --seq 2048 --steps 2 --env QLOWRANK_HEAP_TRIM=0 \
        --layouts '[{"micro_batch": 1, "grad_accum": 2, "checkpointing": true, "keep_blocks": 1, "keep_attention": false}]'

Every grid point (micro-batch x kept blocks x attention kept, at a fixed global batch) trains
in a fresh process: `load_model` in 4-bit, the layout's checkpointing, the trainer's chunked
loss under bf16 autocast, torch AdamW, `--steps` optimizer steps on random tokens; measured
are the time of the steps after the first (tokens/s) and the whole process's anonymous peak
(RssAnon, sampled). Then, for each budget, `plan_run` plans in this process (estimates, and
blocks timed here), and its choice is compared with the fastest grid point whose measured
peak fits the budget. Budgets are chosen between the grid's smallest and largest measured
peaks. The planner may pick a layout outside the grid; it is then measured too.

Models: "smollm2" (the embedded SmolLM2-135M GGUF) and "8b-width" (a random Llama with
Llama-3-8B's widths and 4 layers, vocab 32000, written once to a temporary folder).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve()
L8B_4L = dict(vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_hidden_layers=4, num_attention_heads=32,
              num_key_value_heads=8, tie_word_embeddings=False, rope_theta=500000.0)


def model_path(name: str, folder: Path) -> str:
    if name == "smollm2":
        from qlowrank.model.embedded import smollm2_gguf
        return str(smollm2_gguf())
    target = folder / "l8b-4l"
    if not (target / "config.json").is_file():
        subprocess.run([sys.executable, str(HERE), "--make", str(target)], check=True)
    return str(target)


def make_checkpoint(target: Path) -> None:
    import transformers
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**L8B_4L)).to(torch.bfloat16)
    model.save_pretrained(target)


def measure(path: str, layout: dict, seq: int, steps: int) -> dict:
    """One grid point, in this (fresh) process: tokens/s after the first step, anonymous peak."""
    import qlowrank as ql
    from qlowrank.memory.sampler import StatusSampler
    from qlowrank.model.checkpointing import trim_heaps_before_backward
    from qlowrank.nn.loss import causal_lm_loss

    with StatusSampler() as sampler:
        model = ql.load_model(path, quant=ql.QuantConfig(bits=4, compute_dtype=torch.bfloat16),
                              lora=ql.LoraConfig(r=16, alpha=32), device="cpu", dtype=torch.bfloat16)
        if layout["checkpointing"]:
            ql.enable_gradient_checkpointing(model, keep_blocks=layout["keep_blocks"],
                                             keep_attention=layout["keep_attention"])
        trim_heaps_before_backward(model)   # as the Trainer does, checkpointed or not
        model.train()
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=1e-4)
        vocab = model.get_input_embeddings().num_embeddings
        generator = torch.Generator().manual_seed(0)
        times = []
        for _ in range(steps):
            started = time.perf_counter()
            for _ in range(layout["grad_accum"]):
                tokens = torch.randint(0, vocab, (layout["micro_batch"], seq), generator=generator)
                with torch.autocast("cpu", dtype=torch.bfloat16):
                    loss = causal_lm_loss(model, tokens, tokens) / layout["grad_accum"]
                loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            times.append(time.perf_counter() - started)
    tokens_per_step = layout["micro_batch"] * layout["grad_accum"] * seq
    step = sum(times[1:]) / len(times[1:])
    return {"step_s": step, "tokens_per_s": tokens_per_step / step, "anon_peak": sampler.anon_peak}


def run_point(path: str, layout: dict, seq: int, steps: int, env: dict | None = None) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".json") as handle:
        subprocess.run([sys.executable, str(HERE), "--worker", path, json.dumps(layout), str(seq), str(steps),
                        handle.name], check=True, env={**os.environ, **(env or {})})
        return json.loads(Path(handle.name).read_text())


def predicted_process(path: str, layout: dict, seq: int) -> int:
    """The estimator's process peak for a grid point (what the planner compares with the budget)."""
    import qlowrank as ql
    return ql.estimate_memory(path, quant=ql.QuantConfig(bits=4, compute_dtype=torch.bfloat16),
                              lora=ql.LoraConfig(r=16, alpha=32), seq_len=seq, device="cpu",
                              batch_size=layout["micro_batch"], grad_accum=layout["grad_accum"],
                              gradient_checkpointing=layout["checkpointing"], keep_blocks=layout["keep_blocks"],
                              keep_attention=layout["keep_attention"]).process_bytes


def layout_key(layout: dict) -> tuple:
    return (layout["micro_batch"], layout["checkpointing"], layout["keep_blocks"] if layout["checkpointing"] else -1,
            layout["keep_attention"] if layout["checkpointing"] else None)


def describe(layout: dict, layers: int) -> str:
    from qlowrank.planner import Layout
    return f"{layout['micro_batch']} x {layout['grad_accum']}, " + Layout(**layout).describe(layers)


def grid(global_batch: int, layers: int, micro_batches: list[int]) -> list[dict]:
    points = []
    for micro in micro_batches:
        accum = global_batch // micro
        for keep in sorted({0, layers // 2, layers}):
            for attention in ((False, True) if keep < layers else (False,)):
                points.append(dict(micro_batch=micro, grad_accum=accum, checkpointing=keep < layers,
                                   keep_blocks=keep if keep < layers else 0, keep_attention=attention))
    return points


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2", choices=["smollm2", "8b-width"])
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--global-batch", type=int, default=4)
    parser.add_argument("--micro-batches", default="1,2,4", help="grid micro-batches (divisors of --global-batch)")
    parser.add_argument("--steps", type=int, default=3, help="optimizer steps per grid point (the first is not timed)")
    parser.add_argument("--budgets", type=int, default=3)
    parser.add_argument("--json", default=None, help="write the results here")
    parser.add_argument("--replan", default=None, help="a --json file of an earlier run: re-plan its budgets against "
                                                       "its grid instead of measuring the grid again")
    parser.add_argument("--layouts", default=None, help="a JSON list of layouts: measure only these, predicted "
                                                        "against measured, and plan nothing")
    parser.add_argument("--env", action="append", default=[], help="NAME=VALUE set in every worker (repeatable)")
    parser.add_argument("--worker", nargs=5, help=argparse.SUPPRESS)
    parser.add_argument("--make", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.make:
        make_checkpoint(Path(args.make))
        return
    if args.worker:
        path, layout, seq, steps, out = args.worker
        Path(out).write_text(json.dumps(measure(path, json.loads(layout), int(seq), int(steps))))
        return

    import qlowrank as ql
    from qlowrank.memory.meta_model import layer_count, load_config
    from qlowrank.planner import plan_run

    env = dict(item.split("=", 1) for item in args.env)
    with tempfile.TemporaryDirectory(prefix="qlowrank-planner-") as folder:
        path = model_path(args.model, Path(folder))
        layers = layer_count(load_config(path))
        if args.layouts:
            for layout in json.loads(args.layouts):
                result, predicted = run_point(path, layout, args.seq, args.steps, env), predicted_process(path, layout, args.seq)
                print(f"{describe(layout, layers)}: predicted {predicted / 2**20:.0f} MiB, measured "
                      f"{result['anon_peak'] / 2**20:.0f} MiB ({predicted / result['anon_peak'] - 1:+.1%}), "
                      f"step {result['step_s']:.2f} s {env or ''}", flush=True)
            return
        if args.replan:
            saved = json.loads(Path(args.replan).read_text())
            measured = {layout_key(g["layout"]): (g["layout"], g) for g in saved["grid"]}
            points = [g["layout"] for g in saved["grid"]]
            budgets = [row["budget"] for row in saved["rows"]]
        else:
            points = grid(args.global_batch, layers, [int(m) for m in args.micro_batches.split(",")])
            measured = {}
            for i, layout in enumerate(points):
                result = run_point(path, layout, args.seq, args.steps, env)
                result["predicted_process"] = predicted_process(path, layout, args.seq)
                measured[layout_key(layout)] = (layout, result)
                print(f"[{i + 1}/{len(points)}] {describe(layout, layers)}: {result['tokens_per_s']:.0f} tokens/s, "
                      f"anonymous peak {result['anon_peak'] / 2**20:.0f} MiB (predicted "
                      f"{result['predicted_process'] / 2**20:.0f})", flush=True)
            if args.json:   # the grid is the expensive part: kept before planning, so a failure there loses nothing
                save(args.json, [], measured)
            peaks = sorted(r["anon_peak"] for _, r in measured.values())
            budgets = [int(peaks[0] + (peaks[-1] - peaks[0]) * (i + 0.5) / args.budgets) for i in range(args.budgets)]
        rows = []
        for budget in budgets:
            started = time.perf_counter()
            plan = plan_run(path, budget, args.global_batch, quant=ql.QuantConfig(bits=4, compute_dtype=torch.bfloat16),
                            lora=ql.LoraConfig(r=16, alpha=32), seq_len=args.seq, device="cpu", progress=False)
            planning_s = time.perf_counter() - started
            chosen = plan.chosen.layout
            layout = dict(micro_batch=chosen.micro_batch, grad_accum=chosen.grad_accum, checkpointing=chosen.checkpointing,
                          keep_blocks=chosen.keep_blocks, keep_attention=chosen.keep_attention)
            if layout_key(layout) not in measured:
                measured[layout_key(layout)] = (layout, run_point(path, layout, args.seq, args.steps, env))
            result = measured[layout_key(layout)][1]
            fitting = [(lay, r) for lay, r in measured.values() if r["anon_peak"] <= budget]
            best_layout, best = max(fitting, key=lambda p: p[1]["tokens_per_s"]) if fitting else (None, None)
            rows.append({"budget": budget, "chosen": describe(layout, layers), "chosen_tokens_per_s": result["tokens_per_s"],
                         "chosen_anon_peak": result["anon_peak"], "predicted_step_s": plan.chosen.step_seconds,
                         "measured_step_s": result["step_s"], "predicted_process": plan.chosen.process_bytes,
                         "fastest_fitting": describe(best_layout, layers) if best else None,
                         "fastest_tokens_per_s": best["tokens_per_s"] if best else None,
                         "ratio": result["tokens_per_s"] / best["tokens_per_s"] if best else None,
                         "within_budget": result["anon_peak"] <= budget, "planning_s": planning_s})
            print(plan.table(), flush=True)
    print(f"\n{args.model}, seq {args.seq}, global batch {args.global_batch}; grid of {len(points)} layouts, fresh "
          f"process each, {args.steps} steps (first untimed)\n")
    print("| budget | planner's choice | its tokens/s (measured) | its anon peak | within budget | fastest grid point "
          "that fits (measured) | its tokens/s | choice / fastest | predicted / measured step | planning |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['budget'] / 2**20:.0f} MiB | {r['chosen']} | {r['chosen_tokens_per_s']:.0f} | "
              f"{r['chosen_anon_peak'] / 2**20:.0f} MiB | {'yes' if r['within_budget'] else 'NO'} | {r['fastest_fitting']} | "
              f"{r['fastest_tokens_per_s'] or 0:.0f} | {r['ratio'] or 0:.2f} | "
              f"{r['predicted_step_s']:.2f} / {r['measured_step_s']:.2f} s | {r['planning_s']:.0f} s |")
    print("\ngrid (measured):")
    for layout, r in sorted(measured.values(), key=lambda p: -p[1]["tokens_per_s"]):
        predicted = f"  predicted {r['predicted_process'] / 2**20:7.0f} MiB" if "predicted_process" in r else ""
        print(f"  {describe(layout, layers):70s} {r['tokens_per_s']:7.0f} tokens/s  {r['anon_peak'] / 2**20:7.0f} MiB"
              + predicted)
    if args.json:
        save(args.json, rows, measured)


def save(path: str, rows: list[dict], measured: dict) -> None:
    """The budgets' rows and the measured grid as JSON, written to a temporary name and renamed into place."""
    text = json.dumps({"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "rows": rows,
                       "grid": [{"layout": lay, **r} for lay, r in measured.values()]}, indent=1)
    staging = Path(f"{path}.tmp")
    staging.write_text(text)
    os.replace(staging, path)


if __name__ == "__main__":
    main()
