"""The training loop: steps, evaluation, logging, checkpoints, stop signals and resume, on one process or several.

    trainer = Trainer(model, TrainConfig(steps=100, out_dir="out"), train_examples, eval_examples, pad_token_id)
    result = trainer.train()            # trainer.train(resume=True) continues from out/checkpoints

The rooms around the loop: `parallel.py` (the strategy chosen once for the launch: Single,
DDP or FSDP), `batching.py` (which examples each rank trains on), `step.py` (one optimizer
step), `metrics.py` (what is logged and shown), `checkpoint.py`, `optim.py`, `signals.py`.
bf16 autocast is applied by the loop itself (accelerate's mixed-precision state is
process-global and cannot change between two trainers in one process).
"""

from __future__ import annotations

import math
import random
import signal
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from ..adapter import save_adapter
from ..config import RunSpec, TrainConfig
from ..data import Example
from ..model.checkpointing import CHECKPOINT, enable_gradient_checkpointing, trim_heaps_before_backward
from ..model.compile import compile_blocks
from ..model.packing import check_packed_attention
from ..model.patches import patched_blocks
from .checkpoint import (
    Checkpointed,
    find_resumable,
    load_checkpoint,
    restore_rng,
    resume_position,
    rng_snapshot,
    save_checkpoint,
    set_aside,
)
from .metrics import MemoryRecord, RunLog, peak_memory_bytes
from .optim import build_optimizer, build_scheduler
from ..data.pairs import longest_side
from .objective import objective_for
from .parallel import choose_strategy
from .batching import BatchLayout, Sampler
from .signals import StopRequested, StopSignals, TrainingInterrupted
from .step import Padding, Stepper


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


class Trainer:
    """Train a model's LoRA factors on tokenized examples.

    Args:
        model: a model with LoraLinear layers (add_lora or load_model(lora=...)).
        config: the run (`RunSpec`: the Trainer runs its `train` loop and, unless the model's blocks are
            checkpointed already, its checkpointing layout), or only its TrainConfig.
        train: training examples (load_examples / pack_examples).
        eval: held-out examples for eval loss and perplexity (may be empty).
        pad_token_id: id used to pad batches (its labels are always -100).
        on_step: optional callback(trainer, step, metrics) after every optimizer step.
    """

    def __init__(self, model: nn.Module, config: RunSpec | TrainConfig, train: Sequence[Example],
                 eval: Sequence[Example] = (), pad_token_id: int = 0,
                 on_step: Callable[[Trainer, int, dict], None] | None = None) -> None:
        if not train:
            raise ValueError("Trainer needs at least one training example")
        self.spec = config if isinstance(config, RunSpec) else None
        config = config.train if isinstance(config, RunSpec) else config
        self.model, self.config, self.on_step = model, config, on_step
        self.eval_examples, self.out_dir = list(eval), Path(config.out_dir)
        every = list(train) + self.eval_examples
        if any(len(e.segments) > 1 for e in every):
            check_packed_attention(model)
        self.strategy = choose_strategy(next(model.parameters()).device, config.sharding)
        if config.offload_activations and self.strategy.device.type != "cuda":
            raise ValueError(f"offload_activations moves activations from a GPU to host memory; this model is on "
                             f"{self.strategy.device.type}, where they are in host memory already: drop "
                             "--offload-activations")
        self.layout = BatchLayout(config.batch_size, self.world, self.rank, config.grad_accum, fill=config.compile)
        self.sampler = Sampler(train, self.layout, config.seed, config.group_by_length)
        self.total_steps = config.steps or max(1, math.ceil(config.epochs * self.sampler.per_epoch / config.grad_accum))
        if self.spec is not None and self.spec.checkpointing and not patched_blocks(model, CHECKPOINT):
            enable_gradient_checkpointing(model, keep_attention=self.spec.keep_attention,
                                          keep_blocks=self.spec.keep_blocks)   # the spec's layout, unless already set
        trim_heaps_before_backward(model)   # without checkpointing too (checkpointing arranged it already)
        if config.compile:
            compile_blocks(model)
        # self.model stays the user's module; the strategy wraps a module whose forward computes
        # the whole loss, so DDP's and FSDP's hooks see the chunked head too. Built before the
        # optimizer: FSDP replaces the parameters with sharded ones.
        self.objective = objective_for(config)
        self.strategy.wrap(self.objective.loss_module(model, config.chunk_tokens))
        self.optimizer = build_optimizer(model, config.optimizer, config.lr, config.weight_decay, config.lora_plus_ratio)
        self.scheduler = build_scheduler(self.optimizer, config.warmup_steps, self.total_steps, config.min_lr_ratio)
        padding = Padding(pad_token_id, config.pad_multiple, longest_side(every))
        self.stepper = Stepper(self.strategy, config, padding, self.optimizer, self.scheduler, self.objective)
        self.step = 0
        self.signals: StopSignals | None = None   # active while train() runs
        self._last_good = (0, [0, 0], None)       # (step, position, RNG states) of the last completed step

    @property
    def is_main(self) -> bool:
        """True on the process that writes files (rank 0)."""
        return self.strategy.is_main

    @property
    def rank(self) -> int:
        return self.strategy.rank

    @property
    def world(self) -> int:
        return self.strategy.world

    def _step(self, stream: Iterator[list[Example]]) -> dict:
        start = time.perf_counter()
        chosen = [next(stream) for _ in range(self.config.grad_accum)]
        done = self.stepper.step(chosen, self.step + 1, poll=lambda: self.signals.poll(self.world))
        self.step += 1
        seconds = time.perf_counter() - start
        return {"step": self.step, **done, "tokens_per_s": done["tokens"] / seconds, "seconds": seconds,
                "peak_mem_gib": peak_memory_bytes(self.strategy.device) / 2**30, "epoch": self.sampler.position[0]}

    # ---- evaluation ----
    @torch.no_grad()
    def evaluate(self) -> dict | None:
        """Token-weighted eval loss and perplexity over the held-out examples (None if there are none);
        for preference pairs the mean pair loss and eval_rewards/... (objective.py).

        Several processes split every global batch of held-out examples as in training and
        add up their loss sums and token counts.
        """
        if not self.eval_examples:
            return None
        module, size = self.strategy.module, self.layout.global_micro
        was_training = module.training
        module.eval()
        totals, counts = None, None
        for start in range(0, len(self.eval_examples), size):
            batch = self.stepper.batch(self.layout.share(self.eval_examples[start:start + size]))
            sums, seen = self.stepper.loss_sum(batch).reshape(-1).tolist(), self.objective.counts(batch)
            totals = sums if totals is None else [a + b for a, b in zip(totals, sums)]
            counts = seen if counts is None else [a + b for a, b in zip(counts, seen)]
        module.train(was_training)
        summed = self.strategy.sum(totals + counts)
        loss = sum(t / max(c, 1) for t, c in zip(summed[:len(totals)], summed[len(totals):]))
        return {"step": self.step, "eval_loss": loss, **self.objective.eval_metrics(loss, self.strategy.sum)}

    # ---- checkpoints and outputs ----
    def save(self) -> Path:
        """Write a checkpoint of the current step (atomically, by rank 0) and return its path."""
        state = {"position": self.sampler.position, "position_unit": "examples", "total_steps": self.total_steps,
                 "processes": self.world, "global_batch": self.layout.global_batch, "config": asdict(self.config)}
        # Under FSDP every rank takes part in gathering the factors and optimizer states.
        what = Checkpointed(self.model, self.optimizer, self.scheduler, state, self.strategy.adapter_tensors(self.model),
                            self.strategy.optimizer_state(self.optimizer))
        path = self.strategy.on_main(lambda: save_checkpoint(self.out_dir / "checkpoints", self.step, what,
                                                             self.config.keep_checkpoints))
        return path or self.out_dir / "checkpoints" / f"step-{self.step:06d}"

    def save_adapter(self, out_dir: str | Path) -> Path:
        """Write the adapter (rank 0; every rank must call it under FSDP, which gathers the factors)."""
        tensors = self.strategy.adapter_tensors(self.model)
        # The trainer's adapter keeps LoftQ/PiSSA bases that PEFT's format cannot express.
        self.strategy.on_main(lambda: save_adapter(self.model, out_dir, tensors=tensors, format="qlowrank"))
        return Path(out_dir)

    def export_merged(self, out_dir: str | Path, **kwargs) -> dict | None:
        """export_merged of the trained model, written by rank 0 (every rank must call it).

        Under FSDP the ranks gather one block at a time while rank 0 streams it to disk; the
        probe batch (a forward of the unsharded model) is skipped there.
        """
        return self.strategy.export_merged(self.model, out_dir, **kwargs)

    def resume(self, path: str | Path | None = None) -> Path:
        """Restore the newest intact checkpoint in out_dir/checkpoints (or `path`).

        A newer checkpoint that does not match its manifest (truncated, altered) is renamed
        to `<name>.damaged` with a warning naming it, and the next older one is used.

        Raises:
            CheckpointError: no checkpoint, or none intact (each listed with its problem).
        """
        # Rank 0 chooses (and moves damaged ones aside); every rank loads what it chose.
        path = Path(path) if path else Path(self.strategy.from_main(self._newest_intact) or "")
        state = load_checkpoint(path, self.model, self.optimizer, self.scheduler)
        self.strategy.loaded(self.optimizer)
        position = resume_position(path, state, self.config, self.world)
        self.step, self.sampler.position = state["step"], position
        return path

    def _newest_intact(self) -> str:
        path, damaged = find_resumable(self.out_dir / "checkpoints")
        for bad, problem in damaged:
            aside = set_aside(bad)
            print(f"qlowrank: warning: checkpoint {bad} is damaged ({problem}); moved aside to {aside.name}, "
                  f"resuming from {path.name} instead", file=sys.stderr, flush=True)
        return str(path)

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

    def _train(self, result: TrainResult) -> TrainResult:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.strategy.module.train()
        stream = self.sampler.stream()
        c = self.config
        with RunLog(self.out_dir, c, self.is_main, (self.step, self.total_steps)) as log:
            if c.progress or self.world > 1:
                log.say(f"global batch: {c.batch_size} per process x {self.world} process{'es' if self.world > 1 else ''}"
                        f" x {c.grad_accum} accumulation = {self.layout.global_batch} sequences per step"
                        + self.strategy.describe())
            self._last_good = (self.step, list(self.sampler.position), rng_snapshot())
            try:
                # Two steps are profiled: the optimizer states only appear during the first update.
                with self._profiled(result, log):
                    if self.step == 0:
                        self._log_eval(result, log)
                    self._run(stream, result, log, until=min(self.step + 2, self.total_steps))
                self._run(stream, result, log, until=self.total_steps)
            except (KeyboardInterrupt, StopRequested) as err:
                raise self._interrupted(err, log) from (err if isinstance(err, KeyboardInterrupt) else None)
            self._finish(result, log)
        result.final_step = self.step
        if result.memory_table and c.progress:
            log.say(f"memory of the first two training steps (MemoryProfiler):\n{result.memory_table}")
        result.adapter_dir = self.save_adapter(self.out_dir / "adapter")
        return result

    @contextmanager
    def _profiled(self, result: TrainResult, log: RunLog) -> Iterator[None]:
        """Measure the steps inside the block (when profile_memory), record and write what was measured."""
        if not self.config.profile_memory:
            yield
            return
        record = None
        try:
            with self.strategy.memory_profile(self.model, self.optimizer) as record:
                yield
        finally:   # an interrupted or failed run still reports what it measured
            self._keep_memory(result, record, log)

    def _keep_memory(self, result: TrainResult, record: MemoryRecord | None, log: RunLog) -> None:
        if record is not None and record.summary is not None:
            result.memory, result.memory_table = record.summary, record.table
            log.memory(record)

    def _run(self, stream: Iterator[list[Example]], result: TrainResult, log: RunLog, until: int) -> None:
        """Steps up to `until`, each followed by its logging, evaluation, checkpoint and callback."""
        while self.step < until:
            self.signals.poll(self.world, agree=self.strategy.max)
            metrics = self._step(stream)
            self._last_good = (self.step, list(self.sampler.position), rng_snapshot())
            result.losses.append(metrics["loss"])
            log.step(metrics)
            if self.config.eval_every and self.step % self.config.eval_every == 0 and self.step < self.total_steps:
                self._log_eval(result, log)
            if self.config.save_every and self.step % self.config.save_every == 0:
                result.checkpoint = self.save()
            if self.on_step is not None:
                self.on_step(self, self.step, metrics)

    def _finish(self, result: TrainResult, log: RunLog) -> None:
        """After the last step: the end-of-run memory record, the final checkpoint and evaluation."""
        if self.config.profile_memory:
            self._keep_memory(result, self.strategy.final_memory(self.model), log)
        if result.checkpoint is None or not str(result.checkpoint).endswith(f"step-{self.step:06d}"):
            result.checkpoint = self.save()
        self._log_eval(result, log)

    def _interrupted(self, err: BaseException, log: RunLog) -> TrainingInterrupted:
        """Checkpoint the last completed step after a stop request; the exception to raise."""
        # Discard a half-accumulated step: the checkpoint is the last completed one, with
        # the RNG states as they were then (a dropped micro-batch drew dropout masks).
        self.optimizer.zero_grad(set_to_none=True)
        self.step, position, rng = self._last_good
        self.sampler.position = list(position)
        restore_rng(rng)
        path = self.save()
        log.close()
        log.say(f"\ninterrupted: checkpoint of step {self.step} written to {path}; continue with --resume")
        return TrainingInterrupted(self.signals.agreed or signal.SIGINT, self.step, path)

    def _log_eval(self, result: TrainResult, log: RunLog) -> None:
        metrics = self.evaluate()
        if metrics is not None:
            result.evals.append(metrics)
            log.eval(metrics)

