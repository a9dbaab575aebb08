"""Preference objectives on the quantized base: DPO (reference = the same model with LoRA off) and ORPO (no reference).

DPO (Rafailov et al. 2023, arXiv 2305.18290), the sigmoid loss of TRL's DPOTrainer, with
conservative label smoothing (cDPO, Mitchell 2023) when label_smoothing > 0:

    delta  = (log pi(y_w|x) - log ref(y_w|x)) - (log pi(y_l|x) - log ref(y_l|x))     # summed over completion tokens
    loss   = -(1 - eps) log sigmoid(beta delta) - eps log sigmoid(-beta delta)

The reference is the frozen base itself: one forward without gradients with every LoRA
branch switched off (`disable_lora`) in the same step, so no second copy of the base exists.

ORPO (Hong et al. 2024, arXiv 2403.07691), TRL's odds-ratio formulation on mean log-probs:

    log odds = (m_w - m_l) - (log(1 - exp m_w) - log(1 - exp m_l))     # m: mean completion log-prob
    loss     = NLL(chosen completion tokens) - lambda log sigmoid(log odds)

Metrics are named as TRL names them: rewards/chosen, rewards/rejected, rewards/margins,
rewards/accuracies, logps/chosen, logps/rejected (DPO rewards: beta x log-ratio to the
reference; ORPO rewards: lambda x mean log-prob; logps as each objective's loss sees them).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..data import Example
from ..data.pairs import collate_pairs
from ..model.surgery import disable_lora
from ..nn.loss import IGNORE_INDEX, sequence_log_probs

METRICS = ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "logps/chosen",
           "logps/rejected")


def dpo_losses(chosen: torch.Tensor, rejected: torch.Tensor, ref_chosen: torch.Tensor, ref_rejected: torch.Tensor,
               beta: float, label_smoothing: float = 0.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-pair DPO sigmoid losses and the (detached) rewards of chosen and rejected, from summed log-probs."""
    chosen_ratio, rejected_ratio = chosen - ref_chosen, rejected - ref_rejected
    delta = chosen_ratio - rejected_ratio
    losses = -F.logsigmoid(beta * delta) * (1 - label_smoothing) - F.logsigmoid(-beta * delta) * label_smoothing
    return losses, beta * chosen_ratio.detach(), beta * rejected_ratio.detach()


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x <= 0, without cancellation (branch at -log 2, Maechler 2012)."""
    return torch.where(x < -math.log(2), torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))


def orpo_odds_ratio(chosen_mean: torch.Tensor, rejected_mean: torch.Tensor,
                    orpo_lambda: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-pair lambda * log sigmoid(log odds ratio) (subtracted from the NLL) and the rewards, from mean log-probs."""
    chosen_mean, rejected_mean = chosen_mean.float(), rejected_mean.float()
    log_odds = (chosen_mean - rejected_mean) - (log1mexp(chosen_mean) - log1mexp(rejected_mean))
    return (orpo_lambda * F.logsigmoid(log_odds), orpo_lambda * chosen_mean.detach(),
            orpo_lambda * rejected_mean.detach())


class PreferenceLoss(nn.Module):
    """forward(**pair batch) -> the loss terms' sums (DDP / FSDP wrap this, so the reference forward runs inside it)."""

    def __init__(self, model: nn.Module, objective: Preference, chunk_tokens: int | None) -> None:
        super().__init__()
        self.model, self.objective, self.chunk_tokens = model, objective, chunk_tokens

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor, attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None) -> torch.Tensor:
        n = input_ids.shape[0] // 2                               # rows: n chosen, then n rejected
        valid = (labels[:n, 1:] != IGNORE_INDEX).any(-1)          # the sampler's filler pairs learn nothing
        ref = None
        if self.objective.kind == "dpo":
            # First, so its activations are gone before the policy's are kept for backward.
            with torch.no_grad(), disable_lora(self.model):
                ref, _ = sequence_log_probs(self.model, input_ids, labels, attention_mask, self.chunk_tokens)
        logps, tokens = sequence_log_probs(self.model, input_ids, labels, attention_mask, self.chunk_tokens)
        return self.objective.terms(logps, tokens, ref, valid)


class Preference:
    """DPO or ORPO over preference pairs (data.pairs); the Trainer's objective for --objective dpo / orpo."""

    def __init__(self, kind: str, beta: float = 0.1, label_smoothing: float = 0.0, orpo_lambda: float = 0.1) -> None:
        if kind not in ("dpo", "orpo"):
            raise ValueError(f"preference objective {kind!r}: use 'dpo' or 'orpo'")
        self.kind, self.name = kind, kind
        self.beta, self.label_smoothing, self.orpo_lambda = beta, label_smoothing, orpo_lambda
        self.tally = torch.zeros(len(METRICS) + 1, dtype=torch.float64)   # metric sums over pairs, then the pairs

    def loss_module(self, model: nn.Module, chunk_tokens: int | None) -> nn.Module:
        return PreferenceLoss(model, self, chunk_tokens)

    def collate(self, examples: Sequence[Example], pad_token_id: int, multiple: int,
                cap: int | None) -> dict[str, torch.Tensor]:
        return collate_pairs(examples, pad_token_id, multiple, cap)

    def counts(self, batch: dict[str, torch.Tensor]) -> list[int]:
        """DPO: [pairs]; ORPO: [chosen completion tokens (the NLL's), pairs]."""
        labels = batch["labels"]
        chosen = labels[:labels.shape[0] // 2, 1:] != IGNORE_INDEX
        pairs = int(chosen.any(-1).sum())
        return [pairs] if self.kind == "dpo" else [int(chosen.sum()), pairs]

    def terms(self, logps: torch.Tensor, tokens: torch.Tensor, ref: torch.Tensor | None,
              valid: torch.Tensor) -> torch.Tensor:
        """The loss terms' sums over the valid pairs of one micro-batch (and their metrics, tallied)."""
        n = logps.shape[0] // 2
        weight = valid.to(torch.float32)
        if self.kind == "dpo":
            losses, good, bad = dpo_losses(logps[:n], logps[n:], ref[:n], ref[n:], self.beta, self.label_smoothing)
            seen = logps.detach()
            sums = (losses * weight).sum()[None]                                     # (1,)
        else:
            # A filler pair (no tokens: mean 0, log(1 - e^0) = -inf) would put NaN into the sums and, through
            # where's backward, into the gradients: it gets a harmless stand-in mean that its weight 0 then drops.
            both = torch.cat([valid, valid])
            mean = torch.where(both, logps / tokens.clamp_min(1), torch.full_like(logps, -1.0))
            ratio, good, bad = orpo_odds_ratio(mean[:n], mean[n:], self.orpo_lambda)
            seen = mean.detach()
            sums = torch.stack([-(logps[:n] * weight).sum(), -(ratio * weight).sum()])   # (2,)
        values = torch.stack([good, bad, good - bad, (good > bad).float(), seen[:n], seen[n:]])   # (6, n)
        self.tally[:-1] += (values.double() * weight.double()).sum(-1).cpu()
        self.tally[-1] += float(weight.sum())
        return sums

    def metrics(self, sum_over_ranks: Callable[[list[float]], list[float]], prefix: str = "") -> dict[str, float]:
        """Means over the pairs seen since the last call, on all ranks (TRL's names, `prefix` before them)."""
        totals = sum_over_ranks(self.tally.tolist())
        self.tally.zero_()
        pairs = max(totals[-1], 1.0)
        return {prefix + name: value / pairs for name, value in zip(METRICS, totals)}

    def eval_metrics(self, loss: float, sum_over_ranks: Callable[[list[float]], list[float]]) -> dict[str, float]:
        return self.metrics(sum_over_ranks, prefix="eval_")
