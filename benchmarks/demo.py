"""`qlowrank demo` timed from outside, its figures kept as benchmarks/demo.json.

    flock /tmp/qlowrank-heavy.lock .venv/bin/python benchmarks/demo.py                 # CPU, ~2-3 min on 2 cores
    .venv/bin/python benchmarks/demo.py --device cuda --json /tmp/gpu/demo_cuda.json   # what gpu_all.sh runs

Runs `qlowrank demo` (the embedded SmolLM2-135M-Instruct, NF4, LoRA r=16, 50 steps) in a fresh process
with its output in a temporary folder, and writes the demo's own demo.json (eval losses, seconds per
stage, peak tensor bytes, the export's eval loss under plain transformers) beside the wall time of the
whole process, its exit status, the load average before and after (the CPU may be shared), the
device, the date and the command.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

HERE = Path(__file__).resolve().parent


def run_demo(device: str | None, steps: int, timeout: float) -> dict:
    """One `qlowrank demo` process; its demo.json plus what only the outside sees."""
    with tempfile.TemporaryDirectory(prefix="qlowrank-demo-bench-") as folder:
        command = [sys.executable, "-m", "qlowrank", "demo", "--out", folder, "--steps", str(steps)]
        if device:
            command += ["--device", device]
        load_before = os.getloadavg()
        started = time.perf_counter()
        try:
            finished = subprocess.run(command, timeout=timeout)
            status = finished.returncode
        except subprocess.TimeoutExpired:
            status = "timeout"
        wall = time.perf_counter() - started
        report = Path(folder) / "demo.json"
        demo = json.loads(report.read_text()) if report.is_file() else None
    # The CPU may be shared: the load average (1 min) before and after says how much, beside the cores
    return {"exit": status, "wall_s": wall, "loadavg_before": load_before[0], "loadavg_after": os.getloadavg()[0],
            "demo": demo}


def commit() -> str | None:
    """The checkout's commit, so the figures name the code they measured."""
    try:
        return subprocess.run(["git", "-C", str(HERE), "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, timeout=10, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default=None, help="cpu or cuda [default: the demo's, cuda if present]")
    parser.add_argument("--steps", type=int, default=50, help="the demo's optimizer steps [default: 50]")
    parser.add_argument("--timeout", type=float, default=900, help="seconds before the demo is stopped")
    parser.add_argument("--json", default=str(HERE / "demo.json"), help="where the figures go")
    args = parser.parse_args()
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise SystemExit("benchmarks/demo.py --device cuda needs an NVIDIA GPU (torch sees none); "
                             "leave --device out to run on the CPU")
    result = run_demo(args.device, args.steps, args.timeout)
    if result["exit"] != 0 or not result["demo"]:   # a failed run leaves the last good figures in place
        print(f"qlowrank demo did not finish (exit {result['exit']}): {args.json} not written", flush=True)
        return 1
    record = {"command": "python " + " ".join(["benchmarks/demo.py", *sys.argv[1:]]),
              "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
              "machine": f"{platform.machine()}, {os.cpu_count()} cores", "commit": commit(), **result}
    Path(args.json).write_text(json.dumps(record, indent=1) + "\n")
    print(f"wrote {args.json}: {result['wall_s']:.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
