"""qlowrank: LoRA fine-tuning on a frozen 4-bit / 8-bit base, with memory you can predict."""

from .adapters import load_adapter, save_adapter
from .checkpointing import disable_gradient_checkpointing, enable_gradient_checkpointing
from .config import LoraConfig, QuantConfig
from .export import export_merged
from .inject import (
    ParameterCount,
    add_lora,
    count_parameters,
    disable_lora,
    lora_layers,
    lora_parameters,
    quantize_model,
)
from .loading import load_model, load_tokenizer
from .lora import LoraLinear
from .memory import MemoryEstimate, MemoryProfiler, estimate_memory
from .quant import dequantize_weight
from .tokens import add_tokens

__version__ = "0.1.0"

__all__ = [
    "LoraConfig", "LoraLinear", "add_tokens", "MemoryEstimate", "MemoryProfiler", "ParameterCount", "QuantConfig", "__version__", "add_lora",
    "count_parameters", "dequantize_weight", "disable_gradient_checkpointing", "disable_lora",
    "enable_gradient_checkpointing", "estimate_memory", "export_merged", "load_adapter", "load_model", "load_tokenizer", "lora_layers", "lora_parameters",
    "quantize_model", "save_adapter",
]
