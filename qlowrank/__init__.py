"""qlowrank: LoRA fine-tuning on a frozen 4-bit / 8-bit base, with memory you can predict."""

from .adapter import load_adapter, save_adapter
from .config import LoraConfig, QuantConfig, RunSpec
from .export import export_merged
from .export.gguf_adapter import save_gguf_adapter
from .memory import MemoryEstimate, MemoryProfiler, estimate_memory
from .model.checkpointing import disable_gradient_checkpointing, enable_gradient_checkpointing
from .model.load import load_model, load_tokenizer
from .model.surgery import (
    ParameterCount,
    add_lora,
    count_parameters,
    disable_lora,
    lora_layers,
    lora_parameters,
    quantize_model,
)
from .model.tokens import add_tokens
from .nn.lora import LoraLinear
from .nn.quant import dequantize_weight
from .state import QlowrankState, state_of
from .version import __version__

__all__ = [
    "LoraConfig", "LoraLinear", "add_tokens", "MemoryEstimate", "MemoryProfiler", "ParameterCount", "QuantConfig",
    "RunSpec", "__version__", "add_lora",
    "count_parameters", "dequantize_weight", "disable_gradient_checkpointing", "disable_lora",
    "enable_gradient_checkpointing", "estimate_memory", "export_merged", "load_adapter", "load_model", "load_tokenizer", "lora_layers", "lora_parameters",
    "quantize_model", "save_adapter", "save_gguf_adapter", "QlowrankState", "state_of",
]
