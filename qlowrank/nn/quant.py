"""Quantize and dequantize one linear layer: the only module that imports bitsandbytes.

Everything qlowrank knows about bitsandbytes' internals (parameter classes, quant states,
the CPU repacking trap, 8-bit optimizers) is kept here so that a bitsandbytes upgrade
touches one file.
"""

from __future__ import annotations

import logging
from typing import Iterable

import torch
from torch import nn

from ..config import QuantConfig

# bitsandbytes logs a harmless "Failed to load CPU gemm_4bit_forward from kernels-community"
# on import when the optional `kernels` package is absent; it then uses its own kernels.
logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
import bitsandbytes as bnb  # noqa: E402
import bitsandbytes.functional as bnb_functional  # noqa: E402

_log = logging.getLogger(__name__)
_WARNED_WIDTHS: set[int] = set()   # in_features already warned about (once per process each)

Linear4bit = bnb.nn.Linear4bit
Linear8bitLt = bnb.nn.Linear8bitLt
QUANTIZED_LINEAR_TYPES: tuple[type[nn.Module], ...] = (Linear4bit, Linear8bitLt)


def is_quantized_linear(module: nn.Module) -> bool:
    """True for a bitsandbytes 4-bit or 8-bit linear layer."""
    return isinstance(module, QUANTIZED_LINEAR_TYPES)


def quantized_bits(module: nn.Module) -> int | None:
    """4 or 8 for a bitsandbytes linear layer, None for anything else."""
    if isinstance(module, Linear4bit):
        return 4
    if isinstance(module, Linear8bitLt):
        return 8
    return None


def quantize_linear(
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    quant: QuantConfig,
    device: torch.device | str,
) -> nn.Module:
    """Build a frozen bitsandbytes layer from a float weight of shape (out, in).

    The layer is created on the meta device so no random weights are ever allocated; the
    real weight is quantized when it is moved to `device`.
    """
    if quant.bits is None:
        raise ValueError("quantize_linear needs QuantConfig.bits=4 or 8")
    if weight.dim() != 2:
        raise ValueError(f"quantize_linear expects a 2-D (out, in) weight, got shape {tuple(weight.shape)}")
    device = torch.device(device)
    quant.check_device(device)
    out_features, in_features = weight.shape
    has_bias = bias is not None
    if quant.bits == 4:
        if device.type == "cpu" and in_features % quant.blocksize and in_features not in _WARNED_WIDTHS:
            _WARNED_WIDTHS.add(in_features)
            _log.warning("4-bit layers with %d inputs (not a multiple of the blocksize %d) are dequantized about "
                         "3x less accurately by bitsandbytes' CPU kernels (they restart the blocks at each row); "
                         "on a CPU, 8-bit or a blocksize dividing %d avoids it", in_features, quant.blocksize, in_features)
        if weight.dtype == torch.float32 and quant.compute_dtype != torch.float32:
            # bitsandbytes dequantizes to the dtype it quantized from: quantizing an fp32
            # checkpoint as is would make every forward and backward build an fp32 weight
            # (twice the bytes of a bf16 one) only to cast it down to the compute dtype.
            weight = weight.to(quant.compute_dtype)
        layer = Linear4bit(
            in_features, out_features, bias=has_bias, compute_dtype=quant.compute_dtype,
            compress_statistics=quant.double_quant, quant_type=quant.quant_type, device="meta",
        )
        layer.weight = bnb.nn.Params4bit(
            weight.detach().contiguous(), requires_grad=False, blocksize=quant.blocksize,
            compress_statistics=quant.double_quant, quant_type=quant.quant_type, module=layer,
        ).to(device)
    else:
        layer = Linear8bitLt(
            in_features, out_features, bias=has_bias, has_fp16_weights=False,
            threshold=float(quant.int8_threshold), device="meta",
        )
        layer.weight = bnb.nn.Int8Params(
            weight.detach().contiguous(), requires_grad=False, has_fp16_weights=False,
        ).to(device)
    if has_bias:
        layer.bias = nn.Parameter(bias.detach().to(device), requires_grad=False)
    guard_cpu_repack(layer)
    return layer


def guard_cpu_repack(layer: nn.Module) -> None:
    """Stop bitsandbytes from repacking a 4-bit weight for its CPU inference kernel.

    A Linear4bit forward in eval mode with an input that does not require grad permanently
    repacks the weight for `gemv_4bit`, which has no autograd: afterwards backward gives no
    input gradient and LoRA stops training with only a warning. We switch that path off and
    undo a repack that already happened.
    """
    if not isinstance(layer, Linear4bit):
        return
    layer.support_avx512bf16_for_cpu = False
    state = getattr(layer.weight, "quant_state", None)
    if state is not None and getattr(state, "packing_format_for_cpu", False):
        data, state = bnb_functional._convert_weight_packed_for_cpu_inverse(layer.weight.data, state)
        layer.weight.data = data
        layer.weight.quant_state = state
        layer.quant_state = state


def dequantize_weight(layer: nn.Module) -> torch.Tensor:
    """The float32 weight, shape (out, in), that a linear layer actually multiplies by.

    For a 4-bit layer this is the NF4/FP4 code times its (double-dequantized) block scale;
    for LLM.int8 the int8 row times its row scale / 127. A float nn.Linear returns its own
    weight; transformers' Conv1D (stored (in, out)) is returned transposed.
    """
    if isinstance(layer, Linear4bit):
        guard_cpu_repack(layer)
        # A weight gathered by FSDP comes back without its quant_state; the layer keeps it.
        state = getattr(layer.weight, "quant_state", None) or getattr(layer, "quant_state", None)
        if state is None:
            raise ValueError("this Linear4bit was never quantized (move it to a device first)")
        return bnb_functional.dequantize_4bit(layer.weight.data, state).float()
    if isinstance(layer, Linear8bitLt):
        codes, scales = _int8_codes_and_scales(layer)
        return bnb_functional.int8_vectorwise_dequant(codes, scales).float()
    if isinstance(layer, nn.Linear):
        return layer.weight.detach().float()
    if type(layer).__name__ == "Conv1D":
        return layer.weight.detach().float().t()
    raise TypeError(f"dequantize_weight does not know {type(layer).__name__}; expected a linear layer")


def _int8_codes_and_scales(layer: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    # bitsandbytes moves CB/SCB from the parameter to layer.state on the first forward.
    scales = getattr(layer.weight, "SCB", None)
    if scales is None:
        scales = layer.state.SCB
    if scales is None:
        raise ValueError("this Linear8bitLt was never quantized (move it to a device first)")
    return layer.weight.data, scales


def packed_tensors(layer: nn.Module) -> dict[str, torch.Tensor]:
    """Every tensor that stores a quantized layer's frozen weight (codes and scales)."""
    if isinstance(layer, Linear4bit):
        guard_cpu_repack(layer)
        weight = layer.weight
        # Sharded over processes (FSDP), the weight is a DTensor: this rank holds its local shard,
        # and the quant_state, kept whole on every rank, stays with the layer.
        state = getattr(weight, "quant_state", None) or layer.quant_state
        data = weight.to_local() if hasattr(weight, "to_local") else weight.data
        tensors = {"weight": data, "absmax": state.absmax}
        if state.nested:
            tensors["absmax2"] = state.state2.absmax
            tensors["offset"] = state.offset
        return tensors
    if isinstance(layer, Linear8bitLt):
        codes, scales = _int8_codes_and_scales(layer)
        return {"weight": codes, "SCB": scales}
    raise TypeError(f"{type(layer).__name__} is not a quantized layer")


def storage_bytes(layer: nn.Module) -> int:
    """Bytes the frozen weight occupies, including scales (bias excluded)."""
    return sum(t.numel() * t.element_size() for t in packed_tensors(layer).values())


def weight_element_count(param: torch.Tensor) -> int:
    """True number of weights a parameter holds (a packed 4-bit byte holds two)."""
    if isinstance(param, bnb.nn.Params4bit) and param.quant_state is not None:
        return int(torch.Size(param.quant_state.shape).numel())
    return param.numel()


def make_8bit_optimizer(name: str, params: Iterable, **kwargs) -> torch.optim.Optimizer:
    """bitsandbytes' block-wise 8-bit optimizers by qlowrank name ("adamw8bit", "paged_adamw8bit")."""
    table = {"adamw8bit": bnb.optim.AdamW8bit, "paged_adamw8bit": bnb.optim.PagedAdamW8bit}
    if name not in table:
        raise ValueError(f"unknown 8-bit optimizer {name!r}; use one of {sorted(table)}")
    return table[name](params, **kwargs)


# ---- fused MoE experts: a stack of E weight matrices, quantized expert by expert ----------------

# The tensors of `quantize_expert_stack` that all experts of a stack share (4-bit code books); every other one
# is stacked on a leading expert dimension.
EXPERT_CODE_BOOKS = ("code", "code2")


def quantize_expert_stack(weight: torch.Tensor, quant: QuantConfig, device: torch.device | str) -> dict[str, torch.Tensor]:
    """Quantize a float (E, out, in) stack of expert weights, each expert on its own, into plain tensors.

    Each expert gets its own 4-bit blocks (and, with double quantization, its own nested
    scales and offset) or its own int8 rows, so one expert dequantizes alone from a slice.
    A meta `weight` gives meta tensors of the exact shapes (the estimator's stand-in).

    Returns:
        name -> tensor, every tensor stacked on a leading expert dimension (E, ...), except
        the shared code books (`code`, `code2`).
    """
    if quant.bits is None:
        raise ValueError("quantize_expert_stack needs QuantConfig.bits=4 or 8")
    if weight.dim() != 3:
        raise ValueError(f"quantize_expert_stack expects an (experts, out, in) weight, got shape {tuple(weight.shape)}")
    experts, out_features, in_features = weight.shape
    if weight.is_meta:
        return _meta_expert_stack(experts, out_features * in_features, out_features, quant)
    stack: dict[str, torch.Tensor] = {}
    for index in range(experts):
        store_expert(stack, index, experts, quantize_expert(weight[index], quant, device))
    return stack


def store_expert(stack: dict[str, torch.Tensor], index: int, experts: int, parts: dict[str, torch.Tensor]) -> None:
    """Put one expert's tensors (`quantize_expert`'s, or {"float_weight": (out, in)}) into slot `index` of
    `stack`, name -> (experts, ...) storage allocated with the first expert to arrive; the code books are
    kept once. `stack` lists the stacked tensors first, then the code books (`quantize_expert_stack`'s order)."""
    for name, part in sorted(parts.items(), key=lambda item: item[0] in EXPERT_CODE_BOOKS):
        if name in EXPERT_CODE_BOOKS:
            stack.setdefault(name, part)
            continue
        if name not in stack:
            stack[name] = torch.empty((experts, *part.shape), dtype=part.dtype, device=part.device)
        stack[name][index].copy_(part)


def quantize_expert(weight: torch.Tensor, quant: QuantConfig, device: torch.device | str) -> dict[str, torch.Tensor]:
    """Quantize one expert's float (out, in) weight: its slot of `quantize_expert_stack`'s tensors.

    Returns name -> tensor without the leading expert dimension (the code books, shared by every
    expert, included), so a stack can be filled one expert at a time while it streams in.
    """
    device = torch.device(device)
    if quant.bits == 8:
        codes, scales, _ = bnb_functional.int8_vectorwise_quant(weight.to(device=device, dtype=torch.float16),
                                                                threshold=0.0)
        return {"codes": codes, "SCB": scales}
    one = weight.to(device=device, dtype=quant.compute_dtype).contiguous()
    codes, state = bnb_functional.quantize_4bit(one, blocksize=quant.blocksize, compress_statistics=quant.double_quant,
                                                quant_type=quant.quant_type)
    parts = {"codes": codes.reshape(-1), "absmax": state.absmax, "code": state.code}
    if state.nested:
        parts.update(absmax2=state.state2.absmax, offset=state.offset.reshape(1), code2=state.state2.code)
    return parts


def _meta_expert_stack(experts: int, numel: int, out_features: int, quant: QuantConfig) -> dict[str, torch.Tensor]:
    meta = torch.device("meta")
    if quant.bits == 8:
        return {"codes": torch.empty(experts, out_features, numel // out_features, dtype=torch.int8, device=meta),
                "SCB": torch.empty(experts, out_features, dtype=torch.float32, device=meta)}
    blocks = -(-numel // quant.blocksize)
    tensors = {"codes": torch.empty(experts, -(-numel // 2), dtype=torch.uint8, device=meta),
               "code": torch.empty(16, dtype=torch.float32, device=meta)}
    if quant.double_quant:
        tensors["absmax"] = torch.empty(experts, blocks, dtype=torch.uint8, device=meta)
        tensors["absmax2"] = torch.empty(experts, -(-blocks // 256), dtype=torch.float32, device=meta)
        tensors["offset"] = torch.empty(experts, 1, dtype=torch.float32, device=meta)
        tensors["code2"] = torch.empty(256, dtype=torch.float32, device=meta)
    else:
        tensors["absmax"] = torch.empty(experts, blocks, dtype=torch.float32, device=meta)
    return tensors


def dequantize_expert(tensors: dict[str, torch.Tensor], index: int, shape: tuple[int, int], quant: QuantConfig,
                      dtype: torch.dtype) -> torch.Tensor:
    """Expert `index`'s (out, in) weight in `dtype`, from `quantize_expert_stack`'s tensors (only its slice is read)."""
    codes = tensors["codes"]
    if codes.is_meta:
        return torch.empty(shape, dtype=dtype, device="meta")
    if quant.bits == 8:
        return (codes[index].to(dtype) * (tensors["SCB"][index].to(dtype) / 127.0).unsqueeze(1))
    nested = None
    if "absmax2" in tensors:
        nested = bnb_functional.QuantState(absmax=tensors["absmax2"][index], code=tensors["code2"], blocksize=256,
                                           dtype=torch.float32)
    # The blocks run over the flattened weight, as quantize_4bit made them, so it is dequantized flat:
    # bitsandbytes 0.50.2's CPU kernel restarts the blocks at every row of a 2-D shape, and an (out, in)
    # weight whose `in` is not a multiple of the blocksize comes back wrong (relative error 0.28
    # instead of 0.09 at in = 96). Its Linear4bit forward does the same, which is why
    # `dequantize_weight` keeps bitsandbytes' reading for dense layers (a merge must equal the forward
    # that trained); experts are ours end to end.
    state = bnb_functional.QuantState(
        absmax=tensors["absmax"][index], shape=torch.Size([shape[0] * shape[1]]), code=tensors["code"],
        blocksize=quant.blocksize, quant_type=quant.quant_type, dtype=quant.compute_dtype,
        offset=tensors["offset"][index, 0] if nested is not None else None, state2=nested)
    return bnb_functional.dequantize_4bit(codes[index].reshape(-1, 1), state).reshape(shape).to(dtype)
