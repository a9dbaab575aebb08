#!/usr/bin/env bash
# The chat fine-tune of examples/finetune_chat.py, launched with `accelerate launch` on 2 processes.
#
# What it shows: the same `qlowrank train` on two processes (DDP): --batch is per process, the
# run prints the global batch, the loss is normalised over both ranks' tokens, and only rank 0
# writes the adapter, checkpoints and metrics. On a machine with 2+ GPUs it uses NCCL, one GPU
# per process; elsewhere it forces CPU (gloo), because `accelerate launch --cpu` starts only
# one process without MPI.
#
# How long: ~3-4 min on 2 CPU cores for the default 30 steps of the embedded SmolLM2-135M
# (each process gets one core, so no speed-up there: see benchmarks/ddp_cpu.py); seconds on GPUs.
#
#     bash examples/multi_process.sh [MODEL] [OUT] [STEPS]
#     (MODEL defaults to the embedded SmolLM2-135M GGUF; PYTHON defaults to .venv/bin/python)
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-.venv/bin/python}"
MODEL="${1:-$("$PY" -c 'from qlowrank.model.embedded import smollm2_gguf; print(smollm2_gguf())')}"
OUT="${2:-multi-process}"
STEPS="${3:-30}"

# The Python-docs chat Q/A pairs of finetune_chat.py (held-out topics in eval.jsonl).
"$PY" - "$OUT/data" <<'PYTHON'
import sys
from pathlib import Path
sys.path.insert(0, "examples")
from finetune_chat import write_pydoc_chat
write_pydoc_chat(Path(sys.argv[1]))
PYTHON

GPUS="$("$PY" -c 'import torch; print(torch.cuda.device_count())')"
PORT="$("$PY" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
if [ "$GPUS" -ge 2 ]; then
    LAUNCH=("$PY" -m accelerate.commands.launch --multi_gpu --num_processes 2 --main_process_port "$PORT")
else
    export ACCELERATE_USE_CPU=1
    LAUNCH=("$PY" -m accelerate.commands.launch --multi_gpu --num_processes 2 --num_machines 1 --mixed_precision no
            --dynamo_backend no --main_process_port "$PORT")
fi
"${LAUNCH[@]}" -m qlowrank train --model "$MODEL" --data "$OUT/data/train.jsonl" --eval-data "$OUT/data/eval.jsonl" \
    --bits 4 --lora-rank 16 --lora-alpha 32 --seq 160 --batch 2 --steps "$STEPS" --lr 1e-3 --seed 0 \
    --out "$OUT/run" --no-progress
