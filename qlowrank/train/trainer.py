"""The training loop: accelerate underneath, LoRA-only optimizer, chunked loss, eval, checkpoints, resume.

    trainer = Trainer(model, TrainConfig(steps=100, out_dir="out"), train_examples, eval_examples, pad_token_id)
    result = trainer.train()            # trainer.train(resume=True) continues from out/checkpoints

`accelerate` places the model and the batches and runs backward / clipping, so the same loop
runs on the CPU, one GPU or several (`torchrun`, `accelerate launch`). bf16 autocast is
applied by the loop itself (accelerate's mixed-precision state is process-global and cannot
change between two trainers in one process).

On several processes (`distributed.py`) every rank takes its own `batch_size` examples of
each global micro-batch; the loss is normalised by the token count of the whole step over
all ranks, so N processes x batch b compute what one process x batch N*b computes. With
`sharding="fsdp"` the frozen base is sharded across ranks (FSDP2), and rank 0 gathers and
writes adapters, checkpoints and exports.
"""

from __future__ import annotations

import json
import math
import random
import resource
import signal
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Sequence

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType
from torch import nn
from tqdm.auto import tqdm

from ..adapter import save_adapter
from ..data import Example, collate, epoch_order
from ..export import export_keys, export_merged
from ..memory import MemoryProfiler
from ..memory.report import atomic_write_text, format_bytes
from ..model.compile import compile_blocks
from ..model.packing import check_packed_attention
from ..nn.loss import DEFAULT_CHUNK_TOKENS, IGNORE_INDEX, count_predicted_tokens
from . import parallel as dist_
from .checkpoint import (
    find_resumable,
    latest_checkpoint,
    load_checkpoint,
    restore_rng,
    rng_snapshot,
    save_checkpoint,
    set_aside,
)
from .optim import build_optimizer, build_scheduler
from .signals import StopSignals, TrainingInterrupted

# Fields that decide which examples each step sees: a resume with other values would not
# continue the same run. batch_size and grad_accum may change with the number of processes
# as long as the global batch (batch_size x processes x grad_accum) stays the same.
_TRAJECTORY_FIELDS = ("seed", "optimizer", "group_by_length")
_FIELD_BEFORE_IT_EXISTED = {"group_by_length": False}   # what older checkpoints ran with


@dataclass
class TrainConfig:
    """How to train. Every field has a CLI flag of the same name (dashes for underscores)."""

    out_dir: str = "qlowrank-out"       # adapter, checkpoints/, metrics.jsonl, memory.json go here
    steps: int | None = None            # optimizer steps; None: run `epochs` epochs
    epochs: float = 1.0                 # used when steps is None
    batch_size: int = 4                 # sequences per micro-batch, per process
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
    sharding: str | None = None         # None (one process, or DDP: every rank holds the model) | "fsdp"
    compile: bool = False               # torch.compile each decoder block (compile.py): 7-15% faster steps on a
                                        # CPU after a one-off compile of ~20 s; pays on runs of many minutes
    group_by_length: bool = True        # batch examples of similar length (data.epoch_order): less padding
    pad_multiple: int = 64              # pad each batch's length up to a multiple of this (at most the run's
                                        # longest example). Every new batch shape makes the CPU's kernels
                                        # (oneDNN) keep memory for it, so RSS grew each step with free
                                        # lengths; 64 bounds the shapes (benchmarks/soak.py: finer steps of
                                        # 24 with grouping let RSS grow 7.5% in 120 steps). 1: no rounding

    def __post_init__(self) -> None:
        if self.precision not in ("bf16", "fp32", "auto"):
            raise ValueError(f"TrainConfig.precision={self.precision!r}: use bf16, fp32 or auto (fp16 needs loss "
                             "scaling and is unusable on CPUs; bf16 does not)")
        for name in ("batch_size", "grad_accum", "log_every", "pad_multiple"):
            if getattr(self, name) < 1:
                raise ValueError(f"TrainConfig.{name}={getattr(self, name)} must be >= 1")
        if self.steps is not None and self.steps < 1:
            raise ValueError(f"TrainConfig.steps={self.steps} must be >= 1 (or None to train for `epochs`)")
        if self.steps is None and self.epochs <= 0:
            raise ValueError(f"TrainConfig.epochs={self.epochs} must be > 0")
        if self.sharding not in (None, *dist_.SHARDINGS):
            raise ValueError(f"TrainConfig.sharding={self.sharding!r}: use None (DDP on several processes) or 'fsdp'")


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
        # Batches are padded at most to the run's longest example: rounding never adds a shape above it.
        self._longest = max(len(e.input_ids) for e in self.train_examples + self.eval_examples)
        if any(len(e.segments) > 1 for e in self.train_examples + self.eval_examples):
            check_packed_attention(model)
        device = next(model.parameters()).device
        self.accelerator = Accelerator(cpu=device.type == "cpu")
        self.world, self.rank = self.accelerator.num_processes, self.accelerator.process_index
        self.is_main = self.accelerator.is_main_process
        # accelerate's own FSDP plugin (`accelerate launch --use_fsdp`) means the same as ours.
        self.sharding = config.sharding or ("fsdp" if self.accelerator.distributed_type == DistributedType.FSDP else None)
        self.autocast_dtype = self._autocast_dtype()
        self.global_micro = config.batch_size * self.world        # sequences per micro-batch over all ranks
        self.global_batch = self.global_micro * config.grad_accum  # sequences per optimizer step
        self._lengths = [len(e.input_ids) for e in self.train_examples]
        self.micro_per_epoch = math.ceil(len(self.train_examples) / self.global_micro)
        self.total_steps = config.steps or max(1, math.ceil(config.epochs * self.micro_per_epoch / config.grad_accum))
        # The model (self.model) stays the user's module; DDP / FSDP wrap a module whose
        # forward computes the whole loss, so their hooks see the chunked head too.
        self.model = model
        if config.compile:
            compile_blocks(model)
        loss_module = dist_.LossModule(model, config.chunk_tokens)
        if self.sharding == "fsdp":
            loss_module.to(self.accelerator.device)
            dist_.shard_base(loss_module, self.accelerator.device)
            optimizer = build_optimizer(model, config.optimizer, config.lr, config.weight_decay, config.lora_plus_ratio)
            self.wrapped, self.optimizer = loss_module, optimizer
        else:
            optimizer = build_optimizer(model, config.optimizer, config.lr, config.weight_decay, config.lora_plus_ratio)
            self.wrapped, self.optimizer = self.accelerator.prepare(loss_module, optimizer)
        # The unwrapped optimizer is what schedulers, profilers and state dicts expect.
        self.raw_optimizer = optimizer
        self.scheduler = build_scheduler(optimizer, config.warmup_steps, self.total_steps, config.min_lr_ratio)
        self.step = 0
        self.position = [0, 0]   # (epoch, examples of that epoch's order already used) of the next micro-batch
        self.signals: StopSignals | None = None   # active while train() runs
        self._stop_signum = 0                     # the signal all ranks agreed to stop on

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
    def _mine(self, chosen: Sequence[Example]) -> list[Example]:
        """This rank's share of a global micro-batch. A rank left without examples (the end of
        an epoch) gets one fully masked example: it must still run forward and backward with
        the others (DDP and FSDP synchronize there), and it adds no loss and no gradient."""
        size = self.config.batch_size
        mine = list(chosen[self.rank * size:(self.rank + 1) * size])
        # With torch.compile a smaller batch is a new shape, compiled again (~20 s): fill it up too.
        fewest = size if self.config.compile else 1
        if len(mine) < fewest:
            first = (mine or chosen)[0]
            masked = Example(first.input_ids, [IGNORE_INDEX] * len(first.input_ids), "padding", first.segments)
            mine += [masked] * (fewest - len(mine))
        return mine

    def _micro_batches(self) -> Iterator[list[Example]]:
        """This rank's micro-batches from self.position on; each epoch has its own seeded order.

        The position counts examples, not micro-batches, so a checkpoint resumes at the same
        example on any number of processes.
        """
        while True:
            epoch, offset = self.position
            # Grouped by the global batch (not the micro-batch), so a resume on another number of
            # processes with the same global batch still sees the same examples in each step.
            order = epoch_order(self._lengths, self.global_batch, random.Random(self.config.seed * 100_003 + epoch),
                                self.config.group_by_length)
            while offset < len(order):
                chosen = [self.train_examples[i] for i in order[offset:offset + self.global_micro]]
                offset += len(chosen)
                self.position = [epoch, offset]
                yield self._mine(chosen)
            self.position = [epoch + 1, 0]

    def _batch(self, examples: Sequence[Example]) -> dict[str, torch.Tensor]:
        batch = collate(examples, self.pad_token_id, self.config.pad_multiple, self._longest)
        return {k: v.to(self.accelerator.device) for k, v in batch.items()}

    def _loss_sum(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        with self._autocast():
            return self.wrapped(**batch)

    # ---- evaluation ----
    @torch.no_grad()
    def evaluate(self) -> dict | None:
        """Token-weighted eval loss and perplexity over the held-out examples (None if there are none).

        Several processes split every global batch of held-out examples as in training and
        add up their loss sums and token counts.
        """
        if not self.eval_examples:
            return None
        was_training = self.wrapped.training
        self.wrapped.eval()
        total, tokens = 0.0, 0
        for start in range(0, len(self.eval_examples), self.global_micro):
            batch = self._batch(self._mine(self.eval_examples[start:start + self.global_micro]))
            total += self._loss_sum(batch).item()
            tokens += count_predicted_tokens(batch["labels"])
        self.wrapped.train(was_training)
        total, tokens = dist_.all_reduce_sum([total, tokens], self.accelerator.device)
        loss = total / max(tokens, 1)
        return {"step": self.step, "eval_loss": loss, "eval_ppl": math.exp(min(loss, 50.0))}

    # ---- checkpoints ----
    def save(self) -> Path:
        """Write a checkpoint of the current step (atomically, by rank 0) and return its path."""
        state = {"position": self.position, "position_unit": "examples", "total_steps": self.total_steps,
                 "processes": self.world, "global_batch": self.global_batch, "config": asdict(self.config)}
        sharded = self.sharding == "fsdp"
        # Under FSDP every rank takes part in gathering the factors and optimizer states.
        adapter_tensors = dist_.full_lora_tensors(self.model) if sharded else None
        optimizer_state = dist_.full_optimizer_state(self.raw_optimizer) if sharded else None
        path = None
        if self.is_main:
            path = save_checkpoint(self.out_dir / "checkpoints", self.step, self.accelerator.unwrap_model(self.model),
                                   self.raw_optimizer,
                                   self.scheduler, state, self.config.keep_checkpoints,
                                   adapter_tensors=adapter_tensors, optimizer_state=optimizer_state)
        dist_.barrier()
        return path or self.out_dir / "checkpoints" / f"step-{self.step:06d}"

    def save_adapter(self, out_dir: str | Path) -> Path:
        """Write the adapter (rank 0; every rank must call it under FSDP, which gathers the factors)."""
        tensors = dist_.full_lora_tensors(self.model) if self.sharding == "fsdp" else None
        if self.is_main:   # the trainer's adapter keeps LoftQ/PiSSA bases that PEFT's format cannot express
            save_adapter(self.accelerator.unwrap_model(self.model), out_dir, tensors=tensors, format="qlowrank")
        dist_.barrier()
        return Path(out_dir)

    def export_merged(self, out_dir: str | Path, **kwargs) -> dict | None:
        """export_merged of the trained model, written by rank 0 (every rank must call it).

        Under FSDP the ranks gather one block at a time while rank 0 streams it to disk; the
        probe batch (a forward of the unsharded model) is skipped there.
        """
        report = None
        if self.sharding == "fsdp" and kwargs.get("format", "safetensors") != "safetensors":
            raise ValueError("under FSDP the merged export is written as safetensors only; export GGUF afterwards "
                             "from the adapter with `qlowrank export --format gguf`")
        if self.sharding == "fsdp":
            gatherer = dist_.UnitGatherer(self.wrapped)
            if self.is_main:
                report = export_merged(self.model, out_dir, before_tensor=gatherer.open, probe=False, **kwargs)
            else:
                for key in export_keys(self.model):
                    gatherer.open(key)
            gatherer.close()
        elif self.is_main:
            report = export_merged(self.model, out_dir, **kwargs)
        dist_.barrier()
        return report

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
            # Rank 0 chooses (and moves damaged ones aside); every rank loads what it chose.
            path = None
            if self.is_main:
                path, damaged = find_resumable(self.out_dir / "checkpoints")
                for bad, problem in damaged:
                    aside = set_aside(bad)
                    print(f"qlowrank: warning: checkpoint {bad} is damaged ({problem}); moved aside to {aside.name}, "
                          f"resuming from {path.name} instead", file=sys.stderr, flush=True)
            path = Path(dist_.gather_objects(str(path) if path else None)[0] or "")
        state = load_checkpoint(path, self.model, self.raw_optimizer, self.scheduler)
        if self.sharding == "fsdp":
            dist_.shard_optimizer_state_(self.raw_optimizer)
        saved = {**_FIELD_BEFORE_IT_EXISTED, **state["config"]}
        changed = [f"{k}: {saved.get(k)!r} -> {getattr(self.config, k)!r}" for k in _TRAJECTORY_FIELDS
                   if saved.get(k) != getattr(self.config, k)]
        saved_global = state.get("global_batch", saved["batch_size"] * saved["grad_accum"])
        if saved_global != self.global_batch:
            changed += [f"{k}: {saved.get(k)!r} -> {getattr(self.config, k)!r}" for k in ("batch_size", "grad_accum")
                        if saved.get(k) != getattr(self.config, k)]
            changed.append(f"global batch (batch_size x processes x grad_accum) {saved_global} -> "
                           f"{self.config.batch_size} x {self.world} x {self.config.grad_accum} = {self.global_batch}")
        if changed:
            raise ValueError(f"cannot resume {path}: the run's data order would change ({'; '.join(changed)}); "
                             "resume with the settings it was started with")
        epoch, where = state["position"]
        if state.get("position_unit") != "examples":   # older checkpoints counted micro-batches of one process
            where *= saved["batch_size"]
        self.step, self.position = state["step"], [epoch, where]
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
            # Each rank draws its own dropout masks; rank 0's equal a single process's.
            torch.manual_seed(self.config.seed + 1_000_003 * self.rank)
            random.seed(self.config.seed)
        with StopSignals() as self.signals:
            try:
                return self._train(result)
            finally:
                self.signals = None

    def _check_stop(self, agree: bool = False) -> None:
        """Raise _StopRequested at a safe point once SIGTERM / SIGINT has arrived.

        On several processes the ranks must stop at the same step (the checkpoint and every
        step synchronize them), and a launcher's signal reaches them at slightly different
        moments: there the request is only acted on where all ranks agree (`agree=True`,
        between steps, one small all-reduce), and stops on whichever rank saw it first.
        """
        local = self.signals.requested if self.signals is not None and self.signals.requested else 0
        if self.world > 1:
            if not agree:
                return
            local = dist_.all_reduce_max(local, self.accelerator.device)
        if local:
            self._stop_signum = int(local)
            raise _StopRequested

    def _train(self, result: TrainResult) -> TrainResult:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        log = _MetricsLog(self.out_dir, enabled=self.is_main)
        self.wrapped.train()
        stream = self._micro_batches()
        if self.is_main and (self.config.progress or self.world > 1):
            c = self.config
            print(f"global batch: {c.batch_size} per process x {self.world} process{'es' if self.world > 1 else ''} x "
                  f"{c.grad_accum} accumulation = {self.global_batch} sequences per step"
                  + (f" (FSDP: the base is sharded over {self.world} ranks)" if self.sharding else ""), flush=True)
        bar = tqdm(total=self.total_steps, initial=self.step, desc="train",
                   disable=not self.config.progress or not self.is_main, dynamic_ncols=True)
        last_good = (self.step, list(self.position), rng_snapshot())
        # Two steps are profiled: the optimizer states only appear during the first update.
        # MemoryProfiler's dispatch mode does not see through FSDP's DTensors: under FSDP each
        # rank records what it holds of the model and its peak RSS instead (_record_fsdp_memory).
        profiler = (MemoryProfiler(model=self.model, optimizer=self.raw_optimizer)
                    if self.config.profile_memory and self.sharding != "fsdp" else None)
        profile_until = self.step + 2
        if profiler is not None:
            profiler.__enter__()
        try:
            if self.step == 0:
                self._log_eval(result, log)
            while self.step < self.total_steps:
                self._check_stop(agree=True)
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
            if self.config.profile_memory and self.sharding == "fsdp":
                self._record_fsdp_memory(result)
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
            if self.is_main:
                print(f"\ninterrupted: checkpoint of step {self.step} written to {path}; continue with --resume", flush=True)
            signum = self._stop_signum or signal.SIGINT
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
        result.adapter_dir = self.save_adapter(self.out_dir / "adapter")
        return result

    def _finish_profile(self, profiler: MemoryProfiler, result: TrainResult) -> None:
        profiler.__exit__(None, None, None)
        result.memory, result.memory_table = profiler.summary(), profiler.table()
        if self.world > 1:
            # Every rank measured itself; rank 0 records them all (a rank's own numbers stay in result.memory).
            ranks = dist_.gather_objects({k: result.memory[k] for k in ("peak_bytes", "rss_peak_bytes", "breakdown")})
            result.memory["ranks"] = ranks
            result.memory_table += "\n" + "\n".join(
                f"rank {r}: peak tensors {format_bytes(m['peak_bytes'])}, peak RSS {format_bytes(m['rss_peak_bytes'])}, "
                f"base weights {format_bytes(m['breakdown'].get('base_weights', 0))}" for r, m in enumerate(ranks))
        if self.is_main:
            atomic_write_text(self.out_dir / "memory.json", json.dumps(result.memory, indent=1) + "\n")
            atomic_write_text(self.out_dir / "memory.txt", result.memory_table + "\n")

    def _record_fsdp_memory(self, result: TrainResult) -> None:
        """Per rank: bytes held of the model (sharded base, whole quant_state, LoRA shard) and peak RSS."""
        mine = {**dist_.local_model_bytes(self.model), "rss_peak_bytes": _peak_memory_bytes(self.accelerator.device)}
        ranks = dist_.gather_objects(mine)
        result.memory = {"sharding": "fsdp", "ranks": ranks}
        result.memory_table = "\n".join(
            f"rank {r}: base weights {format_bytes(m['base_weights'])} (sharded) + quant_state "
            f"{format_bytes(m['quant_state'])} (whole), LoRA {format_bytes(m['trainable_params'])}, "
            f"peak RSS {format_bytes(m['rss_peak_bytes'])}" for r, m in enumerate(ranks))
        if self.is_main:
            atomic_write_text(self.out_dir / "memory.json", json.dumps(result.memory, indent=1) + "\n")
            atomic_write_text(self.out_dir / "memory.txt", result.memory_table + "\n")

    def _step(self, stream: Iterator[list[Example]]) -> dict:
        start = time.perf_counter()
        chosen = [next(stream) for _ in range(self.config.grad_accum)]
        micro = [self._batch(examples) for examples in chosen]
        # Normalize by the tokens of the whole step on all ranks, so N processes and
        # accumulation equal one big batch. DDP and FSDP average gradients over the ranks,
        # hence the factor `world` (each rank's gradient is of its share of the global sum).
        local_tokens = sum(count_predicted_tokens(b["labels"]) for b in micro)
        n_tokens = max(1.0, dist_.all_reduce_sum([local_tokens], self.accelerator.device)[0])
        total = 0.0
        for i, batch in enumerate(micro):
            self._check_stop()   # a stop request drops the partial step (train() rolls back)
            # DDP all-reduces once per step: not after the micro-batches before the last.
            sync = i == len(micro) - 1 or self.sharding == "fsdp"
            with nullcontext() if sync else self.accelerator.no_sync(self.wrapped):
                loss_sum = self._loss_sum(batch)
                self.accelerator.backward(loss_sum * (self.world / n_tokens))
            total += loss_sum.item()
        real_tokens = sum(len(e.input_ids) for examples in chosen for e in examples if e.source != "padding")
        total, real_tokens = dist_.all_reduce_sum([total, real_tokens], self.accelerator.device)
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
            if self.sharding == "fsdp":
                grad_norm = dist_.clip_grad_norm_(params, self.config.max_grad_norm)
            else:
                grad_norm = float(self.accelerator.clip_grad_norm_(params, self.config.max_grad_norm))
        lr = self.optimizer.param_groups[0]["lr"]
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        seconds = time.perf_counter() - start
        real_tokens = int(real_tokens)   # all ranks, padding excluded
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
