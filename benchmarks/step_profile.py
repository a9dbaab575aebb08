"""Where the time of one QLoRA training step goes: torch.profiler's op table, grouped.

    .venv/bin/python benchmarks/step_profile.py                       # SmolLM2-135M, batch 4 x 512 (vs_peft's recipe)
    .venv/bin/python benchmarks/step_profile.py --batch 4 --seq 160   # the demo's shape
    .venv/bin/python benchmarks/step_profile.py --lib ql-compile      # with regional torch.compile
    .venv/bin/python benchmarks/step_profile.py --model llama8b_4l --batch 1 --seq 2048 --steps 1   # 8B widths

The real SmolLM2-135M (converted once by benchmarks/vs_peft.py's cache), or another of
vs_peft.py's models (`--model`: llama600m, or llama8b_4l, 4 layers of Llama-3-8B's widths), NF4 + double quant,
bf16 compute, LoRA r=16 on all linear layers, gradient checkpointing, chunked loss, AdamW.
Two warm-up steps, then `--steps` profiled. Each op's self time lands in one group (first
matching rule wins), so the groups add up to the profiled CPU time.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent))
from vs_peft import MODELS, build, prepare_model, token_batches  # noqa: E402

# op name fragment -> group; first match wins
GROUPS = [
    ("dequantize", ("dequantize", "bitsandbytes")),
    ("attention", ("scaled_dot_product", "_flash_attention", "_efficient_attention", "softmax")),
    ("matmul", ("aten::mm", "aten::addmm", "aten::bmm", "aten::matmul", "aten::linear", "mkldnn")),
    ("optimizer", ("_foreach", "adam")),
    # --lib ql-compile: inductor's fused loops (what eager runs as separate elementwise ops)
    ("compiled elementwise (fused)", ("cpp_fused", "compiledfxgraph", "inductor", "compiledfunction", "torch-compiled")),
    ("copies/casts", ("aten::copy_", "aten::to", "aten::_to_copy", "aten::clone", "aten::contiguous", "aten::cat")),
    ("elementwise", ("aten::mul", "aten::add", "aten::sub", "aten::div", "aten::silu", "aten::rsqrt", "aten::pow",
                     "aten::mean", "aten::neg", "aten::exp", "aten::sum", "aten::logsumexp", "aten::gather", "aten::where",
                     "aten::fill_", "aten::zero_", "aten::sigmoid", "aten::index", "aten::embedding", "aten::cos", "aten::sin")),
]


def group_of(name: str) -> str:
    lowered = name.lower()
    for group, fragments in GROUPS:
        if any(f.lower() in lowered for f in fragments):
            return group
    return "other"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--lib", default="qlowrank", help="qlowrank | peft | ql16 | ql-recompute | ql-compile (vs_peft.py)")
    parser.add_argument("--top", type=int, default=15)
    parser.add_argument("--model", default="smollm2", choices=sorted(MODELS))
    args = parser.parse_args()

    folder = prepare_model(args.model)
    batches = token_batches(folder, args.batch, args.seq, args.steps + 2)
    torch.manual_seed(0)
    model, params, loss_fn = build(args.lib, folder)
    model.train()
    optimizer = torch.optim.AdamW(params, lr=2e-4)

    def step(x: torch.Tensor) -> None:
        loss_fn(model, x).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for x in batches[:2]:
        step(x)
    started = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for x in batches[2:2 + args.steps]:
            step(x)
    wall = (time.perf_counter() - started) / args.steps
    events = [e for e in prof.key_averages() if e.self_cpu_time_total > 0]
    total = sum(e.self_cpu_time_total for e in events)
    grouped: dict[str, float] = {}
    for e in events:
        grouped[group_of(e.key)] = grouped.get(group_of(e.key), 0.0) + e.self_cpu_time_total
    print(f"{args.lib}, {args.model}, batch {args.batch} x seq {args.seq}: {wall:.2f} s/step "
          f"(under the profiler), torch threads {torch.get_num_threads()}\n")
    print(f"| group | self CPU s/step | share |\n|---|---|---|")
    for group, us in sorted(grouped.items(), key=lambda kv: -kv[1]):
        print(f"| {group} | {us / 1e6 / args.steps:.3f} | {100 * us / total:.1f}% |")
    print(f"\n| op | calls/step | self CPU s/step | share |\n|---|---|---|---|")
    for e in sorted(events, key=lambda e: -e.self_cpu_time_total)[:args.top]:
        print(f"| {e.key} | {e.count // args.steps} | {e.self_cpu_time_total / 1e6 / args.steps:.3f} | "
              f"{100 * e.self_cpu_time_total / total:.1f}% |")


if __name__ == "__main__":
    main()
