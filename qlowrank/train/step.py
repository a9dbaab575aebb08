"""One optimizer step: micro-batches on the device, bf16 autocast, the loss over all ranks' tokens, clipping, update.

The loss of a step is normalised by the token count of the whole step over all ranks, so N
processes x batch b (and accumulation) compute what one process x batch N*b computes; an
objective with several loss terms (objective.py) normalises each by its own count that way.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch

from ..config import TrainConfig
from ..data import Example
from ..model.offload import OffloadActivations
from .checkpoint import latest_checkpoint
from .objective import Supervised
from .parallel import Strategy


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or inf; the last good checkpoint is kept."""


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The dtype the loop autocasts to for `precision` on `device` (None: plain fp32)."""
    if precision == "fp32":
        return None
    if device.type == "cuda" and not torch.cuda.is_bf16_supported():
        if precision == "bf16":
            raise ValueError("precision=bf16 was asked for but this GPU has no bf16 support; use precision=fp32")
        return None
    return torch.bfloat16


@dataclass(frozen=True)
class Padding:
    """How micro-batches are padded."""

    token_id: int    # the id padded positions hold (their labels are always -100)
    multiple: int    # widths round up to a multiple of this (TrainConfig.pad_multiple)
    longest: int     # ... but never past the run's longest example: rounding adds no shape above it


class Stepper:
    """Runs optimizer steps and loss sums for the trainer.

    Args:
        strategy: the run's Strategy (its wrapped loss module computes the summed loss).
        config: the TrainConfig (precision, clipping, checkpoints folder).
        padding: how batches are padded.
        optimizer, scheduler: what each step applies.
        objective: what the loss module's sums are and what they are normalised by (objective.py).
    """

    def __init__(self, strategy: Strategy, config: TrainConfig, padding: Padding, optimizer: torch.optim.Optimizer,
                 scheduler: torch.optim.lr_scheduler.LRScheduler, objective: Supervised | None = None) -> None:
        self.strategy, self.config, self.padding = strategy, config, padding
        self.objective = objective or Supervised()
        self.optimizer, self.scheduler = optimizer, scheduler
        self.autocast_dtype = autocast_dtype(config.precision, strategy.device)

    def batch(self, examples: Sequence[Example]) -> dict[str, torch.Tensor]:
        """Examples collated, padded and moved to the device."""
        batch = self.objective.collate(examples, self.padding.token_id, self.padding.multiple, self.padding.longest)
        return {k: v.to(self.strategy.device) for k, v in batch.items()}

    def loss_sum(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """The summed loss of one batch, under the run's autocast."""
        dtype = self.autocast_dtype
        offload = OffloadActivations(self.strategy.device.type) if self.config.offload_activations else nullcontext()
        with torch.autocast(self.strategy.device.type, dtype=dtype or torch.float32, enabled=dtype is not None), offload:
            return self.strategy.module(**batch)

    def _accumulate(self, micro: list[dict[str, torch.Tensor]],
                    poll: Callable[[], None]) -> tuple[list[float], list[float]]:
        """Forward and backward of a step's micro-batches; (this rank's sum of each loss term, each
        term's count over the step on all ranks: tokens for SFT)."""
        # DDP and FSDP average gradients over the ranks, hence the factor `world` (each rank's
        # gradient is of its share of the global sum).
        world = self.strategy.world
        local = [sum(column) for column in zip(*(self.objective.counts(b) for b in micro))]
        counts = [max(1.0, n) for n in self.strategy.sum(local)]
        totals = [0.0] * len(counts)
        for i, batch in enumerate(micro):
            poll()   # a stop request drops the partial step (the trainer rolls back)
            with self.strategy.micro_batch(last=i == len(micro) - 1):
                sums = self.loss_sum(batch).reshape(-1)   # (terms,)
                sum(sums[j] * (world / counts[j]) for j in range(len(counts))).backward()
            totals = [t + s for t, s in zip(totals, sums.tolist())]
        return totals, counts

    def step(self, chosen: list[list[Example]], number: int, poll: Callable[[], None]) -> dict:
        """Optimizer step `number` over the micro-batches `chosen` (this rank's shares).

        `poll` runs before each micro-batch and raises to stop. Returns {"loss", "lr",
        "grad_norm", "tokens"} (tokens: real ones on all ranks, padding excluded), and the objective's
        metrics (preference pairs: rewards/..., logps/...).

        Raises:
            NonFiniteLossError: the loss is NaN / inf; the update is not applied.
        """
        totals, counts = self._accumulate([self.batch(examples) for examples in chosen], poll)
        real_tokens = sum(len(e.input_ids) + len(getattr(e, "rejected_ids", ()))
                          for examples in chosen for e in examples if e.source != "padding")
        *totals, real_tokens = self.strategy.sum([*totals, real_tokens])
        loss = sum(total / count for total, count in zip(totals, counts))
        if not math.isfinite(loss):
            self.optimizer.zero_grad(set_to_none=True)
            last = latest_checkpoint(Path(self.config.out_dir) / "checkpoints")
            raise NonFiniteLossError(
                f"the loss is {loss} at step {number}; training stopped before applying it. "
                f"Last good checkpoint: {last or 'none written yet'}. Lower --lr, enable clipping "
                "(--max-grad-norm), use precision=fp32, or check the data, then resume."
            )
        grad_norm = None
        if self.config.max_grad_norm:
            params = [p for g in self.optimizer.param_groups for p in g["params"]]
            grad_norm = self.strategy.clip_grad_norm(params, self.config.max_grad_norm)
        lr = self.optimizer.param_groups[0]["lr"]
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return {"loss": loss, "lr": lr, "grad_norm": grad_norm, "tokens": int(real_tokens),
                **self.objective.metrics(self.strategy.sum)}
