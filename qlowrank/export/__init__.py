"""Merged exports: dequantized safetensors checkpoints and GGUF files, planned once, probed for fidelity."""

from .merge import export_merged
from .plan import export_keys

__all__ = ["export_keys", "export_merged"]
