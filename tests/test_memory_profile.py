"""MemoryProfiler on real training steps: exact byte accounting by category, outputs, CLI."""

from __future__ import annotations

import json

import pytest
import torch
import transformers
from conftest import tiny_config, tiny_model, token_batch

import qlowrank as ql
from qlowrank.cli.main import main
from qlowrank.memory import CATEGORIES, format_bytes, parse_bytes


def lora_setup(bits=4, checkpointing=False):
    model = tiny_model("llama", dtype=torch.bfloat16)
    if bits:
        ql.quantize_model(model, ql.QuantConfig(bits=bits))
    ql.add_lora(model, ql.LoraConfig(r=8))
    if checkpointing:
        ql.enable_gradient_checkpointing(model)
    model.train()
    return model, torch.optim.AdamW(ql.lora_parameters(model), lr=1e-3)


def step(model, opt, tokens):
    model(input_ids=tokens, labels=tokens).loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


def nbytes(tensors):
    return sum(t.numel() * t.element_size() for t in tensors)


def test_every_category_is_counted_exactly():
    """Weights, LoRA, gradients and AdamW state bytes equal what the model and optimizer hold."""
    model, opt = lora_setup(bits=4)
    lora = ql.lora_parameters(model)
    frozen = [p for p in model.parameters() if not p.requires_grad]
    from qlowrank.nn.quant import is_quantized_linear, packed_tensors
    scales = [t for m in model.modules() if is_quantized_linear(m)
              for name, t in packed_tensors(m).items() if name != "weight"]
    buffers = list(model.buffers())
    tokens = token_batch(2, 16)
    with ql.MemoryProfiler(model=model, optimizer=opt) as prof:
        model(input_ids=tokens, labels=tokens).loss.backward()
        after_backward = prof.current
        opt.step()
        after_step = prof.current
        opt.zero_grad(set_to_none=True)
        after_zero = prof.current
    assert after_backward["trainable_params"] == nbytes(lora)
    assert after_backward["base_weights"] == nbytes(frozen) + nbytes(scales) + nbytes(buffers)
    assert after_backward["gradients"] == nbytes(lora)                      # fp32 grads of fp32 factors
    assert after_backward["activations"] == 0                               # the graph is freed
    assert after_step["optimizer_states"] == 2 * nbytes(lora) + 4 * len(lora)  # exp_avg, exp_avg_sq, step
    assert after_zero["gradients"] == 0
    assert prof.peak_bytes >= sum(after_step.values())
    assert prof.peak_bytes == sum(prof.breakdown.values())


def test_a_known_allocation_is_the_peak():
    with ql.MemoryProfiler() as prof:
        big = torch.empty(4 << 20, dtype=torch.uint8)  # 4 MiB
        del big
        small = torch.ones(10)
    assert prof.peak_bytes == 4 << 20
    assert prof.current["temporaries"] == small.numel() * 4


def test_phases_and_activations_with_and_without_checkpointing():
    tokens = token_batch(2, 64)
    peaks = {}
    for checkpointing in (False, True):
        model, opt = lora_setup(bits=4, checkpointing=checkpointing)
        with ql.MemoryProfiler(model=model, optimizer=opt) as prof:
            for _ in range(2):
                step(model, opt, tokens)
        phases = {sample["phase"] for sample in prof.timeline}
        assert {"forward", "backward", "optimizer"} <= phases
        assert prof.peak_step == 2 and prof.peak_phase == "backward"
        peaks[checkpointing] = prof.breakdown["activations"]
    assert peaks[True] < peaks[False] / 2


def test_table_json_and_png(tmp_path):
    model, opt = lora_setup(bits=8)
    tokens = token_batch(2, 16)
    with ql.MemoryProfiler(model=model, optimizer=opt) as prof:
        step(model, opt, tokens)
    table = prof.table()
    for name in CATEGORIES:
        assert name in table
    assert format_bytes(prof.peak_bytes) in table
    data = json.loads(prof.to_json(tmp_path / "m.json"))
    assert data["peak_bytes"] == prof.peak_bytes
    assert json.loads((tmp_path / "m.json").read_text())["breakdown"] == prof.breakdown
    assert data["rss_peak_bytes"] > prof.peak_bytes  # the process holds more than its tensors
    png = prof.save_plot(tmp_path / "m.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_without_model_the_phases_still_come_from_autograd():
    model, opt = lora_setup(bits=None)
    with ql.MemoryProfiler() as prof:
        step(model, opt, token_batch(2, 16))
    assert {"forward", "backward"} <= {s["phase"] for s in prof.timeline}
    assert prof.peak_bytes > 0


def test_parse_and_format_bytes():
    assert parse_bytes("24GiB") == 24 * 2**30
    assert parse_bytes("80 GB") == 80 * 10**9
    assert format_bytes(1536) == "1.50 KiB"
    with pytest.raises(ValueError, match="24GiB"):
        parse_bytes("lots")


def test_cli_estimate_and_profile(tmp_path, capsys):
    config = tiny_config("llama")
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / "model")
    assert main(["estimate", "--model", str(tmp_path / "model" / "config.json"), "--bits", "4", "--r", "8",
                 "--batch", "2", "--seq", "64", "--gpu", "100KiB", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "does NOT fit" in out and "activations" in out
    assert main(["estimate", "--model", str(tmp_path / "model"), "--seq", "64", "--gpu", "1GiB", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["fits"] and result["max_batch_size"] > 100
    assert main(["profile", "--model", str(tmp_path / "model"), "--bits", "4", "--r", "8", "--steps", "2",
                 "--batch", "2", "--seq", "32", "--device", "cpu", "--out", str(tmp_path / "prof")]) == 0
    out = capsys.readouterr().out
    assert "measured tensor memory at the peak" in out and "+0.0% vs measured" in out
    assert main(["estimate", "--model", str(tmp_path / "missing")]) == 2
    assert "does not exist" in capsys.readouterr().err
    summary = json.loads((tmp_path / "prof" / "memory.json").read_text())
    assert summary["peak_bytes"] > 0 and (tmp_path / "prof" / "memory.png").stat().st_size > 10_000


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU")
def test_cuda_allocator_figures_bound_the_tensor_peak():
    model, opt = lora_setup(bits=4)
    model.cuda()
    tokens = token_batch(2, 64).cuda()
    with ql.MemoryProfiler(model=model, optimizer=opt) as prof:
        for _ in range(2):
            step(model, opt, tokens)
    assert prof.cuda_max_allocated >= prof.peak_bytes
    assert prof.cuda_max_reserved >= prof.cuda_max_allocated


# Measured on tiny Llama steps: the allocator-level peak exceeds MemoryProfiler's by 0.1%
# (bf16 base) to 0.4% (4-bit: bitsandbytes dequantizes inside its gemm op, out of the
# dispatcher's sight); 2% leaves room for kernel workspaces without hiding a real miss.
ALLOCATOR_AGREEMENT = 0.02


@pytest.mark.parametrize("bits", [None, 4])
def test_profiler_agrees_with_torch_allocator_timeline(bits):
    """An independent measurement: torch.profiler's allocator events see every byte, even in kernels."""
    from qlowrank.memory.crosscheck import allocator_peak_bytes

    model, opt = lora_setup(bits=bits)
    tokens = token_batch(2, 128)
    step(model, opt, tokens)  # optimizer state exists from here on: the steady state
    reference = allocator_peak_bytes(lambda: step(model, opt, tokens))
    with ql.MemoryProfiler(model=model, optimizer=opt) as prof:
        step(model, opt, tokens)
    assert prof.peak_bytes <= reference
    assert (reference - prof.peak_bytes) / reference <= ALLOCATOR_AGREEMENT
