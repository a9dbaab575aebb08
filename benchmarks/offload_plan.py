"""On paper: what activation offloading buys a Llama-3-8B QLoRA run on one GPU (planner predictions, no GPU needed).

    .venv/bin/python benchmarks/offload_plan.py                  # 16 and 24 GiB GPUs, seq 4096-32768
    .venv/bin/python benchmarks/offload_plan.py --budgets 12,16 --seqs 2048,8192 --host 32

For each GPU budget and sequence length the planner (`plan_run(device="cuda", timed=False)`, as
`estimate --plan --device cuda` runs on a machine without a GPU) plans a global batch of 8
sequences twice, side by side: without offloading, and free to offload activations to a host
of `--host` GiB. Printed: the chosen layout, its predicted GPU process peak (the estimator's tensor
peak plus the CUDA context and allocator reserve, with the 10% headroom the plan keeps) and the
host bytes the offloaded activations take, or the smallest budget that would fit. The model is
Llama-3-8B's config (vocab 128256), NF4 with double quantization, LoRA r 16 on every linear.
These are predictions of the estimator, never measured on a GPU here (none was lent).
"""

from __future__ import annotations

import argparse
import re
import tempfile
import time
from pathlib import Path

import torch
import transformers

LLAMA3_8B = dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                 num_attention_heads=32, num_key_value_heads=8, tie_word_embeddings=False, rope_theta=500000.0,
                 max_position_embeddings=131072)


def plan(config, budget: int, seq: int, offload: bool | None, host: int) -> str:
    import qlowrank as ql
    from qlowrank.memory.report import format_bytes
    from qlowrank.planner import plan_run

    try:
        result = plan_run(config, budget, 8, quant=ql.QuantConfig(bits=4, compute_dtype=torch.bfloat16),
                          lora=ql.LoraConfig(r=16, alpha=32), seq_len=seq, device="cuda", timed=False, progress=False,
                          offload=offload, host_budget=host)
    except ValueError as error:
        needed = re.search(r"give --max-memory (\d+)MiB", str(error))
        return f"nothing fits (needs {int(needed.group(1)) / 1024:.1f} GiB)" if needed else "nothing fits"
    chosen = result.chosen
    layout = chosen.layout
    host_part = f", {format_bytes(chosen.host_bytes)} on the host" if layout.offload else ""
    return (f"{layout.micro_batch} x {layout.grad_accum}, {layout.describe(result.layers)}: "
            f"{format_bytes(int(chosen.process_bytes * (1 + chosen.margin)))} with headroom{host_part}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--budgets", default="16,24", help="GPU budgets, GiB")
    parser.add_argument("--seqs", default="4096,8192,16384,32768")
    parser.add_argument("--host", type=float, default=64, help="host memory the offloaded activations may take, GiB")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="qlowrank-offload-plan-") as folder:
        transformers.LlamaConfig(**LLAMA3_8B).save_pretrained(folder)
        config_path = str(Path(folder) / "config.json")
        print(f"Llama-3-8B config, NF4 + LoRA r 16, global batch 8, host {args.host:g} GiB; planner predictions "
              "(untimed: no offloading first, then the fewest bytes offloaded, then the least recompute)\n")
        print("| GPU budget | seq | without offloading | free to offload activations |")
        print("|---|---|---|---|")
        for budget in (float(b) for b in args.budgets.split(",")):
            for seq in (int(s) for s in args.seqs.split(",")):
                started = time.perf_counter()
                plain = plan(config_path, int(budget * 2**30), seq, False, int(args.host * 2**30))
                free = plan(config_path, int(budget * 2**30), seq, None, int(args.host * 2**30))
                print(f"| {budget:g} GiB | {seq} | {plain} | {free} |  <!-- {time.perf_counter() - started:.0f} s -->",
                      flush=True)


if __name__ == "__main__":
    main()
