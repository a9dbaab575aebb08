"""Peak memory and time of loss + backward: naive full logits vs qlowrank's chunked cross-entropy.

    .venv/bin/python benchmarks/loss_memory.py [--vocab 49152] [--seq 1024] [--batch 2] [--hidden 576]

Each case runs in a fresh subprocess; on the CPU its peak is the growth of the process's
peak resident set (ru_maxrss) over the inputs already allocated, on CUDA the growth of
torch.cuda.max_memory_allocated. The naive path is what transformers does: head -> logits
-> .float() -> cross_entropy -> backward. The head is frozen (as under LoRA) and the
hidden states require grad (they lead back to the LoRA factors).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

import torch
import torch.nn.functional as F


def _rss_peak_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def run_case(method: str, dtype: str, vocab: int, seq: int, batch: int, hidden: int, device: str) -> dict:
    from qlowrank.nn.loss import chunked_cross_entropy

    torch.manual_seed(0)
    autocast = dtype == "bf16-autocast"
    h = torch.randn(batch, seq, hidden, device=device, requires_grad=True)        # (B, T, H)
    weight = torch.randn(vocab, hidden, device=device) * hidden ** -0.5             # (V, H), frozen
    labels = torch.randint(0, vocab, (batch, seq), device=device)
    # Warm up allocator and kernels on a tiny problem so one-off costs are not counted.
    chunked_cross_entropy(h[:, :8], weight, labels[:, :8]).backward()
    h.grad = None
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.max_memory_allocated()
    else:
        before = _rss_peak_bytes()
    start = time.perf_counter()
    with torch.autocast(device, dtype=torch.bfloat16, enabled=autocast):
        if method == "naive":
            logits = F.linear(h, weight).float()                                   # (B, T, V)
            loss = F.cross_entropy(logits[:, :-1].reshape(-1, vocab), labels[:, 1:].reshape(-1))
        else:
            loss = chunked_cross_entropy(h, weight, labels)
    loss.backward()
    if device == "cuda":
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - before
    else:
        peak = _rss_peak_bytes() - before
    return {"peak_bytes": peak, "seconds": time.perf_counter() - start, "loss": loss.item()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vocab", type=int, default=49152)
    parser.add_argument("--seq", type=int, default=1024)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--hidden", type=int, default=576)
    parser.add_argument("--case", help=argparse.SUPPRESS)  # internal: run one case, print JSON
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.case:
        method, dtype = args.case.split(":")
        print(json.dumps(run_case(method, dtype, args.vocab, args.seq, args.batch, args.hidden, device)))
        return
    print(f"loss + backward, vocab {args.vocab}, seq {args.seq}, batch {args.batch}, hidden {args.hidden}, {device}")
    print(f"{'precision':<15} {'method':<8} {'peak MiB':>9} {'vs naive':>9} {'seconds':>8} {'loss':>8}")
    for dtype in ("fp32", "bf16-autocast"):
        results = {}
        for method in ("naive", "chunked"):
            cmd = [sys.executable, __file__, "--case", f"{method}:{dtype}", "--vocab", str(args.vocab),
                   "--seq", str(args.seq), "--batch", str(args.batch), "--hidden", str(args.hidden)]
            results[method] = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout)
        for method, r in results.items():
            ratio = r["peak_bytes"] / results["naive"]["peak_bytes"]
            print(f"{dtype:<15} {method:<8} {r['peak_bytes'] / 2**20:9.1f} {ratio:9.3f} {r['seconds']:8.3f} {r['loss']:8.4f}")


if __name__ == "__main__":
    main()
