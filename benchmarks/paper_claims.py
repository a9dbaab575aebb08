"""The LoRA and QLoRA papers' memory and parameter claims, computed from configs and measured here.

    flock /tmp/qlowrank-heavy.lock .venv/bin/python benchmarks/paper_claims.py [--skip-measured]

1. LoRA (arXiv 2106.09685) trainable-parameter counts, counted on meta-device models with
   qlowrank's add_lora, beside the paper's figures and its formula |Theta| = 2 * L_hat * d * r
   (L_hat = number of adapted weight matrices).
2. GPT-3 175B: full fine-tuning with Adam vs LoRA r=4 on q/v (estimate_memory), and the
   adapter checkpoint size.
3. QLoRA (arXiv 2305.14314): NF4 + double-quant footprints of LLaMA 7B-65B, and 65B QLoRA
   fine-tuning under 48 GB.
4. Measured (MemoryProfiler, same batch and sequence): full fine-tuning, LoRA on a 16-bit
   base, QLoRA on a 4-bit base, on the real SmolLM2-135M and a random 1.1B Llama.

Writes benchmarks/paper_claims.md and benchmarks/paper_claims.png.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
import transformers

import qlowrank as ql
from qlowrank.memory import CATEGORIES, format_bytes, profile_steps
from qlowrank.memory.report import COLORS, atomic_write_text, save_figure

HERE = Path(__file__).parent
GB = 10**9

ROBERTA = {"base": transformers.RobertaConfig(hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                                              intermediate_size=3072, vocab_size=50265, max_position_embeddings=514),
           "large": transformers.RobertaConfig(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16,
                                               intermediate_size=4096, vocab_size=50265, max_position_embeddings=514)}
GPT2 = {"M": transformers.GPT2Config(n_embd=1024, n_layer=24, n_head=16),
        "L": transformers.GPT2Config(n_embd=1280, n_layer=36, n_head=20)}
GPT3 = transformers.GPT2Config(n_embd=12288, n_layer=96, n_head=96, n_positions=2048, vocab_size=50257)
LLAMA = {  # LLaMA-1 shapes (Touvron et al. 2023)
    "7B": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32),
    "13B": dict(hidden_size=5120, intermediate_size=13824, num_hidden_layers=40, num_attention_heads=40),
    "33B": dict(hidden_size=6656, intermediate_size=17920, num_hidden_layers=60, num_attention_heads=52),
    "65B": dict(hidden_size=8192, intermediate_size=22016, num_hidden_layers=80, num_attention_heads=64),
}
QLORA_PAPER_GB = {"7B": 5, "13B": 10, "33B": 21, "65B": 41}


def llama(name: str) -> transformers.LlamaConfig:
    return transformers.LlamaConfig(vocab_size=32000, max_position_embeddings=2048, **LLAMA[name])


def estimate(config, bits, lora, **kwargs):
    kwargs.setdefault("device", "cuda")
    return ql.estimate_memory(config, quant=ql.QuantConfig(bits=bits), lora=lora, **kwargs)


def lora_counts() -> list[str]:
    rows = ["| model | LoRA | paper | ours (add_lora on the config) | 2·L̂·d·r | note |", "|---|---|---|---|---|---|"]
    cases = [
        ("RoBERTa-base", ROBERTA["base"], ["query", "value"], 8, 2 * 12, 768, "0.3M"),
        ("RoBERTa-large", ROBERTA["large"], ["query", "value"], 8, 2 * 24, 1024, "0.8M"),
        ("GPT-2 M", GPT2["M"], ["c_attn"], 4, 2 * 24, 1024, "0.35M"),
        ("GPT-2 L", GPT2["L"], ["c_attn"], 4, 2 * 36, 1280, "0.77M"),
        ("GPT-3 175B", GPT3, ["c_attn"], 1, 2 * 96, 12288, "4.7M"),
        ("GPT-3 175B", GPT3, ["c_attn"], 8, 2 * 96, 12288, "37.7M"),
    ]
    for name, config, targets, r, l_hat, d, paper in cases:
        est = estimate(config, None, ql.LoraConfig(r=r, target_modules=targets), batch_size=1, seq_len=8)
        formula = 2 * l_hat * d * r
        paper_value = float(paper.rstrip("M")) * 1e6
        decimals = len(paper.rstrip("M").partition(".")[2])
        departs = round(formula / 1e6, decimals) != round(paper_value / 1e6, decimals)  # beyond the paper's rounding
        note = "fused c_attn (q,k,v): r·(d+3d) = 4dr per layer, the same as q and v at rank r. " if "GPT" in name else ""
        if departs:
            note += (f"**the paper's figure departs from its own 2·L̂·d·r = {formula / 1e6:.{decimals}f}M "
                     f"({100 * (paper_value - formula) / formula:+.1f}%)**")
        rows.append(f"| {name} | r={r} on q,v | {paper} | {est.trainable_parameters:,} | {formula:,} | {note} |")
    return rows


def gpt3_memory() -> list[str]:
    half = torch.float16
    full = estimate(GPT3, None, None, batch_size=1, seq_len=2048, dtype=half)
    lora_cfg = ql.LoraConfig(r=4, target_modules=["c_attn"])
    lora = estimate(GPT3, None, lora_cfg, batch_size=1, seq_len=2048, dtype=half)
    adapter_fp16 = lora.trainable_parameters * 2
    base_bytes = lora.breakdown["base_weights"]
    return [
        "| GPT-3 175B, batch 1 x 2048, fp16, checkpointing | paper | estimate_memory |", "|---|---|---|",
        f"| full fine-tuning, Adam | 1.2 TB | {full.total_bytes / 1e12:.2f} TB, peak in {full.peak_phase}: "
        f"weights {full.breakdown['trainable_params'] / 1e12:.2f} + grads {full.breakdown['gradients'] / 1e12:.2f} "
        f"+ Adam states (fp16, as torch keeps them in the parameter dtype) {full.breakdown['optimizer_states'] / 1e12:.2f}"
        f" + scratch {full.breakdown['temporaries'] / 1e12:.2f} TB (foreach AdamW's sqrt(v) copy; a fused AdamW "
        f"has none: {(full.total_bytes - full.breakdown['temporaries']) / 1e12:.2f} TB) |",
        f"| LoRA r=4 on q,v | 350 GB | {lora.total_bytes / GB:.0f} GB (frozen weights {base_bytes / GB:.0f} GB) |",
        f"| reduction | 3x | {full.total_bytes / lora.total_bytes:.1f}x |",
        f"| adapter checkpoint | 35 MB | {adapter_fp16 / 1e6:.1f} MB in fp16 ({lora.trainable_parameters:,} params; "
        f"qlowrank saves fp32: {2 * adapter_fp16 / 1e6:.1f} MB) |",
        f"| checkpoint ratio | ~10,000x | {base_bytes / adapter_fp16:,.0f}x (fp16 base / fp16 adapter) |",
    ]


def qlora_footprints() -> list[str]:
    rows = ["| LLaMA | paper (NF4+DQ) | our 4-bit base (NF4+DQ, bf16 embeddings/head/norms) "
            "| + LoRA r=64 all-linear factors (fp32) |", "|---|---|---|---|"]
    for name in LLAMA:
        est = estimate(llama(name), 4, ql.LoraConfig(r=64), batch_size=1, seq_len=16)
        weights, factors = est.breakdown["base_weights"], est.breakdown["trainable_params"]
        rows.append(f"| {name} | {QLORA_PAPER_GB[name]} GB | {weights / GB:.1f} GB ({format_bytes(weights)}) | "
                    f"{(weights + factors) / GB:.1f} GB |")
    rows += ["", "| LLaMA 65B QLoRA, r=64 all linear, checkpointing | estimate | under 48 GB? |",
             "|---|---|---|"]
    for batch, seq, optimizer in ((1, 512, "adamw"), (1, 2048, "adamw"), (1, 512, "adamw8bit"),
                                  (1, 2048, "adamw8bit"), (4, 512, "adamw8bit")):
        est = estimate(llama("65B"), 4, ql.LoraConfig(r=64), batch_size=batch, seq_len=seq, optimizer=optimizer)
        rows.append(f"| batch {batch} x {seq}, {optimizer} | {est.total_bytes / GB:.1f} GB "
                    f"({format_bytes(est.total_bytes)}; LoRA {est.trainable_parameters / 1e6:.0f}M params fp32, "
                    f"peak in {est.peak_phase}) | {'yes' if est.fits(48 * GB) else 'no'} |")
    return rows


BIG = transformers.LlamaConfig(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
                              num_attention_heads=32, num_key_value_heads=4)  # TinyLlama-1.1B shape
MODES = ("full fine-tuning", "LoRA r=16, 16-bit base", "QLoRA r=16, NF4 base")


def measure_one(model_name: str, mode: str, batch: int, seq: int) -> tuple:
    """One profiled run (2 steps), in its own process so that its RSS peak is its own."""
    from qlowrank.model.embedded import smollm2_gguf

    bits = 4 if mode.startswith("QLoRA") else None
    lora = None if mode.startswith("full") else ql.LoraConfig(r=16)
    torch.manual_seed(0)
    if model_name.startswith("SmolLM2"):
        model = ql.load_model(str(smollm2_gguf()), quant=ql.QuantConfig(bits=bits), lora=lora,
                              device="cpu", dtype=torch.bfloat16, progress=False)
    else:
        model = transformers.AutoModelForCausalLM.from_config(BIG, dtype=torch.bfloat16)
        if bits:
            ql.quantize_model(model, ql.QuantConfig(bits=bits))
        if lora:
            ql.add_lora(model, lora)
    if lora is None:
        for param in model.parameters():
            param.requires_grad_(True)
    ql.enable_gradient_checkpointing(model)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-5)
    tokens = torch.randint(0, model.config.vocab_size, (batch, seq), generator=torch.Generator().manual_seed(1))
    started = time.perf_counter()
    prof = profile_steps(model, optimizer, tokens, steps=2, progress=False)
    seconds = (time.perf_counter() - started) / 2
    return model_name, mode, prof.peak_bytes, prof.breakdown, prof.rss_peak_bytes, seconds


def measured(batch: int, seq: int) -> tuple[list[str], list]:
    import multiprocessing

    from qlowrank.model.embedded import smollm2_gguf

    context = multiprocessing.get_context("spawn")
    results = []
    for model_name in ("SmolLM2-135M (real)", "random Llama 1.1B"):
        for mode in MODES:
            with context.Pool(1) as pool:
                result = pool.apply(measure_one, (model_name, mode, batch, seq))
            lora = None if mode.startswith("full") else ql.LoraConfig(r=16)
            source = str(smollm2_gguf()) if model_name.startswith("SmolLM2") else BIG
            est = ql.estimate_memory(source, ql.QuantConfig(bits=4 if mode.startswith("QLoRA") else None), lora,
                                     batch_size=batch, seq_len=seq, device="cpu")
            results.append(result + (est.total_bytes,))
            print(f"{model_name:<22}{mode:<26}{format_bytes(result[2]):>12}  RSS {format_bytes(result[4])}"
                  f"  {result[5]:.1f} s/step", flush=True)
    rows = [f"| model | setting (batch {batch} x {seq}, bf16, checkpointing, AdamW) | peak tensor memory | vs full | "
            "weights (frozen+trainable) | grads+Adam | activations+temporaries | process RSS peak (own process) | s/step | estimate_memory |",
            "|---|---|---|---|---|---|---|---|---|---|"]
    for model_name, mode, peak, bd, rss, seconds, est in results:
        full = next(r[2] for r in results if r[0] == model_name and r[1].startswith("full"))
        rows.append(f"| {model_name} | {mode} | {format_bytes(peak)} | {peak / full:.2f} | "
                    f"{format_bytes(bd['base_weights'] + bd['trainable_params'])} | "
                    f"{format_bytes(bd['gradients'] + bd['optimizer_states'])} | "
                    f"{format_bytes(bd['activations'] + bd['temporaries'])} | {format_bytes(rss)} | {seconds:.1f} | "
                    f"{format_bytes(est)} ({100 * (est - peak) / peak:+.1f}%) |")
    return rows, results


def plot(results) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = sorted({r[0] for r in results}, key=lambda m: [r[0] for r in results].index(m))
    fig, axes = plt.subplots(1, len(models), figsize=(6 * len(models), 5))
    for ax, model_name in zip(axes if len(models) > 1 else [axes], models):
        rows = [r for r in results if r[0] == model_name]
        labels = [r[1].replace(", ", "\n") for r in rows]
        bottom = [0.0] * len(rows)
        for category in CATEGORIES:
            values = [r[3][category] / 2**20 for r in rows]
            ax.bar(labels, values, bottom=bottom, color=COLORS[category], label=category)
            bottom = [b + v for b, v in zip(bottom, values)]
        full = rows[0][2]
        for i, r in enumerate(rows):
            ax.text(i, bottom[i], f"{format_bytes(r[2])}\n{r[2] / full:.2f}x", ha="center", va="bottom", fontsize=8)
        ax.set_title(f"{model_name}\npeak tensor memory, same batch and sequence", fontsize=10)
        ax.set_ylabel("MiB")
        ax.set_ylim(0, max(bottom) * 1.18)
    axes[0].legend(fontsize=8) if len(models) > 1 else axes.legend(fontsize=8)
    save_figure(fig, HERE / "paper_claims.png")
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--skip-measured", action="store_true", help="only the config-based claims (seconds)")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq", type=int, default=256)
    args = parser.parse_args()
    sections = [("1. LoRA paper: trainable parameters", lora_counts()),
                ("2. GPT-3 175B: training memory and adapter size", gpt3_memory()),
                ("3. QLoRA paper: 4-bit footprints and 65B under 48 GB", qlora_footprints())]
    for title, rows in sections:
        print(f"\n## {title}\n" + "\n".join(rows), flush=True)
    if not args.skip_measured:
        rows, results = measured(args.batch, args.seq)
        sections.append((f"4. Measured here: full vs LoRA vs QLoRA (batch {args.batch} x {args.seq})", rows))
        print(f"\n## {sections[-1][0]}\n" + "\n".join(rows))
        plot(results)
    text = "\n\n".join(f"### {title}\n\n" + "\n".join(rows) for title, rows in sections)
    atomic_write_text(HERE / "paper_claims.md", text + "\n")


if __name__ == "__main__":
    main()
