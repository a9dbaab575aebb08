"""StatusSampler: a process's anonymous and file-backed memory, sampled from /proc in a thread.

Linux keeps a high-water mark only for the sum of both kinds (VmHWM). What has to fit is
the anonymous part (RssAnon: heaps, tensors, thread stacks; an OOM kill comes from it);
the file-backed part (RssFile: pages of libraries and of memory-mapped checkpoints) is
clean and the kernel drops it under pressure. So the anonymous peak has to be sampled:
every 10 ms by default, which misses only a transient shorter than that (a tensor that is
allocated, touched and freed within 10 ms at ~10 GB/s of page faults is < 100 MB).
"""

from __future__ import annotations

import threading
import time

STATUS_KEYS = ("RssAnon", "RssFile", "VmHWM", "VmRSS")


def read_status(pid: int | str = "self") -> dict[str, int]:
    """RssAnon, RssFile, VmHWM and VmRSS of a process in bytes ({} when it is gone or /proc is absent)."""
    values: dict[str, int] = {}
    try:
        with open(f"/proc/{pid}/status") as handle:
            for line in handle:
                key, _, rest = line.partition(":")
                if key in STATUS_KEYS:
                    values[key] = int(rest.split()[0]) * 1024
    except (OSError, ValueError, IndexError):
        return {}
    return values


def available_host_bytes() -> int | None:
    """What the machine could still give a process (MemAvailable, else MemFree), in bytes; None without /proc."""
    fields = {}
    try:
        with open("/proc/meminfo") as handle:
            for line in handle:
                key, _, rest = line.partition(":")
                fields[key] = int(rest.split()[0]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return fields.get("MemAvailable", fields.get("MemFree"))


class StatusSampler:
    """Peaks of RssAnon / RssFile / VmHWM of process `pid`, sampled every `interval` seconds.

    Use as a context manager, or call `start()` / `stop()`; `reset()` starts a new phase.
    """

    def __init__(self, pid: int | str = "self", interval: float = 0.01) -> None:
        self.pid = pid
        self.interval = interval
        self.peaks: dict[str, int] = {}
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    def sample(self) -> dict[str, int]:
        """Read the status once and fold it into the peaks; returns the reading."""
        now = read_status(self.pid)
        with self._lock:
            for key, value in now.items():
                self.peaks[key] = max(self.peaks.get(key, 0), value)
        return now

    def _run(self) -> None:
        while not self._stop.is_set():
            if not self.sample():
                return   # the process has exited
            self._stop.wait(self.interval)

    def start(self) -> "StatusSampler":
        """Start sampling in a daemon thread."""
        self.sample()
        self._thread = threading.Thread(target=self._run, daemon=True, name="qlowrank-status-sampler")
        self._thread.start()
        return self

    def stop(self) -> dict[str, int]:
        """Stop sampling (one last reading first); returns the peaks."""
        self.sample()
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        return dict(self.peaks)

    def reset(self) -> None:
        """Forget the peaks so far (a new phase starts now)."""
        with self._lock:
            self.peaks = {}
        self.sample()

    @property
    def anon_peak(self) -> int:
        """Peak RssAnon in bytes (0 before any reading)."""
        return self.peaks.get("RssAnon", 0)

    @property
    def file_peak(self) -> int:
        """Peak RssFile in bytes."""
        return self.peaks.get("RssFile", 0)

    def __enter__(self) -> "StatusSampler":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def wait_sampled(process, interval: float = 0.01) -> tuple[int, dict[str, int]]:
    """Wait for a `subprocess.Popen` to exit while sampling it; (return code, its peaks).

    The peaks of a child are read through /proc/PID (its ru_maxrss would start at the
    parent's high-water mark when the parent is large).
    """
    sampler = StatusSampler(process.pid, interval)
    while process.poll() is None:
        sampler.sample()
        time.sleep(interval)
    return process.returncode, dict(sampler.peaks)
