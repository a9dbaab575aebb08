"""New tokens: add (special) tokens, resize the embeddings, and train only the new rows.

    ids = ql.add_tokens(model, tokenizer, ["<|tool|>", "<|/tool|>"])   # before or after add_lora

The embedding matrix grows by the new tokens (transformers' `resize_token_embeddings`); the
old rows stay frozen (and the quantized layers untouched) while the new rows live in one
small trainable float32 matrix, `trainable_tokens_delta` (n_new, hidden), as in PEFT's
`trainable_token_indices` (the same name, the same file keys). A tied output head shares
that matrix, so the model also learns to *emit* the new tokens. The adapter holds the rows
and the enlarged tokenizer; the export writes the enlarged vocabulary.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..state import state_of

DELTA = "trainable_tokens_delta"   # PEFT's parameter name (its key adds ".token_adapter")


class TrainableTokens(nn.Module):
    """An embedding (or a tied output head) whose rows `token_indices` come from a trainable matrix."""

    def __init__(self, base_layer: nn.Module, token_indices: Sequence[int], delta: nn.Parameter | None = None) -> None:
        super().__init__()
        self.base_layer = base_layer
        for param in base_layer.parameters():
            param.requires_grad_(False)
        weight = base_layer.weight                                        # (vocab, hidden) for both kinds
        index = torch.tensor(list(token_indices), dtype=torch.long, device=weight.device)
        self.register_buffer("token_indices", index, persistent=False)
        slot = torch.full((weight.shape[0],), -1, dtype=torch.long, device=weight.device)
        slot[index] = torch.arange(len(index), device=weight.device)
        self.register_buffer("slot", slot, persistent=False)             # token id -> row of delta, or -1
        if delta is None:
            delta = nn.Parameter(weight.detach()[index].float().clone())   # start from the resized rows
        self.trainable_tokens_delta = delta                               # (n_new, hidden) float32
        self.is_head = isinstance(base_layer, nn.Linear)

    @property
    def weight(self) -> torch.Tensor:
        """The full matrix this layer computes with (old rows frozen, new rows from the delta)."""
        weight = self.base_layer.weight
        return weight.index_copy(0, self.token_indices, self.trainable_tokens_delta.to(weight.dtype))

    def merged_weight(self) -> torch.Tensor:
        """The same matrix in float32, detached: what the export writes."""
        return self.base_layer.weight.detach().float().index_copy(0, self.token_indices,
                                                                 self.trainable_tokens_delta.detach().float())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base_layer(x)
        delta = self.trainable_tokens_delta
        if self.is_head:
            # Only the new tokens' logits change: (B, T, hidden) @ (hidden, n_new).
            new = F.linear(x.to(out.dtype), delta.to(out.dtype))
            return out.index_copy(-1, self.token_indices, new)
        slot = self.slot[x]                                               # (B, T)
        rows = delta[slot.clamp(min=0)].to(out.dtype)                     # (B, T, hidden)
        return torch.where((slot >= 0).unsqueeze(-1), rows, out)


def add_tokens(model: nn.Module, tokenizer, tokens: Sequence[str], special: bool = True) -> list[int]:
    """Add tokens to the tokenizer and model; only their embedding rows train.

    Args:
        model: a transformers model (quantized, with or without LoRA layers).
        tokenizer: its tokenizer; the tokens are added to it in place.
        tokens: the new token strings (tokens it already has are not added again).
        special: add them as special tokens (never split, e.g. chat markers).

    Returns:
        The ids of the tokens whose rows train (the ones that were new).
    """
    if any(isinstance(m, TrainableTokens) for m in model.modules()):
        raise ValueError("this model already has trainable token rows; add all new tokens in one add_tokens call")
    before = len(tokenizer)
    if special:
        tokenizer.add_special_tokens({"additional_special_tokens": list(tokens)}, replace_extra_special_tokens=False)
    else:
        tokenizer.add_tokens(list(tokens))
    new_ids = list(range(before, len(tokenizer)))
    if not new_ids:
        raise ValueError(f"the tokenizer already has every one of {list(tokens)}: nothing to add")
    vocab = model.get_input_embeddings().weight.shape[0]
    if len(tokenizer) > vocab:
        model.resize_token_embeddings(len(tokenizer))
    wrap_trainable_tokens(model, new_ids)
    state_of(model).tokenizer = tokenizer
    return new_ids


def wrap_trainable_tokens(model: nn.Module, token_ids: Sequence[int],
                          deltas: dict[str, torch.Tensor] | None = None) -> dict[str, list[int]]:
    """Make rows `token_ids` of the input embeddings and of the output head trainable.

    A tied head shares the embedding's rows; an untied head gets its own (so the model can
    learn to emit the new tokens). `deltas` (module name -> rows) restores saved rows.
    Returns {module name: token ids} of the modules whose rows are saved.
    """
    deltas = deltas or {}
    embedding = model.get_input_embeddings()
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    names = {id(m): name for name, m in model.named_modules()}
    embed_name = names[id(embedding)]
    head_name = names.get(id(head)) if head is not None else None

    def rows(name: str) -> nn.Parameter | None:
        return nn.Parameter(deltas[name].float().clone()) if name in deltas else None

    wrapper = TrainableTokens(embedding, token_ids, rows(embed_name))
    saved = {embed_name: list(token_ids)}
    if head is not None and head.weight is embedding.weight:
        model.set_output_embeddings(TrainableTokens(head, token_ids, wrapper.trainable_tokens_delta))
    elif isinstance(head, nn.Linear):
        model.set_output_embeddings(TrainableTokens(head, token_ids, rows(head_name)))
        saved[head_name] = list(token_ids)
    model.set_input_embeddings(wrapper)
    state_of(model).trainable_tokens = saved
    return saved
