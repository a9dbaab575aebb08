"""Step time from a few timed blocks: one decoder block of the model's own shapes, timed on this machine.

The planner needs to know which of two runs that fit is faster: more sequences per
micro-batch (each 4-bit weight is dequantized once per micro-batch, whatever its size, and
larger matmuls run nearer the peak rate) or fewer recomputed blocks (a checkpointed block
runs its forward twice). FLOP counts alone cannot rank those: on a CPU the dequantization,
the elementwise ops and the matmul rate at a given token count are what decide, and they
depend on the machine. So the time model is calibrated: one real decoder block (random
weights, quantized and adapted exactly as the run will be) runs forward + backward under
the run's autocast, three ways (not checkpointed, checkpointed with attention recomputed,
checkpointed with attention kept), at every candidate micro-batch; the output head and the
chunked loss at the full vocabulary are timed apart, and the optimizer step on a tensor of
the trainable size. A step is then assembled from those parts:

    step = accum x (kept x plain + (layers - kept) x checkpointed + head) + optimizer

For the question whether to compile (`compiling.py`), `time_compiled` times the same block
compiled (regional torch.compile, as `--compile` runs it) and what its first call costs.
That compile also fills inductor's on-disk cache with the block's kernels, which the run
then reuses.

What it leaves out: the embedding lookup, the final norm, and Python overhead between
blocks (each a few percent at most on the models measured; benchmarks/planner.py reports
predicted against measured step times).
"""

from __future__ import annotations

import time
from contextlib import nullcontext
from dataclasses import dataclass, field

import torch
import transformers
from torch import nn

from ..config import DEFAULT_CHUNK_TOKENS, LoraConfig, QuantConfig, RunSpec
from ..memory.meta_model import hidden_size_of, layer_count, with_depth
from ..model.checkpointing import (
    disable_gradient_checkpointing,
    enable_gradient_checkpointing,
    trim_heaps_before_backward,
)
from ..model.compile import compile_blocks
from ..model.offload import OffloadActivations
from ..model.surgery import random_adapted_model
from ..nn.loss import causal_lm_loss, chunked_cross_entropy

# The stand-in model's vocabulary: small enough that its head costs nothing next to a block
# (the real head is timed apart, at the real vocabulary).
STAND_IN_VOCAB = 256
# Block modes, as timed; a mode + OFFLOADED runs its forward under activation offloading (CUDA).
PLAIN, RECOMPUTE, KEEP_ATTENTION = "plain", "recompute", "keep_attention"
OFFLOADED = "+offload"


@dataclass(frozen=True)
class MicroBatchTimes:
    """Seconds of one micro-batch's parts: one block per mode, and the head with the loss."""

    block: dict[str, float]   # PLAIN / RECOMPUTE / KEEP_ATTENTION -> forward + backward seconds of one block
    head: float               # output head + chunked loss, forward + backward, whole micro-batch


@dataclass(frozen=True)
class CompiledTimes:
    """One micro-batch's block timed compiled: seconds per mode, and the one-off compile."""

    micro_batch: int
    block: dict[str, float]   # mode -> forward + backward seconds of one compiled block
    compile_seconds: float    # the first calls less the compiled time: each mode, with and without input grad


@dataclass
class StepTimes:
    """The calibrated step-time model of one run shape (layers, sequence length)."""

    layers: int
    seq: int
    optimizer: float = 0.0
    micro: dict[int, MicroBatchTimes] = field(default_factory=dict)
    compiled: CompiledTimes | None = None

    def step_seconds(self, micro_batch: int, grad_accum: int, checkpointing: bool, keep_blocks: int,
                     keep_attention: bool, compiled: bool = False, offload: bool = False) -> float:
        """Predicted seconds of one optimizer step (`micro_batch` must have been timed, in the offloaded
        modes too for `offload`; with `compiled`, compiled at this micro-batch too, by `time_compiled`)."""
        times = self.micro[micro_batch]
        block = times.block
        if compiled:
            if self.compiled is None or self.compiled.micro_batch != micro_batch:
                raise ValueError(f"micro-batch {micro_batch} was not timed compiled")
            block = {**block, **self.compiled.block}
        kept = self.layers if not checkpointing else keep_blocks
        suffix = OFFLOADED if offload else ""
        mode = (KEEP_ATTENTION if keep_attention else RECOMPUTE) + suffix
        whole = kept * block[PLAIN + suffix] if kept else 0.0
        recomputed = (self.layers - kept) * block[mode] if kept < self.layers else 0.0
        one = whole + recomputed + times.head
        return grad_accum * one + self.optimizer


def stand_in_config(config: transformers.PretrainedConfig) -> transformers.PretrainedConfig:
    """The model's config with one decoder layer and a STAND_IN_VOCAB vocabulary (special token ids dropped)."""
    small = with_depth(config, 1)
    small.vocab_size = STAND_IN_VOCAB
    for name in ("pad_token_id", "bos_token_id", "eos_token_id"):
        if isinstance(getattr(small, name, None), int) and getattr(small, name) >= STAND_IN_VOCAB:
            setattr(small, name, None)
    small.use_cache = False
    return small


def _seconds(run) -> float:
    started = time.perf_counter()
    run()
    return time.perf_counter() - started


def best_of(run, repeats: int) -> float:
    """The fastest of `repeats` timed runs after one untimed (kernel creation, allocator warm-up)."""
    run()
    return min(_seconds(run) for _ in range(repeats))


def _autocast(device: torch.device, dtype: torch.dtype | None):
    if dtype is None:
        return nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_blocks(
    config: transformers.PretrainedConfig,
    spec: RunSpec,
    micro_batches: dict[int, set[str]],
    trainable_parameters: int = 0,
    repeats: int = 2,
    progress=None,
) -> StepTimes:
    """Time one decoder block of `config` (and its head, and the optimizer step) on this machine, as `spec` runs it.

    Args:
        config: the model's config (its widths; the layer count is read from it).
        spec: the run: its base, adapters, sequence length, compute dtype, device and loss chunk.
        micro_batches: micro-batch -> the block modes to time at it (PLAIN, RECOMPUTE, KEEP_ATTENTION,
            each also + OFFLOADED).
        trainable_parameters: the run's trainable parameter count (the optimizer step is timed on as many).
        repeats: timed runs per measurement (the fastest counts), after one untimed.
        progress: called with a short text before each measurement (a progress bar's description).

    Returns:
        StepTimes for the timed micro-batches.
    """
    device, dtype, autocast_dtype, chunk_tokens = _run_shape(spec)
    seq = spec.seq_len
    times = StepTimes(layers=layer_count(config), seq=seq)
    model = stand_in_model(config, spec.quant, spec.lora, device, dtype)
    generator = torch.Generator().manual_seed(0)
    hidden = hidden_size_of(config)
    head = torch.randn(int(config.vocab_size), hidden, generator=generator).to(device, dtype)
    for micro_batch, modes in sorted(micro_batches.items()):
        block = {}
        for mode in sorted(modes):
            if progress:
                progress(f"timing a block: micro-batch {micro_batch}, {mode.replace('_', ' ')}")
            _set_mode(model, mode)
            block_step = _block_step(model, micro_batch, seq, device, autocast_dtype, chunk_tokens, generator,
                                     offload=mode.endswith(OFFLOADED))
            block[mode] = best_of(block_step, repeats)
        disable_gradient_checkpointing(model)
        states = torch.randn(micro_batch, seq, hidden, generator=generator).to(device, dtype).requires_grad_(True)
        labels = torch.randint(0, int(config.vocab_size), (micro_batch, seq), generator=generator).to(device)

        def head_step(states=states, labels=labels):
            with _autocast(device, autocast_dtype):
                loss = chunked_cross_entropy(states, head, labels, chunk_tokens=chunk_tokens or DEFAULT_CHUNK_TOKENS)
            loss.backward()
            states.grad = None
            _sync(device)

        if progress:
            progress(f"timing the head and loss: micro-batch {micro_batch}")
        times.micro[micro_batch] = MicroBatchTimes(block=block, head=best_of(head_step, repeats))
    times.optimizer = _optimizer_seconds(max(1, trainable_parameters), device, repeats)
    return times


def time_compiled(
    config: transformers.PretrainedConfig,
    spec: RunSpec,
    micro_batch: int,
    modes: set[str],
    repeats: int = 2,
    progress=None,
) -> CompiledTimes:
    """Time one decoder block of `config` compiled (`compile_blocks`, as `--compile` runs it) in each of
    `modes` at `micro_batch`, and what compiling it costs (arguments as for `time_blocks`)."""
    device, dtype, autocast_dtype, chunk_tokens = _run_shape(spec)
    seq = spec.seq_len
    generator = torch.Generator().manual_seed(0)
    block, compile_seconds = {}, 0.0
    for mode in sorted(modes):
        if progress:
            progress(f"compiling a block: micro-batch {micro_batch}, {mode.replace('_', ' ')}")
        model = stand_in_model(config, spec.quant, spec.lora, device, dtype)   # a fresh one: compile after checkpointing
        _set_mode(model, mode)
        compile_blocks(model)
        block_step = _block_step(model, micro_batch, seq, device, autocast_dtype, chunk_tokens, generator,
                                 offload=mode.endswith(OFFLOADED))
        first = _seconds(block_step)   # compiles (inductor's cache makes a repeat cheaper)
        block[mode] = best_of(block_step, repeats)
        # The run's first block gets an input that does not require grad: dynamo compiles it apart
        model.disable_input_require_grads()
        first_block = _seconds(block_step)
        compile_seconds += max(0.0, first - block[mode]) + max(0.0, first_block - block[mode])
        del model, block_step
    return CompiledTimes(micro_batch=micro_batch, block=block, compile_seconds=compile_seconds)


def _run_shape(spec: RunSpec) -> tuple[torch.device, torch.dtype, torch.dtype | None, int | None]:
    """(device, dtype, autocast dtype or None for fp32, loss chunk) of the run: how its blocks compute."""
    dtype = spec.dtype
    return torch.device(spec.device_type), dtype, None if dtype == torch.float32 else dtype, spec.train.chunk_tokens


def stand_in_model(config: transformers.PretrainedConfig, quant: QuantConfig, lora: LoraConfig,
                   device: torch.device, dtype: torch.dtype) -> nn.Module:
    """One decoder block of `config`'s widths, quantized and adapted as the run will be, in training mode."""
    model = random_adapted_model(stand_in_config(config), quant, lora, dtype, device)
    # In the real model every block but the first gets an input that requires grad, so its frozen
    # matmuls compute input gradients in backward; the stand-in's only block must do the same.
    model.enable_input_require_grads()
    trim_heaps_before_backward(model)   # as the Trainer does: its cost is part of the step
    model.train()
    return model


def _set_mode(model: nn.Module, mode: str) -> None:
    disable_gradient_checkpointing(model)
    mode = mode.removesuffix(OFFLOADED)
    if mode != PLAIN:
        enable_gradient_checkpointing(model, keep_attention=mode == KEEP_ATTENTION)


def _block_step(model, micro_batch, seq, device, autocast_dtype, chunk_tokens, generator, offload: bool = False):
    tokens = torch.randint(0, STAND_IN_VOCAB, (micro_batch, seq), generator=generator).to(device)

    def block_step():
        with _autocast(device, autocast_dtype), OffloadActivations(device.type) if offload else nullcontext():
            loss = causal_lm_loss(model, tokens, tokens, chunk_tokens=chunk_tokens)
        loss.backward()
        model.zero_grad(set_to_none=True)
        _sync(device)

    return block_step


def _optimizer_seconds(parameters: int, device: torch.device, repeats: int) -> float:
    weight = nn.Parameter(torch.zeros(parameters, device=device))
    weight.grad = torch.full_like(weight, 1e-3)
    optimizer = torch.optim.AdamW([weight], lr=1e-4)

    def step():
        optimizer.step()
        _sync(device)

    return best_of(step, repeats)
