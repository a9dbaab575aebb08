"""Which examples each micro-batch trains on: a seeded order per epoch, split over the ranks, resumable by position.

Every rank takes its own `batch_size` examples of each global micro-batch. The position
counts examples, not micro-batches, so a checkpoint resumes at the same example on any
number of processes with the same global batch.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from ..data import Example, epoch_order
from ..nn.loss import IGNORE_INDEX


@dataclass(frozen=True)
class BatchLayout:
    """How the sequences of one optimizer step are laid out over processes and micro-batches."""

    batch_size: int       # sequences per micro-batch, per process
    processes: int        # ranks training together
    rank: int             # this process's index
    grad_accum: int       # micro-batches per optimizer step
    fill: bool = False    # pad a short share up to batch_size (torch.compile compiles each new shape again, ~20 s)

    @property
    def global_micro(self) -> int:
        """Sequences per micro-batch over all ranks."""
        return self.batch_size * self.processes

    @property
    def global_batch(self) -> int:
        """Sequences per optimizer step over all ranks."""
        return self.global_micro * self.grad_accum

    def share(self, chosen: Sequence[Example]) -> list[Example]:
        """This rank's share of a global micro-batch.

        A rank left without examples (the end of an epoch) gets one fully masked example: it
        must still run forward and backward with the others (DDP and FSDP synchronize there),
        and it adds no loss and no gradient.
        """
        mine = list(chosen[self.rank * self.batch_size:(self.rank + 1) * self.batch_size])
        fewest = self.batch_size if self.fill else 1
        if len(mine) < fewest:
            first = (mine or chosen)[0]
            masked = Example(first.input_ids, [IGNORE_INDEX] * len(first.input_ids), "padding", first.segments)
            mine += [masked] * (fewest - len(mine))
        return mine


class Sampler:
    """This rank's micro-batches, epoch after epoch, from `position` on.

    Args:
        examples: the training examples.
        layout: the batch layout of the run.
        seed: seeds each epoch's order (seed * 100003 + epoch).
        by_length: group examples of similar length (data.epoch_order): less padding.
    """

    def __init__(self, examples: Sequence[Example], layout: BatchLayout, seed: int, by_length: bool) -> None:
        self.examples, self.layout, self.seed, self.by_length = list(examples), layout, seed, by_length
        self.lengths = [len(e.input_ids) for e in self.examples]
        self.per_epoch = math.ceil(len(self.examples) / layout.global_micro)   # global micro-batches per epoch
        self.position = [0, 0]   # (epoch, examples of that epoch's order already used) of the next micro-batch

    def stream(self) -> Iterator[list[Example]]:
        """This rank's micro-batches from `position` on, updating it as they are taken."""
        while True:
            epoch, offset = self.position
            # Grouped by the global batch (not the micro-batch), so a resume on another number of
            # processes with the same global batch still sees the same examples in each step.
            order = epoch_order(self.lengths, self.layout.global_batch, random.Random(self.seed * 100_003 + epoch),
                                self.by_length)
            while offset < len(order):
                chosen = [self.examples[i] for i in order[offset:offset + self.layout.global_micro]]
                offset += len(chosen)
                self.position = [epoch, offset]
                yield self.layout.share(chosen)
            self.position = [epoch + 1, 0]
