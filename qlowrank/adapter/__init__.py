"""Adapter files in PEFT's layout, both ways."""
