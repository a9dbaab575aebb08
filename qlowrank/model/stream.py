"""Filling a model built on the meta device one tensor at a time, each linear quantized the moment it is complete.

The streamed readers of `model/` (safetensors shards in load.py, GGUF files in gguf.py) share
this: the skeleton is built with accelerate's `init_empty_weights` (no float weights are
allocated), each tensor is handed to a `TensorSink` as it is read, and the sink either
quantizes it into a bitsandbytes layer (once a linear's weight and bias have both arrived)
or stores it in the model's float dtype. So host RAM holds the quantized model plus the one
tensor in flight, never the float model.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
import transformers
from accelerate import init_empty_weights
from torch import nn

from ..config import LoraConfig, QuantConfig
from ..heap import release_free_heap
from ..nn.expert_stack import ExpertStack
from ..nn.experts import expert_projections, freeze_experts, is_fused_experts
from ..nn.layers import is_conv1d
from ..state import state_of
from .structure import linear_layers, name_matches, output_head_names, set_submodule
from .surgery import quantize_layer


@dataclass
class LoadSettings:
    """How a streamed load stores what it reads (load_model's arguments, resolved)."""

    quant: QuantConfig                 # bits=None: keep the linears in float
    device: torch.device               # where the weights live
    dtype: torch.dtype                 # dtype of everything that stays float (embeddings, norms, head)
    skip_modules: tuple[str, ...] = ()  # linear names (or suffixes) kept in float
    lora: LoraConfig | None = None     # LoftQ / PiSSA initialise from each float weight in flight
    seed: int | None = None            # seed of those initialisations
    progress: bool = True              # a tqdm bar while streaming


def empty_model(config: transformers.PretrainedConfig, dtype: torch.dtype, cls=None,
                trust_remote_code: bool = False) -> nn.Module:
    """The model of `config` with its parameters on the meta device (no memory) and its buffers real.

    Non-persistent buffers such as rotary `inv_freq` are computed in `__init__` and are in no
    checkpoint, so they must be real. `cls` defaults to `AutoModelForCausalLM`.
    """
    cls = cls or transformers.AutoModelForCausalLM
    with init_empty_weights(include_buffers=False):
        if cls is transformers.AutoModelForCausalLM:
            return cls.from_config(config, dtype=dtype, trust_remote_code=trust_remote_code)
        return cls._from_config(config, dtype=dtype)


def tied_keys(model: nn.Module) -> set[str]:
    """State-dict keys that are tied to another tensor (not stored in checkpoints)."""
    if not getattr(model.config, "tie_word_embeddings", False):
        return set()
    tied = getattr(model, "_tied_weights_keys", None) or {}
    return set(tied.keys() if isinstance(tied, dict) else tied)




class TensorSink:
    """Receives a model's tensors one at a time and puts each where it belongs, quantized or float."""

    def __init__(self, model: nn.Module, settings: LoadSettings):
        self.model = model
        self.settings = settings
        self.expected = set(model.state_dict().keys())
        self.heads = output_head_names(model)
        self.to_quantize: set[str] = set()
        self.experts: set[str] = set()
        if settings.quant.bits is not None:
            self.to_quantize = {name for name, _ in linear_layers(model)
                                if name not in self.heads and not name_matches(name, settings.skip_modules)}
            # transformers 5's fused MoE experts (3-D stacks): stored per expert, like every linear.
            self.experts = {name for name, module in model.named_modules()
                            if is_fused_experts(module) and not name_matches(name, settings.skip_modules)}
        self.pending: dict[str, dict[str, torch.Tensor]] = {}  # linear name -> arrived weight / bias
        self.stacks: dict[str, ExpertStack] = {}   # model key of a fused expert stack -> its experts so far
        self.loaded: set[str] = set()

    def quantizes(self, key: str) -> bool:
        """Whether the tensor of model key `key` goes into a quantized layer (else it stays float)."""
        module_name, _, leaf = key.rpartition(".")
        return (module_name in self.to_quantize and leaf in ("weight", "bias")) or module_name in self.experts

    def check_shape(self, key: str, shape: tuple[int, ...], origin: str) -> None:
        """ValueError when the checkpoint's tensor does not fit the model built from the config."""
        module_name, _, leaf = key.rpartition(".")
        current = getattr(self.model.get_submodule(module_name), leaf, None)
        if isinstance(current, torch.Tensor) and tuple(current.shape) != tuple(shape):
            raise ValueError(
                f"{origin}: tensor {key!r} has shape {tuple(shape)} but the model built from its config "
                f"expects {tuple(current.shape)}; the weights do not belong to this config"
            )

    def put(self, key: str, tensor: torch.Tensor, origin: str, owned: bool = False) -> None:
        """Store one tensor under model key `key`; `owned`: no other reference to it exists (no copy needed)."""
        self.check_shape(key, tuple(tensor.shape), origin)
        self.loaded.add(key)
        module_name, _, leaf = key.rpartition(".")
        if self.quantizes(key):
            self.pending.setdefault(module_name, {})[leaf] = tensor
            self._quantize_if_complete(module_name)
        else:
            # A tensor that still pointed into a memory-mapped file would keep the whole
            # mapping (every page read so far) resident for the life of the model: copy those.
            _assign(self.model.get_submodule(module_name), leaf, tensor, self.settings, copy=not owned)

    def streams_experts(self, key: str) -> bool:
        """Whether model key `key` is a fused 3-D expert stack, which `put_expert` takes one expert at a time."""
        module_name, _, leaf = key.rpartition(".")
        try:
            module = self.model.get_submodule(module_name)
        except AttributeError:
            return False
        return is_fused_experts(module) and leaf in expert_projections(module)

    def put_expert(self, key: str, index: int, experts: int, tensor: torch.Tensor, origin: str) -> None:
        """Store expert `index` of the `experts` in the fused stack under model key `key` (its (a, b) or
        (1, a, b) slice in the checkpoint's layout): quantized at once into its slot where the experts are
        quantized, else copied into the float stack, which is assigned once every expert has arrived."""
        module_name, _, leaf = key.rpartition(".")
        tensor = tensor[0] if tensor.dim() == 3 else tensor
        stack = self.stacks.get(key)
        if stack is None:
            self.check_shape(key, (experts, *tensor.shape), origin)
            module = self.model.get_submodule(module_name)
            settings = self.settings
            quant = settings.quant if module_name in self.experts else None
            # quantized: FrozenExperts' (E, out, in) layout; float: the checkpoint's own, kept by the original module
            transposed = bool(module.is_transposed) and quant is not None
            stack = self.stacks[key] = ExpertStack(experts, quant, settings.device, settings.dtype, transposed)
        stack.add(index, tensor)
        if not stack.complete():
            return
        del self.stacks[key]
        self.loaded.add(key)
        if module_name in self.experts:
            self.pending.setdefault(module_name, {})[leaf] = stack
            self._quantize_if_complete(module_name)
        else:
            _assign(self.model.get_submodule(module_name), leaf, stack.tensors["float_weight"], self.settings,
                    copy=False)
        release_free_heap()

    def _quantize_if_complete(self, name: str) -> None:
        module = self.model.get_submodule(name)
        parts = self.pending[name]
        if name in self.experts:
            self._freeze_experts_if_complete(name, module, parts)
            return
        if "weight" not in parts or (module.bias is not None and "bias" not in parts):
            return  # the other half is in a later tensor or shard
        settings = self.settings
        weight = parts["weight"].t() if is_conv1d(module) else parts["weight"]  # (out, in)
        bias = parts.get("bias")
        bias = bias.to(settings.dtype) if bias is not None else None
        # LoftQ / PiSSA run here, on the one float weight in flight (quantize_layer decides).
        new, factors = quantize_layer(name, weight.to(settings.device), bias, settings.quant, settings.device,
                                      settings.lora, self.heads, settings.seed)
        if factors is not None:
            state_of(self.model).init_factors[name] = factors
        new.fan_in_fan_out = is_conv1d(module)
        new.train(module.training)
        set_submodule(self.model, name, new)
        del self.pending[name], parts, weight
        release_free_heap()   # quantizing freed float temporaries of many sizes

    def _freeze_experts_if_complete(self, name: str, module: nn.Module, parts: dict[str, torch.Tensor]) -> None:
        if any(leaf not in parts for leaf in module._parameters):
            return  # another projection (or its bias) is in a later tensor or shard
        settings = self.settings
        for leaf, value in list(parts.items()):
            if isinstance(value, ExpertStack):   # streamed in expert by expert: built with its bias
                parts[leaf] = value.build(parts.get(f"{leaf}_bias"))
        set_submodule(self.model, name, freeze_experts(module, settings.quant, settings.device, settings.dtype, parts))
        del self.pending[name], parts
        release_free_heap()

    def finish(self, origin: str, unexpected: list[str]) -> nn.Module:
        """Check that every tensor arrived (tied ones excepted), tie the embeddings, return the model.

        Raises:
            ValueError: missing or unexpected tensors, a linear with a weight but no bias, or a
                parameter still on the meta device, each named.
        """
        model = self.model
        ignore_unexpected = list(getattr(model, "_keys_to_ignore_on_load_unexpected", None) or [])
        unexpected = [k for k in unexpected if not any(re.search(p, k) for p in ignore_unexpected)]
        missing = sorted(self.expected - self.loaded - tied_keys(model))
        ignore_missing = list(getattr(model, "_keys_to_ignore_on_load_missing", None) or [])
        missing = [k for k in missing if not any(re.search(p, k) for p in ignore_missing)]
        if missing or unexpected or self.pending:
            raise ValueError(
                f"{origin}: the checkpoint does not match the model built from its config. "
                f"missing tensors: {missing[:20]}{' ...' if len(missing) > 20 else ''}; "
                f"unexpected tensors: {unexpected[:20]}{' ...' if len(unexpected) > 20 else ''}"
                + (f"; layers with a weight but no bias: {sorted(self.pending)[:20]}" if self.pending else "")
            )
        if tied_keys(model):
            model.tie_weights()
        still_meta = [name for name, p in model.named_parameters() if p.is_meta]
        if still_meta:
            raise ValueError(f"{origin}: these parameters were never loaded: {still_meta[:20]}")
        return model


def _assign(module: nn.Module, leaf: str, tensor: torch.Tensor, settings: LoadSettings, copy: bool) -> None:
    dtype = settings.dtype if tensor.is_floating_point() else tensor.dtype
    tensor = tensor.to(device=settings.device, dtype=dtype, copy=copy)
    if leaf in module._parameters:
        old = module._parameters[leaf]
        module._parameters[leaf] = nn.Parameter(tensor, requires_grad=old.requires_grad if old is not None else False)
    else:
        module._buffers[leaf] = tensor
