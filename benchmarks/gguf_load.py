"""Benchmark: a GGUF loaded into NF4 three ways: transformers' reader, qlowrank's streamed reader, and streamed safetensors.

    flock /tmp/qlowrank-heavy.lock nice -n 10 .venv/bin/python benchmarks/gguf_load.py            # both models
    flock /tmp/qlowrank-heavy.lock nice -n 10 .venv/bin/python benchmarks/gguf_load.py --model smollm2

Models:
- smollm2: the embedded SmolLM2-135M-Instruct GGUF (Q4_1 linears, a Q8_0 embedding); its
  safetensors twin is the same weights read back as bf16 (`save_pretrained`).
- llama3-8b-width: a random Llama with Llama-3-8B's layer widths (hidden 4096, MLP 14336,
  32/8 heads, vocab 128256) and 4 layers (1.92B parameters): written as bf16 safetensors
  shards one layer at a time (benchmarks/large_model.py's writer), then loaded once in bf16
  and written to GGUF q8_0 by qlowrank's own exporter (`export_merged(format="gguf")`).

Each load runs in a fresh Python process: `load_model(..., QuantConfig(bits=4))` (NF4,
double-quant, bf16 compute) with `gguf_reader="transformers"` (today's path: the whole file
dequantized to float32, then quantized), `gguf_reader="streamed"`, and from the safetensors
twin. This launcher imports no torch; it samples each child's /proc/PID/status every 10 ms
for its peak RssAnon (heap and tensors: what must fit) and RssFile (pages of the mapped file,
reclaimable), and takes VmHWM at the end. A fourth child only imports (the runtime baseline).

Each child also reports the anonymous memory after loading (the quantized model + runtime) and
the float32 bytes of the largest quantized linear, so the load's transient is given as a
multiple of that tensor. Files go to a temporary folder that is removed at the end; results to
benchmarks/gguf_load.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
GIB = 2**30
KINDS = ("imports", "transformers", "streamed", "safetensors")

CHILD = r"""
import json, sys, time
t0 = time.time()
import torch, transformers, qlowrank as ql
from qlowrank.nn import quant as quantlib
kind, gguf_path, st_dir = sys.argv[1:4]
def anon():
    for line in open("/proc/self/status"):
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) * 1024
result = {"import_s": time.time() - t0, "anon_after_import": anon()}
if kind != "imports":
    start = time.time()
    source = st_dir if kind == "safetensors" else gguf_path
    reader = {} if kind == "safetensors" else {"gguf_reader": kind}
    model = ql.load_model(source, quant=ql.QuantConfig(bits=4), device="cpu", progress=False, **reader)
    result["load_s"] = time.time() - start
    result["anon_after_load"] = anon()
    linears = [m for m in model.modules() if quantlib.is_quantized_linear(m)]
    result["largest_linear_f32"] = max(m.in_features * m.out_features * 4 for m in linears)
    result["largest_tensor_f32"] = max(p.numel() * 4 for p in model.parameters() if p.is_floating_point())
    result["model_bytes"] = sum(t.numel() * t.element_size() for t in model.state_dict().values())
print("RESULT " + json.dumps(result), flush=True)
"""

PREPARE = r"""
import sys, torch
sys.path.insert(0, sys.argv[4])
import qlowrank as ql
from qlowrank.model.embedded import smollm2_gguf
from qlowrank.model.load import load_tokenizer
name, gguf_path, st_dir = sys.argv[1:4]
tokenizer = load_tokenizer(smollm2_gguf())
if name == "smollm2":
    model = ql.load_model(smollm2_gguf(), quant=ql.QuantConfig(bits=None), dtype=torch.bfloat16, device="cpu",
                          progress=False)
    model.save_pretrained(st_dir)
else:
    from large_model import build_config, write_shards
    write_shards(build_config("llama3-8b", 4, None), __import__("pathlib").Path(st_dir))
    model = ql.load_model(st_dir, quant=ql.QuantConfig(bits=None), dtype=torch.bfloat16, device="cpu",
                          progress=False)
    ql.export_merged(model, gguf_path, format="gguf", gguf_type="q8_0", tokenizer=tokenizer, probe=False)
"""


def status(pid: int) -> dict[str, int]:
    values = {}
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return values
    for line in text.splitlines():
        key, _, rest = line.partition(":")
        if key in ("RssAnon", "RssFile", "VmHWM"):
            values[key] = int(rest.split()[0]) * 1024
    return values


def run_child(args: list[str]) -> dict:
    """Run `python -c CHILD args` and sample its /proc status every 10 ms until it exits."""
    peaks = {"RssAnon": 0, "RssFile": 0, "VmHWM": 0}
    start = time.time()
    child = subprocess.Popen([sys.executable, "-c", CHILD, *args], stdout=subprocess.PIPE, text=True,
                             cwd=HERE.parent)
    while child.poll() is None:
        for key, value in status(child.pid).items():
            peaks[key] = max(peaks[key], value)
        time.sleep(0.01)
    out = child.stdout.read()
    if child.returncode != 0:
        raise RuntimeError(f"child {args[0]} failed with exit code {child.returncode}")
    result = json.loads(next(line for line in out.splitlines() if line.startswith("RESULT "))[7:])
    return {**result, "peak_anon": peaks["RssAnon"], "peak_file": peaks["RssFile"], "vmhwm": peaks["VmHWM"],
            "wall_s": time.time() - start}


def prepare(name: str, folder: Path) -> tuple[Path, Path]:
    st_dir = folder / "safetensors"
    if name == "smollm2":
        from qlowrank.model.embedded import smollm2_gguf

        gguf_path = smollm2_gguf()
    else:
        gguf_path = folder / "llama3-8b-width.q8_0.gguf"
    subprocess.run([sys.executable, "-c", PREPARE, name, str(gguf_path), str(st_dir), str(HERE)], check=True,
                   cwd=HERE.parent)
    return gguf_path, st_dir


def measure(name: str, folder: Path) -> dict:
    gguf_path, st_dir = prepare(name, folder)
    rows = {kind: run_child([kind, str(gguf_path), str(st_dir)]) for kind in KINDS}
    rows["gguf_bytes"] = gguf_path.stat().st_size
    return rows


def table(name: str, rows: dict) -> str:
    base = rows["imports"]["peak_anon"]
    lines = [f"{name} (GGUF {rows['gguf_bytes'] / GIB:.2f} GiB; runtime after imports: {base / GIB:.2f} GiB anonymous)",
             "| path | peak RssAnon | peak RssFile | VmHWM | wall (load) | model after load | (peak - after) / largest linear f32 |",
             "|---|---|---|---|---|---|---|"]
    for kind in KINDS[1:]:
        r = rows[kind]
        multiple = (r["peak_anon"] - r["anon_after_load"]) / r["largest_linear_f32"]
        lines.append(f"| {kind} | {r['peak_anon'] / GIB:.2f} GiB | {r['peak_file'] / GIB:.2f} GiB | "
                     f"{r['vmhwm'] / GIB:.2f} GiB | {r['wall_s']:.1f} s ({r['load_s']:.1f} s) | {r['model_bytes'] / GIB:.2f} GiB | "
                     f"{multiple:.2f} |")
    streamed, st, today = (rows[k]["peak_anon"] for k in ("streamed", "safetensors", "transformers"))
    lines.append(f"streamed GGUF / streamed safetensors peak RssAnon: {streamed / st:.2f}x (target <= 1.2x); "
                 f"streamed / transformers' reader: {streamed / today:.2f}x (target <= 0.3x at large width)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=("smollm2", "llama3-8b-width", "both"), default="both")
    parser.add_argument("--out", default=str(HERE / "gguf_load.json"))
    args = parser.parse_args(argv)
    names = ("smollm2", "llama3-8b-width") if args.model == "both" else (args.model,)
    out = Path(args.out)
    results = json.loads(out.read_text()) if out.is_file() else {}   # one model's rerun keeps the other's rows
    results |= {"machine": f"{platform.machine()}, {os.cpu_count()} cores, "
                          f"{os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / GIB:.0f} GiB RAM",
               "date": time.strftime("%Y-%m-%d"), "command": "python benchmarks/gguf_load.py " + " ".join(argv or sys.argv[1:])}
    for name in names:
        folder = Path(tempfile.mkdtemp(prefix=f"gguf-load-{name}-"))
        try:
            results[name] = measure(name, folder)
        finally:
            shutil.rmtree(folder, ignore_errors=True)
        print(table(name, results[name]), flush=True)
    out.write_text(json.dumps(results, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
