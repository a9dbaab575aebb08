#!/bin/bash
# `qlowrank estimate --calibrate` against the analytic estimate, on configurations whose anonymous peaks
# benchmarks/process_memory.py and benchmarks/large_model.py measured (RESULTS.md, "estimate --calibrate
# against the analytic model"). One command:
#     flock /tmp/qlowrank-heavy.lock benchmarks/calibrate_vs_analytic.sh [8B-WIDTH-4L-DIR] [FULL-8B-DIR]
# The 4-layer 8B-width model is the one benchmarks/process_memory.py caches; the full 8B shape is
# benchmarks/large_model.py's checkpoint (rows skipped when a folder is absent).
cd "$(dirname "$0")/.."
L4=${1:-/tmp/qlowrank-process-memory/llama-4096-14336-32-4-8-500000.0-False-32000}
FULL=${2:-}
GGUF=$(.venv/bin/python -c "from qlowrank.model.embedded import smollm2_gguf; print(smollm2_gguf())")
OUT=$(mktemp -d); trap 'rm -rf "$OUT"' EXIT
run() { name="$1"; shift; started=$(date +%s)
  .venv/bin/qlowrank estimate --device cpu --bits 4 --r 16 --calibrate --json "$@" > "$OUT/r.json" 2> "$OUT/err" \
    || { echo "| $name | failed: $(tail -1 "$OUT/err") |"; return; }
  .venv/bin/python - "$OUT/r.json" "$name" "$(( $(date +%s) - started ))" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
mib = lambda key: round(r[key] / 2**20)
print(f"| {sys.argv[2]} | {mib('calibrated_process_bytes')} | {mib('analytic_process_bytes')} | {mib('total_bytes')} | "
      f"{mib('per_block_bytes')} | {sys.argv[3]} s |", flush=True)
PY
}
echo "| configuration | calibrated MiB | analytic MiB | tensors MiB | per block MiB | wall |"
echo "|---|---|---|---|---|---|"
run "SmolLM2 demo 4 x 160" --model "$GGUF" --batch 4 --seq 160
run "SmolLM2 4 x 512, attention recomputed" --model "$GGUF" --batch 4 --seq 512 --keep-attention off
run "SmolLM2 2 x 512, no checkpointing" --model "$GGUF" --batch 2 --seq 512 --no-checkpointing
if [ -f "$L4/config.json" ]; then
  run "8B width 4L 1 x 2048" --model "$L4" --batch 1 --seq 2048
  run "8B width 4L 8 x 128" --model "$L4" --batch 8 --seq 128
  run "8B width 4L 1 x 2048 x accum 2, no checkpointing" --model "$L4" --batch 1 --grad-accum 2 --seq 2048 --no-checkpointing
fi
[ -n "$FULL" ] && [ -f "$FULL/config.json" ] && run "full 8B 1 x 2048" --model "$FULL" --batch 1 --seq 2048
