"""Merged exports: dequantized safetensors checkpoints and GGUF files, planned once, probed for fidelity."""

from .entries import ExportOptions, export_keys
from .safetensors import export_merged

__all__ = ["ExportOptions", "export_keys", "export_merged"]
