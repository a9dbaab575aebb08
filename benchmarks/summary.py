"""The headline figures, read from the JSONs the benchmark scripts wrote, rendered into the pages that quote them.

    python benchmarks/summary.py            # print the summary table
    python benchmarks/summary.py --write    # regenerate the blocks in RESULTS.md, README.md, docs/install.md
    python benchmarks/summary.py --check    # exit 1 naming each block that differs from what the JSONs say

Each figure comes from one JSON under benchmarks/, written by the script that measured it; the
generated blocks sit between `<!-- summary:NAME:start -->` and `<!-- summary:NAME:end -->` and
are never edited by hand (tests/test_results_drift.py fails when one differs from what this script
renders now). A figure whose JSON is absent is left out, except the GPU row, which then says that
nothing was measured on a GPU yet. Imports nothing beyond the standard library, so the check is fast.

A JSON that this script has no renderer for can still reach the table: give it a top-level
"headline" list of {"topic": ..., "figure": ..., "date": ..., "command": ...} entries (figure a
sentence with its numbers, written by the script from its own results; date and command optional).
Every benchmarks/*.json with such a list gets its rows.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
GIB, MIB = 2**30, 2**20
MACHINE = "a 2-core x86-64 CPU (AMD EPYC, AVX512-bf16), 24 GiB, torch 2.13 CPU, bitsandbytes 0.50.2"
GPU_SCRIPT = "bash benchmarks/gpu_all.sh"


@dataclass(frozen=True)
class Figure:
    """One row of the summary: what, the figure itself (numbers from `source`), when and how it was measured."""
    topic: str
    figure: str
    source: str     # file name under benchmarks/
    date: str
    command: str


def load(name: str) -> dict | list | None:
    path = HERE / name
    return json.loads(path.read_text()) if path.is_file() else None


def dated(data: dict | list, recorded: str) -> str:
    """The date a JSON carries (scripts write one since 2026-12-07), else the one its RESULTS.md section records."""
    return data["date"][:10] if isinstance(data, dict) and data.get("date") else recorded


def pct(value: float, digits: int = 1) -> str:
    return f"{100 * value:+.{digits}f}%"


# --- speed and memory against PEFT (benchmarks/vs_peft.py) ------------------------------------------------

def medians(data: dict, model: str, lib: str) -> dict:
    """Median over a library's runs of the figures vs_peft.py's tables use."""
    runs = [r for r in data["results"] if r["model"] == model and r["lib"] == lib]
    if not runs:
        raise ValueError(f"no {lib} run of {model} in the JSON")
    keys = ("step_s", "peak_rss_bytes", "peak_tensor_bytes", "eval_loss")
    return {k: statistics.median(r[k] for r in runs) for k in keys if all(r.get(k) is not None for r in runs)}


def vs_peft(name: str, model: str, label: str, date: str, command: str) -> Figure | None:
    data = load(name)
    if data is None:
        return None
    q, p = medians(data, model, "qlowrank"), medians(data, model, "peft")
    text = (f"{q['step_s'] / p['step_s']:.2f}x PEFT's time per step ({q['step_s']:.2f} vs {p['step_s']:.2f} s), "
            f"{q['peak_rss_bytes'] / p['peak_rss_bytes']:.2f}x its peak RSS, "
            f"{q['peak_tensor_bytes'] / p['peak_tensor_bytes']:.2f}x its peak tensors, "
            f"eval loss {pct(q['eval_loss'] / p['eval_loss'] - 1, 2)} ({label})")
    return Figure("Speed and memory vs PEFT + bitsandbytes", text, name, dated(data, date), command)


def levers() -> Figure | None:
    name = "vs_peft_smollm2.json"
    data = load(name)
    if data is None:
        return None
    eager, tune = medians(data, "smollm2", "qlowrank"), medians(data, "smollm2", "torchtune")
    text = (f"torchtune's QLoRA modules {tune['step_s']:.2f} s/step against qlowrank's {eager['step_s']:.2f} "
            f"({eager['step_s'] / tune['step_s']:.2f}x for qlowrank), SmolLM2-135M")
    return Figure("torchtune", text, name, dated(data, "2026-11-29"),
                  "python benchmarks/vs_peft.py --models smollm2 --runs 2 --steps 3 "
                  "--libs qlowrank,peft,ql-compile,ql-recompute,torchtune")


def compile_speed() -> Figure | None:
    name = "compile_speed.json"
    data = load(name)
    if data is None:
        return None
    table = data["table"]
    eager, compiled = table["eager, no checkpointing"], table["compiled, no checkpointing"]
    around = table["compile around the checkpoint (attention kept)"]
    text = (f"`--compile` without checkpointing {eager['step_s']:.2f} -> {compiled['step_s']:.2f} s/step on "
            f"SmolLM2-135M ({pct(compiled['step_s'] / eager['step_s'] - 1, 0)}, after a "
            f"{compiled['compile_s']:.0f} s compile); with checkpointing it compiles "
            f"{around['compiled_graph_calls']:.0f} graphs a step (runs eager)")
    return Figure("Speed levers", text, name, data["dates"][-1][:10], "python benchmarks/compile_speed.py --steps 3")


# --- the demo (benchmarks/demo.py) ---------------------------------------------------------------------

def demo() -> Figure | None:
    data = load("demo.json")
    if data is None or not data.get("demo"):
        return None
    d = data["demo"]
    text = (f"{d['steps']} steps: held-out eval loss {d['eval_loss_before']:.3f} -> {d['eval_loss_after']:.3f} "
            f"({pct(d['eval_loss_after'] / d['eval_loss_before'] - 1, 0)}), exported bf16 model "
            f"{d['export_eval_loss_plain_transformers']:.3f} in plain transformers; "
            f"eval + training {d['seconds_eval_and_train']:.0f} s, whole process {data['wall_s']:.0f} s"
            + (f" (load average {data['loadavg_before']:.1f} -> {data['loadavg_after']:.1f})"
               if "loadavg_before" in data else "") + "; "
            f"peak tensors {d['peak_tensor_bytes'] / MIB:.0f} MiB ({d['device']})")
    return Figure("`qlowrank demo` (SmolLM2-135M, NF4, r=16)", text, "demo.json", data["date"][:10], data["command"])


# --- memory: the estimate, the process model, loading -----------------------------------------------------

def estimate_accuracy() -> Figure | None:
    data = load("estimate_accuracy.json")
    if data is None:
        return None
    prof, alloc = data["summary"]["MemoryProfiler"], data["summary"]["torch.profiler allocator"]
    against_profiler = ("equal to the byte" if prof["worst"] == 0 else
                        f"median {100 * prof['median']:.2f}%, worst {100 * prof['worst']:.2f}%")
    text = (f"tensor estimate vs MemoryProfiler: {against_profiler}; vs torch.profiler's allocator timeline: "
            f"median {100 * alloc['median']:.2f}%, worst {100 * alloc['worst']:.2f}% "
            f"({data['configurations']} configurations)")
    return Figure("Memory estimate", text, "estimate_accuracy.json", "2026-11-28",
                  "python benchmarks/estimate_accuracy.py")


def process_errors() -> dict | None:
    data = load("process_memory_errors.json")
    return None if data is None else data["summary"]["process, held out"]


def process_model() -> Figure | None:
    held = process_errors()
    if held is None:
        return None
    text = (f"process (anonymous) estimate on {held['configurations']} held-out runs: median absolute error "
            f"{100 * held['median']:.1f}%, worst {pct(held['worst_signed'])}")
    return Figure("Memory estimate", text, "process_memory_errors.json", "2026-12-04",
                  "python benchmarks/process_memory.py --fit benchmarks/process_memory.json")


def gguf_load() -> Figure | None:
    data = load("gguf_load.json")
    if data is None:
        return None
    parts = []
    for key, label in (("llama3-8b-width", "Llama-3-8B widths, 4 layers"), ("smollm2", "SmolLM2-135M")):
        if key in data:
            streamed, theirs = data[key]["streamed"]["peak_anon"], data[key]["transformers"]["peak_anon"]
            parts.append(f"{label} {streamed / GIB:.2f} GiB against {theirs / GIB:.2f} "
                         f"({streamed / theirs:.2f}x)")
    text = "streamed GGUF load into 4-bit, peak RssAnon vs transformers' GGUF reader + quantize: " + "; ".join(parts)
    return Figure("Loading", text, "gguf_load.json", data["date"], data["command"])


def load_memory() -> Figure | None:
    data = load("load_memory.json")
    if data is None:
        return None
    ours, theirs = data["qlowrank"]["peak_rss"], data["transformers"]["peak_rss"]
    text = (f"safetensors into 4-bit ({data['model']}): qlowrank peak RSS {ours / GIB:.2f} GiB against "
            f"transformers + BitsAndBytesConfig {theirs / GIB:.2f} ({ours / theirs:.2f}x)")
    return Figure("Loading", text, "load_memory.json", data["date"], data["command"])


def large_model() -> Figure | None:
    data = load("large_model.json")
    if data is None:
        return None
    phases = {p["name"]: p for p in data["phases"]}
    parts = []
    for name in ("load NF4 + LoRA", "train seq 512", "train seq 2048"):
        if name in phases and phases[name].get("predicted_anon"):
            anon = phases[name]["measured"]["RssAnon"]
            parts.append(f"{name} {anon / GIB:.2f} GiB anonymous (estimate "
                         f"{pct(phases[name]['predicted_anon'] / anon - 1)})")
    tensors = data.get("estimates", {}).get("seq 2048", {}).get("total_bytes")
    text = ("the Llama-3-8B shape end to end: " + "; ".join(parts)
            + (f"; tensor estimate at seq 2048 {tensors / GIB:.2f} GiB" if tensors else ""))
    return Figure("Memory estimate", text, "large_model.json", data["date"][:10],
                  " ".join(["python benchmarks/large_model.py", *data.get("argv", [])]))


# --- planner, reliability, quality, long runs, several processes --------------------------------------

def planner() -> Figure | None:
    name = "planner_8b_width_trimmed.json"
    data = load(name)
    if data is None:
        return None
    rows = data["rows"]
    ratios = ", ".join(f"{r['ratio']:.2f}" for r in rows)
    within = sum(r["within_budget"] for r in rows)
    text = (f"4 layers of Llama-3-8B's widths, seq 2048, {len(rows)} budgets: {within} of {len(rows)} choices "
            f"within budget, tokens/s {ratios} of the fastest layout that fits (planned with the "
            f"headroom by regime; see RESULTS.md for the re-plan at the 15% headroom of wide models)")
    return Figure("Planner", text, name, dated(data, "2026-12-04"),
                  "python benchmarks/planner.py --model 8b-width --seq 2048 --global-batch 2 --micro-batches 1,2 "
                  "--steps 2 --json benchmarks/planner_8b_width_trimmed.json")


def fault_injection() -> Figure | None:
    data = load("fault_injection.json")
    if data is None:
        return None
    inside = sum(row["inside_write"] for row in data["table"])
    runs = data["runs"]
    equal = sum(r["final_adapter_equals_reference"] for r in runs)
    text = (f"{data['total_kills']} `kill -9`s, {inside} inside a write; {equal} of {len(runs)} runs resumed to an "
            f"adapter equal to the uninterrupted run's; {data['final_adapter_mismatches']} mismatches, "
            f"{len(data['problems'])} invariant violations")
    return Figure("Reliability", text, "fault_injection.json", data["date"], "python " + data["command"])


def quality() -> Figure | None:
    data = load("quality.json")
    if data is None:
        return None
    final = {}
    for run in data["runs"]:
        final.setdefault(run["variant"], []).append(run["final_eval_loss"])
    base = statistics.mean(final["bf16"])
    labels = {"nf4": "NF4 QLoRA", "nf4_loftq": "NF4 + LoftQ", "nf4_dora": "NF4 DoRA", "int8": "LLM.int8"}
    parts = [f"{labels[v]} {pct(statistics.mean(final[v]) / base - 1)}" for v in labels if v in final]
    text = (f"final held-out eval loss against LoRA on the bf16 base (SmolLM2-135M, 100 steps, "
            f"{len(data['settings']['seeds'])} seeds): " + ", ".join(parts))
    return Figure("Adapter quality", text, "quality.json", data["settings"]["date"][:10],
                  "python benchmarks/quality.py")


def soak() -> Figure | None:
    data = load("soak.json")
    if data is None:
        return None
    by = {r["policy"]: r for r in data}
    text = (f"RSS growth after step 10 over {by['pad64']['steps']} demo steps: {pct(by['pad64']['growth'])} with "
            f"lengths padded to 64 (the default), {pct(by['pad1']['growth'])} without")
    return Figure("Long runs", text, "soak.json", "2026-11-29", "python benchmarks/soak.py")


def ddp() -> Figure | None:
    data = load("ddp_cpu.json")
    if data is None:
        return None
    one, rest = data[0], data[1:]
    def base(run: dict) -> float:   # what a rank holds of the 4-bit base: packed weights and their quant state
        return (run["ranks"][0]["base_weights"] + run["ranks"][0]["quant_state"]) / MIB

    parts = [f"{r['name']}: {r['step_s'] / one['step_s']:.2f}x the step time, base bytes per rank "
             f"{base(r):.1f} of {base(one):.1f} MiB" for r in rest]
    return Figure("Several processes (CPU, 2 cores)", "; ".join(parts), "ddp_cpu.json", "2026-11-29",
                  "python benchmarks/ddp_cpu.py")


def moe() -> Figure | None:
    data = load("moe.json")
    if data is None or "qwen3-30b-a3b" not in data:
        return None
    q = data["qwen3-30b-a3b"]
    experts = q["qlowrank_load"]["stored"]["experts"] / q["transformers_bnb_load"]["experts_bytes_left_float"]
    trainer = q["trainer_seq1024"]
    text = (f"Qwen3-30B-A3B's widths, {q['layers']} layers: 4-bit load {q['qlowrank_load']['anon_peak_gib']:.2f} GiB "
            f"RssAnon against transformers + BitsAndBytesConfig {q['transformers_bnb_load']['anon_peak_gib']:.2f} "
            f"(which leaves the experts bf16); experts stored at {experts:.3f}x their bf16 bytes; "
            f"`qlowrank train` at seq 1024 {trainer['anon_peak_gib']:.2f} GiB against a process estimate of "
            f"{trainer['estimate_process_gib']:.2f} ({pct(trainer['estimate_error'], 0)})")
    return Figure("Mixtures of experts", text, "moe.json", "2026-12-06",
                  "python benchmarks/moe.py --measure qwen3-30b-a3b --seqs 1024 2048")


def moe_load() -> Figure | None:
    data = load("moe_load.json")
    key = "qwen3-30b-a3b 4L 128e 4bit"
    if not isinstance(data, dict) or key not in data or "before" not in data[key]:
        return None
    row = data[key]
    text = (f"single-shard save_pretrained MoE checkpoint (Qwen3-30B-A3B's widths, 4 layers, {row['checkpoint_gib']:.2f} "
            f"GiB) into 4-bit, experts converted and quantized one at a time: peak RssAnon "
            f"{row['after']['anon_peak_gib']:.2f} GiB (a layer at a time before: {row['before']['anon_peak_gib']:.2f}); "
            f"the load estimate {row['estimate_load_gib']:.2f} GiB ({pct(row['after']['estimate_error'])})")
    return Figure("Loading mixtures of experts", text, "moe_load.json", dated(row, "2026-12-07"),
                  "python " + row["command"])


def preference() -> Figure | None:
    """examples/preference.py's figures (DPO after SFT), when its JSON is kept as benchmarks/preference.json."""
    data = load("preference.json")
    if not isinstance(data, dict) or "dpo" not in data:
        return None
    dpo, sft = data["dpo"], data["sft"]
    text = (f"DPO after SFT on {dpo['held_out_pairs']} held-out pairs: reward accuracy "
            f"{dpo['before']['eval_rewards/accuracies']:.2f} -> {dpo['after']['eval_rewards/accuracies']:.2f}, "
            f"reward margin {dpo['before']['eval_rewards/margins']:.3f} -> {dpo['after']['eval_rewards/margins']:.3f}, "
            f"log-prob accuracy {dpo['logp_accuracy_before']:.2f} -> {dpo['logp_accuracy_after']:.2f}; SFT held-out "
            f"loss {sft['held_out_loss_before']:.3f} -> {sft['held_out_loss_after']:.3f}")
    return Figure("Preference tuning", text, "preference.json", dated(data, "2026-12-07"),
                  data.get("command", "python examples/preference.py --out benchmarks/preference.json"))


def headlines() -> list[Figure]:
    """Rows of any JSON under benchmarks/ with a top-level "headline" list (see the module docstring)."""
    rows = []
    for path in sorted(HERE.glob("*.json")):
        data = load(path.name)
        if not isinstance(data, dict) or not isinstance(data.get("headline"), list):
            continue
        rows += [Figure(h["topic"], h["figure"], path.name, h.get("date", dated(data, "-")),
                        h.get("command", data.get("command", "-"))) for h in data["headline"]]
    return rows


# --- the GPU script (benchmarks/gpu_all.sh) -------------------------------------------------------------

def gpu_step_text(name: str, step: dict) -> str:
    """One step of gpu_all.json in a few words: its key figure, or how it ended."""
    result = step.get("result")
    if step.get("exit") != 0 or not result:
        return f"{name}: did not finish (exit {step.get('exit')})"
    if name == "gpu_memory":
        return (f"VRAM: estimate {pct(result['estimate_bytes'] / result['cuda_max_allocated'] - 1)} of max allocated, "
                f"allocator reserve {pct(result['reserve_ratio'])}, CUDA context "
                + ("n/a" if result.get("context_bytes") is None else f"{result['context_bytes'] / MIB:.0f} MiB"))
    if name == "gpu_vs_peft":
        return f"vs PEFT: {result['tokens_per_s_ratio']:.2f}x its tokens/s ({result['model']})"
    if name == "offload":
        return (f"offloaded activations: measured peak {result['measured_bytes'] / GIB:.2f} GiB, "
                f"estimate {pct(result['estimate_bytes'] / result['measured_bytes'] - 1)}")
    if name == "demo":
        d = result["demo"]
        return f"demo: eval loss {d['eval_loss_before']:.3f} -> {d['eval_loss_after']:.3f} in {result['wall_s']:.0f} s"
    if name == "cuda_tests":
        return f"`pytest -m cuda`: {result['summary']}"
    return f"{name}: done"


def gpu() -> Figure:
    data = load("gpu_all.json")
    if data is None:
        return Figure("GPU", f"not measured on a GPU yet: `{GPU_SCRIPT}` measures VRAM against the estimate, speed "
                      "against PEFT, activation offloading, the CUDA process margin and the demo", "gpu_all.json",
                      "-", GPU_SCRIPT)
    text = f"{data['device']}: " + "; ".join(gpu_step_text(n, s) for n, s in data["steps"].items())
    return Figure("GPU", text, "gpu_all.json", data["date"][:10], GPU_SCRIPT)


# --- rendering ----------------------------------------------------------------------------------------

def figures() -> list[Figure]:
    """Every summary figure whose JSON is present, in the order of RESULTS.md's sections."""
    makers: list[Callable[[], Figure | None]] = [
        lambda: vs_peft("vs_peft_smollm2_families.json", "smollm2", "SmolLM2-135M, batch 4 x 512", "2026-12-06",
                        "python benchmarks/vs_peft.py --models smollm2 --runs 2 --steps 3 "
                        "--out benchmarks/vs_peft_smollm2_families.json"),
        lambda: vs_peft("vs_peft_llama8b_4l.json", "llama8b_4l", "Llama-3-8B's widths, 4 layers, batch 1 x 2048",
                        "2026-12-04", "python benchmarks/vs_peft.py --models llama8b_4l --runs 2 --steps 3 --batch 1 "
                        "--seq 2048"),
        lambda: vs_peft("vs_peft_llama600m.json", "llama600m", "random Llama 554M, batch 4 x 512", "2026-11-29",
                        "python benchmarks/vs_peft.py --models llama600m --runs 2 --steps 3 "
                        "--libs qlowrank,peft,ql-compile"),
        levers, compile_speed, demo, estimate_accuracy, process_model, large_model, gguf_load, load_memory, planner, fault_injection,
        quality, soak, ddp, moe, moe_load, preference]
    found = [f for f in (make() for make in makers) if f is not None]
    return found + headlines() + [gpu()]


def link(source: str, prefix: str) -> str:
    return f"[{source}]({prefix}{source})" if (HERE / source).is_file() else f"{source} (not written yet)"


def render_table(prefix: str) -> str:
    """The summary table; `prefix` is the path from the page to benchmarks/."""
    lines = [f"Measured on {MACHINE} unless a row says otherwise. Regenerate with "
             "`python benchmarks/summary.py --write`.", "",
             "| topic | figure | source | date | command |", "|---|---|---|---|---|"]
    lines += [f"| {f.topic} | {f.figure} | {link(f.source, prefix)} | {f.date} | `{f.command}` |" for f in figures()]
    return "\n".join(lines)


def render_readme() -> str:
    """README's two headline bullets."""
    speed = vs_peft("vs_peft_smollm2_families.json", "smollm2", "", "", "")
    accuracy, held = load("estimate_accuracy.json"), process_errors()
    if speed is None or accuracy is None or held is None:
        raise SystemExit("benchmarks/summary.py: README's figures need vs_peft_smollm2_families.json, "
                         "estimate_accuracy.json and process_memory_errors.json under benchmarks/")
    data = load("vs_peft_smollm2_families.json")
    q, p = medians(data, "smollm2", "qlowrank"), medians(data, "smollm2", "peft")
    alloc = accuracy["summary"]["torch.profiler allocator"]
    exact = accuracy["summary"]["MemoryProfiler"]["worst"] == 0
    return "\n".join([
        f"- **{q['step_s'] / p['step_s']:.2f}x PEFT's time per step, {q['peak_rss_bytes'] / p['peak_rss_bytes']:.2f}x "
        f"its peak RSS**, same recipe and eval loss within {100 * abs(q['eval_loss'] / p['eval_loss'] - 1):.2f}% "
        "(SmolLM2-135M, NF4, r=16, batch 4 x 512, on a CPU; "
        "[vs_peft_smollm2_families.json](benchmarks/vs_peft_smollm2_families.json), "
        "[all figures](benchmarks/RESULTS.md)).",
        f"- **The memory estimate is {'the profiler' + chr(39) + 's figure to the byte' if exact else 'near the profiler'}**, "
        f"and within median {100 * alloc['median']:.2f}% of torch's own allocator timeline over "
        f"{accuracy['configurations']} configurations ([estimate_accuracy.json](benchmarks/estimate_accuracy.json)); "
        f"the whole-process figure is within median {100 * held['median']:.1f}% on {held['configurations']} "
        "held-out runs ([Memory](docs/memory.md#how-far-to-trust-it))."])


def render_install_demo() -> str:
    """docs/install.md's figures of the demo: demo.json, and the demo's row of process_memory.json."""
    data = load("demo.json")
    lines = []
    if data is None or not data.get("demo"):
        lines.append("- the demo's run time and losses are not recorded yet: `python benchmarks/demo.py` writes them;")
    else:
        d = data["demo"]
        lines += [
            f"- [demo.json](../benchmarks/demo.json) ({data['date'][:10]}, {d['device']}): evaluation, the "
            f"{d['steps']} steps and evaluation again take {d['seconds_eval_and_train']:.0f} s, the whole process "
            f"{data['wall_s']:.0f} s" + (f" (load average {data['loadavg_before']:.1f} -> {data['loadavg_after']:.1f} "
                                        f"on {data['machine']})" if "loadavg_before" in data else "") + ";",
            f"- held-out eval loss {d['eval_loss_before']:.3f} -> {d['eval_loss_after']:.3f} "
            f"({pct(d['eval_loss_after'] / d['eval_loss_before'] - 1, 0)}); the exported bf16 checkpoint, loaded with "
            f"plain transformers, scores {d['export_eval_loss_plain_transformers']:.4f};",
            f"- peak live tensors {d['peak_tensor_bytes'] / MIB:.0f} MiB;"]
    rows = {r["name"]: r for r in load("process_memory.json") or []}
    demo_row = rows.get("demo (smollm2 4-bit b4 s160)")
    if demo_row:
        lines.append(f"- the process's anonymous memory peaks at {demo_row['train_anon_peak'] / MIB:.0f} MiB while "
                     "training ([process_memory.json](../benchmarks/process_memory.json), the demo's settings);")
    return "\n".join(lines)


# page -> {block name: renderer}
BLOCKS: dict[str, dict[str, Callable[[], str]]] = {
    "benchmarks/RESULTS.md": {"table": lambda: render_table("")},
    "README.md": {"readme": render_readme},
    "docs/install.md": {"demo": render_install_demo},
}


def markers(name: str) -> tuple[str, str]:
    return f"<!-- summary:{name}:start -->", f"<!-- summary:{name}:end -->"


def replace_block(text: str, name: str, body: str, page: str) -> str:
    start, end = markers(name)
    pattern = re.compile(re.escape(start) + r"\n.*?" + re.escape(end), flags=re.S)
    if not pattern.search(text):
        raise SystemExit(f"{page}: no {start} ... {end} block; add the two markers where the block goes")
    return pattern.sub(lambda _: f"{start}\n{body}\n{end}", text, count=1)


def block_text(text: str, name: str) -> str | None:
    start, end = markers(name)
    found = re.search(re.escape(start) + r"\n(.*?)\n?" + re.escape(end), text, flags=re.S)
    return None if found is None else found.group(1)


def differences(pages: dict[str, str]) -> list[str]:
    """Each generated block (page -> its text) that differs from what the JSONs render now, named with its first
    differing line."""
    problems = []
    for page, blocks in BLOCKS.items():
        for name, render in blocks.items():
            found = block_text(pages[page], name)
            if found is None:
                problems.append(f"{page}: the summary:{name} block is missing")
                continue
            wanted = render()
            if found != wanted:
                line = next((f"{a!r} should read {b!r}" for a, b in zip(found.splitlines(), wanted.splitlines())
                             if a != b), "its length differs")
                problems.append(f"{page}: summary:{name} differs from the JSONs: {line}")
    return problems


def read_pages(root: Path = ROOT) -> dict[str, str]:
    return {page: (root / page).read_text() for page in BLOCKS}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--write", action="store_true", help="regenerate every block")
    parser.add_argument("--check", action="store_true", help="exit 1 if a block differs from the JSONs")
    args = parser.parse_args()
    if args.write:
        for page, blocks in BLOCKS.items():
            path = ROOT / page
            text = path.read_text()
            for name, render in blocks.items():
                text = replace_block(text, name, render(), page)
            path.write_text(text)
            print(f"wrote {page}")
        return 0
    if args.check:
        problems = differences(read_pages())
        print("\n".join(problems) or "every summary block matches the JSONs")
        return 1 if problems else 0
    print(render_table(""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
