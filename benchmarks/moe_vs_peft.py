"""Benchmark: LoRA on fused MoE experts, qlowrank's per-routed-expert (x A_e) B_e against PEFT's target_parameters.

    flock /tmp/qlowrank-heavy.lock .venv/bin/python benchmarks/moe_vs_peft.py [--tokens 1024] [--steps 4]

One Qwen3-MoE sparse block at Qwen3-30B-A3B's width (hidden 2048, 128 experts of 768, top-8; random bf16
weights, seed 0), LoRA r=16 alpha=32 on both expert projections, trained on the same random hidden states
(batch 1 x --tokens, requiring grad as they would coming from earlier layers) with AdamW on the LoRA factors:

- `peft`: transformers' own block with PEFT 0.21's LoraConfig(target_parameters=[gate_up_proj, down_proj]):
  each forward adds the whole E x out x in delta to the bf16 stack;
- `qlowrank-bf16`: qlowrank's FrozenExperts on the same bf16 stack (quant bits=None): the LoRA update is
  computed on each expert's routed tokens only and no delta is built;
- `qlowrank-4bit`: the same with the stack stored NF4 per expert (what `qlowrank train --bits 4` runs).

Each runs in a fresh process. Before timing, the PEFT and qlowrank variants are given the same LoRA factors
(B random, PEFT's layout is qlowrank's) and their outputs compared, so they compute the same function.
Reported: the median step time after --warmup steps, the anonymous peak (RssAnon sampled from /proc)
during the timed steps and during set-up, and the tensor peak of one step counted by qlowrank's
TensorTracker (every CPU storage an op allocates). Results go to benchmarks/moe_vs_peft.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "moe_vs_peft.json"
GIB = 2**30
VARIANTS = ("peft", "qlowrank-bf16", "qlowrank-4bit")
RANK, ALPHA = 16, 32


# Qwen3-30B-A3B's MoE block; --tiny: a small one that checks the script in seconds
WIDTHS = {"qwen3-30b-a3b": dict(hidden_size=2048, moe_intermediate_size=768, num_experts=128, num_experts_per_tok=8),
          "tiny": dict(hidden_size=64, moe_intermediate_size=32, num_experts=8, num_experts_per_tok=2)}


def block(width: str):
    """One Qwen3-MoE sparse block of `width` (WIDTHS), random bf16 weights."""
    import torch
    import transformers
    from transformers.models.qwen3_moe import modeling_qwen3_moe

    cfg = transformers.Qwen3MoeConfig(num_hidden_layers=1, **WIDTHS[width])
    # What from_pretrained / from_config pick for a whole model here (a lone block would get the eager loop)
    cfg._experts_implementation = "grouped_mm"
    torch.manual_seed(0)
    module = modeling_qwen3_moe.Qwen3MoeSparseMoeBlock(cfg)
    for param in module.parameters():
        torch.nn.init.normal_(param, std=0.02)
    return module.to(torch.bfloat16)


def random_factors(experts: int, shapes: dict[str, tuple[int, int]]) -> dict:
    """Seeded (A (r*E, in), B (out, r*E)) per projection in PEFT's target_parameters layout, B nonzero."""
    import torch

    generator = torch.Generator().manual_seed(1)
    return {name: (torch.randn(RANK * experts, i, generator=generator) * 0.01,
                   torch.randn(o, RANK * experts, generator=generator) * 0.01) for name, (o, i) in shapes.items()}


def build(variant: str, width: str):
    """The block with LoRA on its experts as `variant` puts it, and its trainable parameters."""
    import torch

    module = block(width)
    module.requires_grad_(False)
    experts = module.experts
    shapes = {"gate_up_proj": tuple(experts.gate_up_proj.shape[1:]), "down_proj": tuple(experts.down_proj.shape[1:])}
    factors = random_factors(experts.num_experts, shapes)
    if variant == "peft":
        import peft

        config = peft.LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=[],
                                 target_parameters=["experts.gate_up_proj", "experts.down_proj"])
        module = peft.inject_adapter_in_model(config, module)
        for name, (a, b) in factors.items():
            wrapper = next(m for m in module.modules() if getattr(m, "parameter_name", None) == name)
            with torch.no_grad():
                wrapper.lora_A["default"].weight.copy_(a)
                wrapper.lora_B["default"].weight.copy_(b)
    else:
        import qlowrank as ql
        from qlowrank.nn.experts import freeze_experts

        # What add_lora does to fused experts (the block has no linear layer, which add_lora asks for)
        quant = ql.QuantConfig() if variant == "qlowrank-4bit" else None
        module.experts = freeze_experts(experts, quant, "cpu", torch.bfloat16)
        for name, (a, b) in factors.items():
            weights = getattr(module.experts, name)
            weights.add_lora(ql.LoraConfig(r=RANK, alpha=ALPHA, target_parameters=["experts"]), None)
            with torch.no_grad():
                weights.lora_A.copy_(a)
                weights.lora_B.copy_(b)
    trainable = [p for n, p in module.named_parameters() if "lora_" in n]
    for param in trainable:
        param.requires_grad_(True)
    return module, trainable


def inputs(tokens: int, hidden_size: int, step: int):
    import torch

    generator = torch.Generator().manual_seed(100 + step)
    hidden = torch.randn(1, tokens, hidden_size, generator=generator).mul_(0.5).to(torch.bfloat16).requires_grad_(True)
    target = torch.randn(1, tokens, hidden_size, generator=generator).to(torch.bfloat16)
    return hidden, target


def one_step(module, optimizer, tokens: int, step: int) -> float:
    hidden, target = inputs(tokens, module.gate.weight.shape[1], step)
    out = module(hidden)
    out = out[0] if isinstance(out, tuple) else out
    loss = (out.float() * target.float()).mean()
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.item()


def child(variant: str, width: str, tokens: int, steps: int, warmup: int) -> dict:
    import torch

    from qlowrank.memory.sampler import StatusSampler
    from qlowrank.memory.tracker import TensorTracker

    with StatusSampler() as setup:
        module, trainable = build(variant, width)
        module.train()
        optimizer = torch.optim.AdamW(trainable, lr=1e-4)
        with torch.no_grad():   # the function both compute, before any update (same factors, same inputs)
            probe = module(inputs(tokens, module.gate.weight.shape[1], -1)[0])
            probe = probe[0] if isinstance(probe, tuple) else probe
    torch.save(probe.float()[0, :64].clone(), f"/tmp/moe_vs_peft_{variant}.pt")
    times, losses = [], []
    with StatusSampler() as stepping:
        for step in range(warmup + steps):
            begin = time.perf_counter()
            losses.append(one_step(module, optimizer, tokens, step))
            times.append(time.perf_counter() - begin)
    tracker = TensorTracker(module, optimizer, devices=["cpu"])
    with tracker:
        one_step(module, optimizer, tokens, warmup + steps)
    return {"variant": variant, "tokens": tokens, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "step_seconds": round(statistics.median(times[warmup:]), 3),
            "step_seconds_all": [round(t, 3) for t in times],
            "steps_anon_peak_gib": round(stepping.anon_peak / GIB, 3),
            "setup_anon_peak_gib": round(setup.anon_peak / GIB, 3),
            "tensor_peak_gib": round(sum(tracker.state.peak_breakdown.values()) / GIB, 3),
            "tensor_peak_by_category_gib": {k: round(v / GIB, 3) for k, v in tracker.state.peak_breakdown.items()},
            "losses": [round(x, 6) for x in losses]}


def run_child(variant: str, width: str, tokens: int, steps: int, warmup: int) -> dict:
    command = [sys.executable, __file__, "--child", variant, "--width", width, "--tokens", str(tokens),
               "--steps", str(steps), "--warmup", str(warmup)]
    done = subprocess.run(command, stdout=subprocess.PIPE, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def agreement() -> dict:
    """Largest |qlowrank - PEFT| over the first 64 tokens' outputs, relative to PEFT's largest entry."""
    import torch

    reference = torch.load("/tmp/moe_vs_peft_peft.pt")
    rows = {}
    for variant in VARIANTS[1:]:
        ours = torch.load(f"/tmp/moe_vs_peft_{variant}.pt")
        rows[variant] = float((ours - reference).abs().max() / reference.abs().max())
    for variant in VARIANTS:
        Path(f"/tmp/moe_vs_peft_{variant}.pt").unlink()
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, nargs="+", default=[1024])
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--width", choices=list(WIDTHS), default="qwen3-30b-a3b")
    parser.add_argument("--tiny", action="store_true", help="a tiny block: checks the script, writes no JSON")
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS),
                        help="rerun these only (the others' rows stay as moe_vs_peft.json has them)")
    parser.add_argument("--child")
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.child, args.width, args.tokens[0], args.steps, args.warmup)))
        return 0
    width = "tiny" if args.tiny else args.width
    import platform

    previous = json.loads(RESULTS.read_text()) if RESULTS.is_file() and not args.tiny else {}
    results = {**previous, "machine": f"{platform.processor() or platform.machine()}, {__import__('os').cpu_count()} cores",
               "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "block": WIDTHS[width], "rank": RANK,
               "alpha": ALPHA, "runs": {}}
    for tokens in args.tokens:
        rows = dict(previous.get("runs", {}).get(str(tokens), {}))
        rows.update({variant: run_child(variant, width, tokens, args.steps, args.warmup) for variant in args.variants})
        if set(args.variants) == set(VARIANTS):
            rows["output_difference_vs_peft"] = agreement()
        for variant in args.variants:
            Path(f"/tmp/moe_vs_peft_{variant}.pt").unlink(missing_ok=True)
        results["runs"][str(tokens)] = rows
        for variant in args.variants:
            row = rows[variant]
            print(f"{tokens} tokens {variant:14s} step {row['step_seconds']:7.3f} s  anon {row['steps_anon_peak_gib']:.3f} "
                  f"GiB  tensors {row['tensor_peak_gib']:.3f} GiB", flush=True)
        print("output difference vs PEFT (relative):", rows.get("output_difference_vs_peft"), flush=True)
    if not args.tiny:
        RESULTS.write_text(json.dumps(results, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
