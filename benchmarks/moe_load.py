"""Benchmark: the anonymous peak of loading a single-shard `save_pretrained` MoE checkpoint into 4-bit, beside the estimate.

    flock /tmp/qlowrank-heavy.lock nice -n 10 .venv/bin/python benchmarks/moe_load.py --shape qwen3-30b-a3b --layers 1
    ... --experts 32                      # a moderate width: fewer experts of the real size
    ... --code before=/path/to/older      # also load with another qlowrank (a folder holding its qlowrank/)

`save_pretrained` writes one shard with one tensor per expert for Qwen3-MoE (`mlp.experts.3.up_proj.weight`,
fused by transformers' converters while loading) and the fused, transposed stacks for gpt-oss. Each load runs in
a fresh process sampled through /proc every 10 ms (RssAnon); the child reports its RssAnon once loaded (the
quantized model as held) and the stored expert bytes. The estimate is `estimate_memory(...).process_breakdown
["load_peak"]` of the qlowrank this script imports. Results go to benchmarks/moe_load.json under
"<shape> <layers>L <experts>e <bits>bit", one entry per --code label ("after" is this checkout).
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

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
RESULTS = HERE / "moe_load.json"
GIB = 2**30
VOCAB = 49152   # SmolLM2's, as moe.py's probes: the embeddings stay small beside the experts


def shape_config(shape: str, layers: int, experts: int | None):
    from moe import config

    cfg = config(shape, layers)
    cfg.vocab_size = VOCAB
    if experts is not None:
        setattr(cfg, "num_experts" if shape == "qwen3-30b-a3b" else "num_local_experts", experts)
    return cfg


def child_write(shape: str, layers: int, experts: int, folder: str) -> dict:
    import torch
    import transformers

    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(shape_config(shape, layers, experts or None),
                                                          dtype=torch.bfloat16)
    model.save_pretrained(folder)
    return {"shards": sorted(p.name for p in Path(folder).glob("*.safetensors"))}


def child_load(folder: str, bits: int) -> dict:
    import qlowrank as ql
    from qlowrank.memory.sampler import read_status
    from qlowrank.nn.experts import ExpertWeights

    start = time.time()
    model = ql.load_model(folder, quant=ql.QuantConfig(bits=bits), device="cpu", progress=False)
    seconds = time.time() - start
    stored = sum(m.stored_bytes() for m in model.modules() if isinstance(m, ExpertWeights))
    return {"seconds": round(seconds, 1), "loaded_anon_gib": round(read_status()["RssAnon"] / GIB, 3),
            "experts_stored_gib": round(stored / GIB, 3)}


def run_child(kind: str, *args, pythonpath: str | None = None) -> dict:
    from qlowrank.memory.sampler import wait_sampled

    env = {**os.environ, **({"PYTHONPATH": pythonpath} if pythonpath else {})}
    process = subprocess.Popen([sys.executable, __file__, "--child", kind, *map(str, args)], stdout=subprocess.PIPE,
                               text=True, env=env)
    code, peaks = wait_sampled(process)
    out = process.stdout.read()
    if code != 0:
        raise RuntimeError(f"{kind} failed with exit code {code}")
    return {**json.loads(out.strip().splitlines()[-1]), "anon_peak_gib": round(peaks.get("RssAnon", 0) / GIB, 3),
            "file_peak_gib": round(peaks.get("RssFile", 0) / GIB, 3)}


def measure(shape: str, layers: int, experts: int | None, bits: int, codes: dict[str, str]) -> dict:
    import qlowrank as ql
    from moe import lora

    with tempfile.TemporaryDirectory(prefix="qlowrank-moe-load-") as tmp:
        written = run_child("write", shape, layers, experts or 0, tmp)
        checkpoint = sum(p.stat().st_size for p in Path(tmp).glob("*.safetensors"))
        est = ql.estimate_memory(tmp, quant=ql.QuantConfig(bits=bits), lora=lora(False), batch_size=1, seq_len=1024, device="cpu")
        parts = est.process_breakdown
        row = {"shards": written["shards"], "checkpoint_gib": round(checkpoint / GIB, 3),
               "estimate_load_gib": round(parts["load_peak"] / GIB, 3),
               "estimate_base_gib": round(est.breakdown["base_weights"] / GIB, 3)}
        for label, path in codes.items():
            got = run_child("load", tmp, bits, pythonpath=path)
            got["estimate_error"] = round(parts["load_peak"] / (got["anon_peak_gib"] * GIB) - 1, 3)
            got["code"] = path
            row[label] = got
            print(label, got, flush=True)
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=["qwen3-30b-a3b", "gpt-oss-20b"], default="qwen3-30b-a3b")
    parser.add_argument("--layers", type=int, default=1)
    parser.add_argument("--experts", type=int, help="fewer experts of the shape's size (default: the shape's)")
    parser.add_argument("--bits", type=int, choices=[4, 8], default=4)
    parser.add_argument("--code", nargs="*", default=[], help="LABEL=PATH: also load with the qlowrank under PATH")
    parser.add_argument("--child", nargs="+")
    args = parser.parse_args(argv)
    if args.child:
        kind, *rest = args.child
        if kind == "write":
            print(json.dumps(child_write(rest[0], int(rest[1]), int(rest[2]), rest[3])))
        else:
            print(json.dumps(child_load(rest[0], int(rest[1]))))
        return 0
    codes = {**dict(item.split("=", 1) for item in args.code), "after": str(HERE.parent)}
    cfg = shape_config(args.shape, 1, args.experts)
    experts = cfg.num_experts if args.shape == "qwen3-30b-a3b" else cfg.num_local_experts
    key = f"{args.shape} {args.layers}L {experts}e {args.bits}bit"
    results = json.loads(RESULTS.read_text()) if RESULTS.is_file() else {}
    results[key] = {"command": " ".join(["benchmarks/moe_load.py", *(argv if argv is not None else sys.argv[1:])]),
                    "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                    **measure(args.shape, args.layers, args.experts, args.bits, codes)}
    from qlowrank.atomic import staged_file

    with staged_file(RESULTS, "benchmark results") as staging:   # an interrupted run keeps the earlier entries
        staging.write_text(json.dumps(results, indent=1) + "\n")
    print(json.dumps(results[key], indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
