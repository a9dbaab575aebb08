"""Predicted vs measured process memory: estimate_memory(...).process_bytes against the peak RSS of real training.

    flock /tmp/qlowrank-heavy.lock .venv/bin/python benchmarks/process_memory.py          # all 17, ~25 min here
    flock /tmp/qlowrank-heavy.lock .venv/bin/python benchmarks/process_memory.py --only tiny-4bit
    .venv/bin/python benchmarks/process_memory.py --fit benchmarks/process_memory.json      # re-derive the constants
    .venv/bin/python benchmarks/process_memory.py --repredict benchmarks/process_memory.json --out DIR

Every configuration is measured in a fresh process that does what `qlowrank train` does:
`load_model` (streamed from safetensors, or the SmolLM2 GGUF), checkpointing unless
switched off, `Trainer` with bf16 autocast, the chunked loss and torch AdamW, on batches of
`seq` random tokens (fixed length), for 3 steps (steps 1-2 under MemoryProfiler, as in
training). Measured: the peak RSS while loading (VmHWM after `load_model`) and while
training (VmHWM reset after loading, i.e. `MemoryProfiler.process_peak_bytes` extended to the
whole run); the process peak is the larger, what ru_maxrss of an untouched process reports.
Also recorded: RSS split into anonymous and file pages, and glibc's heap statistics, after
importing, after loading and after training. Predicted: `estimate_memory` with the same
settings. The random checkpoints are written once per configuration by another fresh
process, so their construction does not count. Writes process_memory.json / .png to --out.

`--fit` derives the CPU constants of qlowrank/memory/process.py from the configurations in
FIT (the rest are held out) and prints the table with the model as it is now in process.py.
Every mode also writes process_memory_errors.json (beside the JSON --fit reads, or in --out):
each configuration's role and error, and the median and worst |error| of the held-out ones.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

HERE = Path(__file__).resolve()

# name -> settings; "model": "smollm2" (the embedded GGUF) or a LlamaConfig's keyword arguments
SMOLLM2 = "smollm2"
LLAMA_TINY = dict(vocab_size=512, hidden_size=128, intermediate_size=344, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, tie_word_embeddings=False)
LLAMA_SMOLLM2_SHAPE = dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                           num_attention_heads=9, num_key_value_heads=3, tie_word_embeddings=True)  # random weights, safetensors
LLAMA_MID = dict(vocab_size=16384, hidden_size=512, intermediate_size=1376, num_hidden_layers=4, num_attention_heads=8,
                 num_key_value_heads=2, tie_word_embeddings=False)   # tests/test_process_rss.py's "mid"
LLAMA_500M = dict(vocab_size=32000, hidden_size=1536, intermediate_size=4096, num_hidden_layers=16,
                  num_attention_heads=12, num_key_value_heads=4, tie_word_embeddings=False)   # 501M parameters
LLAMA_1B = dict(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
                num_key_value_heads=4, tie_word_embeddings=False)   # TinyLlama-1.1B's shape
L8B_WIDTH = dict(vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_attention_heads=32,
                 num_key_value_heads=8, tie_word_embeddings=False, rope_theta=500000.0)   # Llama-3-8B's widths
L8B_2L, L8B_4L = dict(L8B_WIDTH, num_hidden_layers=2), dict(L8B_WIDTH, num_hidden_layers=4)
CONFIGS: dict[str, dict] = {
    "tiny-4bit": dict(model=LLAMA_TINY, bits=4, batch=2, seq=64),
    "demo (smollm2 4-bit b4 s160)": dict(model=SMOLLM2, bits=4, batch=4, seq=160),
    "smollm2 8-bit b4 s160": dict(model=SMOLLM2, bits=8, batch=4, seq=160),
    "smollm2 float b4 s160": dict(model=SMOLLM2, bits=None, batch=4, seq=160),
    "smollm2 4-bit no-ckpt b2 s512": dict(model=SMOLLM2, bits=4, batch=2, seq=512, checkpointing=False),
    "smollm2-shape safetensors 4-bit b4 s160": dict(model=LLAMA_SMOLLM2_SHAPE, bits=4, batch=4, seq=160),
    "llama-mid 4-bit b4 s256": dict(model=LLAMA_MID, bits=4, batch=4, seq=256),
    "llama-mid 4-bit b4 s256 accum 4": dict(model=LLAMA_MID, bits=4, batch=4, seq=256, accum=4),
    "llama-mid 4-bit b8 s128 packed": dict(model=LLAMA_MID, bits=4, batch=8, seq=128, packing=True),
    "llama-mid 4-bit dora b2 s512": dict(model=LLAMA_MID, bits=4, batch=2, seq=512, dora=True),
    "llama-mid 4-bit pissa b4 s256": dict(model=LLAMA_MID, bits=4, batch=4, seq=256, init="pissa"),
    "llama-mid 4-bit loftq no-ckpt b2 s1024": dict(model=LLAMA_MID, bits=4, batch=2, seq=1024, init="loftq",
                                                   checkpointing=False),
    "llama-501M 4-bit b2 s256": dict(model=LLAMA_500M, bits=4, batch=2, seq=256),
    "llama-501M 8-bit b1 s256": dict(model=LLAMA_500M, bits=8, batch=1, seq=256),
    "llama-1.1B 4-bit b1 s1024": dict(model=LLAMA_1B, bits=4, batch=1, seq=1024),
    "8B-width 2L 4-bit b1 s512": dict(model=L8B_2L, bits=4, batch=1, seq=512),
    "8B-width 2L 4-bit b1 s2048": dict(model=L8B_2L, bits=4, batch=1, seq=2048),
    "8B-width 2L 8-bit b1 s512": dict(model=L8B_2L, bits=8, batch=1, seq=512),
    "8B-width 2L float b1 s512": dict(model=L8B_2L, bits=None, batch=1, seq=512),
    "8B-width 4L 4-bit b1 s1024": dict(model=L8B_4L, bits=4, batch=1, seq=1024),
    "8B-width 4L 8-bit b1 s512": dict(model=L8B_4L, bits=8, batch=1, seq=512),
    "8B-width 4L 4-bit b8 s128": dict(model=L8B_4L, bits=4, batch=8, seq=128),
    "8B-width 4L 4-bit b1 s2048": dict(model=L8B_4L, bits=4, batch=1, seq=2048),
}
# At Llama-3-8B's widths checkpointed blocks trim glibc's heaps before their backward
# (qlowrank/heap.py); the same configurations measured before that (QLOWRANK_HEAP_TRIM=0, the
# behaviour of narrower models) are kept as "... untrimmed": the untrimmed constants are fitted on them.
CONFIGS.update({f"{name} untrimmed": dict(spec, heap_trim=False) for name, spec in list(CONFIGS.items())
                if name.startswith("8B-width")})


def _vm(key: str) -> int:
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    return 0


def _status() -> dict:
    """RSS split into anonymous and file-backed pages, and glibc's heap statistics (mallinfo2)."""
    from qlowrank.heap import heap_statistics

    out = {key: _vm(key) for key in ("VmRSS", "RssAnon", "RssFile")}
    heap = heap_statistics()
    if heap:
        out.update({"heap_in_use": heap["uordblks"], "heap_free": heap["fordblks"], "mmapped": heap["hblkhd"]})
    return out


def settings_of(spec: dict) -> dict:
    """The spec with defaults filled in: r 16, checkpointing on, 3 steps."""
    return {"r": 16, "checkpointing": True, "steps": 3, "accum": 1, "packing": False, "dora": False,
            "init": "kaiming", "heap_trim": True, **spec}


def quant_lora(spec: dict):
    import qlowrank as ql
    quant = ql.QuantConfig(bits=spec["bits"], compute_dtype=torch.bfloat16)
    return quant, ql.LoraConfig(r=spec["r"], alpha=2 * spec["r"], use_dora=spec["dora"], init=spec["init"])


def make_checkpoint(config_kwargs: dict, folder: Path) -> None:
    """A random Llama saved as bf16 safetensors, one shard per layer (run in its own process)."""
    import transformers
    sys.path.insert(0, str(HERE.parent))
    from large_model import write_shards
    write_shards(transformers.LlamaConfig(**config_kwargs), folder)


def model_path(spec: dict, cache: Path) -> str:
    """The GGUF path, or a random checkpoint for the spec's config (written once, in a fresh process)."""
    if spec["model"] == SMOLLM2:
        from qlowrank.model.embedded import smollm2_gguf
        return str(smollm2_gguf())
    folder = cache / ("llama-" + "-".join(str(spec["model"][k]) for k in sorted(spec["model"])))
    if not (folder / "config.json").is_file():
        subprocess.run([sys.executable, str(HERE), "--make", json.dumps(spec["model"]), str(folder)], check=True)
    return str(folder)


def training_examples(spec: dict, vocab: int):
    """Fixed-length random examples; packed ones hold two whole examples per window."""
    from qlowrank.train import Example

    generator = torch.Generator().manual_seed(0)
    count = spec["batch"] * spec["steps"] * spec["accum"]
    ids = torch.randint(0, vocab, (count, spec["seq"]), generator=generator).tolist()
    if not spec["packing"]:
        return [Example(row, list(row)) for row in ids]
    from qlowrank.data.batch import pack_examples
    halves = [Example(row[:n], list(row[:n])) for row in ids for n in (spec["seq"] // 2,)] * 2
    return pack_examples(halves, spec["seq"])


def measure(spec: dict, path: str) -> dict:
    """Train in this process as `qlowrank train` would; return the measured figures (anonymous
    and file-backed peaks sampled every 10 ms per phase, VmHWM per phase)."""
    import qlowrank as ql
    from qlowrank.memory.sampler import StatusSampler
    from qlowrank.train import TrainConfig, Trainer

    quant, lora = quant_lora(spec)
    imported = _status()
    sampler = StatusSampler().start()
    model = ql.load_model(path, quant=quant, lora=lora, device="cpu", dtype=torch.bfloat16, progress=False, seed=0)
    load = sampler.stop()
    if spec["checkpointing"]:
        ql.enable_gradient_checkpointing(model)
    examples = training_examples(spec, model.get_input_embeddings().num_embeddings)
    rss_loaded, load_peak, loaded = _vm("VmRSS"), _vm("VmHWM"), _status()
    base_bytes = sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))
    with open("/proc/self/clear_refs", "w") as handle:   # VmHWM := VmRSS: the peak of training only
        handle.write("5")
    with tempfile.TemporaryDirectory() as out, StatusSampler() as train:
        config = TrainConfig(out_dir=out, steps=spec["steps"], batch_size=spec["batch"], precision="bf16",
                             progress=False, seed=0, grad_accum=spec["accum"])
        result = Trainer(model, config, examples, []).train()
    return {"rss_loaded": rss_loaded, "load_peak_rss": load_peak, "model_bytes_loaded": base_bytes,
            "load_anon_peak": load["RssAnon"], "load_file_peak": load["RssFile"],
            "train_anon_peak": train.anon_peak, "train_file_peak": train.file_peak,
            "source_bytes": sum(f.stat().st_size for f in Path(path).parent.glob(Path(path).name)) if Path(path).is_file()
            else sum(f.stat().st_size for f in Path(path).glob("*.safetensors")),
            "train_peak_rss": _vm("VmHWM"), "status_imported": imported, "status_loaded": loaded,
            "status_trained": _status(),
            "ru_maxrss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
            "profiler_tensor_peak": result.memory["peak_bytes"], "profiler_process_peak": result.memory["rss_peak_bytes"]}


def predict(spec: dict, path: str):
    import qlowrank as ql
    quant, lora = quant_lora(spec)
    return ql.estimate_memory(path, quant=quant, lora=lora, batch_size=spec["batch"], seq_len=spec["seq"],
                              gradient_checkpointing=spec["checkpointing"], optimizer="adamw",
                              dtype=torch.bfloat16, device="cpu", grad_accum=spec["accum"], packing=spec["packing"])


def prediction(spec: dict, path: str) -> dict:
    """The estimate's figures and the sizes the process model read (kept, so --fit needs no model files)."""
    estimate = predict(spec, path)
    if not spec.get("heap_trim", True):   # measured with QLOWRANK_HEAP_TRIM=0
        estimate.facts = dataclasses.replace(estimate.facts, heap_trimmed=False, blocks_trim=False)
    parts = estimate.process_breakdown
    return {"predicted_process": estimate.process_bytes, "predicted_tensor": estimate.total_bytes,
            "predicted_training_peak": parts["training_peak"], "predicted_load_peak": parts["load_peak"],
            "predicted_file_backed": estimate.file_backed_bytes, "predicted_terms": parts,
            "facts": dataclasses.asdict(estimate.facts)}


def with_errors(row: dict) -> dict:
    """Errors of the anonymous figures: the process (larger of loading and training) and each phase."""
    row["process_anon_peak"] = max(row["load_anon_peak"], row["train_anon_peak"])
    row["error"] = row["predicted_process"] / row["process_anon_peak"] - 1
    row["load_error"] = row["predicted_load_peak"] / row["load_anon_peak"] - 1
    row["training_error"] = row["predicted_training_peak"] / row["train_anon_peak"] - 1
    return row


def run_config(name: str, cache: Path) -> dict:
    spec = settings_of(CONFIGS[name])
    path = model_path(spec, cache)
    with tempfile.NamedTemporaryFile(suffix=".json") as handle:
        # Through a shell that forks (not execs) the worker: a child exec'd straight from this process
        # inherits this process's high-water mark in ru_maxrss (Linux keeps the larger of the pre-exec
        # mm's peak and its own), so ru_maxrss would report this driver's RSS, not the worker's.
        subprocess.run(["/bin/sh", "-c", '"$@"; exit $?', "sh", sys.executable, str(HERE), "--worker",
                        json.dumps(spec), path, handle.name], check=True,
                       env={**os.environ, "QLOWRANK_HEAP_TRIM": "1" if spec["heap_trim"] else "0"})
        measured = json.loads(Path(handle.name).read_text())
    return with_errors({"name": name, "spec": spec, **measured, **prediction(spec, path)})


# The configurations each CPU constant of qlowrank/memory/process.py is fitted on (the rest are held out).
FIT = {"runtime": ("tiny-4bit",),
       "heap": ("smollm2 float b4 s160", "demo (smollm2 4-bit b4 s160)", "smollm2 8-bit b4 s160",
                "8B-width 2L 4-bit b1 s2048 untrimmed", "8B-width 2L 8-bit b1 s512 untrimmed",
                "full 8B s2048 (qlowrank profile, issue 20)"),
       "trimmed_heap": ("8B-width 2L 4-bit b1 s2048", "8B-width 2L 8-bit b1 s512", "full 8B s2048 trimmed"),
       "load": ("8B-width 2L 4-bit b1 s2048 untrimmed", "8B-width 2L 8-bit b1 s512 untrimmed")}
HEAP_TERMS = ("temporaries", "layer_residue", "dequant", "int8")   # process.py's CPU_*_KEPT keys
# Measured outside this driver and used in the fits: `qlowrank profile` on the full Llama-3-8B
# shape (4-bit, r=16, batch 1, seq 2048, 2 steps; issue 20, 2026-12-03, before heap trimming):
# anonymous peak 10.27 GiB; and benchmarks/large_model.py's seq 2048 phase with trimming in a
# fresh process (--skip-seq 512 --skip-export --steps 2; 2026-12-04).
TRIMMED_FULL_8B_S2048 = int(9.61 * 2**30)   # GiB as large_model.py prints it
EXTERNAL = {"full 8B s2048 (qlowrank profile, issue 20)": dict(train_anon_peak=int(10.27 * 2**30), seq=2048,
                                                                heap_trim=False),
            "full 8B s2048 trimmed": dict(train_anon_peak=TRIMMED_FULL_8B_S2048, seq=2048, heap_trim=True)}


def heap_row(facts: dict) -> list[float]:
    """Each heap term's multiplier (HEAP_TERMS order), as qlowrank/memory/process.py computes it."""
    quantized, int8 = facts["bits"] in (4, 8), facts["bits"] == 8
    trimmed = facts.get("heap_trimmed", False)
    from qlowrank.memory.process import ModelFacts, int8_kept_params

    residue = 0 if trimmed else 2 * facts["layers"] * facts["hidden_tokens"]
    known = {f.name for f in dataclasses.fields(ModelFacts)}
    kept_int8 = int8_kept_params(ModelFacts(**{k: v for k, v in facts.items() if k in known}))
    return [0 if int8 else facts["temporary_bytes"], residue, 2 * facts["heap_dequant_params"] if quantized else 0,
            kept_int8 if int8 else 0]


def external_rows() -> list[dict]:
    """EXTERNAL with the estimate's figures for their settings (from the config: no files needed)."""
    import transformers

    import qlowrank as ql
    rows = []
    for name, run in EXTERNAL.items():
        config = transformers.LlamaConfig(**dict(L8B_WIDTH, num_hidden_layers=32, vocab_size=128256))
        estimate = ql.estimate_memory(config, quant=ql.QuantConfig(bits=4, compute_dtype=torch.bfloat16),
                                      lora=ql.LoraConfig(r=16, alpha=32), batch_size=1, seq_len=run["seq"], device="cpu")
        facts = dataclasses.replace(estimate.facts, heap_trimmed=run["heap_trim"])
        rows.append({"name": name, "train_anon_peak": run["train_anon_peak"], "predicted_tensor": estimate.total_bytes,
                     "facts": dataclasses.asdict(facts)})
    return rows


def fit(rows: list[dict]) -> dict:
    """Fit the CPU constants on the FIT configurations' anonymous peaks (closed form / least squares)."""
    import numpy as np

    by = {r["name"]: r for r in rows + external_rows()}
    tiny = by[FIT["runtime"][0]]
    runtime = tiny["train_anon_peak"] - tiny["predicted_tensor"]
    load_runtime = tiny["load_anon_peak"] - tiny["facts"]["base_bytes"]
    constants = {"CPU_RUNTIME_BYTES (MiB)": runtime / 2**20, "CPU_LOAD_RUNTIME_BYTES (MiB)": load_runtime / 2**20}
    for regime, prefix in (("heap", "CPU_UNTRIMMED_KEPT"), ("trimmed_heap", "CPU_TRIMMED_KEPT")):
        heap = [by[n] for n in FIT[regime]]
        a = np.array([heap_row(r["facts"]) for r in heap], dtype=float)
        y = np.array([r["train_anon_peak"] - runtime - r["predicted_tensor"] for r in heap], dtype=float)
        used = [i for i in range(len(HEAP_TERMS)) if a[:, i].any()]   # trimmed: no layer residue term
        solution = np.linalg.lstsq(a[:, used], y, rcond=None)[0]
        constants.update({f"{prefix}[{HEAP_TERMS[i]}]": value for i, value in zip(used, solution)})
    for name in FIT["load"]:
        r, f = by[name], by[name]["facts"]
        constants[f"CPU_LOAD_TRANSIENT[{f['bits']}]"] = ((r["load_anon_peak"] - load_runtime - f["base_bytes"])
                                                       / (2 * f["largest_linear"]))
    return constants


def fitted_names() -> set[str]:
    return {n for v in FIT.values() for n in v}


def median(values: list[float]) -> float:
    ordered = sorted(values)
    return (ordered[(len(ordered) - 1) // 2] + ordered[len(ordered) // 2]) / 2


def print_table(rows: list[dict]) -> None:
    mib = 2**20
    fitted = fitted_names()
    print("\n| configuration | role | tensor peak (est.) | load anon est. / measured | training anon est. / measured "
          "| process anon est. / measured | error | file-backed measured / bound |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['name']} | {'fit' if r['name'] in fitted else 'held out'} | {r['predicted_tensor'] / mib:.0f} MiB | "
              f"{r['predicted_load_peak'] / mib:.0f} / {r['load_anon_peak'] / mib:.0f} MiB | "
              f"{r['predicted_training_peak'] / mib:.0f} / {r['train_anon_peak'] / mib:.0f} MiB | "
              f"{r['predicted_process'] / mib:.0f} / {r['process_anon_peak'] / mib:.0f} MiB | {100 * r['error']:+.1f}% | "
              f"{max(r['load_file_peak'], r['train_file_peak']) / mib:.0f} / {r['predicted_file_backed'] / mib:.0f} MiB |")
    for label, figures in error_summary(rows)["summary"].items():
        print(f"|error| {label}: median {100 * figures['median']:.1f}%, worst {100 * figures['worst']:.1f}% "
              f"over {figures['configurations']} configurations")


def error_summary(rows: list[dict]) -> dict:
    """Each configuration's role and errors, and |error|'s median and worst per subset (process_memory_errors.json)."""
    fitted = fitted_names()
    held = [r for r in rows if r["name"] not in fitted]
    summary = {}
    for label, subset, key in (("process, all", rows, "error"), ("process, held out", held, "error"),
                               ("training phase, held out", held, "training_error"),
                               ("load phase, held out", held, "load_error")):
        if subset:
            errors = [abs(r[key]) for r in subset]
            # the worst keeps its sign: a low prediction is the dangerous one
            worst = max((r[key] for r in subset), key=abs)
            summary[label] = {"median": median(errors), "worst": abs(worst), "worst_signed": worst,
                              "configurations": len(subset)}
    return {"summary": summary,
            "configurations": [{"name": r["name"], "role": "fit" if r["name"] in fitted else "held out",
                                "error": r["error"], "predicted_process": r["predicted_process"],
                                "process_anon_peak": r["process_anon_peak"]} for r in rows]}


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 6.5))
    gib = 2**30
    fitted = fitted_names()
    for used, marker, label in ((True, "s", "used to fit the constants"), (False, "o", "held out")):
        subset = [r for r in rows if (r["name"] in fitted) == used]
        ax.scatter([r["process_anon_peak"] / gib for r in subset], [r["predicted_process"] / gib for r in subset],
                   marker=marker, label=label)
        for r in subset:
            ax.annotate(r["name"], (r["process_anon_peak"] / gib, r["predicted_process"] / gib), fontsize=6,
                        xytext=(4, -3), textcoords="offset points")
    top = max(max(r["process_anon_peak"], r["predicted_process"]) for r in rows) / gib * 1.1
    ax.plot([0, top], [0, top], color="grey", lw=0.6)
    ax.fill_between([0, top], [0, 0.95 * top], [0, 1.05 * top], color="grey", alpha=0.15, label="within 5%")
    ax.set_xlim(0, top)
    ax.set_ylim(0, top)
    ax.set_xlabel("measured anonymous peak of the process (GiB): max(loading, training)")
    ax.set_ylabel("estimate_memory(...).process_bytes (GiB)")
    ax.set_title("process memory on a CPU: predicted vs measured (fresh process each)")
    ax.legend(loc="upper left")
    fig.savefig(path, dpi=110, bbox_inches="tight")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", action="append", choices=sorted(CONFIGS), help="run only this configuration")
    parser.add_argument("--out", default="benchmarks/process_memory", help="folder for the JSON and the plot")
    parser.add_argument("--cache", default=os.path.join(tempfile.gettempdir(), "qlowrank-process-memory"),
                        help="where the random checkpoints are kept between runs")
    parser.add_argument("--fit", metavar="JSON", help="derive process.py's CPU constants from a run's JSON, "
                        "then print the table (measures nothing)")
    parser.add_argument("--repredict", metavar="JSON", help="the current process model against a run's measurements")
    parser.add_argument("--worker", nargs=3, help=argparse.SUPPRESS)
    parser.add_argument("--make", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.make:
        make_checkpoint(json.loads(args.make[0]), Path(args.make[1]))
        return
    if args.worker:
        spec, path, out = json.loads(args.worker[0]), args.worker[1], Path(args.worker[2])
        out.write_text(json.dumps(measure(spec, path)))
        return
    out = Path(args.out)
    if args.fit or args.repredict:   # no measurement: the figures of an earlier run
        rows = json.loads(Path(args.fit or args.repredict).read_text())
        if args.repredict:   # the current process model on those measurements (needs the model files)
            for r in rows:
                spec = settings_of(CONFIGS[r["name"]])
                r.update(spec=spec, **prediction(spec, model_path(spec, Path(args.cache))))
        if args.fit:
            for name, value in fit(rows).items():
                print(f"{name} = {value:.3f}")
    else:
        rows = []
        for name in args.only or list(CONFIGS):
            rows.append(run_config(name, Path(args.cache)))
            r = rows[-1]
            print(f"{name}: predicted {r['predicted_process'] / 2**20:.0f} MiB, measured {r['process_anon_peak'] / 2**20:.0f} "
                  f"MiB ({100 * r['error']:+.1f}%)", flush=True)
            out.mkdir(parents=True, exist_ok=True)   # after each configuration: a long run keeps what it measured
            (out / "process_memory.json").write_text(json.dumps(rows, indent=1))
    rows = [with_errors(r) for r in rows]
    print_table(rows)
    errors = Path(args.fit).with_name("process_memory_errors.json") if args.fit else out / "process_memory_errors.json"
    errors.parent.mkdir(parents=True, exist_ok=True)
    errors.write_text(json.dumps({"command": " ".join(["benchmarks/process_memory.py", *sys.argv[1:]]),
                                  "measurements": "process_memory.json", **error_summary(rows)}, indent=1) + "\n")
    if args.fit:
        return
    out.mkdir(parents=True, exist_ok=True)
    (out / "process_memory.json").write_text(json.dumps(rows, indent=1))
    plot(rows, out / "process_memory.png")
    print(f"wrote {out / 'process_memory.json'}, {out / 'process_memory.png'}")

if __name__ == "__main__":
    main()
