"""Examples to batches: packing, the train/eval split, the epoch order (length-grouped), padding and collation."""

from __future__ import annotations

import random
from typing import Sequence

import torch

from ..nn.loss import IGNORE_INDEX
from .example import Example


def pack_examples(examples: Sequence[Example], seq_len: int) -> list[Example]:
    """Pack whole examples into windows of at most seq_len tokens, without cross-attention.

    Examples are placed first-fit in decreasing length (deterministic). An example longer than
    seq_len is first cut into seq_len pieces (load_examples has usually truncated it already);
    every other example stays whole. Each window records its segment lengths; `collate` turns them into position ids that restart
    at every example, which transformers' attention turns into a block-diagonal causal mask,
    so a packed example sees only itself. The first label of every segment after the first
    is masked, so no example is asked to predict another's first token: each example's loss
    is what it would be alone.
    """
    if seq_len < 1:
        raise ValueError(f"seq_len={seq_len} must be >= 1")
    pieces = [Example(e.input_ids[i:i + seq_len], e.labels[i:i + seq_len], e.source)
              for e in examples for i in range(0, len(e.input_ids), seq_len)]
    windows: list[list[Example]] = []
    room: list[int] = []
    for example in sorted(pieces, key=lambda e: len(e.input_ids), reverse=True):
        n = len(example.input_ids)
        slot = next((i for i, free in enumerate(room) if free >= n), None)
        if slot is None:
            windows.append([])
            room.append(seq_len)
            slot = len(windows) - 1
        windows[slot].append(example)
        room[slot] -= n
    packed = []
    for number, window in enumerate(windows):
        ids = [t for e in window for t in e.input_ids]
        labels = list(window[0].labels) + [t for e in window[1:] for t in [IGNORE_INDEX, *e.labels[1:]]]
        packed.append(Example(ids, labels, f"packed[{number}]", tuple(len(e.input_ids) for e in window)))
    return packed


def split_examples(examples: Sequence[Example], eval_fraction: float, seed: int) -> tuple[list[Example], list[Example]]:
    """A deterministic (train, eval) split holding out `eval_fraction` of the examples."""
    if not 0 <= eval_fraction < 1:
        raise ValueError(f"eval_fraction={eval_fraction} must be in [0, 1)")
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    n_eval = round(len(examples) * eval_fraction)
    held = set(order[:n_eval])
    return [e for i, e in enumerate(examples) if i not in held], [examples[i] for i in sorted(held)]


LENGTH_GROUP_WINDOW = 64   # batches sorted together: wide enough to find neighbours, small enough to stay random


def epoch_order(lengths: Sequence[int], group: int, rng: random.Random, by_length: bool = True) -> list[int]:
    """One epoch's example order, drawn from `rng`; with `by_length`, each run of `group`
    consecutive examples has similar lengths, so a batch of them needs little padding.

    Length grouping shuffles, sorts each window of LENGTH_GROUP_WINDOW groups by length, cuts it
    into groups and shuffles the groups (a short final group stays last, so every group starts
    at a multiple of `group`). Every example still appears once per epoch.
    """
    order = list(range(len(lengths)))
    rng.shuffle(order)
    if not by_length or group < 2:
        return order
    span = group * LENGTH_GROUP_WINDOW
    groups: list[list[int]] = []
    for start in range(0, len(order), span):
        window = sorted(order[start:start + span], key=lambda i: lengths[i], reverse=True)
        groups += [window[i:i + group] for i in range(0, len(window), group)]
    short = [groups.pop()] if groups and len(groups[-1]) < group else []
    rng.shuffle(groups)
    return [i for g in groups + short for i in g]


def batch_width(longest: int, multiple: int = 1, cap: int | None = None) -> int:
    """The padded width of a batch: `longest` rounded up to `multiple`, but never above `cap`
    (the longest example of the run), and never below `longest`."""
    width = -(-longest // multiple) * multiple
    return max(longest, min(width, cap)) if cap is not None else width


def collate(examples: Sequence[Example], pad_token_id: int, multiple: int = 1,
            cap: int | None = None) -> dict[str, torch.Tensor]:
    """Right-pad to the longest example (rounded up to `multiple`, at most `cap`): input_ids,
    labels (-100 on padding), and either an attention_mask or, for packed examples,
    position_ids that restart at every segment.

    Packed batches carry no attention_mask: transformers builds the block-diagonal causal mask
    from the restarting position ids only when the 2D mask is absent. Right padding needs no
    mask for causal attention (no real token attends to a later position) and its labels are -100.
    Rounding the width keeps the number of distinct batch shapes small; see TrainConfig.pad_multiple.
    """
    width = batch_width(max(len(e.input_ids) for e in examples), multiple, cap)
    input_ids = torch.full((len(examples), width), pad_token_id, dtype=torch.long)   # (B, T)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)      # (B, T)
    mask = torch.zeros((len(examples), width), dtype=torch.long)                      # (B, T)
    positions = torch.arange(width).repeat(len(examples), 1)                          # (B, T)
    for i, e in enumerate(examples):
        n = len(e.input_ids)
        input_ids[i, :n] = torch.tensor(e.input_ids)
        labels[i, :n] = torch.tensor(e.labels)
        mask[i, :n] = 1
        start = 0
        for length in e.segments:
            positions[i, start:start + length] = torch.arange(length)
            start += length
        positions[i, start:] = torch.arange(width - start)   # padding: a segment of its own
    if any(len(e.segments) > 1 for e in examples):
        return {"input_ids": input_ids, "labels": labels, "position_ids": positions}
    return {"input_ids": input_ids, "labels": labels, "attention_mask": mask}
