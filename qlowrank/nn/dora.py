"""DoRA (Liu et al. 2024, arXiv 2402.09353): LoRA with each output row rescaled to a trained magnitude.

    y = m / ||W + s B A||_row * (W x + s B A x) + bias

`m` (out,) is a trainable float32 vector that starts at the row norms of the initial weight, so
DoRA starts where LoRA does. The row norm is detached from the gradient (the paper's section
4.3, and PEFT), which is why it can be computed under no_grad from the dequantized weight.
`LoraLinear(use_dora=True)` calls these two functions; they hold the whole of DoRA's arithmetic.
"""

from __future__ import annotations

import torch


def rescale_output(result: torch.Tensor, update: torch.Tensor, magnitude: torch.Tensor, row_norm: torch.Tensor,
                   bias: torch.Tensor | None) -> torch.Tensor:
    """DoRA's output from the base layer's `result` (W x + bias) and the LoRA `update` (s B A x).

    What this keeps for backward is one (B, T, out) tensor (the undecorated output, for m's
    gradient); the norm is a detached (out,) vector.
    """
    plain = result if bias is None else result - bias.to(result.dtype)
    scale = (magnitude / row_norm).to(result.dtype)  # (out,)
    out = scale * (plain + update.to(result.dtype))
    return out if bias is None else out + bias.to(out.dtype)


def rescale_weight(weight: torch.Tensor, magnitude: torch.Tensor) -> torch.Tensor:
    """The merged DoRA weight: each row of the float32 (out, in) `weight` (W + s B A) scaled to `magnitude`."""
    return weight * (magnitude / torch.linalg.vector_norm(weight, dim=1))[:, None]
