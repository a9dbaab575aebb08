"""Training behaviour: the CPU repack trap, gradient checkpointing, overfitting a batch."""

from __future__ import annotations

import pytest
import torch
from conftest import adamw_losses, tiny_model, token_batch
from torch import nn

import qlowrank as ql

# Non-reentrant checkpointing recomputes the same fp32 ops in the same order; observed
# differences are exactly 0 on this CPU. 1e-6 absolute leaves room for other backends.
CHECKPOINT_ATOL = 1e-6
CHECKPOINT_RTOL = 1e-5


def _qlora_llama(device="cpu", compute_dtype=torch.bfloat16, head_scale=1.0, hidden=None):
    model = tiny_model("llama").to(device)
    if head_scale != 1.0:
        # LoRA leaves the 0.02-init head frozen, which bounds the logits (and so the loss): scale it so the loss can fall far.
        model.lm_head.weight.data.mul_(head_scale)
    ql.quantize_model(model, ql.QuantConfig(bits=4, compute_dtype=compute_dtype))
    ql.add_lora(model, ql.LoraConfig(r=8, alpha=16))
    return model


def test_eval_forward_without_grad_first_does_not_stop_training(device):
    tokens = token_batch().to(device)
    clean = _qlora_llama(device, compute_dtype=torch.float32)
    tripped = _qlora_llama(device, compute_dtype=torch.float32)
    for model in (clean, tripped):
        for _, layer in ql.lora_layers(model):
            torch.manual_seed(5)
            nn.init.normal_(layer.lora_B.weight, std=0.05)  # B != 0 so every factor gets a gradient
    tripped.eval()
    with torch.no_grad():
        tripped(tokens)  # the "sanity generation" that silently breaks bitsandbytes on CPU
    tripped(tokens)      # and an eval forward whose input does not require grad
    tripped.train(), clean.train()
    _, want = _loss_and_grads(clean, tokens)
    _, got = _loss_and_grads(tripped, tokens)
    for name in want:
        assert got[name].abs().sum() > 0, name
        # Same weights, same fp32 ops: the gradients are the clean model's, bit for bit.
        torch.testing.assert_close(got[name], want[name], atol=0, rtol=0)
    optimizer = torch.optim.AdamW(ql.lora_parameters(tripped), lr=5e-3)
    losses = []
    for _ in range(10):
        loss = tripped(tokens, labels=tokens).loss
        loss.backward()
        losses.append(loss.item())
        optimizer.step()
        optimizer.zero_grad()
    assert losses[-1] < losses[0] - 0.05


def _loss_and_grads(model, tokens):
    model.zero_grad()
    loss = model(tokens, labels=tokens).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("arch", ["llama", "gpt2", "mistral"])
def test_gradient_checkpointing_matches_plain_backward_with_frozen_embeddings(arch, device):
    model = tiny_model(arch).to(device)
    ql.quantize_model(model, ql.QuantConfig(bits=4, compute_dtype=torch.float32))
    ql.add_lora(model, ql.LoraConfig(r=4, dropout=0.1))
    for _, layer in ql.lora_layers(model):
        nn.init.normal_(layer.lora_B.weight, std=0.05)
    model.train()
    embeddings = model.get_input_embeddings().weight
    assert not embeddings.requires_grad
    tokens = token_batch().to(device)
    torch.manual_seed(7)
    plain_loss, plain_grads = _loss_and_grads(model, tokens)
    assert ql.enable_gradient_checkpointing(model) == 2
    torch.manual_seed(7)
    ckpt_loss, ckpt_grads = _loss_and_grads(model, tokens)
    torch.testing.assert_close(ckpt_loss, plain_loss, atol=CHECKPOINT_ATOL, rtol=CHECKPOINT_RTOL)
    assert plain_grads.keys() == ckpt_grads.keys() and plain_grads
    for name in plain_grads:
        assert plain_grads[name].abs().sum() > 0
        torch.testing.assert_close(ckpt_grads[name], plain_grads[name], atol=CHECKPOINT_ATOL, rtol=CHECKPOINT_RTOL)


class _Block(nn.Module):
    def __init__(self, width):
        super().__init__()
        self.up, self.down = nn.Linear(width, 4 * width), nn.Linear(4 * width, width)

    def forward(self, x):
        return x + self.down(torch.relu(self.up(x)))


def test_gradient_checkpointing_on_plain_module_saves_activations():
    torch.manual_seed(0)
    width, depth = 64, 6
    model = nn.Sequential(nn.Embedding(100, width), *[_Block(width) for _ in range(depth)])
    ql.quantize_model(model, ql.QuantConfig(bits=4, compute_dtype=torch.float32))
    ql.add_lora(model, ql.LoraConfig(r=4))
    tokens = torch.randint(0, 100, (4, 128))

    def saved_bytes():
        total = 0

        def pack(t):
            nonlocal total
            total += t.numel() * t.element_size()
            return t
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = model(tokens).pow(2).mean()
        loss.backward()
        return total, loss.item()

    plain, loss_plain = saved_bytes()
    with pytest.raises(ValueError, match="block_types"):
        ql.enable_gradient_checkpointing(model)
    assert ql.enable_gradient_checkpointing(model, block_types=_Block) == depth
    checkpointed, loss_ckpt = saved_bytes()
    assert loss_ckpt == pytest.approx(loss_plain, rel=CHECKPOINT_RTOL)
    assert checkpointed < plain / 3


def test_4bit_tiny_llama_overfits_one_batch():
    torch.manual_seed(0)
    model = _qlora_llama(head_scale=20.0)
    model.train()
    tokens = token_batch(batch=2, seq=16)
    assert {id(p) for p in ql.lora_parameters(model)} == {id(p) for p in model.parameters() if p.requires_grad}
    losses = adamw_losses(model, tokens, 50)
    assert losses[-1] < losses[0] / 2, f"loss {losses[0]:.3f} -> {losses[-1]:.3f}"
