"""Fidelity probes: how closely an exported checkpoint reproduces the model it was exported from."""

from __future__ import annotations

import os

import torch
from torch import nn


def model_logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            return model(ids.to(model.device)).logits.float().cpu()
    finally:
        model.train(was_training)


def probe_fidelity(model: nn.Module, exported_dir: str | os.PathLike, dtype: torch.dtype, seq: int = 32) -> dict:
    """Relative logits error of an exported checkpoint against the model it came from.

    A fixed random batch (2 x seq tokens, seed 0) runs through both; the error is
    ||logits_export - logits_model|| / ||logits_model|| (Frobenius), and argmax agreement is the
    fraction of positions whose top token is the same.
    """
    config = model.config
    limit = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None) or seq
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, config.vocab_size, (2, min(seq, limit)), generator=generator)
    reference = model_logits(model, ids)
    # CPUs have no fp16 matmul kernels (thousands of times slower than bf16): an fp16 export
    # is probed with its fp16-rounded weights computed in float32 there.
    run_dtype = torch.float32 if dtype == torch.float16 and model.device.type == "cpu" else dtype
    exported = type(model).from_pretrained(str(exported_dir), dtype=run_dtype).to(model.device)
    logits = model_logits(exported, ids)
    del exported
    error = (logits - reference).norm() / reference.norm()
    return {
        "probe_tokens": list(ids.shape),
        "probe_compute_dtype": str(run_dtype).removeprefix("torch."),
        "relative_logits_error": float(error),
        "max_abs_logits_error": float((logits - reference).abs().max()),
        "argmax_agreement": float((logits.argmax(-1) == reference.argmax(-1)).float().mean()),
    }
