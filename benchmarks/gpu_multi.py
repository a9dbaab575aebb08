"""Prepared GPU check (not yet run: no GPU was lent): DDP and FSDP on every GPU of the machine against one GPU.

    python benchmarks/gpu_multi.py [--steps 12] [--seq 1024] [--batch 2]      # one script, < 10 min

A random Llama of TinyLlama-1.1B's shape, NF4 + bf16 compute, LoRA r=16 on all linear layers,
gradient checkpointing, AdamW, the same per-GPU batch everywhere, trained in fresh
processes three ways: 1 GPU; `torchrun --nproc_per_node N` DDP (NCCL); the same with
`sharding="fsdp"`. Per rank: peak VRAM (torch.cuda.max_memory_allocated, and reserved)
against `estimate_memory(..., processes=N, sharding=...)`, the base bytes the rank holds;
per run: tokens/s (all ranks) and its ratio to one GPU. The global batch grows with N, so
losses are not compared here (equality is tested on CPU: tests/test_distributed.py). Writes benchmarks/gpu_multi.json and prints a table.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from ddp_cpu import parse_args, run  # noqa: E402  (the shared launch-and-collect helpers)


def _config():
    import transformers

    return transformers.LlamaConfig(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
                                    num_attention_heads=32, num_key_value_heads=4, tie_word_embeddings=False)


def worker(args) -> None:
    import torch
    import transformers

    import qlowrank as ql
    from qlowrank.train import Example, TrainConfig, Trainer
    from qlowrank.train.parallel import local_device, local_model_bytes

    device = local_device("cuda")
    torch.cuda.set_device(device)
    torch.manual_seed(0)
    quant, lora = ql.QuantConfig(bits=4, compute_dtype=torch.bfloat16), ql.LoraConfig(r=16, alpha=32)
    model = transformers.AutoModelForCausalLM.from_config(_config(), dtype=torch.bfloat16)
    ql.quantize_model(model, quant, device=device)
    model.to(device)
    ql.add_lora(model, lora, seed=0)
    ql.enable_gradient_checkpointing(model)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    generator = torch.Generator().manual_seed(1)
    examples = [Example(ids, ids) for ids in torch.randint(0, 32000, (args.batch * world * args.steps, args.seq),
                                                         generator=generator).tolist()]
    times = []
    torch.cuda.reset_peak_memory_stats(device)
    trainer = Trainer(model, TrainConfig(out_dir=args.out, steps=args.steps, batch_size=args.batch, lr=1e-4,
                                         precision="bf16", progress=False, profile_memory=False,
                                         sharding=args.sharding), examples,
                      on_step=lambda t, step, m: times.append(m["seconds"]))
    result = trainer.train()
    estimate = ql.estimate_memory(_config(), quant=quant, lora=lora, batch_size=args.batch, seq_len=args.seq,
                                  device="cuda", chunked_loss=True, processes=world, sharding=args.sharding)
    print("RESULT " + json.dumps({
        "rank": trainer.rank, "world": world, "losses": result.losses, "step_seconds": times,
        "max_allocated": torch.cuda.max_memory_allocated(device), "max_reserved": torch.cuda.max_memory_reserved(device),
        "estimate": estimate.total_bytes, **local_model_bytes(model),
    }), flush=True)


def main() -> None:
    args = parse_args(__doc__, steps=12, seq=1024, batch=2)
    if args.worker:
        return worker(args)
    import torch

    gpus = torch.cuda.device_count()
    if gpus == 0:
        raise SystemExit("gpu_multi.py needs NVIDIA GPUs (none found)")
    scratch = HERE / "_cache" / "gpu_multi"
    me = [str(Path(__file__).resolve()), "--worker", "--steps", str(args.steps), "--seq", str(args.seq),
          "--batch", str(args.batch)]
    per_gpu_tokens = args.batch * args.seq
    runs = [run("1 GPU", [sys.executable, *me, "--out", str(scratch / "one")], per_gpu_tokens, timeout=540)]
    if gpus > 1:
        torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(gpus)]
        runs.append(run(f"{gpus} GPUs DDP", [*torchrun, *me, "--out", str(scratch / "ddp")], per_gpu_tokens, timeout=540))
        runs.append(run(f"{gpus} GPUs FSDP", [*torchrun, *me, "--sharding", "fsdp", "--out", str(scratch / "fsdp")],
                        per_gpu_tokens, timeout=540))
    else:
        print("only one GPU: DDP and FSDP need two or more; measured the single-GPU run only")
    one = runs[0]
    print(f"{torch.cuda.get_device_name(0)} x {gpus}; TinyLlama-1.1B shape, NF4 + bf16, LoRA r=16, batch {args.batch} "
          f"per GPU x seq {args.seq}")
    print("| run | tokens/s | vs 1 GPU | per-rank peak allocated (GiB) | per-rank estimate (GiB) | est / measured "
          "| per-rank base held (GiB) |")
    print("|---|---|---|---|---|---|---|")
    for r in runs:
        alloc = " / ".join(f"{x['max_allocated'] / 2**30:.2f}" for x in r["ranks"])
        est = " / ".join(f"{x['estimate'] / 2**30:.2f}" for x in r["ranks"])
        ratio = " / ".join(f"{x['estimate'] / x['max_allocated']:.3f}" for x in r["ranks"])
        base = " / ".join(f"{(x['base_weights'] + x['quant_state']) / 2**30:.2f}" for x in r["ranks"])
        print(f"| {r['name']} | {r['tokens_per_s']:.0f} | {r['tokens_per_s'] / one['tokens_per_s']:.2f}x | {alloc} | "
              f"{est} | {ratio} | {base} |")
    (HERE / "gpu_multi.json").write_text(json.dumps(runs, indent=1) + "\n")


if __name__ == "__main__":
    main()
