"""Partial gradient checkpointing: the last k blocks keep their activations, the rest are recomputed."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_model, token_batch

import qlowrank as ql


def _lora_llama(keep_blocks: int | None) -> torch.nn.Module:
    model = tiny_model("llama")
    ql.quantize_model(model, ql.QuantConfig(bits=4, compute_dtype=torch.float32))
    ql.add_lora(model, ql.LoraConfig(r=4, alpha=8), seed=0)
    with torch.no_grad():
        for _, layer in ql.lora_layers(model):   # non-zero B, so every factor gets a gradient
            layer.lora_B.weight.normal_(std=0.05, generator=torch.Generator().manual_seed(3))
    if keep_blocks is not None:
        ql.enable_gradient_checkpointing(model, keep_blocks=keep_blocks)
    return model.train()


def _grads_and_saved_bytes(model: torch.nn.Module) -> tuple[float, list[torch.Tensor], int]:
    ids = token_batch(2, 32)
    saved = []

    def pack(tensor):
        saved.append(tensor.numel() * tensor.element_size())
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(ids, labels=ids).loss
    loss.backward()
    return loss.item(), [p.grad.clone() for p in ql.lora_parameters(model)], sum(saved)


def test_partial_checkpointing_gives_the_gradients_of_none_and_of_full():
    reference_loss, reference, _ = _grads_and_saved_bytes(_lora_llama(None))
    for keep in (0, 1, 2):
        loss, grads, _ = _grads_and_saved_bytes(_lora_llama(keep))
        # Recomputation repeats the same fp32 kernels on the same inputs: bit-identical results.
        assert loss == reference_loss
        assert all(torch.equal(g, r) for g, r in zip(grads, reference)), keep


def test_each_kept_block_stores_more_activations():
    saved = [_grads_and_saved_bytes(_lora_llama(keep))[2] for keep in (0, 1, 2)]
    unchecked = _grads_and_saved_bytes(_lora_llama(None))[2]
    # Measured by autograd's own saved-tensor hooks (the recompute's saves happen in backward,
    # outside the hook): keeping all blocks saves what no checkpointing saves.
    assert saved[0] < saved[1] < saved[2] == unchecked


def test_keep_blocks_out_of_range_is_refused_with_the_block_count():
    with pytest.raises(ValueError, match="has 2 blocks"):
        ql.enable_gradient_checkpointing(tiny_model("llama"), keep_blocks=3)
    with pytest.raises(ValueError, match="has 2 blocks"):
        ql.enable_gradient_checkpointing(tiny_model("llama"), keep_blocks=-1)


def test_the_count_of_checkpointed_blocks_is_returned():
    assert ql.enable_gradient_checkpointing(tiny_model("llama"), keep_blocks=1) == 1
    assert ql.enable_gradient_checkpointing(tiny_model("llama")) == 2
