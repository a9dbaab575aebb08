"""What a training step minimises: the objective gives the loss module, the collation, the normalisers and extra metrics.

The loop (trainer.py, step.py) is the same for every objective. A loss module returns one
sum per loss term; the objective says what each term is normalised by (`counts`), summed
over the step's micro-batches and ranks, so accumulation and several processes compute
what one large batch would:

    step loss = sum_j (sum of term j over the step) / (count j over the step)

`Supervised` (SFT) has one term, the token loss sum, normalised by the predicted tokens.
The preference objectives (DPO, ORPO) live in preference.py.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import nn

from ..config import TrainConfig
from ..data import Example, collate
from ..nn.loss import count_predicted_tokens
from .parallel import LossModule


class Supervised:
    """Causal-LM cross-entropy on the labelled tokens (the default objective)."""

    name = "sft"

    def loss_module(self, model: nn.Module, chunk_tokens: int | None) -> nn.Module:
        """The module whose forward(**batch) returns the loss sums (what DDP / FSDP wrap)."""
        return LossModule(model, chunk_tokens)

    def collate(self, examples: Sequence[Example], pad_token_id: int, multiple: int,
                cap: int | None) -> dict[str, torch.Tensor]:
        """A micro-batch's tensors (data.collate's)."""
        return collate(examples, pad_token_id, multiple, cap)

    def counts(self, batch: dict[str, torch.Tensor]) -> list[int]:
        """What each loss term of `batch` is normalised by: here the predicted tokens."""
        return [count_predicted_tokens(batch["labels"])]

    def metrics(self, sum_over_ranks: Callable[[list[float]], list[float]], prefix: str = "") -> dict[str, float]:
        """Extra metrics gathered since the last call (over all ranks); SFT has none."""
        return {}

    def eval_metrics(self, loss: float, sum_over_ranks: Callable[[list[float]], list[float]]) -> dict[str, float]:
        """What an evaluation reports beside eval_loss."""
        return {"eval_ppl": math.exp(min(loss, 50.0))}


def objective_for(config: TrainConfig) -> Supervised:
    """The objective `config.objective` names (sft, dpo or orpo)."""
    if config.objective == "sft":
        return Supervised()
    from .preference import Preference
    return Preference(config.objective, beta=config.beta, label_smoothing=config.label_smoothing,
                      orpo_lambda=config.orpo_lambda)
