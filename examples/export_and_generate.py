"""Export a fine-tune as a merged bf16 checkpoint, chat with it in plain transformers, and load the adapter in PEFT.

What it shows, from a base model and a qlowrank (or PEFT) adapter:
  1. `ql.export_merged`: dequant(W_4bit) + scale * B @ A, written as an ordinary bf16 checkpoint.
  2. plain transformers (no qlowrank, no bitsandbytes, no peft) loads that folder and chats
     with it through the tokenizer's chat template.
  3. PEFT loads the same adapter onto the same 4-bit base: its logits equal qlowrank's.
With no --adapter, it first trains one for a few steps (examples/finetune_chat.py writes a
better one: pass --adapter finetune-chat/adapter).

How long: ~1 min on 2 CPU cores with the embedded SmolLM2-135M (load, 6 training steps when no
adapter is given, export, two loads, a short chat).

    python examples/export_and_generate.py [--model DIR_OR_GGUF] [--adapter DIR] [--out DIR]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
import transformers

import qlowrank as ql

QUESTIONS = ("What does the assert statement do in Python?", "And what does pass do?")
# qlowrank and PEFT multiply the same NF4 weights in float32; only the order of the LoRA
# additions differs, so their logits agree to float32 rounding (~1e-7 measured in
# tests/test_adapters.py); 1e-4 would still catch a wrong scale or a missing layer (those give > 1e-2).
PEFT_AGREEMENT = 1e-4


def quick_adapter(model_path: str, out: Path) -> Path:
    """Train a LoRA adapter for a few steps on Python-docs chat pairs (a stand-in for a real fine-tune)."""
    import json

    from qlowrank.data.demo_rows import build_conversations
    from qlowrank.train import TrainConfig, Trainer, load_examples

    tokenizer = ql.load_tokenizer(model_path)
    rows = build_conversations()[0][:24]
    (out / "data.jsonl").write_text("".join(json.dumps({"messages": r["messages"]}) + "\n" for r in rows))
    examples = load_examples(out / "data.jsonl", tokenizer, seq_len=128)
    model = ql.load_model(model_path, quant=ql.QuantConfig(bits=4), lora=ql.LoraConfig(r=8, alpha=16), progress=False)
    config = TrainConfig(out_dir=str(out / "train"), steps=6, batch_size=4, lr=2e-3, progress=False,
                         profile_memory=False)
    return Trainer(model, config, examples, pad_token_id=tokenizer.eos_token_id).train().adapter_dir


def chat(folder: Path, max_new_tokens: int) -> None:
    """A two-turn chat with the merged export, through transformers alone."""
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16).eval()
    history = []
    for question in QUESTIONS:
        history.append({"role": "user", "content": question})
        ids = tokenizer.apply_chat_template(history, add_generation_prompt=True, return_tensors="pt",
                                            return_dict=True)
        with torch.no_grad():
            out = model.generate(**ids, max_new_tokens=max_new_tokens, do_sample=False, repetition_penalty=1.2,
                                 pad_token_id=tokenizer.eos_token_id)
        reply = tokenizer.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True).strip()
        history.append({"role": "assistant", "content": reply})
        print(f"user:      {question}\nassistant: {reply}")


def peft_logits_agree(model_path: str, adapter: Path) -> float:
    """Relative logits difference between qlowrank and PEFT, same 4-bit base, same adapter, fp32 compute."""
    import peft

    quant = ql.QuantConfig(bits=4, compute_dtype=torch.float32)
    ours = ql.load_model(model_path, quant=quant, device="cpu", progress=False)
    ql.load_adapter(ours, adapter)
    base = ql.load_model(model_path, quant=quant, device="cpu", progress=False)   # the same NF4 weights
    theirs = peft.PeftModel.from_pretrained(base, str(adapter))
    ids = torch.randint(0, ours.config.vocab_size, (1, 32), generator=torch.Generator().manual_seed(0))   # (1, T)
    with torch.no_grad():
        a, b = ours(ids).logits.float(), theirs(ids).logits.float()
    return float((a - b).norm() / a.norm())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="base model directory or .gguf (default: the embedded SmolLM2)")
    parser.add_argument("--adapter", default=None, help="adapter directory (default: train a quick one)")
    parser.add_argument("--out", default="export-and-generate", help="output folder (merged/ goes here)")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    args = parser.parse_args(argv)
    start = time.perf_counter()
    if args.model is None:
        from qlowrank.model.embedded import smollm2_gguf
        args.model = str(smollm2_gguf())
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    adapter = Path(args.adapter) if args.adapter else quick_adapter(args.model, out)

    # 1. The base rebuilt as it was trained (4-bit, bf16 compute), the adapter on top, merged and exported.
    model = ql.load_model(args.model, quant=ql.QuantConfig(bits=4), progress=False)
    ql.load_adapter(model, adapter)
    report = ql.export_merged(model, out / "merged", dtype=torch.bfloat16, overwrite=True, progress=False)
    print(f"merged bf16 export: {out / 'merged'} (relative logits error vs the trained model: "
          f"{report['relative_logits_error']:.4f})")
    del model

    # 2. Plain transformers chats with the export.
    chat(out / "merged", args.max_new_tokens)

    # 3. PEFT reads the same adapter: same logits as qlowrank on the same 4-bit base.
    difference = peft_logits_agree(args.model, adapter)
    print(f"PEFT vs qlowrank logits, same 4-bit base and adapter: relative difference {difference:.2e}")
    print(f"{time.perf_counter() - start:.0f} s")
    return 0 if difference < PEFT_AGREEMENT else 1


if __name__ == "__main__":
    raise SystemExit(main())
