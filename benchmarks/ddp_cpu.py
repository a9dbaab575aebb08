"""Benchmark: one process against two (DDP, FSDP) on this CPU: wall time, step time, tokens/s, per-rank memory.

    flock /tmp/qlowrank-heavy.lock .venv/bin/python benchmarks/ddp_cpu.py [--steps 8]

The same run three ways, each in fresh processes: 1 process x batch 4 (torch's default
threads), then `torchrun --nproc_per_node 2` with batch 2 per process, once DDP and once
`sharding="fsdp"` (torchrun gives each rank one thread). Global batch 4 x 256 tokens in all
three. The model is a random Llama (hidden 768, 8 layers, vocab 16000, ~80M parameters) in
4-bit NF4 with bf16 compute, LoRA r=16 on every linear layer, gradient checkpointing, AdamW.
Per run: wall time of the whole command (start-up included), median step time over the
steps after the second, tokens/s, per rank the peak RSS and the bytes it holds of the base
(FSDP: its shard plus the whole quant_state), and the per-step losses' largest difference
from the single process. Results go to benchmarks/ddp_cpu.json and a table.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
SEQ, GLOBAL_BATCH = 256, 4


def worker(args) -> None:
    """One rank (or the single process): train and print this rank's figures as JSON."""
    import resource

    import torch
    import transformers

    import qlowrank as ql
    from qlowrank.train import Example, TrainConfig, Trainer
    from qlowrank.train.parallel import local_model_bytes

    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=16000, hidden_size=768, intermediate_size=2048, num_hidden_layers=8,
                                      num_attention_heads=12, num_key_value_heads=4, tie_word_embeddings=False)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    ql.quantize_model(model, ql.QuantConfig(bits=4, compute_dtype=torch.bfloat16))
    ql.add_lora(model, ql.LoraConfig(r=16, alpha=32), seed=0)
    ql.enable_gradient_checkpointing(model)
    generator = torch.Generator().manual_seed(1)
    examples = [Example(ids, ids) for ids in torch.randint(0, 16000, (GLOBAL_BATCH * args.steps, SEQ),
                                                         generator=generator).tolist()]
    world = int(os.environ.get("WORLD_SIZE", "1"))
    times = []
    trainer = Trainer(model, TrainConfig(out_dir=args.out, steps=args.steps, batch_size=GLOBAL_BATCH // world, lr=1e-4,
                                         precision="bf16", progress=False, profile_memory=False,
                                         sharding=args.sharding),
                      examples, on_step=lambda t, step, m: times.append(m["seconds"]))
    result = trainer.train()
    print("RESULT " + json.dumps({
        "rank": trainer.rank, "losses": result.losses, "step_seconds": times,
        "rss_peak_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, **local_model_bytes(model),
    }), flush=True)


def run(name: str, cmd: list[str], tokens_per_rank_step: int, env: dict | None = None, timeout: int = 1800) -> dict:
    """Run one launch; collect each rank's RESULT line; step time is rank 0's median after step 2."""
    start = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **(env or {})}, timeout=timeout)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"{name} failed:\n{done.stderr[-4000:]}")
    ranks = sorted((json.loads(line[7:]) for line in done.stdout.splitlines() if line.startswith("RESULT ")),
                   key=lambda r: r["rank"])
    step = statistics.median(ranks[0]["step_seconds"][2:])
    return {"name": name, "wall_s": wall, "step_s": step, "tokens_per_s": tokens_per_rank_step * len(ranks) / step,
            "ranks": ranks}


def parse_args(doc: str, **defaults) -> argparse.Namespace:
    """--steps and the given options (name=default), plus the hidden worker flags."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    for name, default in defaults.items():
        parser.add_argument(f"--{name}", type=int, default=default)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--sharding", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--out", default=None, help=argparse.SUPPRESS)
    return parser.parse_args()


def main() -> None:
    args = parse_args(__doc__, steps=8)
    if args.worker:
        return worker(args)
    scratch = HERE / "_cache" / "ddp_cpu"
    me = [str(Path(__file__).resolve()), "--worker", "--steps", str(args.steps)]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    runs = [
        run("1 process x batch 4", [sys.executable, *me, "--out", str(scratch / "one")], GLOBAL_BATCH * SEQ),
        run("2 processes DDP x batch 2", [*torchrun, *me, "--out", str(scratch / "ddp")], GLOBAL_BATCH * SEQ // 2),
        run("2 processes FSDP x batch 2", [*torchrun, *me, "--sharding", "fsdp", "--out", str(scratch / "fsdp")],
            GLOBAL_BATCH * SEQ // 2),
    ]
    one = runs[0]
    print(f"random Llama ~80M, NF4 + bf16, LoRA r=16 all-linear, checkpointing, global batch {GLOBAL_BATCH} x {SEQ}, "
          f"{args.steps} steps; {os.cpu_count()} CPU cores")
    print("| run | wall (s) | step (s) | tokens/s | step vs 1 process | per-rank peak RSS (MiB) | per-rank base bytes (MiB) "
          "| max loss diff vs 1 process |")
    print("|---|---|---|---|---|---|---|---|")
    for r in runs:
        diff = max(abs(a - b) for a, b in zip(r["ranks"][0]["losses"], one["ranks"][0]["losses"]))
        rss = " / ".join(f"{x['rss_peak_bytes'] / 2**20:.0f}" for x in r["ranks"])
        base = " / ".join(f"{(x['base_weights'] + x['quant_state']) / 2**20:.1f}" for x in r["ranks"])
        print(f"| {r['name']} | {r['wall_s']:.1f} | {r['step_s']:.2f} | {r['tokens_per_s']:.0f} | "
              f"{r['step_s'] / one['step_s']:.2f}x | {rss} | {base} | {diff:.2e} |")
    (HERE / "ddp_cpu.json").write_text(json.dumps(runs, indent=1) + "\n")


if __name__ == "__main__":
    main()
