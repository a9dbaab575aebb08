"""GPU check: QLoRA peak VRAM of a Llama-3-8B-shaped model (random weights) vs estimate_memory and torchtune.

    .venv/bin/python benchmarks/gpu_memory.py             # needs one NVIDIA GPU, a few minutes
    .venv/bin/python benchmarks/gpu_memory.py --dry-run   # CPU only: the meta-device estimate
    .venv/bin/python benchmarks/gpu_memory.py --chunked-loss --json OUT.json   # as benchmarks/gpu_all.sh runs it

Settings: Llama-3-8B shape (hidden 4096, 32 layers, GQA 32/8, vocab 128256), NF4 +
double quantization, bf16 compute and activations, LoRA r=8 alpha=16 on every linear layer
but the head (torchtune's llama3_1/8B_qlora_single_device targets q, k, v, output proj and
the MLP), batch 2 x 2048 tokens, gradient checkpointing, torch AdamW, 3 steps. Reports the
profiler's tensor peak, torch.cuda.max_memory_allocated / reserved, the estimate, and
torchtune's published 7.4 GiB peak for Llama 3.1 8B QLoRA (their batch and sequence lengths
come from their dataset, so that comparison is indicative only).

Process level (issue 9): after the steps it asks `nvidia-smi --query-compute-apps=pid,used_memory`
for this process's figure, beside torch.cuda.memory_reserved() at the same moment and the
max reserved over the steps. Their differences measure the two CUDA constants of
qlowrank/memory/process.py: the context (nvidia-smi minus reserved) and the allocator's
reserve above the allocated peak (max reserved / max allocated - 1); the script prints both
beside the assumed values, and `estimate_memory(...).process_bytes` beside nvidia-smi.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import time

import torch
import transformers

import qlowrank as ql
from qlowrank.memory import format_bytes, profile_steps

TORCHTUNE_QLORA_8B_GIB = 7.4
CONFIG = transformers.LlamaConfig(
    vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
    num_key_value_heads=8, max_position_embeddings=8192, rope_theta=500000.0, tie_word_embeddings=False)
QUANT = ql.QuantConfig(bits=4, quant_type="nf4", double_quant=True, compute_dtype=torch.bfloat16)
LORA = ql.LoraConfig(r=8, alpha=16)


def nvidia_smi_process_bytes(pid: int) -> int | None:
    """This process's device memory as nvidia-smi lists it (MiB -> bytes); None when nvidia-smi is
    missing or does not list the pid (e.g. inside a container with its own PID namespace)."""
    try:
        out = subprocess.run(["nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=60, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    for line in out.splitlines():
        fields = [f.strip() for f in line.split(",")]
        if len(fields) == 2 and fields[0] == str(pid) and fields[1].isdigit():
            return int(fields[1]) * 2**20
    return None


def process_rows(estimate, prof) -> list[tuple[str, int | None]]:
    """nvidia-smi's figure beside the allocator's and the process model's (all bytes)."""
    torch.cuda.synchronize()
    reserved_now = torch.cuda.memory_reserved()
    smi = nvidia_smi_process_bytes(os.getpid())
    return [
        ("nvidia-smi used_memory (this pid)", smi),
        ("torch.cuda.memory_reserved (same moment)", reserved_now),
        ("torch.cuda.max_memory_reserved", prof.cuda_max_reserved),
        ("MemoryProfiler.process_peak_bytes", prof.process_peak_bytes),
        ("estimate_memory(...).process_bytes", estimate.process_bytes),
    ]


def reserve_ratio(prof) -> float:
    """What the caching allocator reserved above the allocated peak, as a share of it."""
    return prof.cuda_max_reserved / prof.cuda_max_allocated - 1


def record(args, estimate, prof, seconds: float) -> dict:
    """The measured figures and the process model's CUDA constants, for --json (benchmarks/gpu_all.sh)."""
    from qlowrank.memory import process as model

    rows = dict(process_rows(estimate, prof))
    smi, reserved_now = rows["nvidia-smi used_memory (this pid)"], rows["torch.cuda.memory_reserved (same moment)"]
    return {"device": torch.cuda.get_device_name(), "batch": args.batch, "seq": args.seq, "steps": args.steps,
            "chunked_loss": args.chunked_loss, "seconds_per_step": seconds, "profiler_peak": prof.peak_bytes,
            "cuda_max_allocated": prof.cuda_max_allocated, "cuda_max_reserved": prof.cuda_max_reserved,
            "estimate_bytes": estimate.total_bytes, "estimate_process_bytes": estimate.process_bytes,
            "nvidia_smi_bytes": smi, "reserved_now": reserved_now,
            "context_bytes": None if smi is None else smi - reserved_now, "reserve_ratio": reserve_ratio(prof),
            "assumed_context_bytes": model.CUDA_CONTEXT_BYTES + model.CUDA_CUBLAS_WORKSPACE_BYTES,
            "assumed_reserve_ratio": model.CUDA_RESERVE_RATIO,
            "torchtune_published_gib": TORCHTUNE_QLORA_8B_GIB}


def print_process_check(estimate, prof) -> None:
    """The process-level table, and the CUDA constants it measures next to process.py's assumptions."""
    from qlowrank.memory import process as model

    rows = process_rows(estimate, prof)
    print(f"\n{'process level':<44}{'GiB':>8}")
    for name, value in rows:
        print(f"{name:<44}{'n/a' if value is None else f'{value / 2**30:.3f}':>8}")
    smi, reserved_now = rows[0][1], rows[1][1]
    reserve = reserve_ratio(prof)
    print(f"allocator reserve: max reserved / max allocated - 1 = {100 * reserve:.1f}% "
          f"(process.py assumes {100 * model.CUDA_RESERVE_RATIO:.0f}%)")
    if smi is None:
        print("nvidia-smi did not list this process: the context cannot be measured here")
        return
    print(f"CUDA context: nvidia-smi - memory_reserved = {(smi - reserved_now) / 2**20:.0f} MiB (process.py assumes "
          f"{(model.CUDA_CONTEXT_BYTES + model.CUDA_CUBLAS_WORKSPACE_BYTES) / 2**20:.0f} MiB with the cuBLAS workspace)")
    print(f"process model error against nvidia-smi: {100 * (estimate.process_bytes / smi - 1):+.1f}%")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dry-run", action="store_true", help="only build the meta model and print the estimate")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--chunked-loss", action="store_true", help="measure with the trainer's chunked cross-entropy")
    parser.add_argument("--json", default=None, help="also write the figures to this JSON file")
    args = parser.parse_args()
    if not args.dry_run and not torch.cuda.is_available():
        raise SystemExit("benchmarks/gpu_memory.py needs an NVIDIA GPU (torch sees none); --dry-run prints the "
                         "estimate only")

    estimates = {chunked: ql.estimate_memory(CONFIG, quant=QUANT, lora=LORA, batch_size=args.batch, seq_len=args.seq,
                                             gradient_checkpointing=True, optimizer="adamw", dtype=torch.bfloat16,
                                             device="cuda", chunked_loss=chunked) for chunked in (False, True)}
    estimate = estimates[args.chunked_loss]
    print(estimate.table())
    print(f"with the {'full-logits' if args.chunked_loss else 'chunked'} loss instead: "
          f"{format_bytes(estimates[not args.chunked_loss].total_bytes)}")
    if args.dry_run:
        print("\n--dry-run: no GPU used. Run without --dry-run on a machine with one NVIDIA GPU.")
        return

    started = time.perf_counter()
    torch.manual_seed(0)
    with torch.device("cuda"):  # random bf16 weights straight on the GPU, quantized layer by layer
        model = transformers.AutoModelForCausalLM.from_config(CONFIG, dtype=torch.bfloat16)
    ql.quantize_model(model, QUANT)
    ql.add_lora(model, LORA)
    ql.enable_gradient_checkpointing(model)
    model.train()
    torch.cuda.empty_cache()
    print(f"model ready in {time.perf_counter() - started:.0f} s: {ql.count_parameters(model)}")
    optimizer = torch.optim.AdamW(ql.lora_parameters(model), lr=1e-4)
    tokens = torch.randint(0, CONFIG.vocab_size, (args.batch, args.seq), device="cuda")
    started = time.perf_counter()
    loss_fn = None
    if args.chunked_loss:
        from qlowrank.memory.estimator import chunked_loss_fn as loss_fn
    prof = profile_steps(model, optimizer, tokens, args.steps, loss_fn=loss_fn)
    seconds = (time.perf_counter() - started) / args.steps
    print(prof.table())
    gib = 2**30
    rows = [
        ("profiler tensor peak", prof.peak_bytes),
        ("torch.cuda.max_memory_allocated", prof.cuda_max_allocated),
        ("torch.cuda.max_memory_reserved", prof.cuda_max_reserved),
        (f"estimate_memory ({'chunked' if args.chunked_loss else 'full-logits'} loss)", estimate.total_bytes),
        ("torchtune Llama 3.1 8B QLoRA (published)", int(TORCHTUNE_QLORA_8B_GIB * gib)),
    ]
    print(f"\n{'':<42}{'GiB':>8}{'vs max_allocated':>18}")
    for name, value in rows:
        print(f"{name:<42}{value / gib:>8.2f}{100 * (value - prof.cuda_max_allocated) / prof.cuda_max_allocated:>+17.1f}%")
    print_process_check(estimate, prof)
    print(f"\n{torch.cuda.get_device_name()}, batch {args.batch} x {args.seq}, {seconds:.2f} s/step")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(record(args, estimate, prof, seconds), handle, indent=1)


if __name__ == "__main__":
    main()
