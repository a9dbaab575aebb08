"""Adapter files in PEFT's layout, both ways: save_adapter, load_adapter, and the format's readers."""

from .files import (
                    ADAPTER_CONFIG,
                    ADAPTER_WEIGHTS,
                    QLOWRANK_SIDECAR,
                    base_bits,
                    read_adapter_config,
                    read_adapter_lora,
                    read_adapter_weights,
)
from .attach import load_adapter
from .save import save_adapter

__all__ = ["ADAPTER_CONFIG", "ADAPTER_WEIGHTS", "QLOWRANK_SIDECAR", "base_bits", "load_adapter", "read_adapter_config",
           "read_adapter_lora", "read_adapter_weights", "save_adapter"]
