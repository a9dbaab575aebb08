"""The model families a GGUF export writes, and each one's llama.cpp conventions: architecture, tensor layout, hyperparameters.

Tensor names and metadata keys come from the `gguf` package (`get_tensor_name_map`, the
`GGUFWriter.add_*` keys); what is ours is only which convention each family follows, as
llama.cpp's converter (`convert_hf_to_gguf.py`) and transformers' GGUF reader
(`modeling_gguf_pytorch_utils.TENSOR_PROCESSORS`) agree on it:

- "llama" (Llama, Mistral, SmolLM2) is the one architecture whose rotary embedding llama.cpp
  computes on interleaved pairs, so q_proj / k_proj rows are permuted per head (k with the
  key/value head count); every other family here uses the half-split (NeoX) layout as stored.
- Gemma 2 / 3 compute their RMSNorm as `x * (1 + w)`; llama.cpp stores `1 + w` (transformers'
  reader subtracts 1 again from every tensor whose name holds "norm.weight").
- Phi-3 already holds fused `qkv_proj` and `gate_up_proj`, which are llama.cpp's `attn_qkv`
  and `ffn_up` (gate rows first) as they are.
- Qwen2 keeps its q/k/v biases; gpt-oss its attention, router and per-expert biases; the
  other families here have none.
- Mixtures of experts (Qwen3-MoE, Mixtral as "llama" with experts, gpt-oss, Qwen2-MoE, OLMoE) write
  their fused 3-D experts as `ffn_{gate,up,down}_exps` (export/gguf_experts.py) and `expert_count` /
  `expert_used_count`; gpt-oss also its attention sinks, sliding window and YaRN RoPE; Qwen2-MoE its
  shared expert as a dense `ffn_*_shexp` MLP and its sigmoid gate as `ffn_gate_inp_shexp` (H,) (llama.cpp's
  converter squeezes the (1, H) weight), with `expert_shared_feed_forward_length`.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn


@dataclass(frozen=True)
class GgufFamily:
    """How one transformers model type is written as GGUF."""

    arch: str                       # GGUF general.architecture (a gguf.MODEL_ARCH_NAMES value)
    permute_rotary: bool = False    # q/k rows into llama.cpp's interleaved rotary pairs ("llama" only)
    norm_offset: float = 0.0        # added to every norm weight: Gemma's RMSNorm multiplies by (1 + w)
    biases: bool = False            # attention biases are part of the layout (Qwen2)
    untied_head: bool = True        # llama.cpp's layout has an output.weight (Gemma 2's has none)
    rope_types: tuple[str, ...] = ()  # RoPE scalings the layout encodes besides none (gpt-oss: YaRN)


# transformers model_type -> family. llama.cpp's converter writes Mistral as "llama" too.
FAMILIES = {
    "llama": GgufFamily("llama", permute_rotary=True),
    "mistral": GgufFamily("llama", permute_rotary=True),
    "qwen2": GgufFamily("qwen2", biases=True),
    "qwen3": GgufFamily("qwen3"),
    "gemma2": GgufFamily("gemma2", norm_offset=1.0, untied_head=False),
    "gemma3_text": GgufFamily("gemma3", norm_offset=1.0),
    "phi3": GgufFamily("phi3"),
    "olmo2": GgufFamily("olmo2"),
    "qwen3_moe": GgufFamily("qwen3moe"),
    "mixtral": GgufFamily("llama", permute_rotary=True),
    "gpt_oss": GgufFamily("gpt-oss", biases=True, rope_types=("yarn",)),
    "qwen2_moe": GgufFamily("qwen2moe", biases=True),
    "olmoe": GgufFamily("olmoe"),
}
# gpt-oss's YaRN settings that llama.cpp's "gpt-oss" assumes (its converter writes only type, factor, context).
GPT_OSS_YARN = {"beta_fast": 32.0, "beta_slow": 1.0}


def rope_dicts(config) -> list[dict]:
    """Every RoPE settings dict of a config: one, or one per layer type (Gemma 3's sliding / full)."""
    # transformers 5 keeps RoPE settings in rope_parameters, older versions in rope_scaling.
    rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    if not isinstance(rope, dict):
        return []
    nested = [value for value in rope.values() if isinstance(value, dict)]
    return nested or [rope]


def rope_theta(config, layer_type: str = "full_attention") -> float:
    """The RoPE base of `layer_type`'s layers (the global layers of a model with several)."""
    rope = getattr(config, "rope_parameters", None) or {}
    if isinstance(rope.get(layer_type), dict):
        rope = rope[layer_type]
    return float(rope.get("rope_theta") or getattr(config, "rope_theta", None) or 10000.0)


def gguf_family(model: nn.Module) -> GgufFamily:
    """The GGUF family of `model`, or ValueError saying why this writer cannot write it.

    Both writers (the merged model, the adapter alone) write fused MoE experts in llama.cpp's
    `ffn_*_exps` layout, so a family accepted here is accepted by both.
    """
    name, config = type(model).__name__, model.config
    model_type = getattr(config, "model_type", None)
    family = FAMILIES.get(model_type)
    if family is None or not name.endswith("ForCausalLM"):
        raise ValueError(f"GGUF export supports {sorted(FAMILIES)} causal LMs; {name} is not supported: export "
                         "safetensors (format='safetensors') and convert with llama.cpp's converter")
    for rope in rope_dicts(config):
        rope_type = rope.get("rope_type", rope.get("type"))
        if rope_type not in (None, "default", *family.rope_types):
            raise ValueError(f"GGUF export: {name} uses RoPE scaling {rope_type!r}, which this writer does not "
                             "encode yet (e.g. Llama 3.1's 'llama3'); export safetensors and convert with "
                             "llama.cpp's converter")
    biased = getattr(config, "attention_bias", False) or getattr(config, "mlp_bias", False)
    if biased and not family.biases:
        raise ValueError(f"GGUF export: this {name} has attention/MLP biases, which the {family.arch!r} GGUF "
                         "layout written here does not carry; export safetensors instead")
    if not family.untied_head and not getattr(config, "tie_word_embeddings", True):
        raise ValueError(f"GGUF export: this {name} has an untied output head, which llama.cpp's {family.arch!r} "
                         "layout has no tensor for; export safetensors instead")
    if model_type == "gemma3_text":
        _check_gemma3(config)
    if model_type in ("qwen3_moe", "qwen2_moe"):
        _check_every_layer_moe(config, name, family.arch)
    if model_type == "olmoe":
        _check_olmoe(config, name)
    if model_type == "gpt_oss":
        changed = {k: v for k, v in _yarn(config).items() if k in GPT_OSS_YARN and v != GPT_OSS_YARN[k]}
        if changed:
            raise ValueError(f"GGUF export: this {name} has YaRN settings {changed}, which llama.cpp's 'gpt-oss' "
                             f"layout fixes at {GPT_OSS_YARN}")
    return family


def _yarn(config) -> dict:
    return next((rope for rope in rope_dicts(config) if rope.get("rope_type", rope.get("type")) == "yarn"), {})


def _check_every_layer_moe(config, name: str, arch: str) -> None:
    # llama.cpp's qwen3moe / qwen2moe build every layer as a mixture of experts, with global attention.
    if getattr(config, "decoder_sparse_step", 1) != 1 or getattr(config, "mlp_only_layers", []):
        raise ValueError(f"GGUF export: this {name} has dense MLP layers between its MoE layers (decoder_sparse_step / "
                         f"mlp_only_layers), which llama.cpp's {arch!r} layout has no place for; export safetensors "
                         "(format='safetensors') instead")
    if "sliding_attention" in (getattr(config, "layer_types", None) or []):
        raise ValueError(f"GGUF export: this {name} has sliding-window attention layers, which llama.cpp's {arch!r} "
                         "layout does not compute; export safetensors (format='safetensors') instead")


def _check_olmoe(config, name: str) -> None:
    # llama.cpp's olmoe normalizes q and k over the whole projection with norms of n_embd entries, so
    # its k norm only fits a model with as many key/value heads as heads (as OLMoE-1B-7B has).
    kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    if kv_heads != config.num_attention_heads or head_dim(config) * config.num_attention_heads != config.hidden_size:
        raise ValueError(f"GGUF export: this {name} has {kv_heads} key/value heads for {config.num_attention_heads} "
                         "heads (or heads narrower than hidden_size / heads); llama.cpp's 'olmoe' layout holds q/k "
                         "norms of hidden_size entries only, so export safetensors (format='safetensors') instead")


def _check_gemma3(config) -> None:
    # llama.cpp fixes what the GGUF cannot say: the local layers' RoPE base and a full-attention
    # layer every sixth (transformers' reader assumes the same defaults).
    local = rope_theta(config, "sliding_attention")
    if local != 10000.0:
        raise ValueError(f"GGUF export: this Gemma 3 has local RoPE base {local}; llama.cpp assumes 10000")
    expected = ["full_attention" if (i + 1) % 6 == 0 else "sliding_attention" for i in range(config.num_hidden_layers)]
    if getattr(config, "layer_types", None) not in (None, expected):
        raise ValueError("GGUF export: this Gemma 3's layer_types differ from one full-attention layer in six, "
                         "which llama.cpp assumes")


def head_dim(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def add_hparams(gguf, writer, config, family: GgufFamily, name: str, gguf_type: str) -> None:
    """The model's hyperparameters under the `gguf` package's keys for `family.arch`."""
    heads, dim = config.num_attention_heads, head_dim(config)
    writer.add_name(name)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(heads)
    writer.add_head_count_kv(getattr(config, "num_key_value_heads", None) or heads)
    writer.add_key_length(dim)
    writer.add_value_length(dim)
    # Phi-3 may rotate only part of each head (partial_rotary_factor, in rope_parameters in transformers 5).
    rotary = getattr(config, "partial_rotary_factor", None)
    if rotary is None:
        rotary = next((r["partial_rotary_factor"] for r in rope_dicts(config) if "partial_rotary_factor" in r), 1.0)
    writer.add_rope_dimension_count(int(dim * rotary))
    writer.add_rope_freq_base(rope_theta(config))
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)
    if family.arch in ("gemma2", "gemma3"):
        _add_gemma(writer, config, family.arch)
    experts = getattr(config, "num_experts", None) or getattr(config, "num_local_experts", None)
    if experts:
        _add_experts(gguf, writer, config, family.arch, experts)
    if family.arch == "phi3":
        # Phi-3's converter always writes both; a sliding window of 0 means none (Phi-4).
        writer.add_rope_scaling_orig_ctx_len(getattr(config, "original_max_position_embeddings", None)
                                             or config.max_position_embeddings)
        writer.add_sliding_window(getattr(config, "sliding_window", None) or 0)
    file_types = gguf.LlamaFileType
    writer.add_file_type({"f32": file_types.ALL_F32, "f16": file_types.MOSTLY_F16, "bf16": file_types.MOSTLY_BF16,
                          "q8_0": file_types.MOSTLY_Q8_0}[gguf_type])
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)


def _add_experts(gguf, writer, config, arch: str, experts: int) -> None:
    writer.add_expert_count(experts)
    writer.add_expert_used_count(config.num_experts_per_tok)
    # What llama.cpp's converter writes: Qwen3-MoE's moe_intermediate_size; gpt-oss's experts are
    # intermediate_size wide; Mixtral's width is feed_forward_length itself.
    width = getattr(config, "moe_intermediate_size", None) or (config.intermediate_size if arch == "gpt-oss" else None)
    if width:
        writer.add_expert_feed_forward_length(width)
    # Qwen2-MoE's shared expert (llama.cpp would take feed_forward_length, the dense MLPs' width, without it).
    shared = getattr(config, "shared_expert_intermediate_size", None)
    if shared:
        writer.add_expert_shared_feed_forward_length(shared)
    if arch == "gpt-oss":
        writer.add_sliding_window(config.sliding_window)
        yarn = _yarn(config)
        if yarn:
            writer.add_rope_scaling_type(gguf.RopeScalingType.YARN)
            writer.add_rope_scaling_factor(yarn["factor"])
            writer.add_rope_scaling_orig_ctx_len(yarn.get("original_max_position_embeddings", 4096))


def _add_gemma(writer, config, arch: str) -> None:
    if getattr(config, "sliding_window", None):
        writer.add_sliding_window(config.sliding_window)
    if arch == "gemma2" and getattr(config, "attn_logit_softcapping", None) is not None:
        writer.add_attn_logit_softcapping(config.attn_logit_softcapping)
    if getattr(config, "final_logit_softcapping", None) is not None:
        writer.add_final_logit_softcapping(config.final_logit_softcapping)


def reader_caveats(config, family: GgufFamily) -> dict:
    """What GGUF readers assume that this model does otherwise (the export report names each)."""
    caveats = {}
    scalar = getattr(config, "query_pre_attn_scalar", None)
    if family.arch in ("gemma2", "gemma3") and scalar is not None:
        # llama.cpp scales Gemma's queries by 1/sqrt(head_dim) (1/sqrt(hidden/heads) for the 27B);
        # transformers' GGUF reader by its config default, 1/sqrt(256).
        assumed = {head_dim(config), config.hidden_size // config.num_attention_heads}
        if scalar not in assumed:
            caveats["query_pre_attn_scalar_not_in_gguf"] = scalar
    if family.arch in ("qwen3", "phi3", "gpt-oss") and head_dim(config) != _reader_head_dim(config):
        # transformers' GGUF reader does not read attention.key_length for these (llama.cpp does).
        caveats["head_dim_not_read_by_transformers"] = head_dim(config)
    window = getattr(config, "sliding_window", None) if config.model_type in ("mistral", "mixtral") else None
    if window and window < config.max_position_embeddings:
        # The "llama" layout has no sliding window (llama.cpp's converter drops it too): the
        # file computes the same as the model only on contexts up to the window.
        caveats["sliding_window_dropped"] = window
    _moe_caveats(config, caveats)
    return caveats


def _moe_caveats(config, caveats: dict) -> None:
    if config.model_type not in ("qwen3_moe", "qwen2_moe", "olmoe"):
        return
    # llama.cpp's qwen3moe (and transformers' GGUF reader) renormalize the top-k routing weights;
    # its qwen2moe and olmoe never do.
    renormalized = config.model_type == "qwen3_moe"
    if bool(config.norm_topk_prob) != renormalized:
        caveats[f"norm_topk_prob_{str(bool(config.norm_topk_prob)).lower()}_not_in_gguf"] = True
    if getattr(config, "clip_qkv", None) is not None:
        # OLMoE may clamp q / k / v; llama.cpp's olmoe reads no clamp and computes without one.
        caveats["clip_qkv_not_in_gguf"] = config.clip_qkv
    if config.model_type == "olmoe":
        return   # its experts are feed_forward_length wide, which every reader reads
    default = type(config)()
    for key in ("moe_intermediate_size", "shared_expert_intermediate_size"):
        # transformers' GGUF reader reads neither expert_feed_forward_length nor its shared expert's (llama.cpp and
        # qlowrank do).
        if hasattr(config, key) and getattr(config, key) != getattr(default, key):
            caveats[f"{key}_not_read_by_transformers"] = getattr(config, key)


def _reader_head_dim(config) -> int:
    default = type(config)().head_dim if config.model_type in ("qwen3", "gpt_oss") else None
    return default or config.hidden_size // config.num_attention_heads


def is_norm(gguf_name: str) -> bool:
    """Whether a GGUF tensor is a norm weight (the test transformers' Gemma processor applies)."""
    return "norm.weight" in gguf_name

