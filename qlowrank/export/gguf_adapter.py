"""The LoRA adapter alone as a GGUF file, for llama.cpp's `--lora` and Ollama's `ADAPTER` line.

llama.cpp's layout (what its `convert_lora_to_gguf.py` writes and `src/llama-adapter.cpp`
checks): `general.type` = "adapter", `adapter.type` = "lora", `adapter.lora.alpha` (float32),
`general.architecture` = the base's, and for each adapted weight two tensors named after the
base GGUF's tensor, `<name>.lora_a` (A, r x in) and `<name>.lora_b` (B, out x r). llama.cpp
adds `alpha / r * B (A x)` to that weight's output, with r read from lora_b.

Scale. qlowrank's scale per layer is alpha / r (or alpha / sqrt(r) with rsLoRA, and
per-module `rank_pattern` / `alpha_pattern`), while llama.cpp applies one alpha to every layer
and divides by each layer's own rank. The file's alpha is the adapter's `alpha`; a layer whose
scale is not alpha / r (rsLoRA, a pattern) has the ratio folded into its lora_b, so that
alpha / r * B' equals our scale * B for every layer, whatever reads the file.

Layout. For the "llama" architecture llama.cpp stores q_proj / k_proj rows interleaved per
rotary pair (export/gguf_writer.py); B's rows are permuted the same way, since (P B) A = P (B A).
Gemma's `1 + w` norm offset concerns norms, which carry no LoRA. Mixtures of experts (Qwen3-MoE,
Mixtral, gpt-oss, Qwen2-MoE, OLMoE): router LoRA is a 2-D pair on `ffn_gate_inp`; expert LoRA is written as 3-D pairs on `ffn_{gate,up,down}_exps`, lora_a
(E, r, in) and lora_b (E, out, r), split as the merged export splits the stacks
(export/gguf_adapter_experts.py); the same alpha / r and ratio folding apply to them.

Refused: DoRA (its per-row magnitude has no llama.cpp form), modules trained whole
(`modules_to_save`, new-token rows: llama.cpp refuses adapters with full tensors),
PiSSA and multi-iteration LoftQ (their base is not the base GGUF's weights), and every
family or layout export/gguf_arch.py refuses.
"""

from __future__ import annotations

import math
import os
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..atomic import staged_file
from ..model.surgery import lora_layers
from ..nn.experts import ExpertWeights
from ..nn.lora import LoraLinear
from ..nn.router import LoraRouter
from ..state import state_of
from .gguf_writer import expert_namer, gguf_names, permute_rotary, rotary_heads
from .gguf_adapter_experts import expert_lora_layers, expert_lora_tensors
from .gguf_arch import gguf_family
from .gguf_experts import experts_transposed

ADAPTER_TYPES = ("f32", "f16")
# A layer's scale ratio within this of 1 is written unfolded (alpha / r computed two ways in float64).
UNFOLDED_RATIO = 1e-12


def _gguf():
    try:
        import gguf
    except ImportError:
        raise ImportError("GGUF adapter export needs the `gguf` package: pip install gguf") from None
    return gguf


def _check_adapter(model: nn.Module) -> tuple[list[tuple[str, LoraLinear | LoraRouter]], list[tuple[str, ExpertWeights]]]:
    """The model's 2-D LoRA layers (linears, then MoE routers) and expert stacks with LoRA, or ValueError naming what
    llama.cpp's adapter format cannot carry."""
    layers, experts = list(lora_layers(model)), expert_lora_layers(model)
    # A router's (E, H) weight is llama.cpp's ffn_gate_inp, which it adapts as any 2-D weight (build_lora_mm).
    routers = [(name, module) for name, module in model.named_modules() if isinstance(module, LoraRouter)]
    if not layers and not experts and not routers:
        raise ValueError("save_gguf_adapter: the model has no LoRA layers (add_lora or load_adapter first)")
    dora = [name for name, layer in layers if layer.use_dora]
    if dora:
        raise ValueError(f"save_gguf_adapter: DoRA layers ({dora[0]}, ...) cannot be expressed as a llama.cpp LoRA "
                         "adapter (it has no per-row magnitude); export the merged model instead "
                         "(export_merged(..., format='gguf'))")
    rebuilt = [name for name, layer in layers if layer.init == "pissa" or (layer.init == "loftq" and layer.loftq_iters > 1)]
    if rebuilt:
        raise ValueError(f"save_gguf_adapter: {rebuilt[0]} was initialised with {layers[0][1].init}, which replaced the "
                         "frozen base weights; an adapter file applies to the original base, so export the merged "
                         "model instead (export_merged(..., format='gguf'))")
    state = state_of(model)
    if state.modules_to_save or state.trainable_tokens:
        whole = list(state.modules_to_save) + list(state.trainable_tokens)
        raise ValueError(f"save_gguf_adapter: {whole} are trained whole (modules_to_save / new tokens); llama.cpp "
                         "refuses adapters with full tensors, so export the merged model instead")
    # Factors this writer does not know (a LoRA kind added later) are refused, never silently left out.
    written = {id(p) for _, module in layers + routers + experts for p in module.parameters()}
    unknown = [name for name, p in model.named_parameters() if "lora_" in name and id(p) not in written]
    if unknown:
        raise ValueError(f"save_gguf_adapter: LoRA factors {unknown[:3]} belong to no layer this writer writes; "
                         "export the merged model instead (export_merged(..., format='gguf'))")
    return layers + routers, experts


def scale_ratio(layer: LoraLinear | LoraRouter | ExpertWeights, alpha: float) -> float:
    """What lora_b is multiplied by so that llama.cpp's alpha / r gives the layer's own scale (1.0: none)."""
    ratio = layer.scaling * layer.r / alpha
    return 1.0 if abs(ratio - 1.0) <= UNFOLDED_RATIO else ratio


def save_gguf_adapter(model: nn.Module, path: str | os.PathLike, dtype: str = "f32", overwrite: bool = False) -> dict:
    """Write the model's LoRA factors as a llama.cpp / Ollama adapter GGUF (see the module docstring).

    Args:
        model: a transformers model of a family `export_merged(format="gguf")` writes, with LoRA.
        path: the .gguf file, written atomically.
        dtype: "f32" or "f16" for the factors.
        overwrite: replace an existing file.

    Returns:
        A report: architecture, alpha, layers (LoRA linears and routers), expert_stacks (fused expert projections with
        LoRA), folded (of both, those whose scale is folded into lora_b), bytes.

    Raises:
        ValueError: DoRA, modules trained whole, a family or layout GGUF export refuses.
        FileExistsError: `path` exists and `overwrite` is False.
    """
    gguf = _gguf()
    path = Path(path)
    if path.suffix != ".gguf":
        raise ValueError(f"{path}: a GGUF adapter is one file; name it with a .gguf suffix")
    if dtype not in ADAPTER_TYPES:
        raise ValueError(f"dtype={dtype!r}: use one of {ADAPTER_TYPES}")
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists; pass overwrite=True (CLI: --overwrite) to replace it")
    family = gguf_family(model)
    layers, experts = _check_adapter(model)
    # add_lora records the config (always, when experts carry LoRA); a hand-wrapped model has layers.
    alpha = float(state_of(model).lora.alpha if state_of(model).lora is not None else layers[0][1].alpha)
    if not math.isfinite(alpha) or alpha <= 0:
        raise ValueError(f"save_gguf_adapter: LoRA alpha {alpha} cannot be written (llama.cpp needs alpha > 0)")
    names = gguf_names(model, family.arch, [f"{name}.weight" for name, _ in layers])
    start = time.time()
    folded = []
    with staged_file(path, "GGUF adapter export") as tmp:
        writer = gguf.GGUFWriter(tmp, family.arch)
        writer.add_type(gguf.GGUFType.ADAPTER)
        writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
        writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, alpha)
        writer.add_name(Path(str(getattr(model.config, "_name_or_path", "") or "model")).stem or "model")
        for name, layer in layers:
            layer.check_finite()
            a, b = _factors(layer, f"{name}.weight", family, model.config, alpha, folded, name)
            writer.add_tensor(names[f"{name}.weight"] + ".lora_a", _encode(a, dtype))
            writer.add_tensor(names[f"{name}.weight"] + ".lora_b", _encode(b, dtype))
        if experts:
            _add_experts(writer, model, family.arch, experts, alpha, dtype, folded)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        size = tmp.stat().st_size
    report = {"format": "gguf-adapter", "architecture": family.arch, "alpha": alpha, "layers": len(layers),
              "expert_stacks": len(experts), "folded": len(folded), "dtype": dtype, "total_bytes": size,
              "seconds": round(time.time() - start, 2)}
    print(f"exported {path}: " + ", ".join(f"{k}={v}" for k, v in report.items()))
    return report


def _factors(layer: LoraLinear | LoraRouter, key: str, family, config, alpha: float, folded: list, name: str):
    """(A, B) in float32 as llama.cpp wants them: B's rows in the base tensor's row order, the scale ratio folded in."""
    a = layer.lora_A.weight.detach().float().cpu()                # (r, in)
    b = layer.lora_B.weight.detach().float().cpu()                # (out, r)
    if layer.fan_in_fan_out:
        raise ValueError(f"save_gguf_adapter: {name} is a Conv1D (GPT-2 style) layer, which no family here has")
    heads = rotary_heads(family, key, config)
    if heads is not None:
        b = permute_rotary(b, heads)                               # rows as the base GGUF's rows
    ratio = scale_ratio(layer, alpha)
    if ratio != 1.0:
        folded.append(name)
        b = b * ratio
    return a, b


def _add_experts(writer, model: nn.Module, arch: str, experts: list[tuple[str, ExpertWeights]], alpha: float,
                 dtype: str, folded: list) -> None:
    """The 3-D lora_a / lora_b pairs of every expert stack with LoRA (export/gguf_adapter_experts.py)."""
    name_of = expert_namer(model, arch)
    for key, weights in experts:
        ratio = scale_ratio(weights, alpha)
        if ratio != 1.0:
            folded.append(key)
        for base, a, b in expert_lora_tensors(key, weights, experts_transposed(model, key), ratio, name_of):
            writer.add_tensor(base + ".lora_a", _encode(a, dtype))
            writer.add_tensor(base + ".lora_b", _encode(b, dtype))


def _encode(tensor: torch.Tensor, dtype: str) -> np.ndarray:
    array = tensor.contiguous().numpy()
    return array.astype(np.float16) if dtype == "f16" else array
