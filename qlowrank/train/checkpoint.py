"""Training checkpoints: adapter, optimizer, scheduler, RNG states and data position, written atomically.

Layout of one checkpoint, `<out>/checkpoints/step-000050/`:
  adapter/            PEFT adapter (save_adapter)
  optimizer.pt        optimizer.state_dict()   (tensors and numbers only: loads with weights_only)
  scheduler.pt        scheduler.state_dict()
  rng.pt              torch CPU (and CUDA) generator states
  trainer_state.json  step, data position, Python RNG state, config, last metrics
A checkpoint is built in a hidden temporary folder and renamed into place, so a crash or a
Ctrl-C while saving leaves the previous checkpoint intact and never a half-written one.
"""

from __future__ import annotations

import json
import random
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..adapters import load_adapter, replace_dir, save_adapter

STATE_FILE = "trainer_state.json"
_STEP_DIR = re.compile(r"^step-(\d+)$")


def _rng_state() -> tuple[dict, list]:
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, state in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"cuda{i}"] = state
    version, internal, gauss = random.getstate()
    return tensors, [version, list(internal), gauss]


def save_checkpoint(
    root: str | Path,
    step: int,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    state: dict[str, Any],
    keep: int | None = None,
) -> Path:
    """Write checkpoint `root/step-<step>` atomically; keep only the newest `keep` (None: all).

    Returns:
        The checkpoint directory.
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    target = root / f"step-{step:06d}"
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.partial-", dir=root))
    try:
        save_adapter(model, tmp / "adapter")
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
        rng_tensors, python_rng = _rng_state()
        torch.save(rng_tensors, tmp / "rng.pt")
        # Written last: a directory with this file is complete.
        (tmp / STATE_FILE).write_text(json.dumps({**state, "step": step, "python_rng": python_rng}, indent=1) + "\n")
        replace_dir(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if keep:
        for old in list_checkpoints(root)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    return target


def list_checkpoints(root: str | Path) -> list[Path]:
    """Complete checkpoints under `root`, oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _STEP_DIR.match(p.name)) and (p / STATE_FILE).is_file()]
    return [p for _, p in sorted(found)]


def latest_checkpoint(root: str | Path) -> Path | None:
    """The newest complete checkpoint under `root`, or None."""
    checkpoints = list_checkpoints(root)
    return checkpoints[-1] if checkpoints else None


def load_checkpoint(
    path: str | Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
) -> dict[str, Any]:
    """Restore adapter, optimizer, scheduler and RNG states in place; return the trainer state.

    Nothing is unpickled: tensors come from safetensors and `torch.load(weights_only=True)`.
    """
    path = Path(path)
    state_file = path / STATE_FILE
    if not state_file.is_file():
        raise FileNotFoundError(f"{path} is not a complete qlowrank checkpoint (no {STATE_FILE})")
    state = json.loads(state_file.read_text())
    load_adapter(model, path / "adapter")
    device = next(iter(p for g in optimizer.param_groups for p in g["params"])).device
    optimizer.load_state_dict(torch.load(path / "optimizer.pt", map_location=device, weights_only=True))
    scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=True))
    rng = torch.load(path / "rng.pt", weights_only=True)
    torch.set_rng_state(rng["torch"])
    cuda_states = [rng[k] for k in sorted(k for k in rng if k.startswith("cuda"))]
    if cuda_states and torch.cuda.is_available() and len(cuda_states) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda_states)
    version, internal, gauss = state.pop("python_rng")
    random.setstate((version, tuple(internal), gauss))
    return state
