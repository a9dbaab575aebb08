"""Bridges to the ecosystem's trainers: transformers.Trainer and TRL's trainers with a qlowrank model (hf.py)."""
