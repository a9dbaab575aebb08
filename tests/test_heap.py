"""Handing freed heap pages back to the OS: the trim really returns memory, and wide checkpointed blocks arrange one before their backward."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from torch import nn

from qlowrank import heap
from qlowrank.memory.process import CPU_PREDICTION_MARGIN, CPU_WIDE_PREDICTION_MARGIN
from qlowrank.model.checkpointing import (
    enable_gradient_checkpointing,
    trim_heaps_before_backward,
)

pytestmark = pytest.mark.skipif(heap._malloc_trim() is None, reason="needs glibc's malloc_trim")

# A fresh process allocates 3,000 blocks of 64 KiB (under glibc's initial 128 KiB mmap threshold,
# so they come from the heap), touches them, frees all but the last (which pins the heap's top,
# so glibc's automatic trimming of the top cannot release anything) and reports RssAnon before
# and after release_free_heap().
FRAGMENTED_HEAP = r"""
import torch
from qlowrank.heap import release_free_heap
from qlowrank.memory.sampler import read_status
blocks = [torch.ones(16 * 1024) for _ in range(3000)]
keep = blocks[-1]
del blocks[:-1]
before = read_status()["RssAnon"]
trimmed = release_free_heap()
after = read_status()["RssAnon"]
print(before, after, trimmed)
"""
FREED_BYTES = 2999 * 64 * 1024
# At least half of the freed blocks' pages must come back: each 64 KiB block spans 16 whole
# pages of which malloc_trim can release all but the partial pages at its edges (~2 of 17).
MIN_RETURNED_SHARE = 0.5


def test_release_free_heap_returns_freed_pages_to_the_os():
    out = subprocess.run([sys.executable, "-c", FRAGMENTED_HEAP], capture_output=True, text=True, check=True)
    before, after, trimmed = out.stdout.split()
    assert trimmed == "True"
    assert int(before) - int(after) >= MIN_RETURNED_SHARE * FREED_BYTES, (before, after)


class Block(nn.Module):
    """A residual bottleneck of a given width: a stand-in decoder block."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.down, self.up = nn.Linear(width, 4), nn.Linear(4, width)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return hidden + self.up(torch.relu(self.down(hidden)))


@pytest.mark.parametrize("width, trims", [(heap.TRIM_MIN_HIDDEN, 3), (64, 0)])
@pytest.mark.parametrize("keep_blocks", [0, 1, None])   # None: no checkpointing, the Trainer's call alone
def test_wide_blocks_trim_once_each_before_their_backward(monkeypatch, width, trims, keep_blocks):
    calls = []
    monkeypatch.setattr(heap, "release_free_heap", lambda: calls.append(len(calls)) or True)
    model = nn.Sequential(*(Block(width) for _ in range(3)))
    if keep_blocks is None:
        trim_heaps_before_backward(model, block_types=Block)
    else:
        enable_gradient_checkpointing(model, block_types=Block, keep_blocks=keep_blocks)
    trim_heaps_before_backward(model, block_types=Block)   # idempotent: no second trim per block
    model(torch.randn(1, 2, width, requires_grad=True)).sum().backward()
    assert len(calls) == trims
    with torch.no_grad():   # no backward, nothing to arrange
        model(torch.randn(1, 2, width))
    assert len(calls) == trims


@pytest.mark.parametrize("width, checkpointing, keep_blocks, trimmed",
                         [(heap.TRIM_MIN_HIDDEN, True, 0, True), (heap.TRIM_MIN_HIDDEN, False, 0, False),
                          (256, True, 0, False), (heap.TRIM_MIN_HIDDEN, True, 1, False)])
def test_the_process_model_follows_the_trimming(width, checkpointing, keep_blocks, trimmed):
    """The estimate knows which runs' peaks come after a trim (wide, every block checkpointed: a kept
    block runs its backward before the first trim) and then counts no layer residue; every wide
    layout keeps the planner's smaller headroom."""
    import transformers

    import qlowrank as ql

    config = transformers.LlamaConfig(vocab_size=256, hidden_size=width, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=4)
    estimate = ql.estimate_memory(config, ql.QuantConfig(bits=4), ql.LoraConfig(r=4), batch_size=1, seq_len=64,
                                  gradient_checkpointing=checkpointing, keep_blocks=keep_blocks, device="cpu")
    assert estimate.facts.heap_trimmed is trimmed
    assert (estimate.process_breakdown["layer_residue"] == 0) is trimmed
    # and the planner's headroom is the measured error of that regime
    wide = width >= heap.TRIM_MIN_HIDDEN   # every wide block trims, checkpointed or not
    assert estimate.facts.blocks_trim is wide
    assert estimate.prediction_margin == (CPU_WIDE_PREDICTION_MARGIN if wide else CPU_PREDICTION_MARGIN)


def test_compiled_wide_blocks_still_trim(monkeypatch):
    """Under compile_blocks the checkpoint wrapper is compiled; the trim is arranged eagerly inside it."""
    from qlowrank.model.compile import compile_blocks, compiling_is_available

    if not compiling_is_available():
        pytest.skip("inductor has no compiler here")
    calls = []
    monkeypatch.setattr(heap, "release_free_heap", lambda: calls.append(len(calls)) or True)
    model = nn.Sequential(*(Block(heap.TRIM_MIN_HIDDEN) for _ in range(2)))
    enable_gradient_checkpointing(model, block_types=Block)
    compile_blocks(model, block_types=Block)
    model(torch.randn(1, 2, heap.TRIM_MIN_HIDDEN, requires_grad=True)).sum().backward()
    assert len(calls) == 2
