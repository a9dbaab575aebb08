"""A GGUF file's header only: its key-value metadata, its tensor table, and the transformers config they describe.

transformers' GGUF reader (`load_gguf_checkpoint`) decodes every metadata value, including
the tokenizer's vocabulary and merges one Python object at a time (seconds to tens of
seconds for a 49k vocabulary). The estimator needs only the architecture's scalars, so
here the header is walked with `struct`: arrays of strings are skipped by their lengths,
and tensor data is never read. The GGUF layout is llama.cpp's `docs/gguf.md` (version 2
and 3: little-endian, 64-bit counts and string lengths).
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import transformers

# GGUF value types (gguf.md, `gguf_metadata_value_type`) -> struct format of one scalar
_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9


def _truncated(handle: BinaryIO) -> ValueError:
    return ValueError(f"{getattr(handle, 'name', 'GGUF file')}: truncated GGUF header")


def _need(handle: BinaryIO, size: int) -> int:
    """`size`, once the file is known to hold that many more bytes: a corrupt length or count is
    refused here instead of reaching read() (OverflowError) or a loop over 2**64 items."""
    if size > os.fstat(handle.fileno()).st_size - handle.tell():
        raise _truncated(handle)
    return size


def _read(handle: BinaryIO, fmt: str):
    size = struct.calcsize(fmt)
    data = handle.read(size)
    if len(data) != size:
        raise _truncated(handle)
    return struct.unpack(fmt, data)[0]


def _string(handle: BinaryIO) -> str:
    return handle.read(_need(handle, _read(handle, "<Q"))).decode("utf-8", errors="replace")


def _value(handle: BinaryIO, kind: int):
    if kind in _SCALARS:
        return _read(handle, _SCALARS[kind])
    if kind == _STRING:
        return _string(handle)
    if kind == _ARRAY:
        item, count = _read(handle, "<I"), _read(handle, "<Q")
        if item == _STRING:   # a vocabulary or merges: skip, keep only the length
            _need(handle, 8 * count)   # each string has at least its 8-byte length
            for _ in range(count):
                handle.seek(_need(handle, _read(handle, "<Q")), 1)
            return _Skipped(count)
        if item in _SCALARS:
            fmt = _SCALARS[item]
            return list(struct.unpack("<" + fmt[1] * count, handle.read(_need(handle, struct.calcsize(fmt) * count))))
        _need(handle, count)   # each value has at least one byte
        return [_value(handle, item) for _ in range(count)]
    raise ValueError(f"{getattr(handle, 'name', 'GGUF file')}: unknown GGUF value type {kind}")


class _Skipped(int):
    """The length of an array of strings that was not decoded."""


@dataclass(frozen=True)
class TensorEntry:
    """One row of a GGUF file's tensor table: where a tensor's bytes are and how they are stored."""

    name: str
    dims: tuple[int, ...]   # GGUF order: the fastest-moving dimension first (torch's shape reversed)
    ggml_type: int          # GGMLQuantizationType id (F32, Q8_0, Q4_K, ...)
    offset: int             # bytes from the start of the file (data section start + the table's offset)


def read_gguf_layout(path: str | Path) -> tuple[dict, list[TensorEntry]]:
    """(metadata key -> value, tensor table) of a GGUF file, reading the header only.

    Arrays of strings (vocabulary, merges) are skipped, so this costs milliseconds and no
    memory whatever the vocabulary; `gguf.GGUFReader` decodes them all (157 MiB and 5 s for
    SmolLM2's 49k tokens).

    Raises:
        ValueError: not a GGUF file, or an unsupported version.
    """
    with open(path, "rb") as handle:
        if handle.read(4) != b"GGUF":
            raise ValueError(f"{path}: not a GGUF file (no GGUF magic at its start)")
        version = _read(handle, "<I")
        if version not in (2, 3):
            raise ValueError(f"{path}: GGUF version {version} is not supported (2 or 3)")
        n_tensors, n_fields = _read(handle, "<Q"), _read(handle, "<Q")
        fields = {}
        for _ in range(n_fields):
            key = _string(handle)
            fields[key] = _value(handle, _read(handle, "<I"))
        table = []
        for _ in range(n_tensors):
            name = _string(handle)
            dims = tuple(_read(handle, "<Q") for _ in range(_read(handle, "<I")))
            table.append((name, dims, _read(handle, "<I"), _read(handle, "<Q")))
        alignment = int(fields.get("general.alignment", 32))   # gguf.md: the data section starts aligned
        data_start = -(-handle.tell() // alignment) * alignment
    return fields, [TensorEntry(name, dims, kind, data_start + offset) for name, dims, kind, offset in table]


def read_gguf_header(path: str | Path) -> tuple[dict, list[str]]:
    """(metadata key -> value, tensor names) of a GGUF file, reading the header only.

    Raises:
        ValueError: not a GGUF file, or an unsupported version.
    """
    fields, table = read_gguf_layout(path)
    return fields, [entry.name for entry in table]


# Architectures whose config this header walk is tested equal to transformers' own
# (tests/test_gguf_families.py, tests/test_gguf_moe.py; gpt-oss, OLMo 2 and OLMoE, which transformers' reader cannot
# read, against the exported model's config). transformers' reader derives the config of some others with
# extra rules (StableLM's from its tensors, LFM2's per-layer head counts, T5's, ...): those
# are read with transformers' `load_gguf_checkpoint` itself, which decodes the vocabulary too.
HEADER_CONFIG_ARCHITECTURES = ("llama", "qwen2", "qwen3", "gemma2", "gemma3", "phi3", "olmo2", "qwen3moe", "gpt-oss",
                               "qwen2moe", "olmoe")
# GGUF architectures transformers (5.25) has no config mapping for, whose llama.cpp header holds llama.cpp's
# generic decoder keys only (convert_hf_to_gguf's TextModel writes them; `gguf.Keys.LLM` / `Keys.Attention` /
# `Keys.Rope`): each is read with transformers' mapping of an architecture whose header is those same keys.
# A key of the file that mapping does not read is refused unless it says what the config implies
# (`_check_unread`): an OLMo 3 written as "olmo2" (sliding windows) or YaRN RoPE stops there. llama.cpp's
# olmoe header is those keys plus expert_count / expert_used_count, as qwen2moe's (feed_forward_length is
# OLMoE's expert width; OlmoeConfig names these fields as Qwen2MoeConfig does).
SAME_HEADER_AS = {"olmo2": "qwen3", "olmoe": "qwen2_moe"}


def gguf_config_values(path: str | Path) -> tuple[str, dict]:
    """(transformers model_type, config values) of a GGUF model, as transformers' GGUF reader parses them.

    These are the values transformers' tensor processors are built with. For the
    architectures of HEADER_CONFIG_ARCHITECTURES they come from the header alone (OLMo 2's, which
    transformers has no mapping for, through SAME_HEADER_AS), for those of
    transformers' newer GGUF path (`GGUF_CONFIG_ARCHS`) from its header-only builder, and for
    the others from `transformers.modeling_gguf_pytorch_utils.load_gguf_checkpoint`.

    Raises:
        ValueError: an architecture transformers cannot read from GGUF.
    """
    from transformers.integrations.ggml import (
        GGUF_CONFIG_DEFAULTS_MAPPING,
        GGUF_CONFIG_MAPPING,
    )

    fields, names = read_gguf_header(path)
    arch = str(fields.get("general.architecture", ""))
    from transformers.integrations.gguf import GGUF_CONFIG_ARCHS, get_gguf_config, read_gguf_metadata

    if arch in GGUF_CONFIG_ARCHS:   # transformers' own header-only config builder (Qwen3.5, LFM2)
        config = get_gguf_config(*read_gguf_metadata(str(path)))
        return str(config["model_type"]), config
    # transformers' rule, kept as it is so that both readers build the same model: a "llama"
    # file is Mistral when general.name is exactly "mistral" (its test is list membership).
    model_type = "mistral" if arch == "llama" and fields.get("general.name") == "mistral" else arch
    # transformers renames a few architectures before its lookup (qwen3moe -> qwen3_moe, gpt-oss -> gpt_oss).
    model_type = next((name for name in (model_type, arch.replace("-", "_"), arch.replace("moe", "_moe"))
                       if name in GGUF_CONFIG_MAPPING), model_type)
    mapping = GGUF_CONFIG_MAPPING.get(model_type) or GGUF_CONFIG_MAPPING.get(arch)
    borrowed = not mapping and arch in SAME_HEADER_AS
    if borrowed:
        mapping = GGUF_CONFIG_MAPPING[SAME_HEADER_AS[arch]]
    if not mapping:
        raise ValueError(f"{path}: GGUF architecture {arch!r} has no transformers config mapping; "
                         "neither qlowrank nor transformers can read it (pass the model's safetensors checkpoint)")
    if arch not in HEADER_CONFIG_ARCHITECTURES:
        from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

        config = load_gguf_checkpoint(str(path), return_tensors=False)["config"]
        return str(config["model_type"]), config
    config = dict(GGUF_CONFIG_DEFAULTS_MAPPING.get(model_type, GGUF_CONFIG_DEFAULTS_MAPPING.get(arch) or {}))
    sections = {arch: mapping, "tokenizer": GGUF_CONFIG_MAPPING["tokenizer"],
                "general": {"name": "_model_name_or_path"}}
    for key, value in fields.items():
        prefix, _, rest = key.partition(".")
        target = sections.get(prefix, {}).get(rest)
        if target not in (None, -1) and not isinstance(value, _Skipped):
            config[target] = value
    if "vocab_size" not in config and isinstance(fields.get("tokenizer.ggml.tokens"), _Skipped):
        config["vocab_size"] = int(fields["tokenizer.ggml.tokens"])
    config["tie_word_embeddings"] = "output.weight" not in names
    if borrowed:
        _check_unread(path, arch, fields, mapping, config)
    if arch == "llama" and fields.get("llama.expert_count"):
        model_type = "mixtral"   # llama.cpp's converter writes Mixtral as "llama" with experts
    # transformers' reader: Gemma 3 GGUF files hold the text model only.
    return ("gemma3_text" if model_type == "gemma3" else model_type), _moe_values(arch, fields, config)


def _check_unread(path, arch: str, fields: dict, mapping: dict, config: dict) -> None:
    """ValueError for a missing key, or a key of `arch` that a borrowed mapping does not read unless its value is what the config implies.

    llama.cpp reads attention.key_length / value_length and rope.dimension_count (the head width and the rotated
    part of it); the transformers config of these architectures derives them from hidden_size / heads and rotates
    whole heads, so a file that says otherwise describes another model than the one transformers would build.
    """
    import gguf

    required = (gguf.Keys.LLM.EMBEDDING_LENGTH, gguf.Keys.LLM.BLOCK_COUNT, gguf.Keys.LLM.FEED_FORWARD_LENGTH,
                gguf.Keys.Attention.HEAD_COUNT)
    for key in (template.format(arch=arch) for template in required):
        if key not in fields:   # the config class's defaults would describe another model
            raise ValueError(f"{path}: GGUF key {key!r} is missing: the file is not a complete {arch!r} model")
    head_dim = config["hidden_size"] // config["num_attention_heads"]
    implied = {template.format(arch=arch): head_dim for template in
               (gguf.Keys.Attention.KEY_LENGTH, gguf.Keys.Attention.VALUE_LENGTH, gguf.Keys.Rope.DIMENSION_COUNT)}
    for key, value in fields.items():
        prefix, _, rest = key.partition(".")
        if prefix != arch or mapping.get(rest) not in (None, -1) or implied.get(key, object()) == value:
            continue
        builds = f"it builds {implied[key]}" if key in implied else "it has no such setting"
        raise ValueError(f"{path}: GGUF key {key!r} = {value!r} has no place in transformers' {arch!r} config "
                         f"({builds}), so the model built from this file would not be the one it describes; "
                         "pass the model's safetensors checkpoint instead")


def _moe_values(arch: str, fields: dict, config: dict) -> dict:
    """The MoE settings that llama.cpp reads and transformers' GGUF mapping does not; a dense model's values stay as they are.

    transformers' reader builds 768-wide Qwen3-MoE experts whatever expert_feed_forward_length
    says (Qwen2-MoE's: 1408 wide, and a 5632-wide shared expert whatever
    expert_shared_feed_forward_length says), a dense Llama for Mixtral, and fails on gpt-oss's
    YaRN keys (5.25 takes a key's length for its value); here they are read as llama.cpp reads them.
    """
    if arch == "gpt-oss":
        import transformers

        if fields.get("gpt-oss.attention.key_length"):
            config["head_dim"] = int(fields["gpt-oss.attention.key_length"])
        rope = {"rope_type": "default"}
        if fields.get("gpt-oss.rope.scaling.type") == "yarn":
            # What the file does not say (beta_fast / beta_slow / truncate) is gpt-oss's own default.
            rope = dict(transformers.GptOssConfig().rope_parameters)
            rope["factor"] = float(fields["gpt-oss.rope.scaling.factor"])
            rope["original_max_position_embeddings"] = int(fields["gpt-oss.rope.scaling.original_context_length"])
        rope["rope_theta"] = float(config.pop("rope_theta", 10000.0))
        config["rope_parameters"] = rope
    if arch == "llama" and fields.get("llama.expert_count"):
        config["num_local_experts"] = int(fields["llama.expert_count"])
        config["num_experts_per_tok"] = int(fields["llama.expert_used_count"])
    if arch in ("qwen3moe", "qwen2moe") and fields.get(f"{arch}.expert_feed_forward_length"):
        config["moe_intermediate_size"] = int(fields[f"{arch}.expert_feed_forward_length"])
    if arch == "qwen2moe" and fields.get("qwen2moe.expert_shared_feed_forward_length"):
        config["shared_expert_intermediate_size"] = int(fields["qwen2moe.expert_shared_feed_forward_length"])
    return config


def gguf_config(path: str | Path) -> transformers.PretrainedConfig:
    """The transformers config of a GGUF model, from its header only (see `gguf_config_values`).

    It equals the config transformers' own GGUF reader builds (`load_gguf_checkpoint`, whose
    key mapping and defaults it uses): the streamed reader builds its model from it, and its
    logits must equal transformers'.

    Raises:
        ValueError: an architecture transformers cannot read from GGUF.
    """
    return config_from_values(*gguf_config_values(path), path)


def config_from_values(model_type: str, values: dict, path: str | Path) -> transformers.PretrainedConfig:
    """The transformers config that `gguf_config_values`' result describes."""
    values = {key: value for key, value in values.items() if key != "model_type"}
    result = transformers.AutoConfig.for_model(model_type, **values)
    result._name_or_path = str(path)
    return result
