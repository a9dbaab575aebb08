"""Whether a compiled, checkpointed block really runs compiled: compile around the checkpoint or inside it.

    .venv/bin/python benchmarks/compile_order.py [--out benchmarks/compile_order.json]

A tiny random Llama (2 layers, width 64, LoRA r=4 all-linear, fp32, batch 2 x 16, one thread) is
checkpointed (keep_attention=False, so no dispatch mode makes the compiled forward run eagerly)
and compiled with `compile_blocks`, once with compile around the checkpoint (model.patches'
WRAP_ORDER, which is what `--compile` runs) and once inside it (the order swapped for this script
only). After two warm-up steps one step runs under torch.profiler, which counts what ran: calls of
inductor's compiled graphs and eager `aten::linear` calls (the output head is one of them). Also
written: the loss and largest LoRA-gradient differences from the same model eager and unpatched,
and each graph break dynamo reported (its first line and what it names).
Each order runs in its own process, so neither reuses the other's compiled code.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

ORDERS = {"compile around the checkpoint": ("checkpoint", "compile"),
          "compile inside the checkpoint": ("compile", "checkpoint")}


def measure(order: tuple[str, ...]) -> dict:
    import torch
    import transformers

    import qlowrank as ql
    from qlowrank.model import patches
    from qlowrank.model.compile import compile_blocks

    torch.set_num_threads(1)
    patches.WRAP_ORDER = order
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    ql.add_lora(model, ql.LoraConfig(r=4, target_modules="all-linear"), seed=0)
    with torch.no_grad():
        for _, layer in ql.lora_layers(model):
            layer.lora_B.weight.normal_(std=0.05, generator=torch.Generator().manual_seed(3))
    model.train()
    tokens = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(1))

    def step():
        model.zero_grad(set_to_none=True)
        loss = model(input_ids=tokens, labels=tokens).loss
        loss.backward()
        return loss.item(), [p.grad.clone() for p in ql.lora_parameters(model)]

    eager_loss, eager_grads = step()
    ql.enable_gradient_checkpointing(model, keep_attention=False)
    compile_blocks(model)
    for _ in range(2):
        step()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profile:
        loss, grads = step()
    from torch._dynamo.utils import counters
    return {"wrap_order": list(order),
            "graph_breaks": sorted({break_reason(text) for text in counters["graph_break"]}),
            **count_calls(profile),
            "loss_difference": abs(loss - eager_loss),
            "largest_gradient_difference": max(float((g - e).abs().max()) for g, e in zip(grads, eager_grads))}


def count_calls(profile) -> dict[str, int]:
    """What a profiled step ran: calls of inductor's compiled graphs, and eager `aten::linear` calls."""
    names = [event.name for event in profile.events()]
    return {"compiled_graph_calls": sum("CompiledFxGraph" in name for name in names),
            "eager_linear_calls": sum(name == "aten::linear" for name in names)}


def break_reason(text: str) -> str:
    """A graph break's first line and dynamo's developer context (which names what broke it)."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    context = [line for line in lines if line.startswith("Developer debug context")]
    return " / ".join(lines[:1] + context)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).with_name("compile_order.json"))
    parser.add_argument("--order", choices=sorted(ORDERS), help=argparse.SUPPRESS)   # one child's run
    args = parser.parse_args()
    if args.order:
        print(json.dumps(measure(ORDERS[args.order])))
        return
    results = {}
    for name in ORDERS:
        out = subprocess.run([sys.executable, __file__, "--order", name], capture_output=True, text=True, check=True)
        results[name] = json.loads(out.stdout.strip().splitlines()[-1])
        print(name, results[name])
    args.out.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
