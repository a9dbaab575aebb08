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

from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
import transformers
from torch import nn

from ..config import (
    ESTIMATE_OPTIMIZERS,
    SHARDINGS,
    LoraConfig,
    QuantConfig,
    parse_dtype,
)
from ..heap import trims_before_backward
from ..model.checkpointing import enable_gradient_checkpointing
from ..model.offload import OffloadActivations
from ..model.surgery import add_lora
from ..nn.layers import is_linear_like, linear_shape
from . import process as process_model
from .meta_model import (
    build_meta_model,
    fused_attention,
    hidden_size_of,
    layer_count,
    load_config,
    replace_quantized_layers,
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
    try:
        from ..nn.loss import causal_lm_loss
    except ImportError as err:
        raise ImportError(f"chunked_loss=True needs qlowrank.train.loss.causal_lm_loss ({err})") from None
    return causal_lm_loss(model, tokens, tokens)


@dataclass
class MemoryEstimate:
    """A predicted training-step peak, by category (the categories of MemoryProfiler)."""

    breakdown: dict[str, int]
    peak_phase: str                       # "forward/backward" or "optimizer": where the peak falls
    settings: dict = field(default_factory=dict)
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
        """Predicted peak memory of the whole training process that has to fit: on a CPU the
        anonymous peak (RssAnon: runtime + tensors + what the heaps keep; the larger of loading
        and training), on CUDA what nvidia-smi shows (context + reserved). `memory/process.py`."""
        return process_model.process_bytes(self.total_bytes, self.settings.get("device", "cpu"), self.facts)

    @property
    def file_backed_bytes(self) -> int:
        """Upper bound of the file-backed pages beside `process_bytes` (CPU: the libraries and the
        memory-mapped checkpoint while loading; reclaimable, so not part of what has to fit)."""
        return process_model.file_backed_bytes(self.settings.get("device", "cpu"), self.facts)

    @property
    def prediction_margin(self) -> float:
        """The headroom to keep above `process_bytes`: the process model's measured error in this
        estimate's regime (`memory/process.py`; CUDA: assumed until measured)."""
        return process_model.prediction_margin(self.settings.get("device", "cpu"), self.facts)

    @property
    def process_breakdown(self) -> dict[str, int]:
        """process_bytes in parts: CUDA: cuda_context, tensors, allocator_reserve; CPU: runtime,
        tensors, temporaries_kept, layer_residue, dequant_kept, int8_kept (they
        sum to training_peak), then training_peak and load_peak."""
        return process_model.process_breakdown(self.total_bytes, self.settings.get("device", "cpu"), self.facts)

    def _training_process_bytes(self) -> int:
        # the part of process_bytes that grows with the batch (loading does not)
        return self.process_breakdown.get("training_peak", self.process_bytes)

    def at_batch(self, batch_size: int) -> "MemoryEstimate":
        """The same estimate at another batch size (simulated once, then cached)."""
        if self._simulate is None:
            raise RuntimeError("this estimate cannot re-simulate other batch sizes")
        return self._simulate(batch_size)

    def fits(self, device_bytes: int) -> bool:
        """True when the predicted process peak (`process_bytes`) fits in `device_bytes`."""
        return self.process_bytes <= int(device_bytes)

    def max_batch_size(self, device_bytes: int, limit: int = 1 << 16) -> int:
        """The largest batch size whose predicted process peak fits in `device_bytes` (0: not even 1).

        Solved from the linear trend of batch 1 and 2, then checked by simulating the answer.
        """
        if self._simulate is None:
            raise RuntimeError("this estimate cannot re-simulate other batch sizes")
        if not self._simulate(1).fits(device_bytes):
            return 0
        one, two = self._simulate(1)._training_process_bytes(), self._simulate(2)._training_process_bytes()
        per_sample = max(two - one, 1)
        batch = min(limit, 1 + max(0, int(device_bytes) - one) // per_sample)
        while batch > 1 and not self._simulate(batch).fits(device_bytes):
            batch -= max(1, batch // 50)  # the trend is near-linear: a few small steps back suffice
        return max(batch, 1)

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


def estimate_memory(
    path_or_config: str | Path | transformers.PretrainedConfig,
    quant: QuantConfig | None = None,
    lora: LoraConfig | None = None,
    batch_size: int = 1,
    seq_len: int = 2048,
    gradient_checkpointing: bool = True,
    optimizer: str = "adamw",
    dtype: torch.dtype | str = torch.bfloat16,
    device: str | None = None,
    chunked_loss: bool = True,
    loss_fn: LossFn | None = None,
    quantized_from: torch.dtype | str | None = None,
    processes: int = 1,
    sharding: str | None = None,
    grad_accum: int = 1,
    packing: bool = False,
    keep_blocks: int = 0,
    keep_attention: bool | None = None,
    offload_activations: bool = False,
) -> MemoryEstimate:
    """Predict the peak memory of one training step, from a config alone.

    Args:
        path_or_config: a model directory, its config.json, a .gguf file, or a transformers config.
        quant: how the base is stored (None or bits=None: unquantized, in `dtype`).
        lora: the adapters; None with an unquantized base means full fine-tuning.
        batch_size: sequences per step (per process when processes > 1).
        seq_len: tokens per sequence.
        gradient_checkpointing: recompute each block in backward (qlowrank's checkpointing).
        optimizer: "adamw" (fp32 states), "adamw8bit" (bitsandbytes block-wise) or "sgd" (no state).
        dtype: dtype of unquantized weights (embeddings, norms, head, a float base) and activations.
        device: "cuda" or "cpu": whose kernels to imitate (default: cuda if present, else cpu).
        chunked_loss: the trainer's chunked cross-entropy (default: what `qlowrank train` runs);
            False: the model's own loss over the full fp32 logits.
        loss_fn: any `(model, tokens) -> loss`, overriding the two above.
        quantized_from: dtype the weights had when quantized (default `dtype`); bitsandbytes
            dequantizes a 4-bit weight back to it in backward, so an fp32 source doubles that buffer.
        processes: training processes (ranks); the estimate is then one rank's peak.
        sharding: None (each rank holds the whole model: DDP) or "fsdp" (parameters split
            across ranks, as `TrainConfig(sharding="fsdp")` does; see `memory/sharding.py`).
        grad_accum: micro-batches per optimizer step: above 1 every trainable parameter's gradient
            is alive through the later micro-batches' passes.
        packing: examples packed into --seq windows: the same shapes plus the block-diagonal
            (batch, 1, seq, seq) boolean attention mask transformers builds from the position ids.
        keep_blocks: under checkpointing, how many of the last blocks keep their activations
            (partial checkpointing, as `enable_gradient_checkpointing(keep_blocks=...)`).
        keep_attention: under checkpointing, keep each block's attention output (None: from
            KEEP_ATTENTION_MIN_SEQ tokens on, as `enable_gradient_checkpointing` decides).
        offload_activations: (CUDA) tensors saved for backward wait in host memory
            (`model.offload.OffloadActivations`, `--offload-activations`); what the host then holds
            is `host_offload_bytes`, outside `total_bytes`.

    Returns:
        A MemoryEstimate with `total_bytes`, `breakdown`, `fits()` and `max_batch_size()`.

    Raises:
        ValueError: an unknown optimizer, a quantized base without LoRA, or non-positive sizes.
    """
    quant = quant or QuantConfig(bits=None)
    dtype = parse_dtype(dtype, "estimate_memory dtype")
    source_dtype = parse_dtype(quantized_from, "quantized_from") if quantized_from is not None else dtype
    if optimizer not in ESTIMATE_OPTIMIZERS:
        raise ValueError(f"optimizer={optimizer!r} is not supported; use one of {ESTIMATE_OPTIMIZERS}")
    if lora is None and quant.bits is not None:
        raise ValueError(f"a {quant.bits}-bit base cannot be fully fine-tuned; pass a LoraConfig (or quant bits=None)")
    if sharding not in SHARDINGS or processes < 1:
        raise ValueError(f"processes={processes} must be >= 1 and sharding={sharding!r} None or 'fsdp'")
    if batch_size < 1 or seq_len < 1 or grad_accum < 1:
        raise ValueError(f"batch_size={batch_size}, seq_len={seq_len} and grad_accum={grad_accum} must be positive")
    if keep_blocks < 0:
        raise ValueError(f"keep_blocks={keep_blocks} must be >= 0")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device not in ("cuda", "cpu"):
        raise ValueError(f"device={device!r}: estimate for 'cuda' or 'cpu'")
    if offload_activations and device != "cuda":
        raise ValueError("offload_activations moves activations from a GPU to host memory; a CPU run has them "
                         "in host memory already (estimate for device='cuda', or drop it)")
    config = load_config(path_or_config)
    source = source_of(path_or_config)
    loss_fn = loss_fn or (chunked_loss_fn if chunked_loss else default_loss)
    settings = {
        "model": getattr(config, "_name_or_path", "") or config.model_type, "bits": quant.bits,
        "r": lora.r if lora else None, "batch_size": batch_size, "seq_len": seq_len,
        "gradient_checkpointing": gradient_checkpointing, "keep_blocks": keep_blocks,
        "keep_attention": keep_attention, "optimizer": optimizer,
        "dtype": str(dtype).removeprefix("torch."), "device": device, "chunked_loss": chunked_loss,
        "processes": processes, "sharding": sharding, "source": source[0],
        "grad_accum": grad_accum, "packing": packing, "offload_activations": offload_activations,
    }
    spec = StepSpec(quant=quant, lora=lora, seq_len=seq_len, checkpointing=gradient_checkpointing,
                    optimizer=optimizer, dtype=dtype, source_dtype=source_dtype, device=device, loss_fn=loss_fn,
                    grad_accum=grad_accum, packing=packing, processes=processes, sharding=sharding, source=source,
                    keep_blocks=keep_blocks, keep_attention=keep_attention, offload=offload_activations)
    cache: dict[int, MemoryEstimate] = {}

    def simulate(batch: int) -> MemoryEstimate:
        if batch not in cache:
            cache[batch] = _simulate_step(config, spec, batch, {**settings, "batch_size": batch})
            cache[batch]._simulate = simulate
        return cache[batch]

    return simulate(batch_size)


@dataclass(frozen=True)
class StepSpec:
    """What `estimate_memory` simulates, batch size aside (its arguments, validated)."""

    quant: QuantConfig
    lora: LoraConfig | None
    seq_len: int
    checkpointing: bool
    optimizer: str
    dtype: torch.dtype
    source_dtype: torch.dtype
    device: str
    loss_fn: LossFn
    grad_accum: int = 1
    packing: bool = False
    processes: int = 1
    sharding: str | None = None
    source: tuple[str, int | None] = ("safetensors", None)
    keep_blocks: int = 0
    keep_attention: bool | None = None
    offload: bool = False


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


def _model_facts(model: nn.Module, config, spec: StepSpec, batch: int) -> dict:
    """Shapes and sizes the process model needs, read off the meta model before quantization and LoRA."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    shapes = [linear_shape(m) for m in model.modules() if is_linear_like(m) and m is not head]
    base_params = sum(p.numel() for p in model.parameters())
    kind, size = spec.source
    hidden = hidden_size_of(config)
    return dict(linear_params=sum(o * i for o, i in shapes), base_params=base_params, bits=spec.quant.bits,
                source=kind, source_bytes=size if size is not None else base_params * spec.dtype.itemsize,
                largest_linear=max((o * i for o, i in shapes), default=0),
                heap_dequant_params=process_model.heap_dequantized(shapes), layers=layer_count(config),
                hidden_tokens=batch * spec.seq_len * hidden,
                # The peak falls in the first backward: trimmed only if that block trims first, i.e. when no
                # block keeps its activations (kept blocks run their backward before any trim)
                heap_trimmed=spec.checkpointing and not spec.keep_blocks and trims_before_backward(hidden),
                blocks_trim=trims_before_backward(hidden))


def _prepare(config, spec: StepSpec, batch: int) -> tuple[nn.Module, dict, list[torch.Tensor]]:
    """The meta model as it trains (quantized stand-ins, LoRA, checkpointing), its facts, its trainables."""
    model = build_meta_model(config, spec.dtype)
    facts = _model_facts(model, config, spec, batch)
    if spec.quant.bits is not None:
        replace_quantized_layers(model, spec.quant, spec.device, spec.source_dtype)
    if spec.lora is not None:
        add_lora(model, spec.lora)
    else:
        for param in model.parameters():
            param.requires_grad_(True)
    if spec.checkpointing:
        enable_gradient_checkpointing(model, keep_attention=spec.keep_attention, keep_blocks=spec.keep_blocks)
    return model, facts, [p for p in model.parameters() if p.requires_grad]


def _run_pass(model: nn.Module, spec: StepSpec, batch: int,
              trainable: list[torch.Tensor]) -> tuple[TensorTracker, list[torch.Tensor], int]:
    """One forward and backward on meta tensors under the tracker, the optimizer states (live
    from the start; the caller keeps them alive, or the tracker stops counting them), and the
    host bytes of offloaded activations at most."""
    tokens = torch.zeros(batch, spec.seq_len, dtype=torch.long, device="meta")
    states = optimizer_states(trainable, spec.optimizer)   # made outside the tracker, added as state
    tracker = TensorTracker(model, None, devices=["meta"])
    # the run's own offloading hooks, on meta: packed tensors leave the device, unpacking allocates anew
    offload = OffloadActivations("meta") if spec.offload else nullcontext()
    with tracker, fused_attention(spec.device):
        for tensor in states:
            tracker.add(tensor, "optimizer_states")
        tracker.set_phase("forward")
        with offload:
            loss = spec.loss_fn(model, tokens)
        loss.backward()
        del loss
    return tracker, states, offload.host_peak_bytes if spec.offload else 0


def _in_pass_peak(tracker: TensorTracker, spec: StepSpec, batch: int, trainable: list[torch.Tensor]) -> dict[str, int]:
    """The forward/backward peak, with what accumulation and packing add to it.

    With several micro-batches per step every trainable parameter's gradient is alive from the
    second micro-batch's forward on. Packing hands transformers position ids that restart, from
    which it builds a block-diagonal (batch, 1, seq, seq) boolean mask that lives through the pass.
    """
    peak = dict(tracker.state.peak_breakdown)
    if spec.grad_accum > 1:
        grads = sum(p.numel() * p.element_size() for p in trainable)
        peak["gradients"] = max(peak["gradients"], grads)
    if spec.packing:
        peak["activations"] += batch * spec.seq_len * spec.seq_len
    return peak


def _simulate_step(config, spec: StepSpec, batch: int, settings: dict) -> MemoryEstimate:
    model, facts, trainable = _prepare(config, spec, batch)
    tracker, states, host_offload = _run_pass(model, spec, batch, trainable)
    after_backward = dict(tracker.state.live)  # weights, LoRA, gradients, optimizer states
    del states
    step_temp = optimizer_step_temporaries(trainable, spec.optimizer, spec.device)
    # One rank's share of each candidate peak (the same figures on one process).
    at_step = per_rank_breakdown(model, {**after_backward, "temporaries": after_backward["temporaries"] + step_temp},
                                 spec.processes, spec.sharding, "optimizer")
    in_pass = per_rank_breakdown(model, _in_pass_peak(tracker, spec, batch, trainable), spec.processes,
                                 spec.sharding, "forward/backward")
    if sum(at_step.values()) > sum(in_pass.values()):
        breakdown, phase = at_step, "optimizer"
    else:
        breakdown, phase = in_pass, "forward/backward"
    owners = {id(p): (m, p) for m in model.modules() for p in m.parameters(recurse=False)}  # tied weights once
    total_params = sum(_true_numel(m, p) for m, p in owners.values())
    total_params += sum(m.weight_count() for m in model.modules() if hasattr(m, "weight_count"))  # expert stacks
    return MemoryEstimate(breakdown={c: int(breakdown[c]) for c in CATEGORIES}, peak_phase=phase, settings=settings,
                          trainable_parameters=sum(p.numel() for p in trainable), total_parameters=total_params,
                          host_offload_bytes=host_offload,
                          facts=process_model.ModelFacts(base_bytes=int(breakdown["base_weights"]),
                                                         temporary_bytes=int(tracker.state.category_peaks["temporaries"]), **facts))


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
        elif optimizer == "adamw8bit":
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
    if not trainable or optimizer in ("sgd", "adamw8bit"):
        return 0
    sizes = [p.numel() * p.element_size() for p in trainable]
    return sum(sizes) if device == "cuda" else 2 * max(sizes)
