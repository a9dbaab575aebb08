"""Activation offloading: the hooks give the same gradients, the estimator counts what moves, the planner offloads
only where it must, and a CPU run refuses it."""

from __future__ import annotations

import contextlib

import pytest
import torch
import transformers
from conftest import VOCAB, tiny_config

import qlowrank as ql
from qlowrank.config import TrainConfig
from qlowrank.data import Example
from qlowrank.model.offload import OffloadActivations
from qlowrank.planner import Layout, plan_run
from qlowrank.train import Trainer

QUANT = ql.QuantConfig(bits=4, compute_dtype=torch.bfloat16)
LORA = ql.LoraConfig(r=8, alpha=16)


def adapted_model(keep_blocks: int | None) -> torch.nn.Module:
    """A 3-layer fp32 Llama with LoRA; keep_blocks None: no checkpointing."""
    config = tiny_config("llama")
    config.num_hidden_layers = 3
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config)
    ql.add_lora(model, ql.LoraConfig(r=4, alpha=8))
    if keep_blocks is not None:
        ql.enable_gradient_checkpointing(model, keep_attention=False, keep_blocks=keep_blocks)
    return model.train()


def gradients(model: torch.nn.Module, tokens: torch.Tensor, offload: OffloadActivations | None):
    model.zero_grad(set_to_none=True)
    if offload is None:
        loss = model(input_ids=tokens, labels=tokens).loss
    else:
        with offload:
            loss = model(input_ids=tokens, labels=tokens).loss
    loss.backward()
    return [p.grad.clone() for p in model.parameters() if p.requires_grad]


@pytest.mark.parametrize("keep_blocks", [None, 0, 1])
def test_offloaded_saved_tensors_give_the_same_gradients(keep_blocks):
    """The hooks' round trip on this machine: "cpu" as the offloaded device copies every saved tensor to a
    fresh host tensor and back. fp32 and the same ops in the same order: the gradients are bit-identical."""
    model = adapted_model(keep_blocks)
    tokens = torch.randint(0, VOCAB, (2, 64), generator=torch.Generator().manual_seed(1))
    plain = gradients(model, tokens, None)
    offload = OffloadActivations("cpu", min_bytes=0)
    moved = gradients(model, tokens, offload)
    assert offload.copies > 0 and offload.host_peak_bytes > 0
    assert offload.host_bytes == 0   # the backward consumed every copy
    assert all(torch.equal(a, b) for a, b in zip(plain, moved))


def test_a_tensor_saved_twice_is_copied_once_and_parameters_stay():
    x = torch.randn(64, 64, requires_grad=True)
    weight = torch.nn.Parameter(torch.randn(64, 64))

    def run(offload):
        x.grad = weight.grad = None
        with offload:
            y = (x.sin() * x.cos()).sum() + (x @ weight).sum()   # x saved by sin, cos and the matmul
        y.backward()
        return x.grad.clone(), weight.grad.clone()

    offload = OffloadActivations("cpu", min_bytes=0)
    moved, plain = run(offload), run(contextlib.nullcontext())
    assert offload.copies == 3   # x once, then sin(x) and cos(x) for the product; never the parameter
    assert all(torch.equal(a, b) for a, b in zip(moved, plain))


def test_an_expanded_view_comes_back_contiguous_with_the_same_gradients():
    """A saved view whose elements share memory (a broadcast) cannot be copied into the same strides."""
    x = torch.randn(64, 64, requires_grad=True)
    column = torch.randn(64, 1, requires_grad=True)

    def run(offload):
        x.grad = column.grad = None
        with offload:
            y = (x * column.expand(64, 64)).sum()   # mul saves x and the expanded view
        y.backward()
        return x.grad.clone(), column.grad.clone()

    offload = OffloadActivations("cpu", min_bytes=0)
    assert all(torch.equal(a, b) for a, b in zip(run(offload), run(contextlib.nullcontext())))
    assert offload.host_peak_bytes == 2 * 64 * 64 * 4   # both as 64 x 64 float32 on the host
    meta = OffloadActivations("meta", min_bytes=0)
    with meta:
        z = torch.empty(64, 64, device="meta", requires_grad=True) * torch.empty(64, 1, device="meta").expand(64, 64)
    z.sum().backward()
    assert meta.host_peak_bytes == 64 * 64 * 4   # only the expanded view is saved (the column needs no grad here)


def test_a_saved_tensor_changed_in_place_is_refused_as_autograd_refuses_it():
    x = torch.randn(64, 64, requires_grad=True)
    for offload in (contextlib.nullcontext(), OffloadActivations("cpu", min_bytes=0)):
        with offload:
            y = x * 2
            z = y.sin()   # saves y
            y.add_(1)
        with pytest.raises(RuntimeError, match="modified by an inplace operation"):
            z.sum().backward()


def test_offloading_turns_automatic_attention_keeping_off():
    """A kept attention output stays on the GPU (the checkpoint stores it): offloaded, `auto` means recompute."""
    from qlowrank.cli.main import build_parser
    from qlowrank.cli.options import run_spec

    def kept(*flags: str):
        return run_spec(build_parser().parse_args(["estimate", "--model", "m", "--device", "cuda", *flags])).keep_attention

    assert kept("--offload-activations") is False
    assert kept() is None
    assert kept("--offload-activations", "--keep-attention", "on") is True


def test_small_tensors_and_other_devices_stay():
    x = torch.randn(16, 16, requires_grad=True)
    small = OffloadActivations("cpu")   # 1 KiB tensors: below OFFLOAD_MIN_BYTES
    with small:
        x.sin().sum().backward()
    elsewhere = OffloadActivations("cuda", min_bytes=0)
    with elsewhere:
        x.sin().sum().backward()
    assert small.copies == 0 and elsewhere.copies == 0


def offload_config() -> transformers.LlamaConfig:
    """4 layers whose block boundaries (from 1 x 512 x 1024 bf16 = 1 MiB) reach OFFLOAD_MIN_BYTES."""
    return transformers.LlamaConfig(vocab_size=256, hidden_size=1024, intermediate_size=2048, num_hidden_layers=4,
                                    num_attention_heads=8, num_key_value_heads=4, tie_word_embeddings=False,
                                    max_position_embeddings=512)


def estimate(offload: bool, **layout) -> ql.MemoryEstimate:
    return ql.estimate_memory(offload_config(), quant=QUANT, lora=LORA, batch_size=4, seq_len=512, device="cuda",
                              keep_attention=False, offload_activations=offload, chunked_loss=True, **layout)


def test_the_estimate_moves_the_block_boundaries_to_the_host():
    """With every block checkpointed the forward saves each block's input (bf16) and the final norm's
    float32 input outside the blocks; offloading moves exactly those, and the GPU peak drops by at least
    the boundaries of the blocks whose backward has not begun."""
    tokens, hidden, layers = 4 * 512, 1024, 4
    kept, moved = estimate(False), estimate(True)
    assert moved.host_offload_bytes == layers * tokens * hidden * 2 + tokens * hidden * 4
    assert kept.total_bytes - moved.total_bytes >= (layers - 1) * tokens * hidden * 2
    assert kept.host_offload_bytes == 0
    # without checkpointing nearly every activation moves: the GPU keeps little more than the weights
    whole, whole_moved = estimate(False, gradient_checkpointing=False), estimate(True, gradient_checkpointing=False)
    assert whole_moved.host_offload_bytes > whole.breakdown["activations"] / 2
    assert whole_moved.breakdown["activations"] < whole.breakdown["activations"] / 10


def test_offloading_is_refused_on_a_cpu():
    with pytest.raises(ValueError, match="host memory already"):
        ql.estimate_memory(offload_config(), quant=QUANT, lora=LORA, device="cpu", offload_activations=True)
    with pytest.raises(ValueError, match="host memory already"):
        plan_run(offload_config(), 2**33, 4, quant=QUANT, lora=LORA, seq_len=512, device="cpu", offload=True, progress=False)
    model = adapted_model(0)
    example = Example(input_ids=list(range(8)), labels=list(range(8)))
    with pytest.raises(ValueError, match="drop --offload-activations"):
        Trainer(model, TrainConfig(offload_activations=True, profile_memory=False), [example])


def cuda_plan(budget: int, **kwargs):
    return plan_run(offload_config(), budget, 4, quant=QUANT, lora=LORA, seq_len=512, device="cuda", timed=False, progress=False, **kwargs)


def needed(offload: bool) -> int:
    """The leanest layout's process peak with its headroom."""
    e = ql.estimate_memory(offload_config(), quant=QUANT, lora=LORA, batch_size=1, grad_accum=4, seq_len=512,
                           device="cuda", keep_attention=False, offload_activations=offload)
    return int(e.process_bytes * (1 + e.prediction_margin))


def test_the_cuda_planner_offloads_only_where_nothing_else_fits():
    """Planned for CUDA without a GPU (untimed, as `estimate --plan --device cuda` on a CPU machine)."""
    lean, lean_offloaded = needed(False), needed(True)
    assert lean_offloaded < lean
    squeezed = cuda_plan(lean - 1)   # only the offloaded layouts fit
    assert squeezed.chosen.layout.offload and all(c.layout.offload for c in squeezed.candidates)
    assert squeezed.chosen.host_bytes > 0 and "on the host" in squeezed.table()
    # untimed, the fewest bytes over the host link per optimizer step: every block recomputed, its input alone moved
    per_step = [c.host_bytes * c.layout.grad_accum for c in squeezed.candidates]
    assert squeezed.chosen.host_bytes * squeezed.chosen.layout.grad_accum == min(per_step)
    assert squeezed.chosen.layout.checkpointing and squeezed.chosen.layout.keep_blocks == 0
    assert any(not c.layout.checkpointing or c.layout.keep_blocks for c in squeezed.candidates)
    roomy = cuda_plan(8 * lean)      # everything fits: untimed, no transfers and no recompute come first
    assert roomy.chosen.layout == Layout(4, 1, False)
    with pytest.raises(ValueError, match="the host has .* give --max-host-memory"):   # the host is what lacks room
        cuda_plan(lean - 1, host_budget=2**20)
    with pytest.raises(ValueError, match="nothing fits"):   # offloading forbidden: the squeezed budget fits nothing
        cuda_plan(lean - 1, offload=False)


# Two bf16 backward passes on CUDA may differ (atomic adds in some kernels run in any order): bf16 keeps
# 8 mantissa bits, 2^-7 = 0.8% per rounding; twice that, relative, and of the largest entry, absolute.
CUDA_BF16_RTOL = 2 * 2**-7


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU")
@pytest.mark.parametrize("keep_blocks", [None, 0, 2])
def test_on_cuda_offloading_keeps_the_gradients_and_the_estimate_matches_the_profiler(keep_blocks):
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(offload_config()).to(torch.bfloat16)
    ql.quantize_model(model, QUANT)
    ql.add_lora(model, LORA)
    if keep_blocks is not None:
        ql.enable_gradient_checkpointing(model, keep_attention=False, keep_blocks=keep_blocks)
    model.cuda().train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    tokens = torch.randint(0, 256, (4, 512), generator=torch.Generator().manual_seed(1)).cuda()
    plain = gradients(model, tokens, None)
    for a, b in zip(plain, gradients(model, tokens, OffloadActivations())):
        torch.testing.assert_close(a, b, rtol=CUDA_BF16_RTOL, atol=CUDA_BF16_RTOL * a.abs().max().item())
    model.zero_grad(set_to_none=True)
    from qlowrank.nn.loss import causal_lm_loss
    with ql.MemoryProfiler(model=model, optimizer=optimizer) as profiler:
        for _ in range(2):
            with torch.autocast("cuda", dtype=torch.bfloat16), OffloadActivations():
                loss = causal_lm_loss(model, tokens, tokens)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    layout = {"gradient_checkpointing": keep_blocks is not None, "keep_blocks": keep_blocks or 0}
    predicted = estimate(True, **layout).total_bytes
    # the partial-checkpointing agreement of test_memory_estimate (byte-exact on CPU, 1% for kernel workspaces)
    assert abs(predicted - profiler.peak_bytes) / profiler.peak_bytes <= 0.01


@pytest.mark.parametrize("command", [["profile"], ["estimate"]])
def test_the_cli_refuses_offloading_on_a_cpu_before_loading(command, capsys):
    from qlowrank.cli.main import main

    from qlowrank.model.embedded import smollm2_gguf

    code = main([*command, "--model", str(smollm2_gguf()), "--offload-activations", "--device", "cpu"])
    assert code != 0 and "host memory already" in capsys.readouterr().err
