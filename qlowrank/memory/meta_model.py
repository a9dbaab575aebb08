"""The estimator's model: a transformers model built on the meta device, with stand-ins for
bitsandbytes layers that allocate what bitsandbytes allocates.

Meta tensors have shapes, dtypes and storage sizes but no data, so a 175B model costs no
memory and a training step costs no arithmetic. bitsandbytes cannot quantize meta
tensors, so each quantized layer is replaced by a stand-in whose forward and backward
allocate the tensors bitsandbytes 0.50 allocates (read from `bitsandbytes/autograd/
_functions.py`): packed codes and scales as frozen storage; for 4-bit, nothing of the
input kept for backward and a dequantized weight in flight during backward; for
LLM.int8 on CPU (`MatMul8bitFp`), a dequantized weight in flight in both passes and the
layer input kept on `ctx` for backward.

Scaled-dot-product attention on meta tensors would take PyTorch's math path (a full
T x T score matrix); the real CPU and CUDA kernels are fused and keep only the output and
a log-sum-exp, so the simulation calls the fused kernel the target device would use.
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch
import torch.nn.functional as F
import transformers
from torch import nn
from torch.overrides import TorchFunctionMode

from ..adapter.files import read_json_object
from ..config import QuantConfig

_ENCODER_TYPES = ("bert", "roberta", "distilbert", "xlm-roberta", "electra")


def load_config(source: str | Path | transformers.PretrainedConfig) -> transformers.PretrainedConfig:
    """A transformers config from a model directory, a config.json, a .gguf file or a config object.

    Raises:
        FileNotFoundError: the path does not exist or holds no config.json.
        ValueError: the config names no `model_type` transformers knows.
    """
    if isinstance(source, transformers.PretrainedConfig):
        return source
    path = Path(source)
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist; pass a model directory, its config.json, or a .gguf file")
    if path.suffix == ".gguf":
        from ..model.gguf_header import gguf_config  # the header only: transformers' reader decodes the vocabulary too
        return gguf_config(path)
    if path.is_dir():
        if not (path / "config.json").is_file():
            ggufs = sorted(path.glob("*.gguf"))
            if ggufs:
                return load_config(ggufs[0])
            raise FileNotFoundError(f"{path} holds no config.json (nor a .gguf file); pass the model's directory")
        path = path / "config.json"
    data = read_json_object(path)   # a malformed file is named, not a JSONDecodeError from inside json
    model_type = data.pop("model_type", None)
    if model_type is None:
        raise ValueError(f"{path} has no 'model_type'; it does not look like a transformers config.json")
    try:
        return transformers.AutoConfig.for_model(model_type, **data)
    except ValueError as err:
        raise ValueError(f"{path}: transformers does not know model_type={model_type!r} ({err})") from None


def hidden_size_of(config: transformers.PretrainedConfig) -> int:
    """The model width (Llama-style `hidden_size` or GPT-2-style `n_embd`); 0 when the config names neither."""
    return int(getattr(config, "hidden_size", None) or getattr(config, "n_embd", 0) or 0)


def layer_count(config: transformers.PretrainedConfig) -> int:
    """Decoder layers (`num_hidden_layers` or GPT-2-style `n_layer`); 0 when the config names neither."""
    return int(getattr(config, "num_hidden_layers", None) or getattr(config, "n_layer", 0) or 0)


def with_depth(config: transformers.PretrainedConfig, blocks: int) -> transformers.PretrainedConfig:
    """A copy of `config` with `blocks` decoder layers (everything else, the vocabulary included, as it is)."""
    cut = copy.deepcopy(config)
    for name in ("num_hidden_layers", "n_layer", "num_layers"):
        if hasattr(cut, name):
            setattr(cut, name, blocks)
    if getattr(cut, "layer_types", None):
        cut.layer_types = cut.layer_types[:blocks]
    return cut


def build_meta_model(config: transformers.PretrainedConfig, dtype: torch.dtype) -> nn.Module:
    """The model the config describes, on the meta device, in `dtype`, in training mode."""
    auto = transformers.AutoModelForMaskedLM if config.model_type in _ENCODER_TYPES else transformers.AutoModelForCausalLM
    with torch.device("meta"):
        model = auto.from_config(config, dtype=dtype)
    if hasattr(model.config, "use_cache"):
        model.config.use_cache = False
    return model.train()


class MetaQuantLinear(nn.Linear):
    """A stand-in for a frozen bitsandbytes Linear4bit / Linear8bitLt on the meta device.

    Args:
        out_features, in_features: the layer shape.
        quant: bits, blocksize, double quantization and compute dtype of the real layer.
        weight_dtype: dtype of the float weight it replaces (bitsandbytes dequantizes to it).
        device_type: "cpu" or "cuda": which bitsandbytes code path to imitate.
        bias: whether the real layer has a (frozen) bias.
    """

    def __init__(self, out_features: int, in_features: int, quant: QuantConfig, weight_dtype: torch.dtype,
                 device_type: str, bias: bool = False) -> None:
        super().__init__(in_features, out_features, bias=bias, device="meta",
                         dtype=weight_dtype if weight_dtype.is_floating_point else torch.float32)
        n = out_features * in_features
        self.bits = quant.bits
        self.compute_dtype = quant.compute_dtype
        self.weight_dtype = weight_dtype
        self.device_type = device_type
        if quant.bits == 4:
            packed = torch.empty((n + 1) // 2, 1, dtype=torch.uint8, device="meta")  # two codes per byte
            blocks = -(-n // quant.blocksize)
            if quant.double_quant:  # absmax in 8 bits, its own fp32 absmax per 256 blocks, one fp32 offset
                self.register_buffer("absmax", torch.empty(blocks, dtype=torch.uint8, device="meta"))
                self.register_buffer("absmax2", torch.empty(-(-blocks // 256), dtype=torch.float32, device="meta"))
                self.register_buffer("offset", torch.empty((), dtype=torch.float32, device="meta"))
            else:
                self.register_buffer("absmax", torch.empty(blocks, dtype=torch.float32, device="meta"))
        else:
            packed = torch.empty(out_features, in_features, dtype=torch.int8, device="meta")
            self.register_buffer("SCB", torch.empty(out_features, dtype=torch.float32, device="meta"))  # row scales
        self.weight = nn.Parameter(packed, requires_grad=False)
        if bias:
            self.bias.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.bits == 4:
            # Linear4bit casts to compute dtype, runs the fused gemm_4bit op and casts back.
            out = _Matmul4bit.apply(x.to(self.compute_dtype), self)
            if self.bias is not None:
                out = out + self.bias.to(out.dtype)
            return out.to(x.dtype)
        return _Matmul8bit.apply(x, self)

    def dequantized(self, dtype: torch.dtype) -> torch.Tensor:
        """The float weight bitsandbytes materializes when it dequantizes (a meta tensor)."""
        if self.bits == 4:
            return torch.empty(self.out_features, self.in_features, dtype=self.weight_dtype, device="meta").to(dtype)
        return torch.empty(self.out_features, self.in_features, dtype=dtype, device="meta")


class _Matmul4bit(torch.autograd.Function):
    """bitsandbytes' MatMul4Bit: keeps only the packed weight; dequantizes again in backward."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, layer: MetaQuantLinear) -> torch.Tensor:
        ctx.layer = layer
        if layer.device_type == "cuda":
            # gemm_4bit's default kernel dequantizes the whole weight to x's dtype, then matmuls;
            # the CUDA allocator sees that buffer (inside a custom op the CPU tracker cannot)
            weight = torch.empty(layer.out_features, layer.in_features, dtype=x.dtype, device="meta")
            return F.linear(x, weight)
        return x.new_empty(*x.shape[:-1], layer.out_features)  # on CPU only the op's output is visible

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        weight = ctx.layer.dequantized(grad.dtype)  # (out, in), in flight
        return grad @ weight, None


class _Matmul8bit(torch.autograd.Function):
    """bitsandbytes' LLM.int8 training path: CPU `MatMul8bitFp`, CUDA `MatMul8bitLt`."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, layer: MetaQuantLinear) -> torch.Tensor:
        ctx.layer = layer
        ctx.x = x  # both paths keep the layer input on ctx for backward
        if layer.device_type == "cuda":
            flat = x.reshape(-1, x.shape[-1]).to(torch.float16)
            codes = torch.empty_like(flat, dtype=torch.int8)  # (N, in) int8 activations
            out = flat.new_empty(flat.shape[0], layer.out_features).to(x.dtype)
            del codes
            return out.reshape(*x.shape[:-1], layer.out_features)
        weight = layer.dequantized(x.dtype)  # (out, in) CB * SCB / 127, in flight
        return F.linear(x, weight)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, layer = ctx.x, ctx.layer
        weight = layer.dequantized(x.dtype)
        grad = grad.reshape(-1, grad.shape[-1]).contiguous()
        return (grad.to(x.dtype) @ weight).view(x.shape), None


class MetaChecks(TorchFunctionMode):
    """Answer data-dependent checks on meta tensors as in training: no padding, no packing.

    transformers asks e.g. "are these sequences packed?" (`bool(tensor)`), which cannot be
    read from a meta tensor.
    """

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is torch.Tensor.__bool__ and args[0].is_meta:
            return True
        return func(*args, **(kwargs or {}))


def _fused_attention(device_type: str):
    """transformers' SDPA attention (5.25's `sdpa_attention_forward`), with the fused kernel `device_type` runs.

    On meta tensors `F.scaled_dot_product_attention` would pick PyTorch's math path (a full
    T x T score matrix); the CPU and CUDA kernels keep only the output and a log-sum-exp.
    The GQA and causal decisions are transformers' own (`use_gqa_in_sdpa`, `repeat_kv`).
    """
    from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward, use_gqa_in_sdpa

    def forward(module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None, **kwargs):
        # PyTorch's CPU flash kernel has no dropout, so with dropout the CPU takes the math path too;
        # position biases and single-token queries go down transformers' path as they would for real.
        if (kwargs.get("softcap") is not None or kwargs.get("position_bias") is not None or query.shape[2] == 1
                or (device_type == "cpu" and dropout > 0)):
            return sdpa_attention_forward(module, query, key, value, attention_mask, dropout, scaling, is_causal,
                                          **kwargs)
        groups = getattr(module, "num_key_value_groups", 1)
        # With enable_gqa the CPU flash kernel reads the shared K/V heads in place; for CUDA we
        # assume the expanded copy (the conservative case: not every CUDA kernel supports GQA).
        if groups > 1 and (device_type == "cuda" or not use_gqa_in_sdpa(attention_mask, key, value)):
            key, value = repeat_kv(key, groups), repeat_kv(value, groups)
        causal = attention_mask is None and (is_causal if is_causal is not None else getattr(module, "is_causal", True))
        if device_type == "cuda":
            out = torch.ops.aten._scaled_dot_product_efficient_attention(
                query, key, value, attention_mask, True, dropout, bool(causal), scale=scaling)[0]
        else:
            out = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
                query, key, value, dropout, bool(causal), attn_mask=attention_mask, scale=scaling)[0]
        return out.transpose(1, 2).contiguous(), None

    return forward


def use_fused_attention(model: nn.Module, device_type: str) -> None:
    """Give the meta model an attention implementation that allocates what `device_type`'s SDPA kernel does.

    A registered transformers attention implementation of this model alone, rather than a patch
    of `F.scaled_dot_product_attention`: nothing outside the simulation changes, and checkpoint
    recomputation in backward (which runs outside torch-function modes) uses it too. Models that
    train with another implementation (eager) keep theirs.
    """
    if getattr(model.config, "_attn_implementation", None) != "sdpa":
        return
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    name = f"qlowrank_meta_sdpa_{device_type}"
    AttentionInterface.register(name, _fused_attention(device_type))
    AttentionMaskInterface.register(name, sdpa_mask)   # the masks SDPA gets (None where causal alone)
    model.set_attn_implementation(name)


def replace_quantized_layers(model: nn.Module, quant: QuantConfig, device_type: str,
                             source_dtype: torch.dtype | None = None, skip: tuple[str, ...] = ()) -> int:
    """Swap every linear layer quantize_model would quantize for a MetaQuantLinear; returns the count."""
    from ..model.structure import linear_layers, name_matches, output_head_names, set_submodule
    from ..nn.layers import linear_shape

    keep = output_head_names(model)
    count = 0
    for name, module in linear_layers(model):
        if name in keep or name_matches(name, skip):
            continue
        out_features, in_features = linear_shape(module)
        has_bias = getattr(module, "bias", None) is not None
        weight_dtype = source_dtype or module.weight.dtype
        stand_in = MetaQuantLinear(out_features, in_features, quant, weight_dtype, device_type, has_bias)
        stand_in.fan_in_fan_out = type(module).__name__ == "Conv1D"
        set_submodule(model, name, stand_in.train(module.training))
        count += 1
    from ..nn.experts import freeze_experts, is_fused_experts

    # Fused MoE experts: the real FrozenExperts, whose packed stacks are meta tensors of the exact
    # shapes (nn.quant.quantize_expert_stack) and whose meta forward routes T*k rows evenly.
    for name in [name for name, module in model.named_modules() if is_fused_experts(module)]:
        module = model.get_submodule(name)
        if name_matches(name, skip):
            continue
        set_submodule(model, name, freeze_experts(module, quant, "meta", source_dtype or module.down_proj.dtype))
        count += 1
    return count
