"""Whole models: loading (streamed), surgery (quantize, add LoRA), inspection, checkpointing, compile."""
