"""llama.cpp as the independent GGUF reader: how close it runs each family's merged GGUF to the merged safetensors export.

    .venv/bin/python benchmarks/llamacpp_families.py                          # all 11 families, ~2 min on 2 cores
    .venv/bin/python benchmarks/llamacpp_families.py --families olmo2 mixtral gpt_oss

Needs llama-cpp-python (`pip install 'qlowrank[llama]'`); the default suite has no reader of OLMo 2 GGUF
that is independent of qlowrank's writer, and transformers' reader misreads Mixtral and gpt-oss, so this is
where their "GGUF export" is checked. The files are those `tests/test_llamacpp.py` asserts on, built by its
own `_build` (a tiny random 4-bit model with LoRA, B random, exported four ways), and the figures are what that
test compares with its tolerances, written down: relative logits error (||a - b|| / ||b||) over 20 tokens of

    merged_gguf_vs_export     llama.cpp on the merged f32 GGUF against transformers on the merged safetensors
    adapter_vs_merged_gguf    llama.cpp on the base GGUF + the adapter GGUF against llama.cpp on the merged GGUF
    adapter_effect            llama.cpp on the base GGUF alone against the merged GGUF (what the adapter moves)
    qlowrank_reader_vs_export qlowrank's streamed reader (float32) on the merged GGUF against the same export

Gemma 2 / 3 are built with query_pre_attn_scalar = head_dim (as llama.cpp scales, and every released Gemma is),
which no GGUF key carries: a reader that builds a transformers config from the file (transformers', qlowrank's)
takes the config default 256 instead (the export reports it as a caveat), so their qlowrank_reader_vs_export
is that difference, not a reading error. Results: benchmarks/llamacpp_families.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))   # the test's own builders and llama.cpp runner

NOTES = {family: "query_pre_attn_scalar = head_dim is not in GGUF: readers that build a transformers config assume 256"
         for family in ("gemma2", "gemma3")}


def measure(family: str, root: Path) -> dict:
    import torch
    from conftest import rel_error, tiny_tokenizer
    from test_llamacpp import _build, _tolerance, _transformers_logits, llamacpp_logits

    import qlowrank as ql

    start = time.time()
    folder, tokens = _build(family, tiny_tokenizer(), root)
    export = _transformers_logits(folder / "merged", tokens)
    merged = llamacpp_logits(folder / "merged.gguf", tokens)
    base = llamacpp_logits(folder / "base.gguf", tokens)
    adapted = llamacpp_logits(folder / "base.gguf", tokens, lora=folder / "adapter.gguf")
    ours = ql.load_model(folder / "merged.gguf", quant=ql.QuantConfig(bits=None), dtype=torch.float32, device="cpu",
                         progress=False)
    with torch.no_grad():
        read = ours(torch.tensor([tokens])).logits[0].float()
    return {"merged_gguf_vs_export": rel_error(merged, export), "adapter_vs_merged_gguf": rel_error(adapted, merged),
            "adapter_effect": rel_error(base, merged), "qlowrank_reader_vs_export": rel_error(read, export),
            "test_tolerance": _tolerance(family), "tokens": len(tokens), "seconds": round(time.time() - start, 1),
            **({"note": NOTES[family]} if family in NOTES else {})}


def main() -> None:
    from test_llamacpp import DENSE, MOE

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--families", nargs="+", default=[*DENSE, *MOE], choices=[*DENSE, *MOE])
    parser.add_argument("--out", type=Path, default=HERE / "llamacpp_families.json")
    args = parser.parse_args()
    import llama_cpp

    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for family in args.families:
            (Path(tmp) / family).mkdir()
            results[family] = measure(family, Path(tmp) / family)
            print(family, json.dumps(results[family]), flush=True)
    record = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
              "command": " ".join(["python benchmarks/llamacpp_families.py", *sys.argv[1:]]),
              "machine": f"{platform.machine()}, {os.cpu_count()} cores",
              "llama_cpp_python": llama_cpp.__version__, "families": results}
    args.out.write_text(json.dumps(record, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
