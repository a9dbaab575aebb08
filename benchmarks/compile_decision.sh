#!/bin/bash
# The planner's --compile decision against measured step times (RESULTS.md, "The planner decides --compile"):
# `train --batch auto` on the demo data (SmolLM2, seq 512 packed, global batch 4, 6 GiB) for 12 steps, left to
# decide, then forced --compile, --no-compile, --compile again (inductor's cache warm). One command:
#     flock /tmp/qlowrank-heavy.lock benchmarks/compile_decision.sh
# Needs the demo data (`qlowrank demo` writes qlowrank-demo/). Prints each run's plan lines and step times.
cd "$(dirname "$0")/.."
GGUF=$(.venv/bin/python -c "from qlowrank.model.embedded import smollm2_gguf; print(smollm2_gguf())")
for mode in auto compile no-compile compile; do
  out=$(mktemp -d)
  extra=""; [ "$mode" != auto ] && extra="--$mode"
  echo "== $mode"
  .venv/bin/qlowrank train --model "$GGUF" --data qlowrank-demo/train.jsonl --eval-data qlowrank-demo/eval.jsonl \
     --seq 512 --packing --batch auto --global-batch 4 --max-memory 6GiB --steps 12 --out "$out/run" --no-progress $extra 2>&1 \
     | grep -E "compile|->|2>|batch auto|eval loss"
  .venv/bin/python - "$out/run" <<'PY'
import json, sys
rows = [json.loads(line) for line in open(sys.argv[1] + "/metrics.jsonl")]
print("step seconds:", [round(r["seconds"], 2) for r in rows if "seconds" in r])
PY
  rm -rf "$out"
done
