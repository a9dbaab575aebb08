"""The chunked cross-entropy equals the naive full-logits loss, in value and in gradients."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_model, token_batch

import qlowrank as ql
from qlowrank.nn.loss import IGNORE_INDEX, causal_lm_loss, chunked_cross_entropy

# fp32: the chunked path sums per-chunk losses in a different order than one big
# cross_entropy; measured differences on these shapes: loss 4.8e-7, gradients 3e-8. 1e-5 /
# 1e-6 absolute leave an order of magnitude of room.
FP32_LOSS_ATOL = 1e-5
FP32_GRAD_ATOL = 1e-6
FP32_SUM_RTOL = 1e-6     # float32 epsilon is 1.2e-7; summation order costs a few ulps
# bf16 autocast: both paths multiply in bf16 (8-bit mantissa) but round different partial
# results; measured max gradient difference 4.4e-4 on gradients of size ~1e-2; 2e-3 allows ~4x.
BF16_GRAD_ATOL = 2e-3
BF16_LOSS_ATOL = 1e-3


def _inputs(batch=2, seq=33, hidden=16, vocab=50, seed=0, device="cpu"):
    torch.manual_seed(seed)
    h = torch.randn(batch, seq, hidden, device=device, requires_grad=True)
    w = (torch.randn(vocab, hidden, device=device) * 0.5).requires_grad_()
    b = torch.randn(vocab, device=device, requires_grad=True)
    y = torch.randint(0, vocab, (batch, seq), device=device)
    y[0, :5] = IGNORE_INDEX          # a masked prompt
    y[1, -3:] = IGNORE_INDEX         # padding
    return h, w, b, y


def _naive(h, w, b, y, reduction="mean"):
    logits = F.linear(h[:, :-1], w, b).float()  # (B, T-1, V)
    return F.cross_entropy(logits.reshape(-1, w.shape[0]), y[:, 1:].reshape(-1), reduction=reduction)


@pytest.mark.parametrize("chunk", [1, 7, 64, 10_000])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_chunked_loss_and_gradients_equal_naive_fp32(chunk, reduction, device):
    if device == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False  # TF32 would round both paths to 10-bit mantissas
    h, w, b, y = _inputs(device=device)
    got = chunked_cross_entropy(h, w, y, b, chunk_tokens=chunk, reduction=reduction)
    got_grads = torch.autograd.grad(got, (h, w, b))
    want = _naive(h, w, b, y, reduction)
    want_grads = torch.autograd.grad(want, (h, w, b))
    assert got.dtype == torch.float32
    # A sum over ~60 tokens is ~60x the mean: compare it relative to its size.
    torch.testing.assert_close(got, want, atol=FP32_LOSS_ATOL, rtol=FP32_SUM_RTOL)
    for g, r in zip(got_grads, want_grads):
        assert r.abs().sum() > 0
        torch.testing.assert_close(g, r, atol=FP32_GRAD_ATOL, rtol=FP32_SUM_RTOL)
    # Ignored positions pass no gradient back to the hidden state that predicted them.
    assert got_grads[0][0, :4].abs().sum() == 0 and got_grads[0][1, -4:-1].abs().sum() == 0


def test_chunked_loss_under_bf16_autocast_matches_naive():
    h, w, b, y = _inputs(seq=65, hidden=32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = chunked_cross_entropy(h, w, y, b, chunk_tokens=16)
        want = _naive(h, w, b, y)
    got_grads = torch.autograd.grad(got, (h, w, b))
    want_grads = torch.autograd.grad(want, (h, w, b))
    torch.testing.assert_close(got, want, atol=BF16_LOSS_ATOL, rtol=0)
    for g, r in zip(got_grads, want_grads):
        assert g.dtype == r.dtype
        torch.testing.assert_close(g, r, atol=BF16_GRAD_ATOL, rtol=0)


def test_frozen_head_gets_no_gradient_and_all_ignored_gives_zero():
    h, w, _, y = _inputs()
    w.requires_grad_(False)
    loss = chunked_cross_entropy(h, w, y, chunk_tokens=8)
    loss.backward()
    assert w.grad is None and h.grad.abs().sum() > 0
    empty = torch.full_like(y, IGNORE_INDEX)
    assert chunked_cross_entropy(h, w, empty).item() == 0.0


def _lora_llama(target="all-linear", exclude=("lm_head",)):
    # "all-linear" never wraps the output head; naming it explicitly does.
    model = tiny_model("llama")
    ql.quantize_model(model, ql.QuantConfig(bits=4, compute_dtype=torch.float32))
    ql.add_lora(model, ql.LoraConfig(r=4, alpha=8, target_modules=target, exclude_modules=list(exclude)))
    torch.manual_seed(3)
    for _, layer in ql.lora_layers(model):
        torch.nn.init.normal_(layer.lora_B.weight, std=0.05)  # B != 0 so A gets a gradient too
    return model.train()


@pytest.mark.parametrize("head_has_lora", [False, True])
def test_causal_lm_loss_matches_transformers_loss_on_4bit_lora_model(head_has_lora):
    # With LoRA on lm_head the chunked path cannot apply; the fallback must give the same numbers.
    model = _lora_llama(target=["q_proj", "lm_head"] if head_has_lora else "all-linear", exclude=())
    assert isinstance(model.lm_head, ql.LoraLinear) == head_has_lora
    tokens = token_batch(batch=2, seq=24)
    labels = tokens.clone()
    labels[:, :6] = IGNORE_INDEX
    params = ql.lora_parameters(model)
    want = model(tokens, labels=labels).loss
    want_grads = torch.autograd.grad(want, params)
    got = causal_lm_loss(model, tokens, labels, chunk_tokens=5)
    got_grads = torch.autograd.grad(got, params)
    torch.testing.assert_close(got, want, atol=FP32_LOSS_ATOL, rtol=0)
    for g, r in zip(got_grads, want_grads):
        torch.testing.assert_close(g, r, atol=FP32_GRAD_ATOL, rtol=1e-4)


def test_a_target_far_below_the_best_logit_keeps_its_exact_loss():
    """A logit gap past float32's smallest softmax entry (~87 nats): -log(softmax) would read
    inf or a clamp; the exact logsumexp form is used for that row."""
    hidden = torch.zeros(1, 3, 4)
    hidden[0, :, 0] = 1.0
    head = torch.zeros(5, 4)
    head[1, 0] = 200.0                       # token 1 wins every row by 200 nats
    labels = torch.tensor([[0, 2, 1]])       # predicted: 2 (gap 200), then 1 (gap 0)
    got = chunked_cross_entropy(hidden, head, labels, reduction="sum")
    want = F.cross_entropy((hidden[0, :-1] @ head.T), labels[0, 1:], reduction="sum")
    assert torch.isfinite(got)
    torch.testing.assert_close(got, want, atol=FP32_LOSS_ATOL, rtol=FP32_SUM_RTOL)
