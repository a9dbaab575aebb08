"""Per-block patches compose: every pair of checkpointing, compile, heap trimming and activation offload,
installed and removed in both orders, leaves the loss and LoRA gradients of the unpatched model, and
removing them all leaves the blocks as they were."""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import pytest
import torch
from conftest import tiny_config, tiny_model, token_batch

import qlowrank as ql
from qlowrank import heap
from qlowrank.model.checkpointing import ATTENTION_OPS, remove_heap_trims, trim_heaps_before_backward
from qlowrank.model.compile import compile_blocks, compiling_is_available, uncompile_blocks
from qlowrank.model.offload import OffloadActivations
from qlowrank.model.patches import applied_patches
from qlowrank.state import state_of

PATCHES = ("checkpointing", "compile", "heap_trim", "offload")
LAYERS = tiny_config("llama").num_hidden_layers
# Inductor fuses fp32 elementwise work into other loops, so a compiled block moves results by rounding
# only: measured on this model, relative loss and gradient errors <= 1e-6 (test_speed_levers measures the
# same); 1e-4 allows other CPUs' vector widths. Without compile the patches change no arithmetic
# (recomputation repeats the same kernels; offloading copies bits): results are bit-identical.
COMPILED_TOLERANCE = 1e-4
ATTENTION_KERNELS = {op._schema.name for op in ATTENTION_OPS}   # as the profiler names them


def _model() -> torch.nn.Module:
    model = tiny_model("llama")
    ql.add_lora(model, ql.LoraConfig(r=4, target_modules="all-linear"), seed=0)
    with torch.no_grad():   # non-zero B, so every factor gets a gradient
        for _, layer in ql.lora_layers(model):
            layer.lora_B.weight.normal_(std=0.05, generator=torch.Generator().manual_seed(3))
    return model.train()


@dataclass
class Step:
    """What one forward and backward computed, and what ran in it."""

    loss: torch.Tensor
    grads: list[torch.Tensor]    # of the LoRA parameters
    trims: int                   # heap trims before a block's backward
    copies: int                  # saved tensors offloaded
    attention: int               # attention kernels run eagerly (twice per block when it is recomputed)
    compiled: bool               # whether a compiled region ran


class Patcher:
    """Installs and removes the four patches on one model by name, and counts what they did."""

    def __init__(self, model: torch.nn.Module, monkeypatch) -> None:
        self.model, self.offload, self.trims = model, None, 0
        real = heap.release_free_heap

        def counted() -> bool:
            self.trims += 1
            return real()

        monkeypatch.setattr(heap, "release_free_heap", counted)
        monkeypatch.setattr(heap, "TRIM_MIN_HIDDEN", 0)   # the tiny blocks trim as wide ones do

    def install(self, name: str) -> None:
        if name == "checkpointing":
            assert ql.enable_gradient_checkpointing(self.model, keep_attention=False) == LAYERS
        elif name == "compile":
            assert compile_blocks(self.model) == LAYERS
        elif name == "heap_trim":
            assert trim_heaps_before_backward(self.model) == LAYERS
        else:   # on a CPU, "host memory" is the same memory: every saved tensor is really copied
            self.offload = OffloadActivations("cpu", min_bytes=0)
            self.offload.__enter__()

    def remove(self, name: str) -> None:
        if name == "checkpointing":
            ql.disable_gradient_checkpointing(self.model)
        elif name == "compile":
            assert uncompile_blocks(self.model) == LAYERS
        elif name == "heap_trim":
            assert remove_heap_trims(self.model) == LAYERS
        else:
            self.offload.__exit__(None, None, None)
            self.offload = None

    def step(self, tokens: torch.Tensor) -> Step:
        """One forward and backward, and what ran in it."""
        trims, copies = self.trims, self.offload.copies if self.offload else 0
        self.model.zero_grad(set_to_none=True)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profile:
            loss = self.model(input_ids=tokens, labels=tokens).loss
            loss.backward()
        names = [event.name for event in profile.events()]
        return Step(loss.detach(), [p.grad.clone() for p in ql.lora_parameters(self.model)], self.trims - trims,
                    (self.offload.copies if self.offload else 0) - copies,
                    sum(name in ATTENTION_KERNELS for name in names),
                    any(name.startswith("Torch-Compiled Region") for name in names))


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # A 64-wide model gains nothing from a second thread, and on a loaded machine spinning threads made
    # one of its steps take 2 s instead of 10 ms.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def reference(one_thread):
    tokens = token_batch(2, 16)
    model = _model()
    loss = model(input_ids=tokens, labels=tokens).loss
    loss.backward()
    return tokens, loss.detach(), [p.grad.clone() for p in ql.lora_parameters(model)]


def _expected_patches(installed: set[str]) -> tuple[str, ...]:
    """What each block should carry: wrappers innermost first, then the heap-trim hook (checkpointing
    arranges its own trims)."""
    wraps = tuple(w for w, patch in (("checkpoint", "checkpointing"), ("compile", "compile")) if patch in installed)
    return wraps + (("heap_trim",) if installed & {"checkpointing", "heap_trim"} else ())


def _check_step(patcher: Patcher, reference, installed: set[str]) -> None:
    tokens, reference_loss, reference_grads = reference
    step = patcher.step(tokens)
    tolerance = COMPILED_TOLERANCE if "compile" in installed else 0.0
    assert abs(step.loss.item() - reference_loss.item()) <= tolerance * abs(reference_loss.item()), installed
    assert len(step.grads) == len(reference_grads)
    for grad, expected in zip(step.grads, reference_grads):
        assert float((grad - expected).norm()) <= tolerance * float(expected.norm()), installed
    # each patch still does its work, and a removed one does none
    assert step.trims == (LAYERS if installed & {"checkpointing", "heap_trim"} else 0), installed
    assert (step.copies > 0) == ("offload" in installed), installed
    assert step.compiled == ("compile" in installed), installed
    if "compile" not in installed:   # a compiled block's kernels are the graph's, not counted here
        assert step.attention == LAYERS * (2 if "checkpointing" in installed else 1), installed
    expected = _expected_patches(installed)
    assert applied_patches(patcher.model) == ({f"model.layers.{i}": expected for i in range(LAYERS)} if expected else {})


def _pair_orders():
    for pair in itertools.combinations(PATCHES, 2):
        marks = [pytest.mark.skipif(not compiling_is_available(), reason="inductor needs a C++ compiler")] \
            if "compile" in pair else []
        for first, second in (pair, pair[::-1]):
            yield pytest.param(first, second, marks=marks, id=f"{first}-then-{second}")


@pytest.mark.parametrize("first, second", list(_pair_orders()))
def test_two_patches_compose_in_either_order_and_come_off_alone(monkeypatch, reference, first, second):
    """Install `first` then `second`; remove `first` (the one underneath, for two forward wrappers in
    this order) and then `second`: every step in between equals the unpatched model's."""
    model = _model()
    blocks = list(model.model.layers)
    hooks_before = [dict(block._forward_hooks) for block in blocks]
    patcher = Patcher(model, monkeypatch)
    try:
        patcher.install(first)
        _check_step(patcher, reference, {first})
        patcher.install(second)
        _check_step(patcher, reference, {first, second})
        patcher.remove(first)
        _check_step(patcher, reference, {second})
        patcher.remove(second)
        _check_step(patcher, reference, set())
    finally:
        if patcher.offload is not None:   # never leave saved-tensor hooks behind for other tests
            patcher.offload.__exit__(None, None, None)
    assert state_of(model).patches == {}
    for block, hooks in zip(blocks, hooks_before):
        assert "forward" not in block.__dict__     # the class's own forward again
        assert dict(block._forward_hooks) == hooks


def test_checkpointing_again_after_compiling_keeps_the_compile(monkeypatch, reference):
    """The old failure: undoing checkpointing dropped a compiled forward, and compiling again did nothing."""
    if not compiling_is_available():
        pytest.skip("inductor needs a C++ compiler")
    patcher = Patcher(_model(), monkeypatch)
    for name in ("checkpointing", "compile"):
        patcher.install(name)
    patcher.remove("checkpointing")
    _check_step(patcher, reference, {"compile"})
    patcher.remove("compile")
    patcher.install("compile")   # compiles again after an uncompile
    patcher.install("checkpointing")
    _check_step(patcher, reference, {"compile", "checkpointing"})


def test_a_trim_asked_for_twice_stays_until_both_are_withdrawn(monkeypatch, reference):
    """The Trainer's trims and checkpointing's are one hook per block, removed with the last request."""
    patcher = Patcher(_model(), monkeypatch)
    patcher.install("heap_trim")
    patcher.install("checkpointing")
    patcher.install("heap_trim")   # idempotent
    ql.disable_gradient_checkpointing(patcher.model)
    _check_step(patcher, reference, {"heap_trim"})
    assert remove_heap_trims(patcher.model) == LAYERS
    assert remove_heap_trims(patcher.model) == 0
    _check_step(patcher, reference, set())


def test_a_forward_replaced_behind_the_patches_back_is_refused_by_name():
    model = _model()
    ql.enable_gradient_checkpointing(model)
    model.model.layers[0].forward = lambda *args, **kwargs: None   # as another library's wrapper would
    with pytest.raises(RuntimeError, match="LlamaDecoderLayer was replaced after qlowrank patched it"):
        ql.disable_gradient_checkpointing(model)


def test_nothing_of_qlowrank_sits_on_the_modules(monkeypatch):
    """PiSSA factors reach add_lora through the state, and the patches live there too: after quantizing,
    adapting and patching, the only qlowrank attribute on any module is the model's state."""
    model = tiny_model("llama")
    lora = ql.LoraConfig(r=4, init="pissa")
    ql.quantize_model(model, ql.QuantConfig(bits=4, compute_dtype=torch.float32), lora=lora, seed=0)
    factors = dict(state_of(model).init_factors)
    assert factors and all(".layers." in name for name in factors)   # one (A, B) per target
    ql.add_lora(model, lora, seed=0)
    assert state_of(model).init_factors == {}
    for name, layer in ql.lora_layers(model):
        assert torch.equal(layer.lora_A.weight, factors[name][0]) and torch.equal(layer.lora_B.weight, factors[name][1])
    ql.enable_gradient_checkpointing(model)
    trim_heaps_before_backward(model)
    found = {(name, key) for name, module in model.named_modules() for key in module.__dict__ if "qlowrank" in key}
    assert found == {("", "qlowrank_state")}
