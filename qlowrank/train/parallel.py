"""How the processes of a run share the work: the strategy objects `Single | DDP | FSDP`, chosen once.

The trainer asks its strategy, never the rank, what to do: wrap the loss module, run a
micro-batch (DDP all-reduces only on the last one of a step), clip, add numbers up over
the ranks, write files on rank 0, gather sharded tensors before writing them, measure
memory. `choose_strategy` picks one from the launch (torchrun / accelerate launch set up
the process group; accelerate's own FSDP plugin means the same as `sharding="fsdp"`).

- `Single`: one process. The loss module runs as it is; sums and gathers return their input.
- `DDP`: every rank holds the whole model; accelerate wraps the loss module in
  DistributedDataParallel, which averages gradients over the ranks.
- `FSDP`: the frozen base and the factors are split over the ranks (FSDP2, fsdp.py); rank 0
  gathers the factors and optimizer states before it writes them.

`LossModule` wraps a model so that one forward call computes the summed causal-LM loss
(chunked head included): DDP and FSDP hook into a module's forward, so the whole loss, not
only the decoder, must run inside the wrapped module's `forward`.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from pathlib import Path
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from accelerate import Accelerator
from accelerate.utils import DistributedType
from torch import nn

from ..export import export_keys, export_merged
from ..memory import MemoryProfiler
from ..nn.loss import causal_lm_loss
from . import fsdp
from .fsdp import local_model_bytes
from .metrics import MemoryRecord, fsdp_memory, peak_memory_bytes, with_rank_lines

T = TypeVar("T")


class LossModule(nn.Module):
    """`forward(**batch)` returns the summed causal-LM loss of the wrapped model (what DDP/FSDP wrap)."""

    def __init__(self, model: nn.Module, chunk_tokens: int | None) -> None:
        super().__init__()
        self.model = model
        self.chunk_tokens = chunk_tokens

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor, attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None) -> torch.Tensor:
        return causal_lm_loss(self.model, input_ids, labels, attention_mask, self.chunk_tokens, reduction="sum",
                              position_ids=position_ids)


def is_distributed() -> bool:
    """True when a torch.distributed process group with more than one rank is running."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def local_device(device: str | None) -> str | None:
    """The device this process should load onto: under a launcher, `cuda:<LOCAL_RANK>` for cuda."""
    local_rank = os.environ.get("LOCAL_RANK")
    wants_cuda = device in (None, "cuda") and torch.cuda.is_available()
    if local_rank is not None and wants_cuda:
        return f"cuda:{int(local_rank)}"
    return device


def all_reduce_sum(values: list[float], device: torch.device) -> list[float]:
    """Each value summed over all ranks, in one float64 collective (the values themselves on one process)."""
    if not is_distributed():
        return [float(v) for v in values]
    tensor = torch.tensor([float(v) for v in values], dtype=torch.float64, device=device)
    dist.all_reduce(tensor)
    return tensor.tolist()


def all_reduce_max(value: float, device: torch.device) -> float:
    """The largest `value` over all ranks."""
    if not is_distributed():
        return value
    tensor = torch.tensor([float(value)], dtype=torch.float64, device=device)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return tensor.item()


def gather_objects(value: Any) -> list[Any]:
    """`value` from every rank, in rank order (a one-element list on one process)."""
    if not is_distributed():
        return [value]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, value)
    return out


def barrier() -> None:
    """Wait until every rank gets here (nothing on one process)."""
    if is_distributed():
        dist.barrier()


class Strategy:
    """What every strategy offers the trainer; the defaults are what one process does.

    Attributes:
        device: where this process computes.
        world, rank, is_main: number of processes, this one's index, and whether it is rank 0
            (the one that writes files and prints).
        module: the loss module as the strategy wrapped it (set by `wrap`).
    """

    def __init__(self, accelerator: Accelerator) -> None:
        self.accelerator = accelerator
        self.device = accelerator.device
        self.world, self.rank = accelerator.num_processes, accelerator.process_index
        self.is_main = accelerator.is_main_process
        self.module: nn.Module | None = None

    def wrap(self, loss_module: LossModule) -> nn.Module:
        """Wrap the loss module for this strategy; call it before building the optimizer."""
        self.module = loss_module
        return loss_module

    def micro_batch(self, last: bool) -> AbstractContextManager:
        """The context a micro-batch's forward and backward run in (`last`: the step's last one)."""
        return nullcontext()

    def clip_grad_norm(self, params: list[torch.Tensor], max_norm: float) -> float:
        """Clip the gradients' global norm to `max_norm`; return the norm before clipping."""
        return float(torch.nn.utils.clip_grad_norm_(params, max_norm))

    def sum(self, values: list[float]) -> list[float]:
        """Each value summed over the ranks."""
        return all_reduce_sum(values, self.device)

    def max(self, value: float) -> float:
        """The largest `value` over the ranks."""
        return all_reduce_max(value, self.device)

    def from_main(self, compute: Callable[[], T]) -> T:
        """`compute()` run on rank 0 alone, its result given to every rank."""
        return gather_objects(compute() if self.is_main else None)[0]

    def on_main(self, write: Callable[[], T]) -> T | None:
        """`write()` run on rank 0 alone (None elsewhere); every rank waits until it is done."""
        result = write() if self.is_main else None
        barrier()
        return result

    def adapter_tensors(self, model: nn.Module) -> dict | None:
        """The whole LoRA factors to write, or None: the model's own (collective under FSDP)."""
        return None

    def optimizer_state(self, optimizer: torch.optim.Optimizer) -> dict | None:
        """The whole optimizer state to write, or None: optimizer.state_dict() (collective under FSDP)."""
        return None

    def loaded(self, optimizer: torch.optim.Optimizer) -> None:
        """After a checkpoint's full optimizer state was loaded (FSDP shards it again)."""

    def export_merged(self, model: nn.Module, out_dir: str | Path, **kwargs) -> dict | None:
        """export_merged of `model`, written by rank 0 (every rank must call it)."""
        return self.on_main(lambda: export_merged(model, out_dir, **kwargs))

    @contextmanager
    def memory_profile(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> Iterator[MemoryRecord]:
        """Measure the steps run inside the block with MemoryProfiler; the record is filled on the way
        out, also when the block raises (an interrupted run still reports what it measured)."""
        record = MemoryRecord()
        profiler = MemoryProfiler(model=model, optimizer=optimizer)
        try:
            with profiler:
                yield record
        finally:
            record.summary, record.table = profiler.summary(), profiler.table()
            self.add_ranks(record)

    def add_ranks(self, record: MemoryRecord) -> None:
        """Add the other ranks' figures to this rank's memory record (nothing on one process)."""

    def describe(self) -> str:
        """What the run's first line says about the strategy, after the global batch."""
        return ""

    def final_memory(self, model: nn.Module) -> MemoryRecord | None:
        """What to record about memory once training ends (None: the profiled steps say it)."""
        return None


class Single(Strategy):
    """One process: the model runs as it is, nothing is synchronized."""


class DDP(Strategy):
    """Several processes, each holding the whole model; gradients are averaged once per step."""

    def wrap(self, loss_module: LossModule) -> nn.Module:
        self.module = self.accelerator.prepare(loss_module)
        return self.module

    def micro_batch(self, last: bool) -> AbstractContextManager:
        # DDP all-reduces once per step: not after the micro-batches before the last.
        return nullcontext() if last else self.accelerator.no_sync(self.module)

    def add_ranks(self, record: MemoryRecord) -> None:
        # Every rank measured itself; each records them all (its own numbers stay on top).
        with_rank_lines(record, gather_objects(
            {k: record.summary[k] for k in ("peak_bytes", "rss_peak_bytes", "breakdown")}))


class FSDP(Strategy):
    """Several processes sharing the frozen base (FSDP2 per decoder block); rank 0 writes gathered copies."""

    def describe(self) -> str:
        return f" (FSDP: the base is sharded over {self.world} ranks)"

    def wrap(self, loss_module: LossModule) -> nn.Module:
        loss_module.to(self.device)
        fsdp.shard_base(loss_module, self.device)
        self.module = loss_module
        return loss_module

    def clip_grad_norm(self, params: list[torch.Tensor], max_norm: float) -> float:
        return fsdp.clip_grad_norm_(params, max_norm)

    def adapter_tensors(self, model: nn.Module) -> dict | None:
        return fsdp.full_lora_tensors(model)

    def optimizer_state(self, optimizer: torch.optim.Optimizer) -> dict | None:
        return fsdp.full_optimizer_state(optimizer)

    def loaded(self, optimizer: torch.optim.Optimizer) -> None:
        fsdp.shard_optimizer_state_(optimizer)

    def export_merged(self, model: nn.Module, out_dir: str | Path, **kwargs) -> dict | None:
        """The ranks gather one block at a time while rank 0 streams it to disk; the probe batch
        (a forward of the unsharded model) is skipped."""
        if kwargs.get("format", "safetensors") != "safetensors":
            raise ValueError("under FSDP the merged export is written as safetensors only; export GGUF afterwards "
                             "from the adapter with `qlowrank export --format gguf`")
        gatherer = fsdp.UnitGatherer(self.module)
        report = None
        if self.is_main:
            report = export_merged(model, out_dir, before_tensor=gatherer.open, probe=False, **kwargs)
        else:
            for key in export_keys(model):
                gatherer.open(key)
        gatherer.close()
        barrier()
        return report

    @contextmanager
    def memory_profile(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> Iterator[MemoryRecord]:
        # MemoryProfiler's dispatch mode does not see through FSDP's DTensors: each rank records
        # what it holds of the model and its peak RSS at the end instead (final_memory).
        yield MemoryRecord()

    def final_memory(self, model: nn.Module) -> MemoryRecord | None:
        """Per rank: bytes held of the model (sharded base, whole quant_state, LoRA shard) and peak RSS."""
        mine = {**local_model_bytes(model), "rss_peak_bytes": peak_memory_bytes(self.device)}
        return fsdp_memory(gather_objects(mine))


def choose_strategy(device: torch.device, sharding: str | None) -> Strategy:
    """The strategy for this launch: FSDP when asked for (`sharding="fsdp"` or accelerate's FSDP
    plugin), DDP on several processes, else Single. `device`: where the model is."""
    accelerator = Accelerator(cpu=device.type == "cpu")
    if sharding == "fsdp" or accelerator.distributed_type == DistributedType.FSDP:
        return FSDP(accelerator)
    if accelerator.num_processes > 1:
        return DDP(accelerator)
    return Single(accelerator)
