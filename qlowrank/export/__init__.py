"""Merged exports: dequantized safetensors checkpoints and GGUF files."""
