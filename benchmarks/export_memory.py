"""Export peak memory: export_merged with and without its fidelity probe, and the safetensors writers, on an 8B-wide model.

    flock /tmp/qlowrank-heavy.lock nice -n 10 .venv/bin/python benchmarks/export_memory.py [--layers 4] [--code DIR ...]

1. Writes a random bf16 Llama with Llama-3-8B's widths (hidden 4096, MLP 14336, 32/8 heads)
   but `--layers` layers and vocab 32000, one safetensors shard per layer, into a temporary
   folder (deleted at the end).
2. For each `--code` folder (a copy of the package, e.g. `git archive <commit> qlowrank`;
   default: this checkout; the writer runs of step 3 use the last one), in a fresh process: load_model to NF4 with LoRA r=16 on all
   linear layers (B perturbed, as after training), then export_merged(dtype=bf16) twice,
   without and with the probe. A thread samples /proc/self/status every 10 ms: the peaks of
   RssAnon, RssFile (memory-mapped files: transformers' from_pretrained maps the shards it
   loads, so a whole-model probe shows up there) and their sum; VmHWM is the kernel's
   high-water mark of the whole process.
3. The safetensors writers, each in a fresh process, on one shard of 8 tensors of
   4096 x 14336 bf16 (0.94 GB): the streamed writer of export/safetensors.py against
   `safetensors.torch.save_file` and `safetensors.serialize_file`.
Prints one JSON line per measurement (GiB).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

GIB = 2**30
WIDTHS = dict(hidden_size=4096, intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8,
              vocab_size=32000)


def status() -> dict[str, int]:
    """RssAnon, RssFile, VmHWM of this process, in bytes."""
    fields = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        name, _, value = line.partition(":")
        if name in ("RssAnon", "RssFile", "VmHWM"):
            fields[name] = int(value.split()[0]) * 1024
    return fields


class Sampler:
    """The highest RssAnon, RssFile and RssAnon + RssFile seen while the block runs, sampled every 10 ms."""

    def __enter__(self):
        self.anon = self.file = self.total = 0
        self.running = True
        self._sample()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        return self

    def _sample(self):
        now = status()
        self.anon = max(self.anon, now["RssAnon"])
        self.file = max(self.file, now["RssFile"])
        self.total = max(self.total, now["RssAnon"] + now["RssFile"])

    def _run(self):
        while self.running:
            self._sample()
            time.sleep(0.01)

    def __exit__(self, *exc):
        self.running = False
        self.thread.join()
        self._sample()

    def gib(self, prefix: str) -> dict:
        return {f"{prefix}_anon": self.anon / GIB, f"{prefix}_file": self.file / GIB, f"{prefix}_anon_plus_file": self.total / GIB}


def write_model(folder: Path, layers: int) -> None:
    """Random N(0, 0.02) bf16 weights, one shard per layer (one layer in memory at a time)."""
    import torch
    import transformers
    from safetensors.torch import save_file

    config = transformers.LlamaConfig(num_hidden_layers=layers, tie_word_embeddings=False, **WIDTHS)
    config.save_pretrained(folder)
    hidden, mlp, kv = config.hidden_size, config.intermediate_size, config.hidden_size // 4
    generator = torch.Generator().manual_seed(0)

    def rand(*shape):
        return (torch.randn(*shape, generator=generator) * 0.02).to(torch.bfloat16)

    shards = [{"model.embed_tokens.weight": rand(config.vocab_size, hidden)}]
    for i in range(layers):
        p = f"model.layers.{i}."
        shards.append({p + "self_attn.q_proj.weight": rand(hidden, hidden), p + "self_attn.k_proj.weight": rand(kv, hidden),
                       p + "self_attn.v_proj.weight": rand(kv, hidden), p + "self_attn.o_proj.weight": rand(hidden, hidden),
                       p + "mlp.gate_proj.weight": rand(mlp, hidden), p + "mlp.up_proj.weight": rand(mlp, hidden),
                       p + "mlp.down_proj.weight": rand(hidden, mlp), p + "input_layernorm.weight": torch.ones(hidden, dtype=torch.bfloat16),
                       p + "post_attention_layernorm.weight": torch.ones(hidden, dtype=torch.bfloat16)})
    shards.append({"model.norm.weight": torch.ones(hidden, dtype=torch.bfloat16), "lm_head.weight": rand(config.vocab_size, hidden)})
    weight_map = {}
    for i, tensors in enumerate(shards, 1):
        name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(tensors, str(folder / name), metadata={"format": "pt"})
        weight_map.update({key: name for key in tensors})
        shards[i - 1] = None   # free this layer before the next
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


def measure_export(model_dir: Path, out: Path) -> dict:
    """load_model (NF4 + LoRA r=16) then export_merged without and with the probe; peaks in GiB."""
    import torch

    import qlowrank as ql

    quant = ql.QuantConfig(bits=4, compute_dtype=torch.bfloat16)
    lora = ql.LoraConfig(r=16, alpha=32, target_modules="all-linear")
    model = ql.load_model(model_dir, quant=quant, lora=lora, device="cpu", progress=False, seed=0)
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for _, layer in ql.lora_layers(model):
            layer.lora_B.weight.copy_(torch.randn(layer.lora_B.weight.shape, generator=generator) * 0.01)
    now = status()
    result = {"trained_anon": now["RssAnon"] / GIB, "trained_file": now["RssFile"] / GIB}
    for probe in (False, True):
        with Sampler() as sampler:
            report = ql.export_merged(model, out / f"probe-{probe}", dtype=torch.bfloat16, progress=False, probe=probe)
        result.update(sampler.gib(f"export_probe_{probe}"))
        shutil.rmtree(out / f"probe-{probe}")
    result.update({"vmhwm": status()["VmHWM"] / GIB, "shards": report["shards"], "total_bytes": report["total_bytes"] / GIB,
                   "relative_logits_error": report["relative_logits_error"], "argmax_agreement": report["argmax_agreement"]})
    return result


def measure_writer(kind: str, out: Path) -> dict:
    """Peak RssAnon above the start while one writer writes a 0.94 GB shard of 8 bf16 tensors."""
    import safetensors
    import torch
    from safetensors.torch import save_file

    from qlowrank.export.entries import ExportEntry
    from qlowrank.export.safetensors import _write_safetensors

    shape, count = (14336, 4096), 8

    def produce(i):
        return lambda: torch.full(shape, float(i), dtype=torch.bfloat16)   # every byte touched

    entries = [ExportEntry(f"t{i}", shape, torch.bfloat16, produce(i)) for i in range(count)]
    start = status()["RssAnon"]
    with Sampler() as sampler:
        if kind == "streamed":
            _write_safetensors(out, entries, torch.bfloat16, type("Bar", (), {"update": lambda self, n: None})())
        elif kind == "save_file":
            save_file({e.key: e.produce() for e in entries}, str(out), metadata={"format": "pt"})
        else:   # serialize_file: raw pointers, every tensor alive during the call
            tensors = {e.key: e.produce() for e in entries}
            specs = {k: safetensors.TensorSpec(dtype="bfloat16", shape=list(t.shape), data_ptr=t.data_ptr(), data_len=t.nbytes) for k, t in tensors.items()}
            safetensors.serialize_file(specs, str(out), {"format": "pt"})
    return {"writer": kind, "shard_gib": count * 14336 * 4096 * 2 / GIB, "anon_peak_above_start": (sampler.anon - start) / GIB}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--code", action="append", help="package copies to compare (PYTHONPATH); default: this checkout")
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        kind, folder = args.child
        result = measure_export(Path(folder) / "model", Path(folder)) if kind == "export" else \
            measure_writer(kind, Path(folder) / "shard.safetensors")
        print("RESULT " + json.dumps(result))
        return
    root = Path(__file__).resolve().parents[1]
    work = Path(tempfile.mkdtemp(prefix="export-memory-"))
    try:
        codes = args.code or [str(root)]
        runs = [("export", code) for code in codes]
        runs += [(kind, codes[-1]) for kind in ("streamed", "save_file", "serialize_file")]
        write_model(work / "model", args.layers)
        for kind, code in runs:
            env = {**os.environ, "PYTHONPATH": code}
            done = subprocess.run([sys.executable, __file__, "--child", kind, str(work)], env=env,
                                  capture_output=True, text=True)
            line = next((x for x in done.stdout.splitlines() if x.startswith("RESULT ")), None)
            if line is None:
                raise SystemExit(f"{kind} ({code}) failed:\n{done.stderr[-3000:]}")
            print(json.dumps({"run": kind, "code": code, **json.loads(line[7:])}), flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
