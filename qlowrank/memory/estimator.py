"""estimate_memory: predict the peak memory of a (Q)LoRA or full fine-tuning step from a config alone.

The estimate is a simulation, not a table of rules of thumb: the model is built on the meta
device (no weights, so a 175B config takes seconds), quantized layers become stand-ins that
allocate what bitsandbytes allocates (`meta_model.py`), LoRA and checkpointing are applied
with qlowrank's own code, and one training step (forward, loss, backward) runs under the
same `TensorTracker` the profiler uses. So the estimate follows what the code really keeps:
what LoraLinear and bitsandbytes save for backward, checkpoint boundaries and recomputation,
the fp32 upcast of the logits in the loss, dtypes. The optimizer step, which cannot run on
meta tensors, is added from its measured rule (see `optimizer_step_temporaries`).

Steady state is modelled (step 2 and later): optimizer states exist from the start of the
step, gradients appear during backward and are freed by `zero_grad()`.
"""

from __future__ import annotations

import functools
import math
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
import transformers
from torch import nn

from ..config import DEFAULT_CHUNK_TOKENS, LoraConfig, QuantConfig, RunSpec, TrainConfig, parse_dtype, spec_from_keywords
from ..heap import trims_before_backward
from ..model.checkpointing import enable_gradient_checkpointing
from ..model.offload import OffloadActivations
from ..model.surgery import add_lora, disable_lora
from ..nn.layers import is_linear_like, linear_shape
from ..nn.loss import causal_lm_loss, sequence_log_probs
from . import process as process_model
from .expert_facts import expert_facts
from .meta_model import (
    MetaChecks,
    build_meta_model,
    hidden_size_of,
    layer_count,
    load_config,
    replace_quantized_layers,
    use_fused_attention,
)
from .report import breakdown_table, format_bytes
from .sharding import per_rank_breakdown
from .tracker import CATEGORIES, TensorTracker

_BNB_MIN_8BIT_SIZE = 4096   # bitsandbytes keeps 32-bit state for tensors smaller than this
_BNB_BLOCK = 256            # bitsandbytes' 8-bit optimizer block size (one fp32 absmax each)

LossFn = Callable[[nn.Module, torch.Tensor], torch.Tensor]


def default_loss(model: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """The model's own loss with labels = inputs (transformers upcasts the full logits to fp32)."""
    return model(input_ids=tokens, labels=tokens).loss


def chunked_loss_fn(model: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """The trainer's chunked cross-entropy (never materializes the full fp32 logits)."""
    return causal_lm_loss(model, tokens, tokens)


@dataclass
class MemoryEstimate:
    """A predicted training-step peak, by category (the categories of MemoryProfiler)."""

    breakdown: dict[str, int]
    peak_phase: str                       # "forward/backward" or "optimizer": where the peak falls
    settings: dict = field(default_factory=dict)   # the spec's choices as plain values (RunSpec.describe)
    spec: RunSpec | None = None           # the run estimated
    trainable_parameters: int = 0
    total_parameters: int = 0
    facts: process_model.ModelFacts | None = None   # what the CPU process model needs (sizes, source)
    host_offload_bytes: int = 0           # activation offloading: the most saved-tensor bytes waiting on the host
    _simulate: Callable[[int], "MemoryEstimate"] | None = field(default=None, repr=False, compare=False)

    @property
    def total_bytes(self) -> int:
        """Predicted peak bytes of tensor memory in one training step (what MemoryProfiler counts)."""
        return sum(self.breakdown.values())

    @property
    def process_bytes(self) -> int:
        """Predicted peak memory of the whole training process: on a CPU the
        anonymous peak (RssAnon: runtime + tensors + what the heaps keep; the larger of loading
        and training), on CUDA what nvidia-smi shows (context + reserved). `memory/process.py`."""
        return process_model.process_bytes(self.total_bytes, self.settings.get("device", "cpu"), self.facts)

    @property
    def file_backed_bytes(self) -> int:
        """Upper bound of the file-backed pages beside `process_bytes` (CPU: the libraries and the
        memory-mapped checkpoint while loading; reclaimable, so not part of what has to fit)."""
        return process_model.file_backed_bytes(self.settings.get("device", "cpu"), self.facts)

    @property
    def required_bytes(self) -> int:
        """What a budget must hold for this run: `process_bytes` plus the prediction's measured error."""
        return required_bytes(self.process_bytes, self.prediction_margin)

    @property
    def prediction_margin(self) -> float:
        """The headroom to keep above `process_bytes`: the process model's measured error in this
        estimate's regime (`memory/process.py`; CUDA: assumed until measured)."""
        return process_model.prediction_margin(self.settings.get("device", "cpu"), self.facts)

    @property
    def process_breakdown(self) -> dict[str, int]:
        """process_bytes in parts: CUDA: cuda_context, tensors, allocator_reserve; CPU: runtime,
        tensors, temporaries_kept, layer_residue, dequant_kept, int8_kept, expert_holes (they
        sum to training_peak), then training_peak and load_peak."""
        return process_model.process_breakdown(self.total_bytes, self.settings.get("device", "cpu"), self.facts)

    def fits(self, device_bytes: int) -> bool:
        """Whether the run fits in `device_bytes`: its predicted process peak plus the headroom for the
        prediction's error in its regime (`required_bytes`). The one meaning of "fits": the CLI's
        `--gpu`, `--dry-run --max-memory`, the planner and examples/will_it_fit.py all ask this."""
        return fits_budget(self.process_bytes, self.prediction_margin, device_bytes)

    def max_batch_size(self, device_bytes: int, limit: int = 1 << 16) -> int:
        """The largest batch size that `fits` in `device_bytes` (0: not even 1), up to `limit`.

        Doubling, then bisection: the peak grows with the batch (flat while it falls in a full
        fine-tuning's optimizer step), so the answer is the exact boundary in about 2 log2(batch)
        simulations, each cached.
        """
        if self._simulate is None:
            raise RuntimeError("this estimate cannot re-simulate other batch sizes")
        if not self._simulate(1).fits(device_bytes):
            return 0
        low, high = 1, 2
        while high <= limit and self._simulate(high).fits(device_bytes):
            low, high = high, 2 * high
        high = min(high, limit + 1)
        while high - low > 1:
            middle = (low + high) // 2
            low, high = (middle, high) if self._simulate(middle).fits(device_bytes) else (low, middle)
        return low

    def table(self) -> str:
        """The breakdown as a text table, with the settings."""
        s = self.settings
        extra = [("peak in phase", self.peak_phase),
                 *([("offloaded to host", format_bytes(self.host_offload_bytes))] if s.get("offload_activations") else []),
                 ("trainable params", f"{self.trainable_parameters:,}"),
                 ("total params", f"{self.total_parameters:,}")]
        title = (f"estimated peak: {s.get('model', '?')}  bits={s.get('bits')}  r={s.get('r')}  "
                 f"batch={s.get('batch_size')}  seq={s.get('seq_len')}  checkpointing={s.get('gradient_checkpointing')}  "
                 f"optimizer={s.get('optimizer')}  dtype={s.get('dtype')}  device={s.get('device')}")
        return breakdown_table(self.breakdown, title, extra)

    def to_dict(self) -> dict:
        """JSON-ready values."""
        return {"total_bytes": self.total_bytes, "total": format_bytes(self.total_bytes),
                "process_bytes": self.process_bytes, "process": format_bytes(self.process_bytes),
                "process_breakdown": self.process_breakdown, "file_backed_bytes": self.file_backed_bytes,
                "breakdown": dict(self.breakdown), "peak_phase": self.peak_phase, "settings": dict(self.settings),
                "trainable_parameters": self.trainable_parameters, "total_parameters": self.total_parameters,
                "host_offload_bytes": self.host_offload_bytes}


# What `estimate_memory(path, ...)` assumes for what its keywords leave out: one sequence of 2048 tokens
# on a float base, AdamW, checkpointing, the chunked loss (a spec given whole is taken as it is).
KEYWORD_DEFAULTS = RunSpec(quant=QuantConfig(bits=None), lora=None, train=TrainConfig(batch_size=1), seq_len=2048)


def estimate_memory(
    run: RunSpec | str | Path | transformers.PretrainedConfig,
    quant: QuantConfig | None = None,
    lora: LoraConfig | None = None,
    batch_size: int | None = None,
    seq_len: int | None = None,
    *,
    loss_fn: LossFn | None = None,
    quantized_from: torch.dtype | str | None = None,
    **keywords,
) -> MemoryEstimate:
    """Predict the peak memory of one training step of a run, from its model's config alone.

    Args:
        run: the run (`RunSpec`), or its model (a model directory, its config.json, a .gguf file or
            a transformers config) with the rest given as keywords.
        quant, lora, batch_size, seq_len: the run's base, adapters, micro-batch and sequence length,
            also by position (None: the spec's, or for a model a float base, full fine-tuning, 1, 2048).
        loss_fn: any `(model, tokens) -> loss` in place of the run's loss (the trainer's chunked
            cross-entropy at `train.chunk_tokens`, or the model's own loss over full fp32 logits).
        quantized_from: dtype the weights had when quantized (default: the compute dtype);
            bitsandbytes dequantizes a 4-bit weight back to it in backward, so an fp32 source doubles that buffer.
        **keywords: the run's fields, overriding `run`'s (or, for a model, `KEYWORD_DEFAULTS`): any
            RunSpec field (quant, lora, seq_len, packing, checkpointing, keep_blocks, keep_attention,
            processes, device), the TrainConfig fields batch_size, grad_accum, optimizer, objective,
            sharding, compile, offload_activations and chunk_tokens, and the older spellings
            gradient_checkpointing, dtype (the compute dtype) and chunked_loss.

    The estimate is one rank's when `processes` > 1 (FSDP: the parameters split across ranks,
    `memory/sharding.py`). Preference pairs (objective dpo / orpo) are two sequences each, and DPO
    adds its reference forward (the same model with LoRA off, without gradients). Activation
    offloading's host bytes are `host_offload_bytes`, outside `total_bytes`.

    Returns:
        A MemoryEstimate with `total_bytes`, `process_bytes`, `breakdown`, `fits()` and `max_batch_size()`.

    Raises:
        ValueError: a field out of range, a quantized base without LoRA, offloading off CUDA.
        TypeError: a keyword that is not a field of the run.
    """
    given = {"quant": quant, "lora": lora, "batch_size": batch_size, "seq_len": seq_len}
    keywords.update({k: v for k, v in given.items() if v is not None})
    if isinstance(run, RunSpec):
        spec = spec_from_keywords(run.model, base=run, **keywords) if keywords else run
    else:
        spec = spec_from_keywords(run, base=KEYWORD_DEFAULTS, **keywords)
    if spec.model is None:
        raise ValueError("estimate_memory: the run names no model (RunSpec.model): give a model folder, "
                         "config.json, .gguf file or a transformers config")
    config = load_config(spec.model)
    source_dtype = parse_dtype(quantized_from, "quantized_from") if quantized_from is not None else spec.dtype
    run_loss = pair_log_probs_loss(spec.train.chunk_tokens) if spec.pairs else loss_for(spec.train.chunk_tokens)
    step = _Step(spec, loss_fn or run_loss, source_dtype, source_of(spec.model))
    cache: dict[int, MemoryEstimate] = {}

    def simulate(batch: int) -> MemoryEstimate:
        if batch not in cache:
            cache[batch] = _simulate_step(config, step, batch)
            cache[batch]._simulate = simulate
        return cache[batch]

    return simulate(spec.train.batch_size)


def loss_for(chunk_tokens: int | None) -> LossFn:
    """The step's loss for a run's `chunk_tokens`: the trainer's chunked cross-entropy, or (None / 0)
    the model's own loss over full fp32 logits (what the estimate and the profiler both run)."""
    if not chunk_tokens:
        return default_loss
    if chunk_tokens == DEFAULT_CHUNK_TOKENS:
        return chunked_loss_fn
    return functools.partial(_chunked_loss, chunk_tokens=chunk_tokens)


def pair_log_probs_loss(chunk_tokens: int | None) -> LossFn:
    """What a preference step computes for its loss: each sequence's summed log-prob of its tokens
    (`nn.loss.sequence_log_probs`, the DPO / ORPO trainer's path, chunked at `chunk_tokens`)."""
    def loss(model: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
        return sequence_log_probs(model, tokens, tokens, None, chunk_tokens)[0].sum()
    return loss


def _chunked_loss(model: nn.Module, tokens: torch.Tensor, chunk_tokens: int) -> torch.Tensor:
    return causal_lm_loss(model, tokens, tokens, chunk_tokens=chunk_tokens)


def required_bytes(process_bytes: int, margin: float) -> int:
    """A budget that holds a predicted process peak with `margin` (the prediction's relative error) on top."""
    return math.ceil(process_bytes * (1 + margin))


def fits_budget(process_bytes: int, margin: float, budget: int) -> bool:
    """Whether a predicted process peak, with its margin, fits `budget`: what every "fits" asks."""
    return required_bytes(process_bytes, margin) <= int(budget)


@dataclass(frozen=True)
class _Step:
    """The spec as `estimate_memory` resolved it: the loss it runs, the weights' source dtype and files."""

    spec: RunSpec
    loss_fn: LossFn
    source_dtype: torch.dtype
    source: tuple[str, int | None]


def source_of(path_or_config: str | Path | transformers.PretrainedConfig) -> tuple[str, int | None]:
    """("gguf" or "safetensors", bytes of the files `load_model` maps); None when there are no
    weight files (a config alone): the process model then assumes a checkpoint in the compute dtype."""
    if isinstance(path_or_config, transformers.PretrainedConfig):
        return "safetensors", None
    path = Path(path_or_config)
    if path.suffix == ".gguf":
        return "gguf", path.stat().st_size
    folder = path if path.is_dir() else path.parent
    sizes = [f.stat().st_size for f in folder.glob("*.safetensors")]
    return "safetensors", (sum(sizes) if sizes else None)


def _model_facts(model: nn.Module, config, step: _Step, sequences: int) -> dict:
    """Shapes and sizes the process model needs, read off the meta model before quantization and LoRA."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    shapes = [linear_shape(m) for m in model.modules() if is_linear_like(m) and m is not head]
    base_params = sum(p.numel() for p in model.parameters())
    kind, size = step.source
    spec = step.spec
    hidden = hidden_size_of(config)
    return dict(linear_params=sum(o * i for o, i in shapes), base_params=base_params, bits=spec.quant.bits,
                source=kind, source_bytes=size if size is not None else base_params * spec.dtype.itemsize,
                largest_linear=max((o * i for o, i in shapes), default=0),
                heap_dequant_params=process_model.heap_dequantized(shapes), layers=layer_count(config),
                hidden_tokens=sequences * spec.seq_len * hidden,
                # The peak falls in the first backward: trimmed only if that block trims first, i.e. when no
                # block keeps its activations (kept blocks run their backward before any trim)
                heap_trimmed=spec.checkpointing and not spec.keep_blocks and trims_before_backward(hidden),
                blocks_trim=trims_before_backward(hidden),
                **expert_facts(model, sequences * spec.seq_len, spec.quant.bits, spec.dtype))


def _prepare(config, step: _Step, sequences: int) -> tuple[nn.Module, dict, list[torch.Tensor]]:
    """The meta model as it trains (quantized stand-ins, LoRA, checkpointing), its facts, its trainables."""
    spec = step.spec
    model = build_meta_model(config, spec.dtype)
    use_fused_attention(model, spec.device_type)
    facts = _model_facts(model, config, step, sequences)
    if spec.quant.bits is not None:
        replace_quantized_layers(model, spec.quant, spec.device_type, step.source_dtype)
    if spec.lora is not None:
        add_lora(model, spec.lora)
    else:
        for param in model.parameters():
            param.requires_grad_(True)
    if spec.checkpointing:
        enable_gradient_checkpointing(model, keep_attention=spec.keep_attention, keep_blocks=spec.keep_blocks)
    return model, facts, [p for p in model.parameters() if p.requires_grad]


def _run_pass(model: nn.Module, step: _Step, sequences: int,
              trainable: list[torch.Tensor]) -> tuple[TensorTracker, list[torch.Tensor], int]:
    """One forward and backward on meta tensors under the tracker (after DPO's reference forward), the
    optimizer states (live from the start; the caller keeps them alive, or the tracker stops counting
    them), and the host bytes of offloaded activations at most."""
    spec = step.spec
    offloading = spec.train.offload_activations
    tokens = torch.zeros(sequences, spec.seq_len, dtype=torch.long, device="meta")
    states = optimizer_states(trainable, spec.train.optimizer)   # made outside the tracker, added as state
    tracker = TensorTracker(model, None, devices=["meta"])
    # the run's own offloading hooks, on meta: packed tensors leave the device, unpacking allocates anew
    offload = OffloadActivations("meta") if offloading else nullcontext()
    with tracker, MetaChecks():
        for tensor in states:
            tracker.add(tensor, "optimizer_states")
        tracker.set_phase("forward")
        if spec.train.objective == "dpo":   # the reference: LoRA off, no gradients, before the policy's pass
            with torch.no_grad(), disable_lora(model):
                reference = step.loss_fn(model, tokens)
            del reference
        with offload:
            loss = step.loss_fn(model, tokens)
        loss.backward()
        del loss
    return tracker, states, offload.host_peak_bytes if offloading else 0


def _in_pass_peak(tracker: TensorTracker, spec: RunSpec, sequences: int, trainable: list[torch.Tensor]) -> dict[str, int]:
    """The forward/backward peak, with what accumulation and packing add to it.

    With several micro-batches per step every trainable parameter's gradient is alive from the
    second micro-batch's forward on. Packing hands transformers position ids that restart, from
    which it builds a block-diagonal (batch, 1, seq, seq) boolean mask that lives through the pass.
    """
    peak = dict(tracker.state.peak_breakdown)
    if spec.train.grad_accum > 1:
        grads = sum(p.numel() * p.element_size() for p in trainable)
        peak["gradients"] = max(peak["gradients"], grads)
    if spec.packing:
        peak["activations"] += sequences * spec.seq_len * spec.seq_len
    return peak


def _simulate_step(config, step: _Step, batch: int) -> MemoryEstimate:
    spec = step.spec if batch == step.spec.train.batch_size else step.spec.with_train(batch_size=batch)
    sequences = batch * (2 if spec.pairs else 1)   # a pair is its chosen and its rejected sequence
    model, facts, trainable = _prepare(config, step, sequences)
    tracker, states, host_offload = _run_pass(model, step, sequences, trainable)
    after_backward = dict(tracker.state.live)  # weights, LoRA, gradients, optimizer states
    del states
    step_temp = optimizer_step_temporaries(trainable, spec.train.optimizer, spec.device_type)
    # One rank's share of each candidate peak (the same figures on one process).
    sharding = spec.train.sharding
    at_step = per_rank_breakdown(model, {**after_backward, "temporaries": after_backward["temporaries"] + step_temp},
                                 spec.processes, sharding, "optimizer")
    in_pass = per_rank_breakdown(model, _in_pass_peak(tracker, spec, sequences, trainable), spec.processes,
                                 sharding, "forward/backward")
    if sum(at_step.values()) > sum(in_pass.values()):
        breakdown, phase = at_step, "optimizer"
    else:
        breakdown, phase = in_pass, "forward/backward"
    owners = {id(p): (m, p) for m in model.modules() for p in m.parameters(recurse=False)}  # tied weights once
    total_params = sum(_true_numel(m, p) for m, p in owners.values())
    total_params += sum(m.weight_count() for m in model.modules() if hasattr(m, "weight_count"))  # expert stacks
    facts = process_model.ModelFacts(base_bytes=int(breakdown["base_weights"]),
                                     temporary_bytes=int(tracker.state.category_peaks["temporaries"]), **facts)
    return MemoryEstimate(breakdown={c: int(breakdown[c]) for c in CATEGORIES}, peak_phase=phase,
                          settings={**spec.describe(), "source": step.source[0]}, spec=spec,
                          trainable_parameters=sum(p.numel() for p in trainable), total_parameters=total_params,
                          host_offload_bytes=host_offload, facts=facts)


def _true_numel(module: nn.Module, param: torch.Tensor) -> int:
    # a stand-in's packed weight holds out*in weights whatever its storage shape
    if getattr(module, "bits", None) in (4, 8) and param is getattr(module, "weight", None):
        return module.out_features * module.in_features
    return param.numel()


def optimizer_states(trainable: list[torch.Tensor], optimizer: str) -> list[torch.Tensor]:
    """Meta tensors shaped like the steady-state optimizer state of `trainable`.

    torch AdamW: exp_avg and exp_avg_sq in the parameter's dtype, plus a 0-d fp32 step.
    bitsandbytes AdamW8bit: two uint8 states and one fp32 absmax per 256 values each (plus
    two 256-entry fp32 code books), 32-bit states below 4096 elements. SGD: nothing.
    """
    states: list[torch.Tensor] = []
    for param in trainable:
        def like(dtype: torch.dtype, n: int | None = None) -> torch.Tensor:
            return torch.empty(param.numel() if n is None else n, dtype=dtype, device="meta")
        if optimizer == "adamw":
            states += [like(param.dtype), like(param.dtype), torch.empty((), dtype=torch.float32, device="meta")]
        elif optimizer in ("adamw8bit", "paged_adamw8bit"):   # paging moves the same bytes under pressure
            if param.numel() >= _BNB_MIN_8BIT_SIZE:
                blocks = -(-param.numel() // _BNB_BLOCK)
                states += [like(torch.uint8), like(torch.uint8), like(torch.float32, blocks),
                           like(torch.float32, blocks), like(torch.float32, 256), like(torch.float32, 256)]
            else:
                states += [like(torch.float32), like(torch.float32)]
    return states


def optimizer_step_temporaries(trainable: list[torch.Tensor], optimizer: str, device: str) -> int:
    """Scratch bytes alive at the worst moment of `optimizer.step()`.

    torch AdamW on CPU updates one tensor at a time and builds `sqrt(v) / c` (two tensors of
    the parameter's size) for the largest parameter; on CUDA the default foreach path builds
    the denominator for all parameters at once (one copy of all states' size). bitsandbytes'
    8-bit step works block-wise in place; SGD without momentum adds in place.
    """
    if not trainable or optimizer in ("sgd", "adamw8bit", "paged_adamw8bit"):
        return 0
    sizes = [p.numel() * p.element_size() for p in trainable]
    return sum(sizes) if device == "cuda" else 2 * max(sizes)
