"""Speed of the chunked loss: qlowrank's (one in-place float32 softmax) against the earlier formulation.

    .venv/bin/python benchmarks/loss_speed.py                      # SmolLM2's head: vocab 49152, hidden 576
    .venv/bin/python benchmarks/loss_speed.py --vocab 128256 --hidden 4096 --tokens 2048

Forward + backward of the output head and the cross-entropy over `--tokens` rows (frozen head,
bf16 autocast, the default chunk), alternating the two formulations in one process, best of
`--repeats` each. The earlier one (`logsumexp`, then the logits turned into the softmax in place
with a subtract and an exp, then a mask multiply) is kept here as the reference.
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from qlowrank.config import DEFAULT_CHUNK_TOKENS
from qlowrank.nn.loss import chunked_cross_entropy
from qlowrank.planner.timing import best_of


def earlier(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, chunk: int) -> torch.Tensor:
    """The loss sum and the hidden-state gradient as computed before (reference)."""
    flat_h, flat_y = hidden[:, :-1].reshape(-1, hidden.shape[-1]), labels[:, 1:].reshape(-1)
    total = torch.zeros(())
    grad_h = torch.empty_like(flat_h)
    for start in range(0, flat_h.shape[0], chunk):
        h, y = flat_h[start:start + chunk], flat_y[start:start + chunk]
        valid = y != -100
        target = torch.where(valid, y, torch.zeros_like(y))
        logits = F.linear(h, weight).float()
        lse = torch.logsumexp(logits, dim=-1)
        total += ((lse - logits.gather(1, target[:, None]).squeeze(1)) * valid).sum()
        grad = logits.sub_(lse[:, None]).exp_()
        grad[torch.arange(len(y)), target] -= 1.0
        grad *= valid[:, None]
        grad_h[start:start + chunk] = grad.to(weight.dtype) @ weight
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vocab", type=int, default=49152)
    parser.add_argument("--hidden", type=int, default=576)
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    generator = torch.Generator().manual_seed(0)
    weight = (torch.randn(args.vocab, args.hidden, generator=generator) * 0.02).to(torch.bfloat16)
    hidden = torch.randn(1, args.tokens + 1, args.hidden, generator=generator).to(torch.bfloat16).requires_grad_(True)
    labels = torch.randint(0, args.vocab, (1, args.tokens + 1), generator=generator)

    def now():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = chunked_cross_entropy(hidden, weight, labels, reduction="sum")
        loss.backward()
        hidden.grad = None
        return loss

    def before():
        with torch.no_grad():
            return earlier(hidden.detach(), weight, labels, DEFAULT_CHUNK_TOKENS)

    rounds = [(best_of(before, args.repeats), best_of(now, args.repeats)) for _ in range(2)]   # alternating
    old, new = min(r[0] for r in rounds), min(r[1] for r in rounds)
    print(f"| head (vocab x hidden) | tokens | earlier formulation | qlowrank now | ratio |\n|---|---|---|---|---|\n"
          f"| {args.vocab} x {args.hidden} | {args.tokens} | {old:.3f} s | {new:.3f} s | {new / old:.2f}x |")
    print(f"loss sums: earlier {float(before()):.4f}, now {float(now().detach()):.4f}")


if __name__ == "__main__":
    main()
