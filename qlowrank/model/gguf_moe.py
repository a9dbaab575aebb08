"""Mixture-of-experts GGUF tensors back into transformers 5's fused 3-D experts: the tensor processors the streamed reader uses.

llama.cpp writes each layer's experts as three 3-D tensors, `ffn_gate_exps`, `ffn_up_exps`,
`ffn_down_exps` (E, out, in in torch order; see export/gguf_experts.py). transformers' own
processors are used wherever they read that layout:

- "qwen3moe", "qwen2moe": transformers' `Qwen2MoeTensorProcessor` stacks gate and up into `gate_up_proj`
  (and gives Qwen2-MoE's shared-expert gate, (H,) in the file, back its (1, H)); the shared expert's
  `ffn_*_shexp` are dense tensors, named by transformers' map.
- "olmoe": the same processor (transformers' table has no entry for it; its layout is qwen2moe's experts
  without a shared expert). transformers has no config mapping for olmoe either: its header is read
  with qwen2_moe's (`gguf_header.SAME_HEADER_AS`).
- "llama" with experts (Mixtral, as llama.cpp's converter writes it): transformers' reader has
  no such case (it would build a dense Llama); `LlamaExpertsProcessor` is its Llama processor
  (q/k rotary rows) plus the Qwen-MoE processor's expert stacking, both transformers' own.
- "gpt-oss": transformers' `GptOssTensorProcessor` expects other names (`ffn_gate_up_projs`)
  and a per-expert layout transformers 5 no longer has, and its reader is not even given it
  (TENSOR_PROCESSORS keys it "gpt_oss", files say "gpt-oss"). `GptOssExpertsProcessor` undoes
  llama.cpp's converter instead: transpose back and interleave gate / up (even / odd columns),
  biases likewise.

Expert tensors a processor assembles from several GGUF tensors wait in its `parsed_parameters`
until the last arrives (model/gguf_reader.py counts them): one layer's float stack at a time.
"""

from __future__ import annotations

import re

import numpy as np
import torch


def _transformers_processors():
    from transformers.modeling_gguf_pytorch_utils import (
        GGUFTensor,
        LlamaTensorProcessor,
        Qwen2MoeTensorProcessor,
        TensorProcessor,
    )

    return GGUFTensor, LlamaTensorProcessor, Qwen2MoeTensorProcessor, TensorProcessor


def _expert_pattern() -> re.Pattern:
    """blk.N.ffn_{gate,up,down}_exps.{weight,bias}, from the `gguf` package's tensor names."""
    import gguf

    kinds = {"gate": gguf.MODEL_TENSOR.FFN_GATE_EXP, "up": gguf.MODEL_TENSOR.FFN_UP_EXP,
             "down": gguf.MODEL_TENSOR.FFN_DOWN_EXP}
    names = "|".join(f"(?P<{kind}>{re.escape(gguf.TENSOR_NAMES[t]).replace(re.escape('{bid}'), r'[0-9]+')})"
                     for kind, t in kinds.items())
    return re.compile(rf"(?:{names})\.(?P<suffix>weight|bias)")


def experts_of(values: dict) -> int:
    """The expert count a GGUF config describes (0: a dense model)."""
    return int(values.get("num_experts") or values.get("num_local_experts") or 0)


def processor_class(architecture: str, values: dict):
    """The processor class for an MoE GGUF architecture, or None where transformers' table applies as it is."""
    if architecture == "llama" and experts_of(values):
        return LlamaExpertsProcessor
    if architecture == "gpt-oss":
        return GptOssExpertsProcessor
    if architecture == "olmoe":
        return _Qwen2Moe
    return None


GGUFTensor, _Llama, _Qwen2Moe, _Base = _transformers_processors()


class LlamaExpertsProcessor(_Llama):
    """Mixtral in llama.cpp's "llama" layout: transformers' Llama processor, and its Qwen-MoE one for ffn_*_exps."""

    def __init__(self, config=None):
        super().__init__(config=config)
        self.experts = _Qwen2Moe(config=config)

    def preprocess_name(self, hf_name: str) -> str:
        return self.experts.preprocess_name(hf_name)

    def perform_fallback_tensor_mapping(self, gguf_to_hf_name_map, suffix, qual_name, hf_name):
        self.experts.perform_fallback_tensor_mapping(gguf_to_hf_name_map, suffix, qual_name, hf_name)

    def process(self, weights, name, **kwargs):
        if re.fullmatch(self.experts.GGUF_MOE_WEIGHTS_PATTERN, name):
            return self.experts.process(weights, name, **kwargs)
        return super().process(weights, name, **kwargs)


class GptOssExpertsProcessor(_Base):
    """gpt-oss as llama.cpp's converter writes it, back into transformers 5's (E, in, out) interleaved stacks."""

    HF_EXPERTS = re.compile(r"(?P<module>.*\.experts)\.(?P<proj>gate_up_proj|down_proj)(?P<bias>_bias)?$")

    def __init__(self, config=None):
        super().__init__(config=config)
        import gguf

        self.name_map = gguf.get_tensor_name_map(gguf.MODEL_ARCH.GPT_OSS, int(self.config.get("num_hidden_layers", 0)))
        self.pattern = _expert_pattern()

    def perform_fallback_tensor_mapping(self, gguf_to_hf_name_map, suffix, qual_name, hf_name):
        # The fused stacks and their biases have no entry in the gguf map; the unfused projections do.
        match = self.HF_EXPERTS.fullmatch(hf_name)
        if match is None:
            return
        gguf_suffix = ".bias" if match["bias"] else ".weight"
        projections = ("gate_proj", "up_proj") if match["proj"] == "gate_up_proj" else ("down_proj",)
        for projection in projections:
            name = self.name_map.get_name(f"{match['module']}.{projection}")
            if name is not None:
                gguf_to_hf_name_map[name + gguf_suffix] = qual_name + hf_name

    def process(self, weights, name: str, **kwargs):
        match = self.pattern.fullmatch(name)
        mapping, parsed = kwargs.get("tensor_key_mapping"), kwargs.get("parsed_parameters")
        if match is None or not mapping or parsed is None or name not in mapping:
            return GGUFTensor(weights, name, {})
        bias = match["suffix"] == "bias"
        if match["down"]:
            # (E, H, I) -> transformers' (E, I, H); the bias (E, H) is as it is.
            return GGUFTensor(weights if bias else np.ascontiguousarray(np.swapaxes(weights, 1, 2)), name, {})
        values = torch.from_numpy(np.array(weights))                        # (E, I, H) or bias (E, I)
        values = values if bias else values.transpose(1, 2)                 # (E, H, I)
        shape = (*values.shape[:-1], 2 * values.shape[-1])                  # (E, H, 2I) or (E, 2I)
        key = mapping[name]
        stack = parsed["tensors"].setdefault(key, torch.zeros(shape, dtype=values.dtype))
        first = 0 if match["gate"] else 1
        stack[..., first::2] = values                                       # gate at even columns, up at odd
        return GGUFTensor(weights, None, {})
