"""An independent check of the profiler: PyTorch's own allocator-level memory timeline.

`torch.profiler` with `profile_memory=True` records every allocation and free the c10
allocator makes, including buffers inside C++ kernels and custom ops that a dispatch-level
tracker cannot see. Its memory timeline (`torch.profiler._memory_profiler`, a private but
long-standing module) gives the peak of live bytes over a block of code. It is much slower
than MemoryProfiler and has no categories, so it is used to validate, not to report.
"""

from __future__ import annotations

from typing import Callable

from torch.profiler import ProfilerActivity, profile


def allocator_peak_bytes(fn: Callable[[], object], device: str = "cpu") -> int:
    """Run `fn()` under torch.profiler and return the peak live bytes on `device` (includes
    tensors that existed before, as the timeline infers them from their later use)."""
    from torch.profiler._memory_profiler import MemoryProfileTimeline

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.startswith("cuda") else [])
    with profile(activities=activities, profile_memory=True, record_shapes=True, with_stack=True) as prof:
        fn()
    _, sizes = MemoryProfileTimeline(prof._memory_profile())._coalesce_timeline(device)
    return max((sum(row) for row in sizes), default=0)
