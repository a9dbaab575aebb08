"""Benchmark: mixtures of experts on two processes (DDP, FSDP) against one: losses, LoRA factors, per-rank memory.

    flock /tmp/qlowrank-heavy.lock nice -n 10 .venv/bin/python benchmarks/moe_processes.py [--steps 10]

Random Qwen3-MoE (16 experts, top 2) and gpt-oss (8 experts, top 2) checkpoints, hidden 128, 4 layers,
loaded 4-bit NF4 with fp32 compute, LoRA r=8 on the attention only ("attention") or on the attention, the
experts and the routers ("experts+router"), gradient checkpointing, AdamW lr 1e-3, random tokens, global
batch 4 x 128. Each combination runs as 1 process x batch 4, then under `torchrun --nproc_per_node 2` as
DDP and FSDP with batch 2 per process. Per run: the per-step losses' and the final adapter's largest
difference from the single process (and DDP's adapter from FSDP's); per rank the bytes it holds of
the base (FSDP: its shard plus the whole code books and quant_state) and its anonymous (RssAnon) peak,
sampled through /proc; and
`estimate_memory(..., processes=2, sharding="fsdp")`'s per-rank base bytes and process peak. Results go to
benchmarks/moe_processes.json (with its summary row) and a table.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
SEQ, GLOBAL_BATCH = 128, 4
FAMILIES = ("qwen3_moe", "gpt_oss")
TARGETS = {"attention": [], "experts+router": ["experts", "router"]}
COMMAND = "python benchmarks/moe_processes.py"


def config_of(family: str):
    import transformers

    common = dict(vocab_size=1024, hidden_size=128, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                  head_dim=32, num_experts_per_tok=2)
    if family == "qwen3_moe":
        return transformers.Qwen3MoeConfig(intermediate_size=256, moe_intermediate_size=64, num_experts=16, **common)
    return transformers.GptOssConfig(intermediate_size=64, num_local_experts=8, layer_types=["sliding_attention",
                                     "full_attention"] * 2, **common)


def lora_of(target: str):
    import qlowrank as ql

    return ql.LoraConfig(r=8, alpha=16, target_parameters=TARGETS[target])


def worker(args) -> None:
    """One rank (or the single process): train, print this rank's losses and the bytes it holds as JSON."""
    import torch

    import qlowrank as ql
    from qlowrank.train import Example, TrainConfig, Trainer
    from qlowrank.train.fsdp import local_model_bytes

    model = ql.load_model(args.model, quant=ql.QuantConfig(bits=4, compute_dtype=torch.float32),
                          lora=lora_of(args.target), device="cpu", progress=False, seed=0)
    ql.enable_gradient_checkpointing(model)
    generator = torch.Generator().manual_seed(1)
    examples = [Example(ids, ids) for ids in torch.randint(0, 1024, (GLOBAL_BATCH * args.steps, SEQ),
                                                         generator=generator).tolist()]
    world = int(os.environ.get("WORLD_SIZE", "1"))
    config = TrainConfig(out_dir=args.out, steps=args.steps, batch_size=GLOBAL_BATCH // world, lr=1e-3,
                         precision="fp32", progress=False, profile_memory=False, sharding=args.sharding)
    result = Trainer(model, config, examples).train()
    print("RESULT " + json.dumps({"losses": result.losses, **local_model_bytes(model)}), flush=True)


def launch(cmd: list[str]) -> list[dict]:
    """Run one launch, sampling its ranks' RssAnon; each rank's RESULT with its anonymous peak."""
    sys.path.insert(0, str(ROOT / "tests"))
    from conftest import children_anon_peaks, finish_process, start_process

    process = start_process(cmd, ROOT)
    peaks = children_anon_peaks(process) if "torch.distributed.run" in cmd else []
    out = finish_process(process, timeout=1800)
    ranks = [json.loads(line[7:]) for line in out.splitlines() if line.startswith("RESULT ")]
    for rank, peak in zip(ranks, peaks):
        rank["anon_peak_bytes"] = peak
    return ranks


def largest_difference(a: Path, b: Path) -> float:
    from safetensors.torch import load_file

    x, y = (load_file(d / "adapter" / "adapter_model.safetensors") for d in (a, b))
    assert x.keys() == y.keys()
    return max(float((x[k] - y[k]).abs().max()) for k in x)


def estimate(family: str, target: str) -> dict:
    import torch

    import qlowrank as ql

    est = ql.estimate_memory(config_of(family), quant=ql.QuantConfig(bits=4, compute_dtype=torch.float32),
                             lora=lora_of(target), batch_size=GLOBAL_BATCH // 2, seq_len=SEQ, dtype=torch.float32,
                             device="cpu", processes=2, sharding="fsdp")
    return {"base_weights": est.breakdown["base_weights"], "process_bytes": est.process_bytes}


def combination(scratch: Path, family: str, target: str, steps: int) -> dict:
    me = [str(Path(__file__).resolve()), "--worker", "--steps", str(steps), "--model", str(scratch / family),
          "--target", target]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    out = scratch / f"{family}-{target}"
    runs = {"one": launch([sys.executable, *me, "--out", str(out / "one")]),
            "ddp": launch([*torchrun, *me, "--out", str(out / "ddp")]),
            "fsdp": launch([*torchrun, *me, "--sharding", "fsdp", "--out", str(out / "fsdp")])}
    one = runs["one"][0]
    row = {"family": family, "target": target, "one_base_bytes": one["base_weights"] + one["quant_state"],
           "fsdp_estimate": estimate(family, target), "runs": runs}
    for name in ("ddp", "fsdp"):
        row[f"{name}_loss_diff"] = max(abs(a - b) for r in runs[name] for a, b in zip(r["losses"], one["losses"]))
        row[f"{name}_adapter_diff"] = largest_difference(out / name, out / "one")
    # The two strategies run the same sums in the same order: their adapters should agree exactly.
    row["ddp_vs_fsdp_adapter_diff"] = largest_difference(out / "ddp", out / "fsdp")
    row["fsdp_rank_base_bytes"] = [r["base_weights"] + r["quant_state"] for r in runs["fsdp"]]
    row["fsdp_rank_anon_peaks"] = [r["anon_peak_bytes"] for r in runs["fsdp"]]
    return row


def headline(rows: list[dict], date: str) -> dict:
    loss = max(max(r["ddp_loss_diff"], r["fsdp_loss_diff"]) for r in rows)
    factors = max(max(r["ddp_adapter_diff"], r["fsdp_adapter_diff"]) for r in rows)
    between = max(r["ddp_vs_fsdp_adapter_diff"] for r in rows)
    qwen = next(r for r in rows if r["family"] == "qwen3_moe" and r["target"] == "experts+router")
    share = max(qwen["fsdp_rank_base_bytes"]) / qwen["one_base_bytes"]
    peak, predicted = max(qwen["fsdp_rank_anon_peaks"]), qwen["fsdp_estimate"]["process_bytes"]
    figure = (f"Qwen3-MoE and gpt-oss (tiny, NF4, LoRA on attention / experts + routers), 2 processes DDP and FSDP "
              f"against 1: losses within {loss:.1e}, LoRA factors within {factors:.1e} (DDP against FSDP: "
              f"{between:.1e}); FSDP holds {share:.2f}x of the base per rank (experts sharded), estimated process "
              f"peak {predicted / 2**20:.0f} MiB against {peak / 2**20:.0f} MiB measured")
    return {"topic": "Mixtures of experts on several processes", "figure": figure, "date": date, "command": COMMAND}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=10)
    for hidden in ("--worker", "--sharding", "--out", "--model", "--target"):
        parser.add_argument(hidden, **({"action": "store_true"} if hidden == "--worker" else {"default": None}),
                            help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args)
    import torch
    import transformers

    scratch = HERE / "_cache" / "moe_processes"
    for family in FAMILIES:
        torch.manual_seed(0)
        transformers.AutoModelForCausalLM.from_config(config_of(family)).save_pretrained(scratch / family)
    rows = [combination(scratch, family, target, args.steps) for family in FAMILIES for target in TARGETS]
    print("| family | LoRA on | max loss diff DDP / FSDP | max factor diff DDP / FSDP | base per FSDP rank / one "
          "process (KiB) | estimated base per rank (KiB) | FSDP rank RssAnon peaks / estimate (MiB) |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        peaks = " / ".join(f"{p / 2**20:.0f}" for p in r["fsdp_rank_anon_peaks"])
        print(f"| {r['family']} | {r['target']} | {r['ddp_loss_diff']:.1e} / {r['fsdp_loss_diff']:.1e} | "
              f"{r['ddp_adapter_diff']:.1e} / {r['fsdp_adapter_diff']:.1e} | "
              f"{max(r['fsdp_rank_base_bytes']) / 1024:.1f} / {r['one_base_bytes'] / 1024:.1f} | "
              f"{r['fsdp_estimate']['base_weights'] / 1024:.1f} | {peaks} / "
              f"{r['fsdp_estimate']['process_bytes'] / 2**20:.0f} |")
    date = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    result = {"date": date, "command": COMMAND, "steps": args.steps, "rows": rows,
              "headline": [headline(rows, date[:10])]}
    (HERE / "moe_processes.json").write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
