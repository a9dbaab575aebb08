"""Memory: measure it (MemoryProfiler), predict it (estimate_memory), in shared categories."""

from .estimator import MemoryEstimate, estimate_memory
from .profiler import MemoryProfiler, profile_steps
from .report import format_bytes, parse_bytes
from .tracker import CATEGORIES

__all__ = ["CATEGORIES", "MemoryEstimate", "MemoryProfiler", "estimate_memory", "format_bytes", "parse_bytes", "profile_steps"]
