"""How close LoftQ / PiSSA bring a quantized SmolLM2-135M to its float weights before training, and what they cost.

    flock /tmp/qlowrank-heavy.lock .venv/bin/python benchmarks/init_error.py      # ~10 min on 2 cores
    .venv/bin/python benchmarks/init_error.py --layers 6 --ranks 16                # smoke: 6 layers

Part 1, per layer: the float model runs on real text (pydoc topics, 4 x 128 tokens) and
each linear layer's input X is kept. For each method the layer's effective weight W' =
dequant(Q) + s B A is formed exactly as `load_model` forms it, and the relative output
error ||X W'^T - X W^T|| / ||X W^T|| is averaged over the 210 layers. The seconds are the
time the method spends on all layers (what it adds to loading), randomized and full SVD.

Part 2, whole model: `load_model` with each init (timed end to end), and the relative
error of its logits against the float model on the same text.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from torch import nn

import qlowrank as ql
from qlowrank.model.embedded import smollm2_gguf
from qlowrank.nn.init import layer_generator, quantize_with_init
from qlowrank.nn.quant import quantize_linear

HERE = Path(__file__).resolve().parent
METHODS = {  # name -> LoraConfig fields (None: plain quantization, no init)
    "nf4": None,
    "loftq1": dict(init="loftq", loftq_iters=1),
    "loftq5": dict(init="loftq", loftq_iters=5),
    "pissa": dict(init="pissa"),
    "loftq1_full_svd": dict(init="loftq", loftq_iters=1, svd="full"),
    "loftq5_full_svd": dict(init="loftq", loftq_iters=5, svd="full"),
    "pissa_full_svd": dict(init="pissa", svd="full"),
}


def text_batch(tokenizer, batch: int = 4, seq: int = 128) -> torch.Tensor:
    from pydoc_data.topics import topics

    text = "\n\n".join(topics[k] for k in sorted(topics))
    ids = tokenizer(text[:200_000], return_tensors="pt")["input_ids"][0]
    return ids[: batch * seq].reshape(batch, seq)


def capture_inputs(model: nn.Module, ids: torch.Tensor, limit: int | None) -> dict[str, torch.Tensor]:
    inputs, hooks = {}, []
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n != "lm_head"][:limit]
    for name in names:
        def hook(module, args, out, name=name):
            inputs[name] = args[0].detach().reshape(-1, args[0].shape[-1]).float()
        hooks.append(model.get_submodule(name).register_forward_hook(hook))
    with torch.no_grad():
        model(ids)
    for h in hooks:
        h.remove()
    return inputs


def effective_weight(weight: torch.Tensor, quant: ql.QuantConfig, method: str, r: int, name: str) -> torch.Tensor:
    spec = METHODS[method]
    if spec is None:
        return ql.dequantize_weight(quantize_linear(weight, None, quant, "cpu"))
    lora = ql.LoraConfig(r=r, alpha=2 * r, **spec)
    layer, (a, b) = quantize_with_init(weight, None, quant, lora, "cpu", layer_generator(0, name))
    return ql.dequantize_weight(layer) + lora.scaling * (b @ a)


def per_layer(model, inputs, quant, ranks, methods) -> list[dict]:
    rows = []
    for r in ranks:
        for method in methods:
            if METHODS[method] is None and r != ranks[0]:
                continue
            errors, seconds = [], 0.0
            for name, x in inputs.items():
                weight = model.get_submodule(name).weight.detach().float()   # (out, in)
                start = time.perf_counter()
                w_eff = effective_weight(weight, quant, method, r, name)
                seconds += time.perf_counter() - start
                ref = x @ weight.T
                errors.append(float((x @ w_eff.T - ref).norm() / ref.norm()))
            rows.append({"method": method, "r": r if METHODS[method] else None, "layers": len(errors),
                         "mean_error": statistics.mean(errors), "median_error": statistics.median(errors),
                         "max_error": max(errors), "seconds": seconds})
            print(f"  {method:16s} r={r:3d}: mean layer-output error {rows[-1]['mean_error']:.4f}, "
                  f"{seconds:.1f} s", flush=True)
    return rows


def whole_model(gguf: Path, ids: torch.Tensor, reference: torch.Tensor, quant, r: int, methods) -> list[dict]:
    rows = []
    for method in methods:
        spec = METHODS[method]
        lora = ql.LoraConfig(r=r, alpha=2 * r, **(spec or {}))
        start = time.perf_counter()
        model = ql.load_model(gguf, quant=quant, lora=lora, device="cpu", dtype=torch.float32, progress=False)
        seconds = time.perf_counter() - start
        with torch.no_grad():
            logits = model(ids).logits.float()
        error = float((logits - reference).norm() / reference.norm())
        rows.append({"method": method, "r": r, "load_seconds": seconds, "logits_error": error})
        print(f"  load_model {method:16s}: {seconds:.1f} s, logits error {error:.4f}", flush=True)
        del model
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ranks", default="16,64")
    parser.add_argument("--layers", type=int, default=None, help="only the first N linear layers (smoke)")
    parser.add_argument("--skip-models", action="store_true", help="part 1 only (smoke)")
    parser.add_argument("--out", default=str(HERE / "init_error.json"))
    args = parser.parse_args()
    ranks = [int(r) for r in args.ranks.split(",")]
    torch.manual_seed(0)
    torch.set_num_threads(2)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = smollm2_gguf()
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    ids = text_batch(tokenizer)
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32).eval()
    with torch.no_grad():
        reference = model(ids).logits.float()
    inputs = capture_inputs(model, ids, args.layers)
    # fp32 compute: the errors are those of the stored weights, not of bf16 activations.
    quant = ql.QuantConfig(bits=4, quant_type="nf4", double_quant=True, compute_dtype=torch.float32)
    print(f"per layer ({len(inputs)} layers, {ids.numel()} tokens of pydoc text):", flush=True)
    layers = per_layer(model, inputs, quant, ranks, list(METHODS))
    del model, inputs
    print("whole model (load_model end to end):", flush=True)
    models = [] if args.skip_models else whole_model(gguf, ids, reference, quant, ranks[0],
                                                     ["nf4", "loftq1", "loftq5", "pissa"])
    result = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "tokens": list(ids.shape),
              "per_layer": layers, "whole_model": models}
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    base = {row["r"]: row for row in layers if row["method"] == "nf4"}[None]
    print("\n| method | r | mean layer-output rel. error | vs plain NF4 | median | max | seconds (all layers) |")
    print("|---|---|---|---|---|---|---|")
    for row in layers:
        print(f"| {row['method']} | {row['r'] or '-'} | {row['mean_error']:.4f} | "
              f"{row['mean_error'] / base['mean_error']:.3f}x | {row['median_error']:.4f} | {row['max_error']:.4f} | "
              f"{row['seconds']:.1f} |")
    print("\n| load_model init (r=%d) | load seconds | logits rel. error vs float |" % ranks[0])
    print("|---|---|---|")
    for row in models:
        print(f"| {row['method']} | {row['load_seconds']:.1f} | {row['logits_error']:.4f} |")


if __name__ == "__main__":
    main()
