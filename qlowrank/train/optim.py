"""Optimizers over the LoRA factors only (AdamW, 8-bit AdamW, LoRA+) and the warmup + cosine schedule."""

from __future__ import annotations

import math

import torch
from torch import nn

from ..config import TRAIN_OPTIMIZERS
from ..model.surgery import lora_layers, lora_parameters
from ..nn import quant as quantlib


def build_optimizer(
    model: nn.Module,
    name: str = "adamw",
    lr: float = 2e-4,
    weight_decay: float = 0.0,
    lora_plus_ratio: float = 1.0,
    betas: tuple[float, float] = (0.9, 0.999),
) -> torch.optim.Optimizer:
    """An optimizer over the model's LoRA factors and nothing else.

    Args:
        model: a model with LoraLinear layers.
        name: "adamw" (torch), "adamw8bit" or "paged_adamw8bit" (bitsandbytes, block-wise
            8-bit states: a quarter of AdamW's state memory).
        lr: learning rate of A (and of B when lora_plus_ratio is 1).
        weight_decay: decoupled weight decay on both factors.
        lora_plus_ratio: LoRA+ (Hayou et al. 2024, arXiv 2402.12354): B trains at
            lr * ratio (the paper suggests 16); 1 is plain LoRA.
        betas: Adam's moment decay rates.

    Returns:
        The optimizer; param group 0 holds every lora_A, group 1 every lora_B, and a group 2
        (at lr) the DoRA magnitudes and modules_to_save parameters, when there are any.
    """
    if name not in TRAIN_OPTIMIZERS:
        raise ValueError(f"optimizer {name!r} is not supported; use one of {TRAIN_OPTIMIZERS}")
    if lr <= 0 or lora_plus_ratio <= 0:
        raise ValueError(f"lr={lr} and lora_plus_ratio={lora_plus_ratio} must be positive")
    layers = [layer for _, layer in lora_layers(model)]
    if not layers:
        raise ValueError("the model has no LoRA layers to train; call add_lora (or load_model(lora=...)) first")
    groups = [
        {"params": [layer.lora_A.weight for layer in layers], "lr": lr, "name": "lora_A"},
        {"params": [layer.lora_B.weight for layer in layers], "lr": lr * lora_plus_ratio, "name": "lora_B"},
    ]
    factors = {id(p) for group in groups for p in group["params"]}
    others = [p for p in lora_parameters(model) if id(p) not in factors and p.requires_grad]
    if others:
        groups.append({"params": others, "lr": lr, "name": "magnitudes_and_saved_modules"})
    return make_optimizer(name, groups, lr=lr, betas=betas, weight_decay=weight_decay)


def make_optimizer(name: str, params, lr: float, **kwargs) -> torch.optim.Optimizer:
    """Construct optimizer `name` over `params` (tensors or param groups): torch's AdamW or SGD, or
    bitsandbytes' 8-bit AdamW (through nn/quant.py). `build_optimizer` picks the LoRA groups; this
    only builds, so `qlowrank profile` uses it for full fine-tuning too."""
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, **kwargs)
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, **{k: v for k, v in kwargs.items() if k != "betas"})
    return quantlib.make_8bit_optimizer(name, params, lr=lr, **kwargs)


def lr_factor(step: int, warmup_steps: int, total_steps: int, min_lr_ratio: float = 0.0) -> float:
    """Multiplier of the base lr after `step` optimizer steps: linear warmup, then cosine decay.

    Warmup goes 1/warmup, 2/warmup, ..., 1 (the first step never runs at lr 0); the cosine
    then falls from 1 to `min_lr_ratio` at `total_steps`.
    """
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    span = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def build_scheduler(
    optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int, min_lr_ratio: float = 0.0
) -> torch.optim.lr_scheduler.LambdaLR:
    """Warmup + cosine as a LambdaLR (its state_dict is plain numbers, safe to checkpoint)."""
    if warmup_steps < 0 or total_steps < 1:
        raise ValueError(f"warmup_steps={warmup_steps} must be >= 0 and total_steps={total_steps} >= 1")
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, warmup_steps, total_steps, min_lr_ratio)
    )
