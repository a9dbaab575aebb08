"""FSDP2 mechanics: shard the frozen base per decoder block, gather what rank 0 writes, clip sharded gradients.

- `shard_base` applies torch's FSDP2 `fully_shard` to every decoder block, then to the
  root. bitsandbytes 4-bit weights shard in their uint8 storage; the quantization state
  (`quant_state`: absmax, code book) stays whole on every rank, and bitsandbytes restores
  it onto the gathered weight in forward. LLM.int8 layers lose their `CB`/`SCB` state when
  gathered, so 8-bit bases are refused.
- `full_lora_tensors`, `full_optimizer_state` gather what rank 0 writes;
  `shard_optimizer_state_` re-shards a loaded full state; `UnitGatherer` unshards one FSDP
  unit at a time so that a merged export streams with one block gathered at once.
- `local_model_bytes` is what one rank holds of the model (the FSDP memory record).

The `FSDP` strategy in parallel.py is the one user of these helpers in training.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from ..adapter.expert_tensors import factor_of, factor_owners
from ..adapter.files import FACTORS
from ..model.structure import find_block_types
from ..model.surgery import lora_layers
from ..nn import quant as quantlib
from ..nn.experts import ExpertWeights


def is_dtensor(tensor: Any) -> bool:
    return type(tensor).__name__ == "DTensor" or hasattr(tensor, "device_mesh") and hasattr(tensor, "full_tensor")


def shard_base(root: nn.Module, device: torch.device) -> None:
    """FSDP2: `fully_shard` each decoder block of `root.model`, then `root` itself, in place.

    Every rank must hold the same model: the LoRA factors are broadcast from rank 0 first
    (FSDP, unlike DDP, does not synchronize parameters).

    Raises:
        ValueError: not launched on several processes, an 8-bit base, or no decoder blocks found.
    """
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    if not (dist.is_available() and dist.is_initialized()):
        raise ValueError("sharding='fsdp' needs a process group: launch with torchrun or accelerate launch "
                         "(see docs/multi-process.md)")
    model = root.model
    eight_bit = [name for name, m in model.named_modules() if quantlib.quantized_bits(m) == 8]
    if eight_bit:
        raise ValueError(f"sharding='fsdp' does not support 8-bit (LLM.int8) bases: FSDP drops the int8 layers' "
                         f"CB/SCB state when it gathers them ({eight_bit[0]}, ...). Use bits=4 with FSDP, or 8-bit "
                         "without sharding (DDP)")
    types = find_block_types(model)
    blocks = [m for m in model.modules() if types and isinstance(m, types)]
    if not blocks:
        raise ValueError(f"sharding='fsdp': no decoder blocks found in {type(model).__name__} (its "
                         "`_no_split_modules` names none); FSDP shards one block at a time")
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                dist.broadcast(param.data, src=0)
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    for block in blocks:
        fully_shard(block, mesh=mesh)
    fully_shard(root, mesh=mesh)


def fsdp_units(root: nn.Module) -> dict[str, nn.Module]:
    """Name -> module of every FSDP2 unit under `root` ("" is the root)."""
    from torch.distributed.fsdp import FSDPModule

    return {name: m for name, m in root.named_modules() if isinstance(m, FSDPModule)}


def full_lora_tensors(model: nn.Module) -> dict[str, dict[str, torch.Tensor]]:
    """{path: {"lora_A": tensor, "lora_B": tensor}}, gathered whole (collective: call on every rank), for every
    module that holds LoRA factors: LoraLinear layers, MoE routers and adapted expert projections
    (`<experts>.<projection>`), the layout `save_adapter(tensors=...)` reads."""
    holders = dict(lora_layers(model))
    holders.update({path: model.get_submodule(path) for path, _ in factor_owners(model).values()})
    out: dict[str, dict[str, torch.Tensor]] = {}
    for name, holder in holders.items():
        out[name] = {}
        for factor in FACTORS:
            weight = factor_of(holder, factor).detach()
            out[name][factor] = (weight.full_tensor() if is_dtensor(weight) else weight).float().cpu()
    return out


def full_optimizer_state(optimizer: torch.optim.Optimizer) -> dict:
    """optimizer.state_dict() with every sharded state tensor gathered whole (collective)."""
    state = optimizer.state_dict()
    # state_dict() shares each parameter's state dict with the optimizer: build new ones.
    state["state"] = {index: {key: value.full_tensor().cpu() if is_dtensor(value) else value
                              for key, value in param_state.items()}
                      for index, param_state in state["state"].items()}
    return state


def shard_optimizer_state_(optimizer: torch.optim.Optimizer) -> None:
    """After load_state_dict of a full state: turn each state tensor shaped like its sharded
    parameter into a DTensor with the parameter's placement (collective)."""
    from torch.distributed.tensor import distribute_tensor

    for group in optimizer.param_groups:
        for param in group["params"]:
            if not is_dtensor(param):
                continue
            for key, value in list(optimizer.state.get(param, {}).items()):
                if torch.is_tensor(value) and not is_dtensor(value) and tuple(value.shape) == tuple(param.shape):
                    optimizer.state[param][key] = distribute_tensor(value.to(param.device), param.device_mesh,
                                                                    param.placements)


def clip_grad_norm_(params: list[torch.Tensor], max_norm: float) -> float:
    """Clip the global gradient norm of (possibly sharded) parameters; return the norm before clipping.

    With FSDP each rank holds a disjoint shard of each gradient, so the squared norm is the
    sum over ranks of the local shards' squared norms.
    """
    grads = [p.grad for p in params if p.grad is not None]
    local = [g.to_local() if is_dtensor(g) else g for g in grads]
    squares = sum(float(g.float().pow(2).sum()) for g in local)
    device = local[0].device if local else torch.device("cpu")
    summed = torch.tensor([squares], dtype=torch.float64, device=device)
    dist.all_reduce(summed)   # FSDP always runs in a process group (shard_base requires one)
    total = summed.item() ** 0.5
    coefficient = max_norm / (total + 1e-6)
    if coefficient < 1:
        for g in local:
            g.mul_(coefficient)
    return total


def local_model_bytes(model: nn.Module) -> dict[str, int]:
    """Bytes this rank holds of the model: {"base_weights", "quant_state", "trainable_params"}.

    With FSDP a parameter is a DTensor and only its local shard counts; a 4-bit layer's
    quant_state (absmax and, with double quantization, its own absmax and code) is whole on
    every rank and is counted apart as "quant_state" (it is part of the base), as are the code
    books of MoE expert stacks (their codes and per-expert scales are parameters, sharded).
    """
    seen: set[int] = set()
    out = {"base_weights": 0, "quant_state": 0, "trainable_params": 0}

    def count(tensor: torch.Tensor, key: str) -> None:
        local = tensor.to_local() if hasattr(tensor, "to_local") else tensor
        storage = local.untyped_storage()
        if storage.data_ptr() not in seen:
            seen.add(storage.data_ptr())
            out[key] += storage.nbytes()

    for module in model.modules():
        if quantlib.quantized_bits(module) == 4:
            for name, tensor in quantlib.packed_tensors(module).items():
                count(tensor, "base_weights" if name == "weight" else "quant_state")
        if isinstance(module, ExpertWeights):   # the code books its experts share are buffers, whole on every rank
            for name in quantlib.EXPERT_CODE_BOOKS:
                if hasattr(module, name):
                    count(getattr(module, name), "quant_state")
    for param in model.parameters():
        count(param, "trainable_params" if param.requires_grad else "base_weights")
    for buffer in model.buffers():
        count(buffer, "base_weights")
    return out


class UnitGatherer:
    """Unshard the FSDP unit that owns a parameter, one unit at a time (collective, same order on every rank).

    `open(name)` takes a parameter name relative to `root.model`; the unit holding it is
    gathered and the previously gathered one is resharded, so at most one decoder block
    (or the root's own embeddings / head / norms) is whole at once.
    """

    def __init__(self, root: nn.Module) -> None:
        units = fsdp_units(root)
        # Longest prefix first: a block's names before the root's "".
        self.units = sorted(units.items(), key=lambda item: -len(item[0]))
        self.current: nn.Module | None = None

    def open(self, name: str) -> None:
        full = f"model.{name}"
        unit = next(m for prefix, m in self.units if not prefix or full.startswith(prefix + "."))
        if unit is self.current:
            return
        self.close()
        unit.unshard()
        self.current = unit

    def close(self) -> None:
        if self.current is not None:
            self.current.reshard()
            self.current = None
