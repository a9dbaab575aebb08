#!/usr/bin/env bash
# Every one-GPU measurement in one go, under 10 minutes: writes benchmarks/gpu_all.json.
#
#   bash benchmarks/gpu_all.sh                 # on a machine with one NVIDIA GPU
#   PYTHON=/path/to/python bash benchmarks/gpu_all.sh
#
# Steps (each in a fresh process, each with its own time limit; the limits add up to 570 s):
#   gpu_memory   VRAM of a Llama-3-8B-shaped QLoRA step against the estimate, and the CUDA process
#                margin: the context (nvidia-smi minus reserved) and the allocator's reserve
#                (benchmarks/gpu_memory.py --chunked-loss --steps 2)
#   gpu_vs_peft  tokens/s and VRAM against PEFT + bitsandbytes, Llama-3.2-1B shape
#                (benchmarks/gpu_vs_peft.py --models llama1b --libs qlowrank,peft)
#   offload      `qlowrank profile --offload-activations` on SmolLM2 at seq 4096 against
#                `qlowrank estimate` of the same run
#   demo         `qlowrank demo --device cuda` (benchmarks/demo.py)
#   cuda_tests   pytest -m cuda
# A step that fails or runs out of time is recorded as such and the others still run;
# benchmarks/gpu_collect.py then folds the step outputs into benchmarks/gpu_all.json, which
# `python benchmarks/summary.py --write` renders. Without a GPU it says so and exits 2 at once.
set -uo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(dirname "$HERE")"
PY="${PYTHON:-$ROOT/.venv/bin/python}"
[ -x "$PY" ] || PY="$(command -v python3 || command -v python)"

if ! command -v nvidia-smi >/dev/null 2>&1 || ! nvidia-smi -L >/dev/null 2>&1; then
    echo "gpu_all.sh: no NVIDIA GPU here (nvidia-smi finds none): nothing measured, gpu_all.json not written" >&2
    exit 2
fi
if ! "$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "gpu_all.sh: $PY's torch sees no CUDA device (a CPU build of torch?): nothing measured" >&2
    exit 2
fi

OUT="$(mktemp -d "${TMPDIR:-/tmp}/qlowrank-gpu-all.XXXXXX")"
cd "$ROOT" || exit 1
DEVICE="$(nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | head -1)"
echo "gpu_all.sh: $DEVICE; step outputs in $OUT"

# run_step NAME SECONDS COMMAND...: the command's output goes to NAME.log, "exit seconds" to NAME.status
run_step() {
    local name="$1" limit="$2"
    shift 2
    local started=$SECONDS
    echo "== $name (at most ${limit} s): $*"
    timeout --kill-after=10 "$limit" "$@" >"$OUT/$name.log" 2>&1
    local status=$?
    echo "$status $((SECONDS - started))" >"$OUT/$name.status"
    tail -n 5 "$OUT/$name.log"
    echo "-- $name: exit $status after $((SECONDS - started)) s"
}

GGUF="$("$PY" -c "from qlowrank.model.embedded import smollm2_gguf; print(smollm2_gguf())" 2>/dev/null)"

run_step gpu_memory 130 "$PY" benchmarks/gpu_memory.py --chunked-loss --steps 2 --json "$OUT/gpu_memory.json"
run_step gpu_vs_peft 160 "$PY" benchmarks/gpu_vs_peft.py --models llama1b --libs qlowrank,peft \
    --json "$OUT/gpu_vs_peft.json"
OFFLOAD=(--model "$GGUF" --bits 4 --r 16 --batch 1 --seq 4096 --device cuda --offload-activations)
run_step offload 80 bash -c '"$1" -m qlowrank estimate "${@:3}" --json >"$2/offload_estimate.json" &&
    "$1" -m qlowrank profile "${@:3}" --steps 2 --out "$2/offload"' _ "$PY" "$OUT" "${OFFLOAD[@]}"
run_step demo 110 "$PY" benchmarks/demo.py --device cuda --timeout 100 --json "$OUT/demo.json"
run_step cuda_tests 90 "$PY" -m pytest -q -m cuda -p no:cacheprovider tests

"$PY" benchmarks/gpu_collect.py "$OUT" "$HERE/gpu_all.json" "$DEVICE"
