"""Fold the step outputs of benchmarks/gpu_all.sh into one JSON (benchmarks/gpu_all.json).

    python benchmarks/gpu_collect.py STEP_DIR OUT.json [DEVICE]     # gpu_all.sh's last step

For each step: its exit status and seconds (NAME.status), and the figures its own output holds
(gpu_memory.py's and gpu_vs_peft.py's --json, `qlowrank profile`'s memory.json beside `qlowrank
estimate --json`, demo.py's JSON, pytest's last line). A step that did not finish keeps its status
and the tail of its log, so the JSON says what failed. Standard library only.
"""

from __future__ import annotations

import json
import statistics
import sys
from datetime import datetime, timezone
from pathlib import Path


def read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def vs_peft_result(folder: Path) -> dict | None:
    data = read_json(folder / "gpu_vs_peft.json")
    if not data:
        return None
    speed = {lib: statistics.median(r["tokens_per_s"] for r in data["results"] if r["lib"] == lib)
             for lib in {r["lib"] for r in data["results"]}}
    if "qlowrank" not in speed or "peft" not in speed:
        return None
    model = data["results"][0]["model"]
    return {"model": model, "tokens_per_s": speed, "tokens_per_s_ratio": speed["qlowrank"] / speed["peft"],
            "results": data["results"]}


def offload_result(folder: Path) -> dict | None:
    estimate, measured = read_json(folder / "offload_estimate.json"), read_json(folder / "offload" / "memory.json")
    if not estimate or not measured:
        return None
    return {"measured_bytes": measured["peak_bytes"], "cuda_max_allocated": measured.get("cuda_max_allocated"),
            "cuda_max_reserved": measured.get("cuda_max_reserved"), "estimate_bytes": estimate["total_bytes"],
            "estimate_process_bytes": estimate["process_bytes"], "host_offload_bytes": estimate["host_offload_bytes"]}


def tests_result(folder: Path) -> dict | None:
    lines = [line for line in (folder / "cuda_tests.log").read_text().splitlines() if line.strip()] \
        if (folder / "cuda_tests.log").is_file() else []
    return {"summary": lines[-1].strip("= ")} if lines else None


RESULTS = {"gpu_memory": lambda f: read_json(f / "gpu_memory.json"), "gpu_vs_peft": vs_peft_result,
           "offload": offload_result, "demo": lambda f: read_json(f / "demo.json"), "cuda_tests": tests_result}


def collect(folder: Path, device: str | None = None) -> dict:
    steps = {}
    for name, result in RESULTS.items():
        status = (folder / f"{name}.status").read_text().split() if (folder / f"{name}.status").is_file() else []
        log = (folder / f"{name}.log").read_text().splitlines()[-20:] if (folder / f"{name}.log").is_file() else []
        exit_code = int(status[0]) if status else None
        steps[name] = {"exit": exit_code, "seconds": int(status[1]) if len(status) > 1 else None,
                       "timed_out": exit_code in (124, 137), "result": result(folder) if exit_code == 0 else None,
                       **({} if exit_code == 0 else {"log_tail": log})}
    memory = steps["gpu_memory"]["result"] or {}
    return {"date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "device": memory.get("device") or device or "a CUDA GPU", "command": "bash benchmarks/gpu_all.sh", "steps": steps}


def main() -> int:
    if len(sys.argv) not in (3, 4):
        raise SystemExit("usage: python benchmarks/gpu_collect.py STEP_DIR OUT.json [DEVICE]")
    folder, out = Path(sys.argv[1]), Path(sys.argv[2])
    record = collect(folder, sys.argv[3] if len(sys.argv) == 4 else None)
    out.write_text(json.dumps(record, indent=1) + "\n")
    failed = [n for n, s in record["steps"].items() if s["exit"] != 0]
    print(f"wrote {out}" + (f"; steps that did not finish: {', '.join(failed)}" if failed else "; every step finished"))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
