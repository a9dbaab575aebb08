"""The training loop: accelerate underneath, LoRA-only optimizer, chunked loss, eval, checkpoints, resume.

    trainer = Trainer(model, TrainConfig(steps=100, out_dir="out"), train_examples, eval_examples, pad_token_id)
    result = trainer.train()            # trainer.train(resume=True) continues from out/checkpoints

`accelerate` places the model and the batches and runs backward / clipping, so the same loop
runs on the CPU, one GPU or several (`accelerate launch`). bf16 autocast is applied by the
loop itself (accelerate's mixed-precision state is process-global and cannot change
between two trainers in one process).
"""

from __future__ import annotations

import json
import math
import random
import resource
import signal
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Sequence

import torch
from accelerate import Accelerator
from torch import nn
from tqdm.auto import tqdm

from ..adapters import save_adapter
from ..memory import MemoryProfiler
from ..memory.report import atomic_write_text
from .checkpoint import (
    find_resumable, latest_checkpoint, load_checkpoint, restore_rng, rng_snapshot, save_checkpoint, set_aside,
)
from .data import Example, collate
from .loss import DEFAULT_CHUNK_TOKENS, causal_lm_loss, count_predicted_tokens
from .packing import check_packed_attention
from .optim import build_optimizer, build_scheduler
from .signals import StopSignals, TrainingInterrupted

# Fields that decide which examples each step sees: a resume with other values would not
# continue the same run.
_TRAJECTORY_FIELDS = ("batch_size", "grad_accum", "seed", "optimizer")


@dataclass
class TrainConfig:
    """How to train. Every field has a CLI flag of the same name (dashes for underscores)."""

    out_dir: str = "qlowrank-out"       # adapter, checkpoints/, metrics.jsonl, memory.json go here
    steps: int | None = None            # optimizer steps; None: run `epochs` epochs
    epochs: float = 1.0                 # used when steps is None
    batch_size: int = 4                 # sequences per micro-batch
    grad_accum: int = 1                 # micro-batches per optimizer step
    lr: float = 2e-4                    # peak learning rate (of lora_A; lora_B: lr * lora_plus_ratio)
    lora_plus_ratio: float = 1.0        # LoRA+ (arXiv 2402.12354): B's lr multiplier; 1 = plain LoRA
    optimizer: str = "adamw"            # adamw | adamw8bit | paged_adamw8bit
    weight_decay: float = 0.0
    warmup_steps: int = 0               # linear warmup, then cosine decay to min_lr_ratio * lr
    min_lr_ratio: float = 0.0
    max_grad_norm: float | None = 1.0   # gradient clipping; None or 0 disables
    precision: str = "auto"             # bf16 | fp32 | auto (bf16 where the device supports it)
    chunk_tokens: int | None = DEFAULT_CHUNK_TOKENS  # chunked loss rows; None: naive full logits
    eval_every: int = 0                 # evaluate every N steps (0: only before and after training)
    save_every: int = 0                 # checkpoint every N steps (0: only at the end)
    keep_checkpoints: int | None = 2    # newest checkpoints kept (None: all)
    log_every: int = 1                  # metrics.jsonl line every N steps
    seed: int = 0                       # data order and dropout (torch and random are seeded at the start of a
                                        # fresh run); the CLI also seeds LoRA init and the eval split with it
    profile_memory: bool = True         # measure the first step with MemoryProfiler
    progress: bool = True               # tqdm bar

    def __post_init__(self) -> None:
        if self.precision not in ("bf16", "fp32", "auto"):
            raise ValueError(f"TrainConfig.precision={self.precision!r}: use bf16, fp32 or auto (fp16 needs loss "
                             "scaling and is unusable on CPUs; bf16 does not)")
        for name in ("batch_size", "grad_accum", "log_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"TrainConfig.{name}={getattr(self, name)} must be >= 1")
        if self.steps is not None and self.steps < 1:
            raise ValueError(f"TrainConfig.steps={self.steps} must be >= 1 (or None to train for `epochs`)")
        if self.steps is None and self.epochs <= 0:
            raise ValueError(f"TrainConfig.epochs={self.epochs} must be > 0")


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or inf; the last good checkpoint is kept."""


@dataclass
class TrainResult:
    """What a run produced."""

    losses: list[float] = field(default_factory=list)       # training loss of each step run here
    evals: list[dict] = field(default_factory=list)         # {"step", "eval_loss", "eval_ppl"}
    final_step: int = 0
    checkpoint: Path | None = None                          # the last checkpoint written
    adapter_dir: Path | None = None                         # out_dir/adapter
    memory: dict | None = None                              # MemoryProfiler summary of the first 2 steps
    memory_table: str | None = None                         # the same as a text table


def _peak_memory_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB


class Trainer:
    """Train a model's LoRA factors on tokenized examples.

    Args:
        model: a model with LoraLinear layers (add_lora or load_model(lora=...)).
        config: the TrainConfig.
        train: training examples (load_examples / pack_examples).
        eval: held-out examples for eval loss and perplexity (may be empty).
        pad_token_id: id used to pad batches (its labels are always -100).
        on_step: optional callback(trainer, step, metrics) after every optimizer step.
    """

    def __init__(self, model: nn.Module, config: TrainConfig, train: Sequence[Example],
                 eval: Sequence[Example] = (), pad_token_id: int = 0,
                 on_step: Callable[["Trainer", int, dict], None] | None = None) -> None:
        if not train:
            raise ValueError("Trainer needs at least one training example")
        self.config, self.train_examples, self.eval_examples = config, list(train), list(eval)
        self.pad_token_id, self.on_step = pad_token_id, on_step
        self.out_dir = Path(config.out_dir)
        if any(len(e.segments) > 1 for e in self.train_examples + self.eval_examples):
            check_packed_attention(model)
        device = next(model.parameters()).device
        self.accelerator = Accelerator(cpu=device.type == "cpu")
        self.autocast_dtype = self._autocast_dtype()
        self.micro_per_epoch = math.ceil(len(self.train_examples) / config.batch_size)
        self.total_steps = config.steps or max(1, math.ceil(config.epochs * self.micro_per_epoch / config.grad_accum))
        optimizer = build_optimizer(model, config.optimizer, config.lr, config.weight_decay, config.lora_plus_ratio)
        self.model, self.optimizer = self.accelerator.prepare(model, optimizer)
        # The unwrapped optimizer is what schedulers, profilers and state dicts expect.
        self.raw_optimizer = optimizer
        self.scheduler = build_scheduler(optimizer, config.warmup_steps, self.total_steps, config.min_lr_ratio)
        self.step = 0
        self.position = [0, 0]   # (epoch, micro-batch index within it) of the next micro-batch
        self.signals: StopSignals | None = None   # active while train() runs

    def _autocast_dtype(self) -> torch.dtype | None:
        device = self.accelerator.device
        if self.config.precision == "fp32":
            return None
        if device.type == "cuda" and not torch.cuda.is_bf16_supported():
            if self.config.precision == "bf16":
                raise ValueError("precision=bf16 was asked for but this GPU has no bf16 support; use precision=fp32")
            return None
        return torch.bfloat16

    def _autocast(self):
        return torch.autocast(self.accelerator.device.type, dtype=self.autocast_dtype or torch.float32,
                              enabled=self.autocast_dtype is not None)

    # ---- data ----
    def _micro_batches(self) -> Iterator[list[Example]]:
        """Micro-batches from self.position on; each epoch has its own seeded order."""
        size, rank, world = self.config.batch_size, self.accelerator.process_index, self.accelerator.num_processes
        while True:
            epoch, index = self.position
            order = list(range(len(self.train_examples)))
            random.Random(self.config.seed * 100_003 + epoch).shuffle(order)
            while index < self.micro_per_epoch:
                chosen = order[index * size:(index + 1) * size]
                index += 1
                self.position = [epoch, index]
                # Several processes each take every world-th example of the same micro-batch.
                yield [self.train_examples[i] for i in chosen[rank::world]] or [self.train_examples[chosen[0]]]
            self.position = [epoch + 1, 0]

    def _batch(self, examples: Sequence[Example]) -> dict[str, torch.Tensor]:
        return {k: v.to(self.accelerator.device) for k, v in collate(examples, self.pad_token_id).items()}

    def _loss_sum(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        with self._autocast():
            return causal_lm_loss(self.model, batch["input_ids"], batch["labels"], batch.get("attention_mask"),
                                  self.config.chunk_tokens, reduction="sum", position_ids=batch.get("position_ids"))

    # ---- evaluation ----
    @torch.no_grad()
    def evaluate(self) -> dict | None:
        """Token-weighted eval loss and perplexity over the held-out examples (None if there are none)."""
        if not self.eval_examples:
            return None
        was_training = self.model.training
        self.model.eval()
        total, tokens = 0.0, 0
        size = self.config.batch_size
        for start in range(0, len(self.eval_examples), size):
            self._check_stop()
            batch = self._batch(self.eval_examples[start:start + size])
            total += self._loss_sum(batch).item()
            tokens += count_predicted_tokens(batch["labels"])
        self.model.train(was_training)
        loss = total / max(tokens, 1)
        return {"step": self.step, "eval_loss": loss, "eval_ppl": math.exp(min(loss, 50.0))}

    # ---- checkpoints ----
    def save(self) -> Path:
        """Write a checkpoint of the current step (atomically) and return its path."""
        state = {"position": self.position, "total_steps": self.total_steps, "config": asdict(self.config)}
        path = None
        if self.accelerator.is_main_process:
            path = save_checkpoint(self.out_dir / "checkpoints", self.step, self.accelerator.unwrap_model(self.model),
                                   self.raw_optimizer, self.scheduler, state, self.config.keep_checkpoints)
        self.accelerator.wait_for_everyone()
        return path or self.out_dir / "checkpoints" / f"step-{self.step:06d}"

    def resume(self, path: str | Path | None = None) -> Path:
        """Restore the newest intact checkpoint in out_dir/checkpoints (or `path`).

        A newer checkpoint that does not match its manifest (truncated, altered) is renamed
        to `<name>.damaged` with a warning naming it, and the next older one is used.

        Raises:
            CheckpointError: no checkpoint, or none intact (each listed with its problem).
        """
        if path:
            path = Path(path)
        else:
            path, damaged = find_resumable(self.out_dir / "checkpoints")
            for bad, problem in damaged:
                aside = set_aside(bad) if self.accelerator.is_main_process else bad
                print(f"qlowrank: warning: checkpoint {bad} is damaged ({problem}); moved aside to {aside.name}, "
                      f"resuming from {path.name} instead", file=sys.stderr, flush=True)
        state = load_checkpoint(path, self.accelerator.unwrap_model(self.model), self.raw_optimizer, self.scheduler)
        saved = state["config"]
        changed = [f"{k}: {saved.get(k)!r} -> {getattr(self.config, k)!r}" for k in _TRAJECTORY_FIELDS
                   if saved.get(k) != getattr(self.config, k)]
        if changed:
            raise ValueError(f"cannot resume {path}: the run's data order would change ({'; '.join(changed)}); "
                             "resume with the settings it was started with")
        self.step, self.position = state["step"], list(state["position"])
        return path

    # ---- the loop ----
    def train(self, resume: bool | str | Path = False) -> TrainResult:
        """Run to `total_steps`, evaluating, logging and checkpointing on the way.

        Raises:
            NonFiniteLossError: the loss became NaN / inf (the weights are not updated with it,
                and the last checkpoint on disk is the last good state).
            TrainingInterrupted: SIGTERM or SIGINT (Ctrl-C) arrived, or a KeyboardInterrupt was
                raised; a checkpoint of the last completed step was written first.
            OSError: a checkpoint or the adapter could not be written (the earlier checkpoints are intact).
        """
        result = TrainResult()
        if resume:
            result.checkpoint = self.resume(None if resume is True else resume)
        elif self.step == 0:
            # A fresh run draws dropout masks from torch's global generator: seed it, so
            # the same config gives the same run (a resume restores the saved RNG states).
            torch.manual_seed(self.config.seed)
            random.seed(self.config.seed)
        with StopSignals() as self.signals:
            try:
                return self._train(result)
            finally:
                self.signals = None

    def _check_stop(self) -> None:
        """Raise _StopRequested at a safe point once SIGTERM / SIGINT has arrived."""
        if self.signals is not None and self.signals.requested is not None:
            raise _StopRequested

    def _train(self, result: TrainResult) -> TrainResult:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        log = _MetricsLog(self.out_dir, enabled=self.accelerator.is_main_process)
        self.model.train()
        stream = self._micro_batches()
        bar = tqdm(total=self.total_steps, initial=self.step, desc="train", disable=not self.config.progress,
                   dynamic_ncols=True)
        last_good = (self.step, list(self.position), rng_snapshot())
        # Two steps are profiled: the optimizer states only appear during the first update.
        profiler = MemoryProfiler(model=self.model, optimizer=self.raw_optimizer) if self.config.profile_memory else None
        profile_until = self.step + 2
        if profiler is not None:
            profiler.__enter__()
        try:
            if self.step == 0:
                self._log_eval(result, log)
            while self.step < self.total_steps:
                self._check_stop()
                metrics = self._step(stream)
                if profiler is not None and (self.step >= profile_until or self.step >= self.total_steps):
                    profiler = self._finish_profile(profiler, result)
                last_good = (self.step, list(self.position), rng_snapshot())
                result.losses.append(metrics["loss"])
                bar.update(1)
                bar.set_postfix(loss=f"{metrics['loss']:.4f}", lr=f"{metrics['lr']:.2e}",
                                tok_s=f"{metrics['tokens_per_s']:.0f}", peak=f"{metrics['peak_mem_gib']:.2f}GiB")
                if self.step % self.config.log_every == 0:
                    log.write(metrics)
                if self.config.eval_every and self.step % self.config.eval_every == 0 and self.step < self.total_steps:
                    self._log_eval(result, log)
                if self.config.save_every and self.step % self.config.save_every == 0:
                    result.checkpoint = self.save()
                if self.on_step is not None:
                    self.on_step(self, self.step, metrics)
            if result.checkpoint is None or not str(result.checkpoint).endswith(f"step-{self.step:06d}"):
                result.checkpoint = self.save()
            self._log_eval(result, log)
        except (KeyboardInterrupt, _StopRequested) as err:
            if profiler is not None:
                profiler = self._finish_profile(profiler, result)
            # Discard a half-accumulated step: the checkpoint is the last completed one, with
            # the RNG states as they were then (a dropped micro-batch drew dropout masks).
            self.optimizer.zero_grad(set_to_none=True)
            self.step, self.position = last_good[0], list(last_good[1])
            restore_rng(last_good[2])
            path = self.save()
            bar.close()
            log.close()
            print(f"\ninterrupted: checkpoint of step {self.step} written to {path}; continue with --resume", flush=True)
            signum = self.signals.requested if self.signals is not None and self.signals.requested else signal.SIGINT
            raise TrainingInterrupted(signum, self.step, path) from (err if isinstance(err, KeyboardInterrupt) else None)
        except Exception:
            log.close()
            raise
        finally:
            bar.close()
            if profiler is not None:
                self._finish_profile(profiler, result)
        log.close()
        result.final_step = self.step
        if result.memory_table and self.config.progress:
            print(f"memory of the first two training steps (MemoryProfiler):\n{result.memory_table}", flush=True)
        if self.accelerator.is_main_process:
            result.adapter_dir = save_adapter(self.accelerator.unwrap_model(self.model), self.out_dir / "adapter",
                                              format="qlowrank")
        return result

    def _finish_profile(self, profiler: MemoryProfiler, result: TrainResult) -> None:
        profiler.__exit__(None, None, None)
        result.memory, result.memory_table = profiler.summary(), profiler.table()
        if self.accelerator.is_main_process:
            profiler.to_json(self.out_dir / "memory.json", timeline=False)
            atomic_write_text(self.out_dir / "memory.txt", result.memory_table + "\n")

    def _step(self, stream: Iterator[list[Example]]) -> dict:
        start = time.perf_counter()
        chosen = [next(stream) for _ in range(self.config.grad_accum)]
        micro = [self._batch(examples) for examples in chosen]
        # Normalize by the tokens of the whole step, so accumulation equals one big batch.
        n_tokens = max(1, sum(count_predicted_tokens(b["labels"]) for b in micro))
        total = 0.0
        for batch in micro:
            self._check_stop()   # a stop request drops the partial step (train() rolls back)
            loss_sum = self._loss_sum(batch)
            self.accelerator.backward(loss_sum / n_tokens)
            total += loss_sum.item()
        loss = total / n_tokens
        if not math.isfinite(loss):
            self.optimizer.zero_grad(set_to_none=True)
            last = latest_checkpoint(self.out_dir / "checkpoints")
            raise NonFiniteLossError(
                f"the loss is {loss} at step {self.step + 1}; training stopped before applying it. "
                f"Last good checkpoint: {last or 'none written yet'}. Lower --lr, enable clipping "
                "(--max-grad-norm), use precision=fp32, or check the data, then resume."
            )
        grad_norm = None
        if self.config.max_grad_norm:
            params = [p for g in self.optimizer.param_groups for p in g["params"]]
            grad_norm = float(self.accelerator.clip_grad_norm_(params, self.config.max_grad_norm))
        lr = self.optimizer.param_groups[0]["lr"]
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        seconds = time.perf_counter() - start
        real_tokens = sum(len(e.input_ids) for examples in chosen for e in examples)   # padding excluded
        return {"step": self.step, "loss": loss, "lr": lr, "grad_norm": grad_norm, "tokens": real_tokens,
                "tokens_per_s": real_tokens / seconds, "seconds": seconds,
                "peak_mem_gib": _peak_memory_bytes(self.accelerator.device) / 2**30, "epoch": self.position[0]}

    def _log_eval(self, result: TrainResult, log: "_MetricsLog") -> None:
        metrics = self.evaluate()
        if metrics is not None:
            result.evals.append(metrics)
            log.write(metrics)
            if self.config.progress:
                tqdm.write(f"step {self.step}: eval loss {metrics['eval_loss']:.4f}, perplexity {metrics['eval_ppl']:.2f}")


class _StopRequested(Exception):
    """Internal: a stop signal was seen at a safe point (train() turns it into TrainingInterrupted)."""


class _MetricsLog:
    """Appends metric dicts to out_dir/metrics.jsonl, and to TensorBoard when it is installed."""

    def __init__(self, out_dir: Path, enabled: bool = True) -> None:
        self.handle = open(out_dir / "metrics.jsonl", "a") if enabled else None
        self.board = None
        if enabled:
            try:
                from torch.utils.tensorboard import SummaryWriter
                self.board = SummaryWriter(str(out_dir / "tensorboard"))
            except ImportError:  # tensorboard is optional
                pass

    def write(self, metrics: dict) -> None:
        if self.handle is None:
            return
        self.handle.write(json.dumps({**metrics, "time": time.time()}) + "\n")
        self.handle.flush()
        if self.board is not None:
            for key, value in metrics.items():
                if key != "step" and isinstance(value, (int, float)):
                    self.board.add_scalar(key, value, metrics["step"])

    def close(self) -> None:
        if self.handle is not None:
            self.handle.close()
            self.handle = None
        if self.board is not None:
            self.board.close()
