"""Training checkpoints: adapter, optimizer, scheduler, RNG states and data position, written atomically, with a manifest.

Layout of one checkpoint, `<out>/checkpoints/step-000050/`:
  adapter/            PEFT adapter (save_adapter)
  optimizer.pt        optimizer.state_dict()   (tensors and numbers only: loads with weights_only)
  scheduler.pt        scheduler.state_dict()
  rng.pt              torch CPU (and CUDA) generator states
  trainer_state.json  step, data position, Python RNG state, config, last metrics
  manifest.json       size and SHA-256 of every file above (written last)
A checkpoint is built in a hidden staging folder, fsynced and renamed into place, so a crash,
a kill -9 or a full disk while saving leaves the previous checkpoint intact and never a
half-written one. The manifest catches what happens to the files afterwards (a truncated
copy, a flipped bit): `find_resumable` skips a damaged checkpoint for the newest good one.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import random
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..adapter import load_adapter, save_adapter
from ..atomic import remove_leftovers, staged_dir, staging_tag
from ..config import TrainConfig

STATE_FILE = "trainer_state.json"
MANIFEST_FILE = "manifest.json"
_STEP_DIR = re.compile(r"^step-(\d+)$")


class CheckpointError(ValueError):
    """No usable checkpoint: missing, or every one found is damaged (the message lists why)."""


def rng_snapshot() -> tuple:
    """Every RNG state training draws from (torch CPU, CUDA, Python's random), to restore later."""
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    return torch.get_rng_state(), cuda, random.getstate()


def restore_rng(snapshot: tuple) -> None:
    """Put back the RNG states of an `rng_snapshot()`."""
    cpu, cuda, python = snapshot
    torch.set_rng_state(cpu)
    if cuda is not None:
        torch.cuda.set_rng_state_all(cuda)
    random.setstate(python)


def _rng_state() -> tuple[dict, list]:
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, state in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"cuda{i}"] = state
    version, internal, gauss = random.getstate()
    return tensors, [version, list(internal), gauss]


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def write_manifest(folder: str | os.PathLike) -> Path:
    """Record the size and SHA-256 of every file under `folder` in `folder/manifest.json`."""
    folder = Path(folder)
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST_FILE)
    entries = {p.relative_to(folder).as_posix(): {"bytes": p.stat().st_size, "sha256": _sha256(p)} for p in files}
    path = folder / MANIFEST_FILE
    path.write_text(json.dumps({"format": 1, "files": entries}, indent=1) + "\n")
    return path


def verify_checkpoint(path: str | os.PathLike) -> str | None:
    """None when every file matches the manifest, else what is wrong (the first problem found)."""
    path = Path(path)
    manifest = path / MANIFEST_FILE
    if not manifest.is_file():
        return f"no {MANIFEST_FILE}"
    try:
        files = json.loads(manifest.read_text())["files"]
        items = [(name, int(entry["bytes"]), str(entry["sha256"])) for name, entry in files.items()]
    except (ValueError, KeyError, TypeError, AttributeError, UnicodeDecodeError) as err:
        return f"{MANIFEST_FILE} is unreadable ({type(err).__name__}: {err})"
    if STATE_FILE not in files:
        return f"{MANIFEST_FILE} does not list {STATE_FILE}"
    for name, size, checksum in items:
        file = path / name
        if not file.is_file():
            return f"{name} is missing"
        actual = file.stat().st_size
        if actual != size:
            return f"{name} is {actual} bytes, the manifest says {size} (truncated or altered)"
        if _sha256(file) != checksum:
            return f"{name} does not match its SHA-256 in the manifest (altered)"
    return None


@dataclass
class Checkpointed:
    """What a checkpoint saves besides the RNG states."""

    model: nn.Module                                         # its LoRA factors (the adapter)
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    state: dict[str, Any]                                    # the trainer's state (JSON): position, config, ...
    adapter_tensors: dict[str, dict[str, torch.Tensor]] | None = None  # gathered whole factors (FSDP), else None
    optimizer_state: dict | None = None                      # gathered whole optimizer state (FSDP), else None


def save_checkpoint(root: str | Path, step: int, what: Checkpointed, keep: int | None = None) -> Path:
    """Write checkpoint `root/step-<step>` atomically; keep only the newest `keep` (None: all).

    `what.adapter_tensors` / `what.optimizer_state` replace what the model and optimizer hold
    when those are sharded over several processes (the trainer gathers them first).

    Raises:
        OSError: the checkpoint could not be written (full disk, read-only folder). Nothing
            of it is left behind and the earlier checkpoints are untouched.

    Returns:
        The checkpoint directory.
    """
    root = Path(root)
    target = root / f"step-{step:06d}"
    remove_leftovers(root)   # staging folders of killed runs (only this trainer writes here)
    previous = [p.name for p in list_checkpoints(root) if p != target]
    intact = f"the previous checkpoint {previous[-1]} is intact" if previous else "no earlier checkpoint exists"
    with staged_dir(target, "checkpoint", intact) as tmp:
        save_adapter(what.model, tmp / "adapter", tensors=what.adapter_tensors, format="qlowrank")
        # Serialized in memory, then written by Python: a full disk is then a plain OSError
        # (torch.save straight to a file turns it into an opaque RuntimeError).
        (tmp / "optimizer.pt").write_bytes(_torch_bytes(what.optimizer_state or what.optimizer.state_dict()))
        (tmp / "scheduler.pt").write_bytes(_torch_bytes(what.scheduler.state_dict()))
        rng_tensors, python_rng = _rng_state()
        (tmp / "rng.pt").write_bytes(_torch_bytes(rng_tensors))
        (tmp / STATE_FILE).write_text(json.dumps({**what.state, "step": step, "python_rng": python_rng}, indent=1) + "\n")
        write_manifest(tmp)   # last: it covers every file above
    if keep:
        for old in list_checkpoints(root)[:-keep]:
            _remove(old)
    return target


def _torch_bytes(obj: Any) -> memoryview:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getbuffer()


def _remove(path: Path) -> None:
    # Renamed out of the step-N pattern first, so a kill during the deletion cannot leave a
    # half-deleted folder that still looks like a checkpoint.
    hidden = path.with_name(f".{path.name}.old-{staging_tag()}-x")
    os.replace(path, hidden)
    shutil.rmtree(hidden, ignore_errors=True)


def list_checkpoints(root: str | Path) -> list[Path]:
    """Checkpoint folders (step-N) under `root`, oldest first (not verified: see find_resumable)."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _STEP_DIR.match(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found)]


def latest_checkpoint(root: str | Path) -> Path | None:
    """The newest checkpoint folder under `root`, or None."""
    checkpoints = list_checkpoints(root)
    return checkpoints[-1] if checkpoints else None


def find_resumable(root: str | Path) -> tuple[Path, list[tuple[Path, str]]]:
    """The newest checkpoint under `root` that matches its manifest, and the damaged newer ones.

    Returns:
        (checkpoint, [(damaged checkpoint, what is wrong), ...] newest first).

    Raises:
        CheckpointError: there is no checkpoint, or none is intact (each one and its problem listed).
    """
    root = Path(root)
    damaged = []
    for path in reversed(list_checkpoints(root)):
        problem = verify_checkpoint(path)
        if problem is None:
            return path, damaged
        damaged.append((path, problem))
    if not damaged:
        raise CheckpointError(f"no checkpoint in {root}; run without --resume first")
    listed = "; ".join(f"{p.name}: {problem}" for p, problem in damaged)
    raise CheckpointError(f"no intact checkpoint in {root} to resume from ({listed}); restore one from a copy or "
                          "start again without --resume")


def set_aside(path: str | os.PathLike) -> Path:
    """Rename a damaged checkpoint to `<name>.damaged[-k]`: kept for inspection, never resumed from."""
    path = Path(path)
    for k in range(1000):
        aside = path.with_name(f"{path.name}.damaged" + (f"-{k}" if k else ""))
        if not aside.exists():
            os.replace(path, aside)
            return aside
    raise FileExistsError(f"too many set-aside copies of {path}")


def load_checkpoint(
    path: str | Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
) -> dict[str, Any]:
    """Verify a checkpoint against its manifest, then restore adapter, optimizer, scheduler
    and RNG states in place; return the trainer state.

    Nothing is unpickled: tensors come from safetensors and `torch.load(weights_only=True)`.

    Raises:
        CheckpointError: the checkpoint is damaged (nothing has been changed yet).
    """
    path = Path(path)
    problem = verify_checkpoint(path)
    if problem is not None:
        raise CheckpointError(f"checkpoint {path} is damaged: {problem}")
    state = json.loads((path / STATE_FILE).read_text())
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


# Fields that decide which examples each step sees: a resume with other values would not
# continue the same run. batch_size and grad_accum may change with the number of processes
# as long as the global batch (batch_size x processes x grad_accum) stays the same.
# objective: a DPO checkpoint resumed as SFT (or the reverse) would read other data with another loss
_TRAJECTORY_FIELDS = ("seed", "optimizer", "group_by_length", "objective")
_FIELD_BEFORE_IT_EXISTED = {"group_by_length": False, "objective": "sft"}   # what older checkpoints ran with


def resume_position(path: Path, state: dict[str, Any], config: TrainConfig, processes: int) -> list[int]:
    """The data position (epoch, examples used) to continue from, once `state` (load_checkpoint's)
    is known to continue the same run under `config` on `processes` ranks.

    Raises:
        ValueError: the data order would change (seed, optimizer, grouping or global batch differ).
    """
    saved = {**_FIELD_BEFORE_IT_EXISTED, **state["config"]}
    changed = [f"{k}: {saved.get(k)!r} -> {getattr(config, k)!r}" for k in _TRAJECTORY_FIELDS
               if saved.get(k) != getattr(config, k)]
    global_batch = config.batch_size * processes * config.grad_accum
    saved_global = state.get("global_batch", saved["batch_size"] * saved["grad_accum"])
    if saved_global != global_batch:
        changed += [f"{k}: {saved.get(k)!r} -> {getattr(config, k)!r}" for k in ("batch_size", "grad_accum")
                    if saved.get(k) != getattr(config, k)]
        changed.append(f"global batch (batch_size x processes x grad_accum) {saved_global} -> "
                       f"{config.batch_size} x {processes} x {config.grad_accum} = {global_batch}")
    if changed:
        raise ValueError(f"cannot resume {path}: the run's data order would change ({'; '.join(changed)}); "
                         "resume with the settings it was started with")
    epoch, where = state["position"]
    if state.get("position_unit") != "examples":   # older checkpoints counted micro-batches of one process
        where *= saved["batch_size"]
    return [epoch, where]
