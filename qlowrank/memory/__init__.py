"""Memory: measure it (MemoryProfiler), predict it (estimate_memory), in shared categories."""

from .profile import MemoryProfiler
from .report import format_bytes, parse_bytes
from .tracker import CATEGORIES

__all__ = ["CATEGORIES", "MemoryProfiler", "format_bytes", "parse_bytes"]
