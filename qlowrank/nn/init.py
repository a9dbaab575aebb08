"""Quantization-aware LoRA initialisation (LoftQ, PiSSA), one layer at a time from its float weight.

Both need the float weight W, which exists only while a checkpoint streams in: `load_model`
(and `quantize_model(..., lora=...)`) call `quantize_with_init` per layer as each weight
arrives, so no second full-precision copy of the model is ever held.

- LoftQ (Li et al. 2023, arXiv 2310.08659): alternate Q = quant(W - s B A) and a rank-r SVD
  of W - dequant(Q), so that dequant(Q) + s B A ~ W before the first step. With one
  iteration the base is plain quant(W); with more it becomes quant(W - s B A).
- PiSSA (Meng et al. 2024, arXiv 2404.02948): the r principal singular components of W go
  into B and A; the residual W - s B A is what gets quantized (or kept in float).

Unlike PEFT's LoftQ, the factors honour the LoRA scale s = alpha / r: s B A is the
correction, so alpha = 2r does not double it. The SVD is a seeded randomized one (Halko et
al. 2011: rank r + 8 oversampling, 4 power iterations), or the full SVD on request.
"""

from __future__ import annotations

import zlib

import torch
from torch import nn

from ..config import LoraConfig, QuantConfig
from . import quant as quantlib

OVERSAMPLE = 8      # extra random directions of the randomized SVD (Halko et al.: 5-10 suffice)
POWER_ITERS = 4     # power iterations: the quantization residual's spectrum decays slowly


def layer_generator(seed: int, name: str) -> torch.Generator:
    """A CPU generator for one layer: a function of (seed, layer name) only (crc32, not
    Python's per-process randomized hash(), so it is the same in every process)."""
    return torch.Generator().manual_seed((seed * 0x9E3779B1 + zlib.crc32(name.encode())) % 2**63)


def top_singular(matrix: torch.Tensor, rank: int, method: str = "randomized",
                 generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(U (m, k), S (k,), Vh (k, n)): the top-`rank` singular triplets of a float32 matrix."""
    m, n = matrix.shape
    rank = min(rank, m, n)
    if method == "full" or rank + OVERSAMPLE >= min(m, n):
        u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
        return u[:, :rank], s[:rank], vh[:rank]
    k = rank + OVERSAMPLE
    omega = torch.randn(n, k, generator=generator).to(matrix.device)   # (n, k) seeded on the CPU
    q, _ = torch.linalg.qr(matrix @ omega)                              # (m, k) range of M
    for _ in range(POWER_ITERS):
        z, _ = torch.linalg.qr(matrix.T @ q)                            # (n, k)
        q, _ = torch.linalg.qr(matrix @ z)                              # (m, k)
    u_small, s, vh = torch.linalg.svd(q.T @ matrix, full_matrices=False)  # (k, n) projected problem
    return (q @ u_small)[:, :rank], s[:rank], vh[:rank]


def _factors(matrix: torch.Tensor, rank: int, scaling: float, method: str,
             generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(A (r, in), B (out, r)) with scaling * B @ A the best rank-r approximation of `matrix`."""
    u, s, vh = top_singular(matrix, rank, method, generator)
    root = (s / scaling).sqrt()                                         # split S evenly between B and A
    return root[:, None] * vh, u * root[None, :]


def quantize_with_init(weight: torch.Tensor, bias: torch.Tensor | None, quant: QuantConfig, lora: LoraConfig,
                       device: torch.device | str,
                       generator: torch.Generator) -> tuple[nn.Module, tuple[torch.Tensor, torch.Tensor]]:
    """The frozen base layer for one LoRA target under `lora.init` "loftq" or "pissa".

    Args:
        weight: the float weight, shape (out, in).
        bias: its bias or None (kept as is).
        quant: how the base is stored; bits=None keeps a float nn.Linear (PiSSA only).
        lora: this layer's config (r and alpha already resolved from rank/alpha patterns).
        device: where the layer lives.
        generator: seeds the randomized SVD.

    Returns:
        (the base layer, its initial (A (r, in), B (out, r))): `LoraLinear(init_factors=...)` takes the pair.
    """
    if lora.init not in ("loftq", "pissa"):
        raise ValueError(f"quantize_with_init is for init='loftq' or 'pissa', not {lora.init!r}")
    target = weight.detach().to(device=device, dtype=torch.float32)    # (out, in)
    scaling = lora.scaling
    if lora.init == "pissa":
        a, b = _factors(target, lora.r, scaling, lora.svd, generator)
        residual = target - scaling * (b @ a)
        layer = _base_layer(residual, bias, quant, device)
    else:
        if quant.bits is None:
            raise ValueError("LoraConfig(init='loftq') needs a quantized base (QuantConfig(bits=4 or 8)): on a float "
                             "base there is no quantization error to correct; use init='pissa' or 'kaiming'")
        lowrank = torch.zeros_like(target)
        for _ in range(lora.loftq_iters):
            layer = _base_layer(target - lowrank, bias, quant, device)
            a, b = _factors(target - quantlib.dequantize_weight(layer).to(target.device), lora.r, scaling, lora.svd,
                            generator)
            lowrank = scaling * (b @ a)
    return layer, (a.contiguous(), b.contiguous())


def _base_layer(weight: torch.Tensor, bias: torch.Tensor | None, quant: QuantConfig, device) -> nn.Module:
    if quant.bits is not None:
        return quantlib.quantize_linear(weight, bias, quant, device)
    out_features, in_features = weight.shape
    layer = nn.Linear(in_features, out_features, bias=bias is not None, device="meta")
    dtype = quant.compute_dtype if quant.compute_dtype != torch.float16 else torch.float32
    layer.weight = nn.Parameter(weight.to(device=device, dtype=dtype), requires_grad=False)
    if bias is not None:
        layer.bias = nn.Parameter(bias.detach().to(device), requires_grad=False)
    return layer


def pissa_float_inplace(layer: nn.Module, lora: LoraConfig, generator: torch.Generator
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """PiSSA on a float base already in memory: W <- W - s B A in place; returns (A, B)."""
    weight = quantlib.dequantize_weight(layer)                          # (out, in) float32
    a, b = _factors(weight, lora.r, lora.scaling, lora.svd, generator)
    residual = weight - lora.scaling * (b @ a)
    param = layer.weight
    with torch.no_grad():
        param.copy_((residual.t() if type(layer).__name__ == "Conv1D" else residual).to(param.dtype))
    return a, b
