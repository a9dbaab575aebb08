"""4-bit storage of one MoE decoder block against its bf16 bytes, at the published widths of each MoE family.

One decoder layer of each model's shape (vocabulary cut to 256: the block is what is measured) is
built in bf16, quantized in place by `ql.quantize_model` (NF4, double quant, blocksize 64: the
default), and the block's stored bytes (packed codes, block scales, code books, float router and norms)
are divided by its bf16 bytes. Shapes are the released configs' (config.json on the hub):
Qwen3-30B-A3B, Qwen1.5-MoE-A2.7B (Qwen2-MoE, with its shared expert), Qwen2-57B-A14B, OLMoE-1B-7B-0924.

    flock /tmp/qlowrank-heavy.lock nice -n 10 python benchmarks/moe_block_share.py
"""

from __future__ import annotations

import argparse
import datetime
import json
import time
from pathlib import Path

import torch
import transformers

import qlowrank as ql
from qlowrank.nn import quant as quantlib

HERE = Path(__file__).resolve().parent
SHAPES = {
    "Qwen3-30B-A3B": ("qwen3_moe", dict(hidden_size=2048, intermediate_size=6144, moe_intermediate_size=768,
                                        num_experts=128, num_experts_per_tok=8, num_attention_heads=32,
                                        num_key_value_heads=4, head_dim=128)),
    "Qwen1.5-MoE-A2.7B": ("qwen2_moe", dict(hidden_size=2048, intermediate_size=5632, moe_intermediate_size=1408,
                                            shared_expert_intermediate_size=5632, num_experts=60, num_experts_per_tok=4,
                                            num_attention_heads=16, num_key_value_heads=16)),
    "Qwen2-57B-A14B": ("qwen2_moe", dict(hidden_size=3584, intermediate_size=18944, moe_intermediate_size=2560,
                                         shared_expert_intermediate_size=20480, num_experts=64, num_experts_per_tok=8,
                                         num_attention_heads=28, num_key_value_heads=4)),
    "OLMoE-1B-7B-0924": ("olmoe", dict(hidden_size=2048, intermediate_size=1024, num_experts=64, num_experts_per_tok=8,
                                       num_attention_heads=16, num_key_value_heads=16)),
}


def block_share(model_type: str, shape: dict) -> dict:
    config = transformers.AutoConfig.for_model(model_type, vocab_size=256, num_hidden_layers=1, **shape)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    block = model.model.layers[0]
    bf16 = sum(p.numel() * 2 for p in block.parameters())
    start = time.time()
    ql.quantize_model(model, ql.QuantConfig(compute_dtype=torch.bfloat16))
    seconds = time.time() - start
    stored = sum(t.numel() * t.element_size() for t in [*block.parameters(), *block.buffers()])
    # A bitsandbytes linear keeps its block scales in its quant_state, not in a parameter or buffer.
    stored += sum(quantlib.storage_bytes(m) - m.weight.numel() * m.weight.element_size()
                  for m in block.modules() if quantlib.is_quantized_linear(m))
    return {"model_type": model_type, "bf16_bytes": bf16, "stored_bytes": stored, "share": round(stored / bf16, 4),
            "quantize_seconds": round(seconds, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="*", default=list(SHAPES))
    parser.add_argument("--out", type=Path, default=HERE / "moe_block_share.json")
    args = parser.parse_args()
    results = {}
    for name in args.models:
        model_type, shape = SHAPES[name]
        results[name] = {**block_share(model_type, shape), "shape": shape}
        print(name, results[name])
    out = {"date": datetime.date.today().isoformat(),
           "command": "python benchmarks/moe_block_share.py" + (f" --models {' '.join(args.models)}"
                                                                 if args.models != list(SHAPES) else ""),
           "quant": "nf4, double quant, blocksize 64", "layers": 1, "results": results}
    args.out.write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
