"""How far "a quantized base GGUF + the adapter GGUF" drifts in llama.cpp from the merged export, on the real SmolLM2-135M.

    flock /tmp/qlowrank-heavy.lock .venv/bin/python benchmarks/llamacpp_drift.py        # ~15 min on 2 cores
    .venv/bin/python benchmarks/llamacpp_drift.py --steps 1 --eval 2 --out /tmp/d.json  # smoke
    .venv/bin/python benchmarks/llamacpp_drift.py --report                              # the docs' table

Needs llama-cpp-python (`pip install 'qlowrank[llama]'`). A QLoRA adapter (NF4 + double quantization,
r 16, alpha 32, all linear layers) is trained on the demo's task (chat Q/A from the pydoc topics,
batch 4 x <= 160 tokens, AdamW lr 1e-3, bf16 autocast and bf16 weights outside the 4-bit layers, as the quality
benchmark), so the factors learned to correct dequant(NF4(W)).
The merged f32 GGUF (dequant(NF4) + scale B A, exactly what was trained) is the reference. Every other
file is run by llama.cpp (llama-cpp-python, f32 KV cache) on the held-out conversations and compared
with two references position by position: relative logits error, KL(reference || file) in nats per token,
top-1 agreement, and the held-out loss on the answer tokens. The second reference is the adapter on the
original f16 weights, which separates what a quantized GGUF base adds from the NF4-vs-original gap that the
adapter was trained across. Bases the adapter is applied to:

    nf4_f32      the B = 0 export of the quantized model: the base the adapter was trained on
    f16 / q8_0   the original weights written by qlowrank's exporter (f16, Q8_0)
    q4_k_m       the original f32 GGUF quantized by llama.cpp (llama_model_quantize, Q4_K_M)
    q4_1_source  the SmolLM2-135M-Instruct.Q4_1.gguf file the model was loaded from

"Original weights" are that Q4_1 file dequantized (the only SmolLM2 weights here), so NF4 re-quantizes
already 4-bit weights, as in the quality benchmark. Rows without the adapter show the adapter's own effect.
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
DEFAULT_OUT = HERE / "llamacpp_drift.json"
LORA = dict(r=16, alpha=32, target_modules="all-linear")
SEQ = 160
# llama.cpp's file type for Q4_K_M (enum llama_ftype in llama.h).
LLAMA_FTYPE_MOSTLY_Q4_K_M = 15
# (row name, base file, with the adapter?) in the table's order; the reference is "merged_f32".
ROWS = [
    ("merged_f16", "merged_f16.gguf", False),
    ("merged_q8_0", "merged_q8_0.gguf", False),
    ("nf4_f32 + adapter", "base_nf4_f32.gguf", True),
    ("f16 + adapter", "base_f16.gguf", True),
    ("q8_0 + adapter", "base_q8_0.gguf", True),
    ("q4_k_m + adapter", "base_q4_k_m.gguf", True),
    ("q4_1_source + adapter", None, True),
    ("nf4_f32, no adapter", "base_nf4_f32.gguf", False),
    ("f16, no adapter", "base_f16.gguf", False),
    ("q4_1_source, no adapter", None, False),
]
# The two references every row is compared with: what was trained, and the adapter on the original f16 weights
# (which separates what a quantized GGUF base adds from the NF4-vs-original gap the adapter was trained across).
REFERENCES = {"merged_f32": ("merged_f32.gguf", False), "f16 + adapter": ("base_f16.gguf", True)}


def train_and_export(work: Path, steps: int, seed: int) -> dict:
    """Train the adapter and write every GGUF the table compares (the B = 0 base first)."""
    import qlowrank as ql
    from qlowrank.data.demo_rows import build_conversations
    from qlowrank.model.embedded import smollm2_gguf
    from qlowrank.train import TrainConfig, Trainer, load_examples

    source = smollm2_gguf()
    tokenizer = ql.load_tokenizer(source)
    train_rows, eval_rows = build_conversations()
    for name, rows in (("train", train_rows), ("eval", eval_rows)):
        (work / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    train = load_examples(work / "train.jsonl", tokenizer, SEQ)
    held = load_examples(work / "eval.jsonl", tokenizer, SEQ)
    quiet = dict(format="gguf", progress=False, probe=False)
    torch.manual_seed(seed)
    model = ql.load_model(source, quant=ql.QuantConfig(bits=4, compute_dtype=torch.bfloat16),
                          lora=ql.LoraConfig(**LORA), device="cpu", dtype=torch.bfloat16, progress=False, seed=seed)
    ql.export_merged(model, work / "base_nf4_f32.gguf", gguf_type="f32", **quiet)   # B = 0: dequant(NF4)
    ql.enable_gradient_checkpointing(model)
    config = TrainConfig(out_dir=str(work / "run"), steps=steps, batch_size=4, lr=1e-3,
                         warmup_steps=max(1, steps // 10), min_lr_ratio=0.1, precision="bf16", seed=seed,
                         profile_memory=False, progress=False, keep_checkpoints=1)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    started = time.perf_counter()
    result = Trainer(model, config, train, pad_token_id=pad).train()   # held-out loss: measured in llama.cpp below
    trained = {"steps": result.final_step, "seconds": round(time.perf_counter() - started, 1),
               "train_losses": result.losses}
    model.eval()
    for gguf_type in ("f32", "f16", "q8_0"):
        ql.export_merged(model, work / f"merged_{gguf_type}.gguf", gguf_type=gguf_type, **quiet)
    adapter = ql.save_gguf_adapter(model, work / "adapter.gguf", dtype="f16")   # the CLI's default type
    del model
    original = ql.load_model(source, quant=ql.QuantConfig(bits=None), device="cpu", dtype=torch.float32,
                             progress=False)
    for gguf_type in ("f32", "f16", "q8_0"):
        ql.export_merged(original, work / f"base_{gguf_type}.gguf", gguf_type=gguf_type, **quiet)
    del original
    return {"source": str(source), "training": trained, "adapter": adapter, "eval_examples": held,
            "tokenizer_vocab": len(tokenizer)}


def quantize_q4_k_m(work: Path) -> None:
    """The original f32 GGUF as llama.cpp's own Q4_K_M (its fallbacks for widths not divisible by 256 included)."""
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = LLAMA_FTYPE_MOSTLY_Q4_K_M
    code = llama_cpp.llama_model_quantize(str(work / "base_f32.gguf").encode(),
                                          str(work / "base_q4_k_m.gguf").encode(), params)
    if code != 0:
        raise RuntimeError(f"llama_model_quantize to Q4_K_M failed with code {code}")


def _open(path: Path, lora: Path | None):
    import llama_cpp

    kw = dict(model_path=str(path), n_ctx=SEQ + 16, n_batch=SEQ + 16, logits_all=True, verbose=False,
              n_threads=2, type_k=0, type_v=0, seed=0)   # f32 KV cache: no f16 rounding of keys and values
    if lora is not None:
        kw["lora_path"] = str(lora)
    return llama_cpp.Llama(**kw)


def _logits(llm, tokens: list[int]) -> torch.Tensor:
    llm.reset()
    llm.eval(tokens)
    return torch.from_numpy(np.array(llm.scores[:len(tokens)], dtype=np.float32))


def run_file(path: Path, lora: Path | None, examples) -> list[torch.Tensor]:
    """llama.cpp's logits of every held-out example, for one file (with or without the adapter)."""
    llm = _open(path, lora)
    try:
        return [_logits(llm, example.input_ids) for example in examples]
    finally:
        llm.close()


def compare(references: list[torch.Tensor], got: list[torch.Tensor], examples) -> dict:
    """One file's logits against a reference's on every held-out example."""
    sums = dict(diff2=0.0, ref2=0.0, kl=0.0, agree=0, positions=0, nll=0.0, ref_nll=0.0, answer=0)
    for ref, logits, example in zip(references, got, examples):
        _accumulate(sums, ref, logits, example.labels)
    return {"relative_logits_error": math.sqrt(sums["diff2"] / sums["ref2"]),
            "kl_nats_per_token": sums["kl"] / sums["positions"],
            "top1_agreement": sums["agree"] / sums["positions"],
            "eval_loss": sums["nll"] / sums["answer"], "reference_eval_loss": sums["ref_nll"] / sums["answer"],
            "positions": sums["positions"], "answer_tokens": sums["answer"]}


def _accumulate(sums: dict, ref: torch.Tensor, got: torch.Tensor, labels: list[int]) -> None:
    ref_log, got_log = torch.log_softmax(ref.double(), -1), torch.log_softmax(got.double(), -1)
    sums["diff2"] += float((got - ref).double().pow(2).sum())
    sums["ref2"] += float(ref.double().pow(2).sum())
    sums["kl"] += float((ref_log.exp() * (ref_log - got_log)).sum())
    sums["agree"] += int((ref.argmax(-1) == got.argmax(-1)).sum())
    sums["positions"] += ref.shape[0]
    # Position t predicts token t + 1; the loss counts the answer tokens (labels != -100), as training did.
    target = torch.tensor(labels[1:])
    keep = target != -100
    picked = target[keep].unsqueeze(1)
    sums["nll"] -= float(got_log[:-1][keep].gather(1, picked).sum())
    sums["ref_nll"] -= float(ref_log[:-1][keep].gather(1, picked).sum())
    sums["answer"] += int(keep.sum())


def run(args) -> dict:
    work = Path(args.work or tempfile.mkdtemp(prefix="llamacpp-drift-"))
    work.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    made = train_and_export(work, args.steps, args.seed)
    examples = made.pop("eval_examples")[:args.eval]
    quantize_q4_k_m(work)
    sizes = {p.name: p.stat().st_size for p in sorted(work.glob("*.gguf"))}
    adapter = work / "adapter.gguf"
    source = Path(made["source"])
    references = {name: run_file(work / file, adapter if lora else None, examples)
                  for name, (file, lora) in REFERENCES.items()}
    rows = []
    for name, base, with_adapter in ROWS:
        path = source if base is None else work / base
        got = run_file(path, adapter if with_adapter else None, examples)
        row = {"row": name, "base": path.name, "adapter": with_adapter,
               "against": {ref: compare(logits, got, examples) for ref, logits in references.items()}}
        main_ref = row["against"]["merged_f32"]
        print(f"{name:26s} rel {main_ref['relative_logits_error']:.4f}  KL {main_ref['kl_nats_per_token']:.5f}  "
              f"top1 {main_ref['top1_agreement']:.4f}  loss {main_ref['eval_loss']:.4f}", flush=True)
        rows.append(row)
    return {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "model": "SmolLM2-135M-Instruct",
            "lora": LORA, "quant": "nf4 + double quantization", **made,
            "references": {name: file for name, (file, _) in REFERENCES.items()},
            "eval_examples": len(examples), "file_bytes": sizes, "rows": rows,
            "total_seconds": round(time.perf_counter() - started, 1)}


def report(path: Path) -> str:
    """The docs' table (markdown) from the JSON: each row against both references."""
    data = json.loads(Path(path).read_text())
    lines = ["| llama.cpp runs | vs merged f32: rel. logits error | KL (nats/token) | top-1 agree | "
             "vs f16 + adapter: KL | top-1 agree | held-out loss |", "|---|---|---|---|---|---|---|"]
    for row in data["rows"]:
        merged, f16 = row["against"]["merged_f32"], row["against"]["f16 + adapter"]
        lines.append(f"| {row['row']} | {merged['relative_logits_error']:.2g} | {merged['kl_nats_per_token']:.2g} | "
                     f"{merged['top1_agreement']:.1%} | {f16['kl_nats_per_token']:.2g} | {f16['top1_agreement']:.1%} | "
                     f"{merged['eval_loss']:.3f} |")
    reference = data["rows"][0]["against"]["merged_f32"]["reference_eval_loss"]
    lines.append(f"| merged_f32 (the reference) | 0 | 0 | 100% | | | {reference:.3f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20, help="training steps [default: 20]")
    parser.add_argument("--eval", type=int, default=12, help="held-out examples to run [default: 12]")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work", help="folder for the GGUF files [default: a new temporary folder]")
    parser.add_argument("--out", default=str(DEFAULT_OUT), help=f"the JSON to write [default: {DEFAULT_OUT}]")
    parser.add_argument("--report", action="store_true", help="print the table of --out's JSON and exit")
    args = parser.parse_args()
    if args.report:
        print(report(Path(args.out)))
        return
    data = run(args)
    out = Path(args.out)
    tmp = out.with_name(f".{out.name}.tmp")
    tmp.write_text(json.dumps(data, indent=1) + "\n")
    tmp.replace(out)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
