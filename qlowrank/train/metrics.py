"""What a training run shows and records: metrics.jsonl, TensorBoard, the progress bar, memory.json / memory.txt.

Only rank 0 writes and prints (`RunLog(enabled=strategy.is_main)`); the other ranks run the
same calls, which do nothing. Step metrics carry the process's peak memory, so a leak shows
in metrics.jsonl step by step.
"""

from __future__ import annotations

import json
import resource
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..config import TrainConfig
from ..memory.report import atomic_write_text, format_bytes


def peak_memory_bytes(device: torch.device) -> int:
    """Peak memory of this process so far: CUDA's max allocated, or the peak RSS on a CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB


@dataclass
class MemoryRecord:
    """What a run measured about its memory: `summary` goes to memory.json, `table` to memory.txt."""

    summary: dict | None = None   # MemoryProfiler.summary(), plus "ranks" on several processes
    table: str | None = None      # the same as text


def with_rank_lines(record: MemoryRecord, ranks: list[dict]) -> None:
    """Add every rank's MemoryProfiler figures (peak tensors, peak RSS, base weights) to `record`."""
    record.summary["ranks"] = ranks
    record.table += "\n" + "\n".join(
        f"rank {r}: peak tensors {format_bytes(m['peak_bytes'])}, peak RSS {format_bytes(m['rss_peak_bytes'])}, "
        f"base weights {format_bytes(m['breakdown'].get('base_weights', 0))}" for r, m in enumerate(ranks))


def fsdp_memory(ranks: list[dict]) -> MemoryRecord:
    """The record of an FSDP run from each rank's `local_model_bytes` and peak RSS."""
    table = "\n".join(
        f"rank {r}: base weights {format_bytes(m['base_weights'])} (sharded) + quant_state "
        f"{format_bytes(m['quant_state'])} (whole), LoRA {format_bytes(m['trainable_params'])}, "
        f"peak RSS {format_bytes(m['rss_peak_bytes'])}" for r, m in enumerate(ranks))
    return MemoryRecord({"sharding": "fsdp", "ranks": ranks}, table)


class RunLog:
    """metrics.jsonl (and TensorBoard when it is installed), the tqdm bar and messages, on rank 0 only.

    Args:
        out_dir: the run's folder.
        config: the run's TrainConfig (progress, log_every).
        enabled: False on the ranks that neither write nor print.
        steps: (first step of this run, total steps) for the progress bar.
    """

    def __init__(self, out_dir: Path, config: TrainConfig, enabled: bool, steps: tuple[int, int]) -> None:
        self.out_dir, self.config, self.enabled = out_dir, config, enabled
        self.handle = open(out_dir / "metrics.jsonl", "a") if enabled else None
        self.board = None
        if enabled:
            try:
                from torch.utils.tensorboard import SummaryWriter
                self.board = SummaryWriter(str(out_dir / "tensorboard"))
            except ImportError:  # tensorboard is optional
                pass
        first, total = steps
        self.bar = tqdm(total=total, initial=first, desc="train", disable=not config.progress or not enabled,
                        dynamic_ncols=True)

    def __enter__(self) -> RunLog:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def say(self, text: str) -> None:
        """Print a line (rank 0)."""
        if self.enabled:
            print(text, flush=True)

    def step(self, metrics: dict) -> None:
        """One optimizer step done: move the bar, and log every `log_every` steps."""
        self.bar.update(1)
        self.bar.set_postfix(loss=f"{metrics['loss']:.4f}", lr=f"{metrics['lr']:.2e}",
                             tok_s=f"{metrics['tokens_per_s']:.0f}", peak=f"{metrics['peak_mem_gib']:.2f}GiB")
        if metrics["step"] % self.config.log_every == 0:
            self.write(metrics)

    def eval(self, metrics: dict) -> None:
        """An evaluation: always logged, and shown beside the bar."""
        self.write(metrics)
        if self.config.progress and self.enabled:
            extra = (f"perplexity {metrics['eval_ppl']:.2f}" if "eval_ppl" in metrics   # SFT; pairs: their accuracy
                     else f"reward accuracy {metrics.get('eval_rewards/accuracies', float('nan')):.3f}")
            tqdm.write(f"step {metrics['step']}: eval loss {metrics['eval_loss']:.4f}, {extra}")

    def memory(self, record: MemoryRecord) -> None:
        """Write memory.json and memory.txt (atomically)."""
        if self.enabled:
            atomic_write_text(self.out_dir / "memory.json", json.dumps(record.summary, indent=1) + "\n")
            atomic_write_text(self.out_dir / "memory.txt", record.table + "\n")

    def write(self, metrics: dict) -> None:
        """One line of metrics.jsonl (with the wall time) and its numbers on TensorBoard."""
        if self.handle is None:
            return
        self.handle.write(json.dumps({**metrics, "time": time.time()}) + "\n")
        self.handle.flush()
        if self.board is not None:
            for key, value in metrics.items():
                if key != "step" and isinstance(value, (int, float)):
                    self.board.add_scalar(key, value, metrics["step"])

    def close(self) -> None:
        """Close the bar, the file and TensorBoard (again: nothing)."""
        self.bar.close()
        if self.handle is not None:
            self.handle.close()
            self.handle = None
        if self.board is not None:
            self.board.close()
            self.board = None
