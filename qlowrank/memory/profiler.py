"""MemoryProfiler: measured memory of real training steps, by category, on CPU and CUDA.

    with ql.MemoryProfiler(model=model, optimizer=opt) as prof:
        for batch in batches:
            model(batch, labels=batch).loss.backward(); opt.step(); opt.zero_grad()
    print(prof.table()); prof.save_plot("memory.png"); prof.to_json()

Tensor bytes come from `TensorTracker` (every storage an op allocates, attributed to the
shared categories). The process RSS (and on CUDA the caching allocator's max allocated
and reserved bytes) are reported beside them: RSS also holds the Python heap, libraries
and allocator caches, so it is an upper bound on, not a measure of, tensor memory.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm

from .report import atomic_write_text, breakdown_table, format_bytes, plot_profile
from .sampler import StatusSampler
from .tracker import CATEGORIES, PHASES, TensorTracker


def _rss_bytes() -> tuple[int, int]:
    """(current RSS, peak RSS since the last reset) of this process, from /proc (0 where absent)."""
    values = {"VmRSS": 0, "VmHWM": 0}
    try:
        with open("/proc/self/status") as handle:
            for line in handle:
                key = line.split(":", 1)[0]
                if key in values:
                    values[key] = int(line.split()[1]) * 1024
    except OSError:
        pass
    return values["VmRSS"], values["VmHWM"]


def _reset_peak_rss() -> bool:
    # Writing 5 to clear_refs resets VmHWM (Linux >= 4.0), so the peak covers only our block.
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
        return True
    except OSError:
        return False


def _cuda_context_bytes() -> int | None:
    """This process's device memory outside the caching allocator (the CUDA context), as the
    driver reports it: NVML's per-process figure when pynvml is installed, else the device's
    used memory minus what the allocator reserved (which also counts other processes)."""
    reserved = torch.cuda.memory_reserved()
    try:
        import pynvml
        pynvml.nvmlInit()
        handle = pynvml.nvmlDeviceGetHandleByIndex(torch.cuda.current_device())
        for process in pynvml.nvmlDeviceGetComputeRunningProcesses(handle):
            if process.pid == os.getpid() and process.usedGpuMemory:
                return max(0, int(process.usedGpuMemory) - reserved)
    except Exception:  # no pynvml, no NVML permission, a MIG slice: fall back to the device total
        pass
    free, total = torch.cuda.mem_get_info()
    return max(0, total - free - reserved)


class MemoryProfiler:
    """Measure live tensor memory by category around real training steps.

    Args:
        model: the model being trained (optional): its weights are attributed by identity,
            its forward and output head mark the forward phase and the logits.
        optimizer: the optimizer (optional): its state and step are attributed.
        device: device type whose tensors are counted ("cpu", "cuda"); default: the
            model's device, or every device when no model is given.
        timeline_every: keep one timeline sample per this many events (memory for long runs).

    After the block: `peak_bytes`, `breakdown` (category -> bytes at the peak), `peak_phase`,
    `timeline`, `rss_peak_bytes` (VmHWM: anonymous + file-backed), `anon_peak_bytes` and
    `file_peak_bytes` (RssAnon / RssFile sampled every 10 ms), `process_peak_bytes` (what has
    to fit: the anonymous peak on a CPU, what nvidia-smi shows on CUDA), `cuda_max_allocated` / `cuda_max_reserved` / `cuda_context_bytes` (CUDA only).
    """

    def __init__(self, model: nn.Module | None = None, optimizer: torch.optim.Optimizer | None = None,
                 device: str | torch.device | None = None, timeline_every: int = 1) -> None:
        if device is None and model is not None:
            first = next(iter(model.parameters()), None)
            device = first.device if first is not None else None
        self.device_type = torch.device(device).type if device is not None else None
        self._tracker = TensorTracker(model, optimizer, devices=[self.device_type] if self.device_type else None,
                                      timeline_every=timeline_every)
        self.rss_start_bytes = 0
        self.rss_peak_bytes = 0
        self.rss_peak_is_exact = False
        self.anon_peak_bytes = 0
        self.file_peak_bytes = 0
        self._sampler: StatusSampler | None = None
        self.cuda_max_allocated: int | None = None
        self.cuda_max_reserved: int | None = None
        self.cuda_context_bytes: int | None = None

    def __enter__(self) -> "MemoryProfiler":
        if self.device_type == "cuda" and torch.cuda.is_available():
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.cuda_context_bytes = _cuda_context_bytes()
        self.rss_peak_is_exact = _reset_peak_rss()
        self.rss_start_bytes = _rss_bytes()[0]
        self._sampler = StatusSampler().start()   # no kernel high-water mark for RssAnon: sample it
        self._tracker.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._tracker.__exit__(*exc)
        self.rss_peak_bytes = _rss_bytes()[1]
        if self._sampler is not None:
            peaks = self._sampler.stop()
            self.anon_peak_bytes, self.file_peak_bytes = peaks.get("RssAnon", 0), peaks.get("RssFile", 0)
        if self.device_type == "cuda" and torch.cuda.is_available():
            torch.cuda.synchronize()
            self.cuda_max_allocated = torch.cuda.max_memory_allocated()
            self.cuda_max_reserved = torch.cuda.max_memory_reserved()

    def mark(self, phase: str) -> None:
        """Mark a phase by hand ("forward", "backward", "optimizer", "setup"), e.g. with no model given."""
        if phase not in PHASES:
            raise ValueError(f"unknown phase {phase!r}; use one of {PHASES}")
        self._tracker.set_phase(phase)

    @property
    def peak_bytes(self) -> int:
        """Most live tensor bytes at any moment inside the block."""
        return self._tracker.state.peak_bytes

    @property
    def process_peak_bytes(self) -> int:
        """Measured peak of the whole process, the counterpart of `MemoryEstimate.process_bytes`:
        on CPU the anonymous peak inside the block (RssAnon, sampled; VmHWM where /proc has no
        RssAnon); on CUDA what nvidia-smi shows for this process at the peak, the CUDA context
        plus the caching allocator's max reserved bytes."""
        if self.cuda_max_reserved is not None:
            return int(self.cuda_max_reserved + (self.cuda_context_bytes or 0))
        return self.anon_peak_bytes or self.rss_peak_bytes

    @property
    def breakdown(self) -> dict[str, int]:
        """Category -> live bytes at the moment of the peak (the categories of `estimate_memory`)."""
        return dict(self._tracker.state.peak_breakdown)

    @property
    def peak_phase(self) -> str:
        """The phase (forward, backward, optimizer, setup) in which the peak happened."""
        return self._tracker.state.peak_phase

    @property
    def peak_step(self) -> int:
        """The 1-based step (forward call) in which the peak happened (0: before the first)."""
        return self._tracker.state.peak_step

    @property
    def current(self) -> dict[str, int]:
        """Category -> live bytes right now."""
        return dict(self._tracker.state.live)

    @property
    def timeline(self) -> list[dict]:
        """One sample per event: {'event', 'phase', 'step', <category>: bytes, ...}."""
        return [
            {"event": event, "phase": PHASES[phase], "step": step, **dict(zip(CATEGORIES, values))}
            for event, phase, step, values in self._tracker.state.timeline
        ]

    def summary(self) -> dict:
        """Everything measured, as plain JSON-ready values."""
        return {
            "peak_bytes": self.peak_bytes,
            "peak_phase": self.peak_phase,
            "peak_step": self.peak_step,
            "breakdown": self.breakdown,
            "rss_start_bytes": self.rss_start_bytes,
            "rss_peak_bytes": self.rss_peak_bytes,
            "rss_peak_is_exact": self.rss_peak_is_exact,
            "anon_peak_bytes": self.anon_peak_bytes,
            "file_peak_bytes": self.file_peak_bytes,
            "process_peak_bytes": self.process_peak_bytes,
            "cuda_context_bytes": self.cuda_context_bytes,
            "cuda_max_allocated": self.cuda_max_allocated,
            "cuda_max_reserved": self.cuda_max_reserved,
            "device": self.device_type,
        }

    def to_json(self, path: str | os.PathLike | None = None, timeline: bool = True, max_samples: int = 4000) -> str:
        """The summary (and the timeline, thinned to about `max_samples`) as JSON; also written
        atomically to `path` if given."""
        data = self.summary()
        if timeline:
            samples = self._tracker.state.timeline
            stride = max(1, -(-len(samples) // max_samples))
            data["timeline_categories"] = list(CATEGORIES)
            data["timeline"] = [[e, PHASES[p], s, list(v)] for e, p, s, v in samples[::stride]]
        text = json.dumps(data, indent=1)
        if path is not None:
            atomic_write_text(path, text)
        return text

    def table(self) -> str:
        """A text table of the peak breakdown with RSS and CUDA allocator figures."""
        extra = [("peak in phase", f"{self.peak_phase} (step {self.peak_step})")]
        if self.cuda_max_allocated is not None:
            extra += [("cuda max alloc", format_bytes(self.cuda_max_allocated)),
                      ("cuda max reserved", format_bytes(self.cuda_max_reserved)),
                      ("process peak", f"{format_bytes(self.process_peak_bytes)} (nvidia-smi: context + reserved)")]
        else:
            extra.append(("process peak", f"{format_bytes(self.process_peak_bytes)} (RSS)"))
        return breakdown_table(self.breakdown, "measured tensor memory at the peak", extra)

    def save_plot(self, path: str | os.PathLike, title: str = "qlowrank memory profile") -> Path:
        """Write the PNG: stacked-area timeline with phases, and the peak breakdown bar."""
        return plot_profile(self._tracker.state.timeline, self.breakdown, path, title)


def profile_steps(model: nn.Module, optimizer: torch.optim.Optimizer, tokens: torch.Tensor, steps: int = 3,
                  progress: bool = True, loss_fn=None) -> MemoryProfiler:
    """Run `steps` causal-LM training steps (labels = inputs) under a MemoryProfiler and return it.

    Step 2 onwards is the steady state (optimizer state exists), so use steps >= 2 to see it.
    `loss_fn(model, tokens) -> loss` replaces the model's own loss (e.g. a chunked one).
    """
    with MemoryProfiler(model=model, optimizer=optimizer) as prof:
        for _ in tqdm(range(steps), desc="profiling steps", unit="step", disable=not progress):
            loss = loss_fn(model, tokens) if loss_fn else model(input_ids=tokens, labels=tokens).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            del loss
    return prof
