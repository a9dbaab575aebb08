"""`qlowrank export`: base checkpoint + adapter -> one plain, merged Hugging Face checkpoint (or GGUF, or the adapter alone as GGUF)."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..config import QuantConfig, parse_dtype
from .errors import exit_2_on_bad_input


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "export",
        help="merge a LoRA adapter into its base and write a plain (dequantized) Hugging Face checkpoint",
        description=(
            "Rebuild the base exactly as it was quantized during training (read from the adapter's "
            "qlowrank_adapter.json, or --bits), load the adapter, and write dequant(W) + scale * B A "
            "(or, with --from-original, the original float W + scale * B A) as sharded safetensors."
        ),
    )
    parser.add_argument("--model", required=True, help="base model: HF directory, .gguf file or hub id")
    parser.add_argument("--adapter", required=True, help="adapter directory (qlowrank's or PEFT's)")
    parser.add_argument("--out", required=True, help="output directory, or the .gguf file with --format gguf (created atomically)")
    parser.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"], help="exported weight dtype")
    parser.add_argument("--format", default="safetensors", choices=["safetensors", "gguf", "gguf-adapter"],
                        help="a Hugging Face checkpoint, one merged GGUF file for llama.cpp / Ollama / LM Studio, "
                             "or the adapter alone as GGUF (llama.cpp --lora, Ollama ADAPTER; docs/export.md)")
    parser.add_argument("--gguf-type", default="f16", choices=["f16", "bf16", "q8_0", "f32"],
                        help="weight type of a GGUF export (norms stay f32); gguf-adapter: f16 or f32")
    parser.add_argument("--from-original", action="store_true",
                        help="merge into the original float weights of --model instead of the dequantized ones")
    parser.add_argument("--bits", choices=["4", "8", "none"],
                        help="how the base was quantized in training (default: from the adapter's qlowrank_adapter.json)")
    parser.add_argument("--compute-dtype", choices=["bf16", "fp16", "fp32"],
                        help="compute dtype of the rebuilt quantized model for the fidelity probe (default: as trained)")
    parser.add_argument("--gguf-file", help="GGUF file name inside --model (a directory)")
    parser.add_argument("--device", help="cpu or cuda (default: cuda if available)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    parser.add_argument("--no-probe", action="store_true", help="skip the fidelity probe")
    parser.add_argument("--trust-remote-code", action="store_true", help="allow the checkpoint's own model code")
    parser.set_defaults(func=exit_2_on_bad_input("export", run))


def base_quant(sidecar: dict | None, bits: str | None, compute_dtype: str | None,
               source: str = "the adapter's qlowrank_adapter.json") -> QuantConfig:
    """The QuantConfig the base was trained with: the adapter's record, overridden by flags."""
    recorded = dict((sidecar or {}).get("base_quant") or {})
    if bits is None and sidecar is None:
        raise ValueError(
            "the adapter has no qlowrank_adapter.json (it was not saved by qlowrank), so how its base was "
            "quantized in training is unknown: pass --bits 4, 8 or none"
        )
    if bits is not None:
        recorded["bits"] = None if bits == "none" else int(bits)
    elif not recorded:
        recorded["bits"] = None  # qlowrank recorded a float base
    if compute_dtype is not None:
        recorded["compute_dtype"] = compute_dtype
    try:
        if "compute_dtype" in recorded:
            recorded["compute_dtype"] = parse_dtype(recorded["compute_dtype"], "compute_dtype")
        return QuantConfig(**recorded)
    except (TypeError, ValueError) as err:   # an unknown key, a wrong value
        raise ValueError(f"{source}: key 'base_quant' is unusable ({err})") from None


def run(args: argparse.Namespace) -> int:
    from ..adapter import ADAPTER_WEIGHTS, load_adapter, read_adapter_config, read_adapter_lora, read_adapter_weights
    from ..adapter.peft_format import rebuilds_base
    from ..export import export_merged
    from ..model.load import load_model

    if args.format == "gguf-adapter":
        from ..export.gguf_adapter import ADAPTER_TYPES

        if args.gguf_type not in ADAPTER_TYPES:   # before the base is loaded
            raise ValueError(f"--gguf-type {args.gguf_type}: a GGUF adapter is written as one of {ADAPTER_TYPES}")
    _, sidecar = read_adapter_config(args.adapter)
    read_adapter_weights(Path(args.adapter) / ADAPTER_WEIGHTS)   # a broken file fails before the model loads
    quant = base_quant(sidecar, args.bits, args.compute_dtype, f"{args.adapter}/qlowrank_adapter.json")
    lora, seed = read_adapter_lora(args.adapter)
    # LoftQ (> 1 iteration) and PiSSA trained on a base of their own: rebuild it the same way.
    rebuild = rebuilds_base(lora.init, lora.loftq_iters)
    model = load_model(args.model, quant=quant, device=args.device, gguf_file=args.gguf_file,
                       trust_remote_code=args.trust_remote_code, lora=lora if rebuild else None, seed=seed)
    load_adapter(model, args.adapter)
    if args.format == "gguf-adapter":
        from ..export.gguf_adapter import save_gguf_adapter

        save_gguf_adapter(model, args.out, dtype=args.gguf_type, overwrite=args.overwrite)
        return 0
    base = args.model if args.from_original else None
    export_merged(model, args.out, dtype=parse_dtype(args.dtype), base=base, overwrite=args.overwrite,
                  probe=not args.no_probe, format=args.format, gguf_type=args.gguf_type)
    return 0

