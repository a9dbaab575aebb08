"""Predicted vs measured process memory: estimate_memory(...).process_bytes against the peak RSS of real training.

    flock /tmp/qlowrank-heavy.lock .venv/bin/python benchmarks/process_memory.py            # all configurations
    .venv/bin/python benchmarks/process_memory.py --only tiny-4bit                         # one, by name

Every configuration is measured in a fresh process that does what `qlowrank train` does:
`load_model` (streamed from safetensors, or the SmolLM2 GGUF), checkpointing unless
switched off, `Trainer` with bf16 autocast, the chunked loss and torch AdamW, on batches of
`seq` random tokens, for `--steps` steps (steps 1-2 under MemoryProfiler, as in training).
Measured: the process's peak RSS over the training steps (VmHWM reset after loading, i.e.
`MemoryProfiler.process_peak_bytes` extended to the whole run) and `ru_maxrss` over the whole
process. Predicted: `estimate_memory` with the same settings; the error is against the
training peak. The random checkpoints are written once per configuration by another fresh
process, so their construction does not count. Writes process_memory.json / .png to --out.
"""

from __future__ import annotations

import argparse
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
LLAMA_500M = dict(vocab_size=32000, hidden_size=1536, intermediate_size=4096, num_hidden_layers=16,
                  num_attention_heads=12, num_key_value_heads=4, tie_word_embeddings=False)   # 546M parameters
CONFIGS: dict[str, dict] = {
    "demo (smollm2 4-bit b4 s160)": dict(model=SMOLLM2, bits=4, batch=4, seq=160),
    "smollm2 8-bit b4 s160": dict(model=SMOLLM2, bits=8, batch=4, seq=160),
    "smollm2 float b4 s160": dict(model=SMOLLM2, bits=None, batch=4, seq=160),
    "smollm2 4-bit no-ckpt b4 s160": dict(model=SMOLLM2, bits=4, batch=4, seq=160, checkpointing=False),
    "smollm2 4-bit b2 s512": dict(model=SMOLLM2, bits=4, batch=2, seq=512),
    "smollm2 4-bit no-ckpt b2 s512": dict(model=SMOLLM2, bits=4, batch=2, seq=512, checkpointing=False),
    "llama-546M 4-bit b2 s256": dict(model=LLAMA_500M, bits=4, batch=2, seq=256),
    "llama-546M 8-bit b1 s256": dict(model=LLAMA_500M, bits=8, batch=1, seq=256),
    "tiny-4bit": dict(model=LLAMA_TINY, bits=4, batch=2, seq=64),
}


def _vm(key: str) -> int:
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    return 0


def settings_of(spec: dict) -> dict:
    """The spec with defaults filled in: r 16, checkpointing on, 3 steps."""
    return {"r": 16, "checkpointing": True, "steps": 3, **spec}


def quant_lora(spec: dict):
    import qlowrank as ql
    quant = ql.QuantConfig(bits=spec["bits"], compute_dtype=torch.bfloat16)
    return quant, ql.LoraConfig(r=spec["r"], alpha=2 * spec["r"])


def make_checkpoint(config_kwargs: dict, folder: Path) -> None:
    """A random Llama saved as bf16 safetensors (run in its own process)."""
    import transformers
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**config_kwargs)).to(torch.bfloat16)
    model.save_pretrained(folder)


def model_path(spec: dict, cache: Path) -> str:
    """The GGUF path, or a random checkpoint for the spec's config (written once, in a fresh process)."""
    if spec["model"] == SMOLLM2:
        from qlowrank.embedded import smollm2_gguf
        return str(smollm2_gguf())
    folder = cache / ("llama-" + "-".join(str(spec["model"][k]) for k in sorted(spec["model"])))
    if not (folder / "config.json").is_file():
        subprocess.run([sys.executable, str(HERE), "--make", json.dumps(spec["model"]), str(folder)], check=True)
    return str(folder)


def measure(spec: dict, path: str) -> dict:
    """Train in this process as `qlowrank train` would; return the measured figures."""
    import qlowrank as ql
    from qlowrank.train import Example, TrainConfig, Trainer

    quant, lora = quant_lora(spec)
    model = ql.load_model(path, quant=quant, lora=lora, device="cpu", dtype=torch.bfloat16, progress=False, seed=0)
    if spec["checkpointing"]:
        ql.enable_gradient_checkpointing(model)
    vocab = model.get_input_embeddings().num_embeddings
    generator = torch.Generator().manual_seed(0)
    examples = [Example(ids, list(ids)) for ids in
                torch.randint(0, vocab, (spec["batch"] * spec["steps"], spec["seq"]), generator=generator).tolist()]
    rss_loaded = _vm("VmRSS")
    with open("/proc/self/clear_refs", "w") as handle:   # VmHWM := VmRSS: the peak of training only
        handle.write("5")
    with tempfile.TemporaryDirectory() as out:
        config = TrainConfig(out_dir=out, steps=spec["steps"], batch_size=spec["batch"], precision="bf16",
                             progress=False, seed=0)
        result = Trainer(model, config, examples, []).train()
    return {"rss_loaded": rss_loaded, "train_peak_rss": _vm("VmHWM"),
            "ru_maxrss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
            "profiler_tensor_peak": result.memory["peak_bytes"], "profiler_process_peak": result.memory["rss_peak_bytes"]}


def predict(spec: dict, path: str):
    import qlowrank as ql
    quant, lora = quant_lora(spec)
    return ql.estimate_memory(path, quant=quant, lora=lora, batch_size=spec["batch"], seq_len=spec["seq"],
                              gradient_checkpointing=spec["checkpointing"], optimizer="adamw",
                              dtype=torch.bfloat16, device="cpu")


def run_config(name: str, cache: Path) -> dict:
    spec = settings_of(CONFIGS[name])
    path = model_path(spec, cache)
    with tempfile.NamedTemporaryFile(suffix=".json") as handle:
        subprocess.run([sys.executable, str(HERE), "--worker", json.dumps(spec), path, handle.name], check=True)
        measured = json.loads(Path(handle.name).read_text())
    estimate = predict(spec, path)
    return {"name": name, **measured, "predicted_process": estimate.process_bytes,
            "predicted_tensor": estimate.total_bytes,
            "error": estimate.process_bytes / measured["train_peak_rss"] - 1}


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 6))
    gib = 2**30
    xs = [r["train_peak_rss"] / gib for r in rows]
    ys = [r["predicted_process"] / gib for r in rows]
    ax.scatter(xs, ys)
    for r, x, y in zip(rows, xs, ys):
        ax.annotate(r["name"], (x, y), fontsize=7, xytext=(4, -3), textcoords="offset points")
    top = max(xs + ys) * 1.1
    ax.plot([0, top], [0, top], color="grey", lw=0.6)
    ax.fill_between([0, top], [0, 0.95 * top], [0, 1.05 * top], color="grey", alpha=0.15, label="within 5%")
    ax.set_xlabel("measured peak RSS of training (GiB)")
    ax.set_ylabel("estimate_memory(...).process_bytes (GiB)")
    ax.set_title("process memory: predicted vs measured (CPU, fresh process each)")
    ax.legend()
    fig.savefig(path, dpi=110, bbox_inches="tight")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", action="append", choices=sorted(CONFIGS), help="run only this configuration")
    parser.add_argument("--out", default="benchmarks/process_memory", help="folder for the JSON and the plot")
    parser.add_argument("--cache", default=os.path.join(tempfile.gettempdir(), "qlowrank-process-memory"),
                        help="where the random checkpoints are kept between runs")
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
    names = args.only or [n for n in CONFIGS if n != "tiny-4bit"]
    rows = []
    for name in names:
        rows.append(run_config(name, Path(args.cache)))
        r = rows[-1]
        print(f"{name}: predicted {r['predicted_process'] / 2**20:.0f} MiB, measured {r['train_peak_rss'] / 2**20:.0f} MiB "
              f"({100 * r['error']:+.1f}%)", flush=True)
    mib = 2**20
    print(f"\n| configuration | tensor peak (est.) | process (est.) | measured train peak RSS | error | ru_maxrss |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['name']} | {r['predicted_tensor'] / mib:.0f} MiB | {r['predicted_process'] / mib:.0f} MiB | "
              f"{r['train_peak_rss'] / mib:.0f} MiB | {100 * r['error']:+.1f}% | {r['ru_maxrss'] / mib:.0f} MiB |")
    errors = sorted(abs(r["error"]) for r in rows)
    print(f"\n|error| median {100 * errors[len(errors) // 2]:.1f}%, worst {100 * errors[-1]:.1f}% over {len(rows)} "
          "configurations")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "process_memory.json").write_text(json.dumps(rows, indent=1))
    plot(rows, out / "process_memory.png")
    print(f"wrote {out / 'process_memory.json'}, {out / 'process_memory.png'}")


if __name__ == "__main__":
    main()
