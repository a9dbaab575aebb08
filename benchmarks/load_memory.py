"""Benchmark: peak host RAM of loading a >= 1B-parameter checkpoint straight into 4-bit.

    flock /tmp/qlowrank-heavy.lock .venv/bin/python benchmarks/load_memory.py

Builds (once, under benchmarks/_cache/) a random Llama-shaped checkpoint: 1.2B parameters,
bf16, sharded safetensors of ~500 MB with an index (~2.4 GB). Then, each in a fresh
process so peaks do not mix, measures peak RSS (VmHWM) of:

- the import baseline: `import torch, transformers, qlowrank` (bitsandbytes included);
- qlowrank: `load_model(dir, QuantConfig(bits=4))` (NF4, double-quant, bf16 compute);
- transformers: `from_pretrained(dir, quantization_config=BitsAndBytesConfig(load_in_4bit=True,
  ...same settings...), device_map="cpu")`.

- qlowrank load + LoRA r=16 + `export_merged(dtype=bf16)` streamed in ~500 MB shards.

It prints one table with both side by side, the ratio qlowrank / transformers, and
qlowrank against quantized size + largest shard + import baseline; the figures go to
benchmarks/load_memory.json (`--json` to put them elsewhere).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

CACHE = Path(__file__).resolve().parent / "_cache" / "llama-1.2b-bf16"
EXPORT_DIR = CACHE.with_name("llama-1.2b-merged-bf16")
SHARD_BYTES = 500 * 2**20
GIB = 2**30


def llama_config():
    import transformers

    # TinyLlama-1.1B's shape with 24 layers: 1.21B parameters, untied head.
    return transformers.LlamaConfig(
        vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=24,
        num_attention_heads=32, num_key_value_heads=4, max_position_embeddings=2048,
        tie_word_embeddings=False, dtype="bfloat16",
    )


def build_checkpoint(folder: Path) -> None:
    """Write the random checkpoint tensor by tensor (never the whole model in memory)."""
    import torch
    import transformers
    from accelerate import init_empty_weights
    from safetensors.torch import save_file
    from tqdm import tqdm

    if (folder / "model.safetensors.index.json").is_file():
        return
    config = llama_config()
    with init_empty_weights():
        shapes = {k: tuple(v.shape) for k, v in transformers.LlamaForCausalLM(config).state_dict().items()}
    tmp = folder.with_name(folder.name + ".partial")
    tmp.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(0)
    shards: list[dict] = [{}]
    size = 0
    for key, shape in shapes.items():
        nbytes = 2 * torch.Size(shape).numel()
        if shards[-1] and size + nbytes > SHARD_BYTES:
            shards.append({})
            size = 0
        shards[-1][key] = shape
        size += nbytes
    weight_map = {}
    for i, shard in enumerate(tqdm(shards, desc="building checkpoint"), 1):
        name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        tensors = {}
        for key, shape in shard.items():
            if key.endswith("norm.weight"):
                tensors[key] = torch.ones(shape, dtype=torch.bfloat16)
            else:  # N(0, 0.02), the Llama init
                tensors[key] = (torch.randn(shape, generator=generator) * 0.02).to(torch.bfloat16)
            weight_map[key] = name
        save_file(tensors, str(tmp / name), metadata={"format": "pt"})
    total = sum(2 * torch.Size(s).numel() for s in shapes.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    config.save_pretrained(str(tmp))
    os.replace(tmp, folder)


def peak_rss() -> int:
    """This process's peak resident set (VmHWM), in bytes.

    Not getrusage's ru_maxrss: that survives fork + exec, so a child would report its
    parent's peak (here: the checkpoint builder's) whenever that is higher.
    """
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024  # reported in kB
    raise RuntimeError("no VmHWM in /proc/self/status (this benchmark needs Linux)")


def model_bytes(model) -> int:
    """Bytes the loaded model holds: packed 4-bit codes + scales, plus every float tensor."""
    from qlowrank.nn import quant as quantlib

    total = 0
    for module in model.modules():
        if quantlib.is_quantized_linear(module):
            total += quantlib.storage_bytes(module)
            total += module.bias.nbytes if module.bias is not None else 0
            continue
        tensors = list(module._parameters.values()) + list(module._buffers.values())
        total += sum(t.nbytes for t in tensors if t is not None)
    return total


def child(kind: str, folder: str) -> None:
    """Run one measurement in this (fresh) process and print it as JSON."""
    import torch
    import transformers

    import qlowrank as ql

    start = time.time()
    result = {"kind": kind}
    if kind == "qlowrank":
        quant = ql.QuantConfig(bits=4, quant_type="nf4", double_quant=True, compute_dtype=torch.bfloat16)
        model = ql.load_model(folder, quant=quant, device="cpu", progress=False)
    elif kind == "transformers":
        config = transformers.BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16,
        )
        model = transformers.AutoModelForCausalLM.from_pretrained(
            folder, quantization_config=config, dtype=torch.bfloat16, device_map="cpu"
        )
    elif kind == "export":  # load + LoRA, then stream a bf16 merged export (probe off: it loads the export)
        quant = ql.QuantConfig(bits=4, quant_type="nf4", double_quant=True, compute_dtype=torch.bfloat16)
        model = ql.load_model(folder, quant=quant, lora=ql.LoraConfig(r=16, alpha=32), device="cpu", progress=False)
        result["load_peak_rss"] = peak_rss()
        ql.export_merged(model, EXPORT_DIR, dtype=torch.bfloat16, overwrite=True, probe=False,
                         max_shard_size=SHARD_BYTES, progress=False)
        result["largest_output_shard"] = max(p.stat().st_size for p in EXPORT_DIR.glob("*.safetensors"))
    else:
        model = None
    result["seconds"] = time.time() - start
    result["peak_rss"] = peak_rss()
    if model is not None:
        result["model_bytes"] = model_bytes(model)
        result["params"] = ql.count_parameters(model).total
    print(json.dumps(result))


def measure(kind: str, folder: Path) -> dict:
    out = subprocess.run(
        [sys.executable, __file__, "--child", kind, str(folder)], check=True, capture_output=True, text=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--child", nargs=2, metavar=("KIND", "DIR"), help=argparse.SUPPRESS)
    parser.add_argument("--json", default=str(Path(__file__).resolve().with_name("load_memory.json")),
                        help="where the figures go")
    args = parser.parse_args()
    if args.child:
        child(*args.child)
        return
    build_checkpoint(CACHE)
    shards = sorted(CACHE.glob("*.safetensors"))
    largest = max(p.stat().st_size for p in shards)
    on_disk = sum(p.stat().st_size for p in shards)
    base = measure("baseline", CACHE)
    ours = measure("qlowrank", CACHE)
    theirs = measure("transformers", CACHE)
    exported = measure("export", CACHE)
    target = ours["model_bytes"] + largest + base["peak_rss"]
    print(f"checkpoint: {ours['params'] / 1e9:.2f}B params, bf16, {len(shards)} shards, "
          f"{on_disk / GIB:.2f} GiB on disk, largest shard {largest / GIB:.2f} GiB")
    print(f"quantized model in memory (qlowrank): {ours['model_bytes'] / GIB:.2f} GiB; "
          f"transformers: {theirs['model_bytes'] / GIB:.2f} GiB")
    print()
    print(f"| {'process':<42} | {'peak RSS GiB':>12} | {'seconds':>7} | {'vs transformers':>15} |")
    print(f"|{'-' * 44}|{'-' * 14}|{'-' * 9}|{'-' * 17}|")
    rows = [("import baseline", base), ("qlowrank load_model(bits=4)", ours),
            ("transformers from_pretrained(bnb 4-bit)", theirs),
            ("qlowrank load + LoRA + export_merged bf16", exported)]
    for label, row in rows:
        ratio = row["peak_rss"] / theirs["peak_rss"]
        print(f"| {label:<42} | {row['peak_rss'] / GIB:>12.2f} | {row['seconds']:>7.1f} | {ratio:>14.2f}x |")
    print()
    print(f"qlowrank / transformers peak = {ours['peak_rss'] / theirs['peak_rss']:.2f}x")
    print(f"qlowrank peak / (quantized {ours['model_bytes'] / GIB:.2f} + largest shard {largest / GIB:.2f} "
          f"+ import baseline {base['peak_rss'] / GIB:.2f} = {target / GIB:.2f} GiB) = {ours['peak_rss'] / target:.2f}x")
    export_target = exported["model_bytes"] + exported["largest_output_shard"] + base["peak_rss"]
    print(f"export: peak {exported['peak_rss'] / GIB:.2f} GiB (load alone {exported['load_peak_rss'] / GIB:.2f}) / "
          f"(quantized + LoRA {exported['model_bytes'] / GIB:.2f} + largest output shard "
          f"{exported['largest_output_shard'] / GIB:.2f} + import baseline {base['peak_rss'] / GIB:.2f} = "
          f"{export_target / GIB:.2f} GiB) = {exported['peak_rss'] / export_target:.2f}x")
    record = {"command": " ".join(["python benchmarks/load_memory.py", *sys.argv[1:]]),
              "date": datetime.now(timezone.utc).strftime("%Y-%m-%d"),
              "machine": f"{platform.machine()}, {os.cpu_count()} cores",
              "model": f"random Llama, {ours['params'] / 1e9:.2f}B parameters, bf16 safetensors",
              "shards": len(shards), "on_disk": on_disk, "largest_shard": largest, "baseline": base, "qlowrank": ours,
              "transformers": theirs, "export": exported}
    Path(args.json).write_text(json.dumps(record, indent=1) + "\n")
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
