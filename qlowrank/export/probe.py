"""Fidelity probe: the exported weights run a probe batch beside the trained model, one module's weights at a time.

The exported model is never built whole. Its skeleton is made on the meta device (no
weight memory), and a forward pre-hook on each module that owns weights reads them from the
written file (a safetensors shard, or the GGUF file) just before that module runs; a forward
hook puts the meta tensors back right after. So the probe holds the trained model plus one
module's exported weights (at most the embedding or the output head) and the activations of
a 2 x 32-token batch, where loading the export whole (as before) held a second full model:
~16 GB beside ~6 GB for an 8B model.

The program is the one `from_pretrained(out_dir, dtype=...)` would run (same class, same
config, same weights cast to the same dtype, same modules in the same order), so the logits
are the same numbers, bit for bit (tests/test_export.py checks it).
"""

from __future__ import annotations

import contextlib
from typing import Callable, Iterator

import torch
import transformers
from accelerate import init_empty_weights
from torch import nn

PROBE_BATCH = 2   # sequences in the probe batch
PROBE_SEQ = 32    # tokens per sequence (fewer when the model's context is shorter)

# Reads one tensor of the export by its state-dict key, as stored (dtype and layout of the model).
WeightReader = Callable[[str], torch.Tensor]


def probe_ids(model: nn.Module, seq: int = PROBE_SEQ) -> torch.Tensor:
    """The fixed probe batch: (PROBE_BATCH, seq) uniform random token ids, seed 0."""
    config = model.config
    limit = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None) or seq
    generator = torch.Generator().manual_seed(0)
    return torch.randint(0, config.vocab_size, (PROBE_BATCH, min(seq, limit)), generator=generator)


def model_logits(model: nn.Module, ids: torch.Tensor, device: torch.device | None = None) -> torch.Tensor:
    """float32 logits of `ids` in eval mode, without gradients, on the CPU; the model's mode is restored."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            return model(ids.to(device or model.device)).logits.float().cpu()
    finally:
        model.train(was_training)


def compare_logits(logits: torch.Tensor, reference: torch.Tensor) -> dict:
    """The report's fidelity figures of `logits` (the export's) against `reference` (the trained model's).

    relative_logits_error = ||logits - reference|| / ||reference|| (Frobenius);
    max_abs_logits_error = max |logits - reference|; argmax_agreement = the fraction of positions
    whose top token is the same.
    """
    return {
        "relative_logits_error": float((logits - reference).norm() / reference.norm()),
        "max_abs_logits_error": float((logits - reference).abs().max()),
        "argmax_agreement": float((logits.argmax(-1) == reference.argmax(-1)).float().mean()),
    }


class StreamedWeights:
    """Forward hooks that give each module of a meta-device skeleton its exported weights only while it runs."""

    def __init__(self, skeleton: nn.Module, read: WeightReader, device: torch.device):
        self.read, self.device = read, device
        self.aliases = _aliases(skeleton)
        self.saved: dict[int, dict[str, tuple[str, torch.Tensor]]] = {}   # id(module) -> leaf -> (kind, skeleton tensor)
        self.handles = []
        for prefix, module in skeleton.named_modules():
            if _stored_leaves(module):
                self.handles.append(module.register_forward_pre_hook(self._loader(prefix)))
                self.handles.append(module.register_forward_hook(self._release))

    def _loader(self, prefix: str):
        def load(module: nn.Module, args) -> None:
            saved = self.saved.setdefault(id(module), {})
            for leaf, kind in _stored_leaves(module).items():
                table = getattr(module, kind)
                _, skeleton_tensor = saved.setdefault(leaf, (kind, table[leaf]))
                tensor = self.read(self.aliases[f"{prefix}.{leaf}" if prefix else leaf])
                if tensor.is_floating_point():   # from_pretrained casts every float tensor to its dtype
                    tensor = tensor.to(skeleton_tensor.dtype)
                tensor = tensor.to(self.device)
                table[leaf] = nn.Parameter(tensor, requires_grad=False) if kind == "_parameters" else tensor

        return load

    def _release(self, module: nn.Module, args, output) -> None:
        for leaf, (kind, tensor) in self.saved.pop(id(module), {}).items():
            getattr(module, kind)[leaf] = tensor   # back to meta: the exported tensor is freed

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


def _stored_leaves(module: nn.Module) -> dict[str, str]:
    """A module's own tensors that a checkpoint stores: leaf name -> "_parameters" or "_buffers"."""
    leaves = {name: "_parameters" for name, p in module._parameters.items() if p is not None}
    leaves.update({name: "_buffers" for name, b in module._buffers.items()
                   if b is not None and name not in module._non_persistent_buffers_set})
    return leaves


def _aliases(skeleton: nn.Module) -> dict[str, str]:
    """Every state-dict key -> the key the checkpoint stores it under (a tied head: the embeddings')."""
    first: dict[int, str] = {}
    aliases = {}
    for key, tensor in [*skeleton.named_parameters(remove_duplicate=False),
                        *skeleton.named_buffers(remove_duplicate=False)]:
        aliases[key] = first.setdefault(id(tensor), key)
    return aliases


@contextlib.contextmanager
def streamed_model(cls: type, config: transformers.PretrainedConfig, read: WeightReader, dtype: torch.dtype,
                   device: torch.device) -> Iterator[nn.Module]:
    """The model `cls(config)` in `dtype` whose weights are read by `read` module by module as it runs."""
    # Parameters on meta (no memory); buffers real, since rotary inv_freq and the like are in no checkpoint.
    with init_empty_weights(include_buffers=False):
        skeleton = cls._from_config(config, dtype=dtype)
    skeleton.tie_weights()   # as from_pretrained does (init_empty_weights leaves a tied head untied)
    for module in skeleton.modules():   # the real buffers go where the model runs; parameters stay on meta
        for name, buffer in module._buffers.items():
            if buffer is not None:
                module._buffers[name] = buffer.to(device)
    hooks = StreamedWeights(skeleton, read, device)
    try:
        yield skeleton
    finally:
        hooks.remove()


def probe_fidelity(model: nn.Module, config: transformers.PretrainedConfig, read: WeightReader,
                   dtype: torch.dtype) -> dict:
    """Relative logits error of exported weights (read by `read`) against the model they came from.

    A fixed random batch (`probe_ids`) runs through the trained model, then through the
    exported weights streamed module by module (`streamed_model`) in `dtype`. Returns the
    figures of `compare_logits` plus the batch shape and the compute dtype.
    """
    ids = probe_ids(model)
    reference = model_logits(model, ids)
    # CPUs have no fp16 matmul kernels (thousands of times slower than bf16): an fp16 export
    # is probed with its fp16-rounded weights computed in float32 there.
    run_dtype = torch.float32 if dtype == torch.float16 and model.device.type == "cpu" else dtype
    with streamed_model(type(model), config, read, run_dtype, model.device) as exported:
        logits = model_logits(exported, ids, device=model.device)
    return {"probe_tokens": list(ids.shape), "probe_compute_dtype": str(run_dtype).removeprefix("torch."),
            **compare_logits(logits, reference)}
