"""Chunked causal-LM cross-entropy: the frozen output head and the loss, a slice of tokens at a time.

With real vocabularies (49k for SmolLM2, 128k for Llama 3) the (batch x seq x vocab) logits
are the largest tensor of a QLoRA step, and the naive path keeps several float32 copies of
them alive at once (logits, log-softmax, their gradients). Here the head is applied to
`chunk_tokens` rows at a time; for each chunk we compute the loss *and* the gradient with
respect to the hidden states right away (d loss / d logits = softmax - one_hot), then free
the chunk's logits. Only the (tokens x hidden) gradient is kept for backward, so the full
logits never exist, and nothing has to be recomputed.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..config import DEFAULT_CHUNK_TOKENS  # rows of logits alive at once (one definition, with the options)

IGNORE_INDEX = -100          # label value that contributes no loss (transformers' convention)
AUTOCAST_DEVICES = ("cpu", "cuda")   # where torch.autocast exists (the estimator runs the same code on "meta")


def autocast_off(device_type: str) -> contextlib.AbstractContextManager:
    """Autocast switched off on `device_type`; nothing to switch off where autocast does not exist (meta)."""
    return torch.autocast(device_type, enabled=False) if device_type in AUTOCAST_DEVICES else contextlib.nullcontext()
# Below this a float32 softmax entry has lost its relative precision (subnormal), so -log of it
# is not the loss: those rows take logsumexp - logit instead (a logit gap of ~87 nats or more).
SMALLEST_PROBABILITY = torch.finfo(torch.float32).tiny


class _LinearCrossEntropy(torch.autograd.Function):
    """sum over valid rows of CE(hidden @ W.T + b, labels), with gradients computed in forward."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, chunk_tokens, compute_dtype):
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        need_b = bias is not None and ctx.needs_input_grad[2]
        # Autocast is switched off inside: the dtypes below are chosen explicitly (compute_dtype
        # for the matmuls, float32 for softmax and the loss) so they do not depend on context.
        with autocast_off(hidden.device.type):
            w = weight.to(compute_dtype)                               # (V, H)
            b = bias.to(compute_dtype) if bias is not None else None
            total = torch.zeros((), dtype=torch.float32, device=hidden.device)
            grad_h = torch.empty_like(hidden) if need_h else None      # (N, H)
            grad_w = torch.zeros_like(weight, dtype=torch.float32) if need_w else None
            grad_b = torch.zeros_like(bias, dtype=torch.float32) if need_b else None
            for start in range(0, hidden.shape[0], chunk_tokens):
                h = hidden[start:start + chunk_tokens].to(compute_dtype)   # (c, H)
                y = labels[start:start + chunk_tokens]                     # (c,)
                valid = y != IGNORE_INDEX
                target = torch.where(valid, y, torch.zeros_like(y))
                # One softmax, in place on the float32 logits, is the gradient's start and gives the
                # loss too: CE = -log softmax[target]. Fewer passes over the (c, V) block than
                # logsumexp + subtract + exp, and no second block (`torch.softmax(dtype=float32)`
                # would hold one more): benchmarks/loss_speed.py. The last-dim kernel reads each
                # row before it writes it, so output may alias input (checked against the naive loss
                # in tests/test_loss.py).
                grad = F.linear(h, w, b).float()                          # (c, V)
                torch.ops.aten._softmax.out(grad, -1, False, out=grad)
                rows = torch.arange(len(y), device=y.device)
                picked = grad[rows, target]                                # (c,)
                loss = -torch.log(picked)
                lost = picked < SMALLEST_PROBABILITY                       # underflowed: the exact form
                if not hidden.is_meta and bool(lost.any()):   # (meta tensors hold no values to test)
                    exact = F.linear(h[lost], w, b).float()
                    loss[lost] = torch.logsumexp(exact, dim=-1) - exact.gather(1, target[lost, None]).squeeze(1)
                total += (loss * valid).sum()
                if need_h or need_w or need_b:
                    grad[rows, target] -= 1.0
                    if not hidden.is_meta and not bool(valid.all()):
                        grad[~valid] = 0.0
                    grad = grad.to(compute_dtype)
                    if need_h:
                        grad_h[start:start + chunk_tokens] = (grad @ w).to(hidden.dtype)
                    if need_w:
                        grad_w += (grad.t() @ h).float()
                    if need_b:
                        grad_b += grad.float().sum(0)
                del grad
                if hidden.is_meta and start > 0:
                    # Meta tensors (estimate_memory's simulation) carry no data. Chunk 2 allocates
                    # what chunk 1 did while chunk 1's last buffers are still bound, and every later
                    # chunk repeats chunk 2 (the last one with fewer rows): two chunks give the
                    # peak of all N / chunk_tokens, so the logits term costs the same at any length.
                    break
        ctx.grads = (grad_h, grad_w, grad_b)
        ctx.dtypes = (weight.dtype, bias.dtype if bias is not None else None)
        return total

    @staticmethod
    def backward(ctx, grad_total):
        grad_h, grad_w, grad_b = ctx.grads
        ctx.grads = None
        scale = grad_total
        out_h = grad_h * scale.to(grad_h.dtype) if grad_h is not None else None
        out_w = (grad_w * scale).to(ctx.dtypes[0]) if grad_w is not None else None
        out_b = (grad_b * scale).to(ctx.dtypes[1]) if grad_b is not None else None
        return out_h, out_w, out_b, None, None, None


def chunked_cross_entropy(
    hidden: torch.Tensor,
    head_weight: torch.Tensor,
    labels: torch.Tensor,
    head_bias: torch.Tensor | None = None,
    chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
    reduction: str = "mean",
) -> torch.Tensor:
    """Causal-LM loss of `hidden @ head_weight.T (+ bias)` against `labels`, without full logits.

    Labels are aligned with the inputs, as in transformers: position t predicts labels[t + 1],
    and `IGNORE_INDEX` (-100) positions contribute nothing.

    Args:
        hidden: final hidden states, shape (B, T, H).
        head_weight: the output head, shape (V, H) (a float weight; frozen or not).
        labels: shape (B, T), token ids or -100.
        head_bias: optional (V,) bias of the head.
        chunk_tokens: rows of logits computed at once; memory is about chunk_tokens * V * 8 bytes.
        reduction: "mean" over predicted tokens, or "sum".

    Returns:
        A float32 scalar. With no predicted token at all, 0 (not NaN).
    """
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction={reduction!r} is not supported; use 'mean' or 'sum'")
    if chunk_tokens < 1:
        raise ValueError(f"chunk_tokens={chunk_tokens} must be >= 1")
    if hidden.dim() != 3 or labels.shape != hidden.shape[:2]:
        raise ValueError(f"expected hidden (B, T, H) and labels (B, T); got {tuple(hidden.shape)} and {tuple(labels.shape)}")
    device_type = hidden.device.type
    if device_type in AUTOCAST_DEVICES and torch.is_autocast_enabled(device_type):
        compute_dtype = torch.get_autocast_dtype(device_type)
    else:
        compute_dtype = head_weight.dtype
    flat_h = hidden[:, :-1].reshape(-1, hidden.shape[-1])       # (B*(T-1), H)
    flat_y = labels[:, 1:].reshape(-1).to(hidden.device)          # (B*(T-1),)
    total = _LinearCrossEntropy.apply(flat_h, head_weight, head_bias, flat_y, chunk_tokens, compute_dtype)
    if reduction == "sum":
        return total
    return total / (flat_y != IGNORE_INDEX).sum().clamp_min(1)


def count_predicted_tokens(labels: torch.Tensor) -> int:
    """How many positions of a (B, T) label tensor carry loss (after the causal shift)."""
    return int((labels[:, 1:] != IGNORE_INDEX).sum())


def plain_head(model: nn.Module) -> nn.Linear | None:
    """The output head if the chunked path can reproduce the model's own logits, else None."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    config = getattr(model, "config", None)
    # Logit soft-capping (Gemma 2) or a logit scale (Cohere) change logits after the head.
    if getattr(config, "final_logit_softcapping", None) or getattr(config, "logit_scale", None) not in (None, 1, 1.0):
        return None
    if type(head) is not nn.Linear or getattr(model, "base_model", model) is model:
        return None
    return head


def causal_lm_loss(
    model: nn.Module,
    input_ids: torch.Tensor,
    labels: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    chunk_tokens: int | None = DEFAULT_CHUNK_TOKENS,
    reduction: str = "mean",
    position_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """The causal-LM loss of a transformers model, chunked when the head allows it.

    The decoder runs as usual (`model.base_model`); the plain `nn.Linear` head is applied
    chunk by chunk. A head wrapped with LoRA, or a model that post-processes its logits,
    falls back to the model's own logits (same numbers, more memory). `chunk_tokens=None`
    forces that naive path. `position_ids` that restart mid-row (packed examples, with no
    attention_mask) make transformers attend within each restarted segment only.
    """
    inputs = {"input_ids": input_ids, "attention_mask": attention_mask, "position_ids": position_ids, "use_cache": False}
    head = plain_head(model) if chunk_tokens else None
    if head is None:
        logits = model(**inputs).logits
        shifted = logits[:, :-1].float().reshape(-1, logits.shape[-1])  # (B*(T-1), V)
        return F.cross_entropy(shifted, labels[:, 1:].reshape(-1), ignore_index=IGNORE_INDEX, reduction=reduction)
    outputs = model.base_model(**inputs)
    return chunked_cross_entropy(outputs[0], head.weight, labels, head.bias, chunk_tokens, reduction)


def _token_log_probs(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                     targets: torch.Tensor) -> torch.Tensor:
    logits = F.linear(hidden, weight, bias).float()                                # (c, V)
    return logits.gather(-1, targets[:, None]).squeeze(-1) - logits.logsumexp(-1)  # (c,)


def sequence_log_probs(model: nn.Module, input_ids: torch.Tensor, labels: torch.Tensor,
                       attention_mask: torch.Tensor | None = None,
                       chunk_tokens: int | None = DEFAULT_CHUNK_TOKENS) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed log-prob of each row's labelled tokens, their number), both shape (N,).

    Labels are aligned with input_ids (position t predicts labels[t + 1]); -100 counts for
    nothing. With a plain output head the logits exist `chunk_tokens` rows at a time, and
    backward recomputes each chunk's logits instead of keeping them (torch checkpoint).
    """
    targets = labels[:, 1:]                                     # (N, T-1)
    mask = targets != IGNORE_INDEX
    safe = targets.masked_fill(~mask, 0)
    inputs = {"input_ids": input_ids, "attention_mask": attention_mask, "use_cache": False}
    head = plain_head(model) if chunk_tokens else None
    if head is None:
        logits = model(**inputs).logits[:, :-1].float()        # (N, T-1, V)
        per_token = logits.gather(-1, safe[..., None]).squeeze(-1) - logits.logsumexp(-1)
    else:
        hidden = model.base_model(**inputs)[0][:, :-1]          # (N, T-1, H)
        flat_h, flat_y = hidden.reshape(-1, hidden.shape[-1]), safe.reshape(-1)
        pieces = [checkpoint(_token_log_probs, flat_h[s:s + chunk_tokens], head.weight, head.bias,
                             flat_y[s:s + chunk_tokens], use_reentrant=False)
                  for s in range(0, flat_h.shape[0], chunk_tokens)]
        per_token = torch.cat(pieces).view(safe.shape)
    return (per_token * mask).sum(-1), mask.sum(-1)
