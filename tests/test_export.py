"""export_merged and `qlowrank export`: plain, merged, dequantized checkpoints that reproduce the trained model."""

from __future__ import annotations

import gc
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import transformers
from conftest import rel_error, tiny_model, token_batch
from safetensors.torch import load_file, save_file

import qlowrank as ql
from qlowrank.cli.main import main as cli_main
from qlowrank.export.probe import compare_logits, model_logits, probe_ids

# float32 export of a float32-computing model: the merged weight is dequant(W) + s B A in
# float32 instead of x W^T + s B (A x); re-association changes a few float32 roundings
# (2^-24 each). Measured 3.5e-7 .. 3.6e-7 relative logits error; the bound is 1e-5.
FP32_EXPORT_TOL = 1e-5
# bf16 export run in bf16: every weight and activation is rounded to bf16 (unit roundoff
# u = 2^-8). Over the tiny 2-layer models the rounding errors accumulate to a measured
# 0.0062 .. 0.0064 relative logits error (4-bit bases); 4u = 0.0156 leaves 2.4x headroom.
BF16_EXPORT_TOL = 4 * 2**-8
# fp16 export probed on a CPU: fp16-rounded weights (u = 2^-11), float32 compute (no fp16
# kernels on CPUs). Measured 4.3e-4 .. 5.8e-4 on the three tiny models; bound 4u = 0.00195.
FP16_WEIGHTS_TOL = 4 * 2**-11
# LLM.int8 also quantizes activations at run time, which a float export cannot reproduce:
# one int8 step is absmax / 127 (~0.019 sigma here); measured 0.0066 .. 0.0071 relative error.
INT8_EXPORT_TOL = 0.02

BLOCKED_LOADER = textwrap.dedent("""
    import sys
    # Make peft, bitsandbytes and qlowrank look uninstalled: find_spec returns None for a
    # None entry in sys.modules, and any import of them raises ImportError.
    for name in ("peft", "bitsandbytes", "qlowrank"):
        sys.modules[name] = None
    import torch, transformers
    from safetensors.torch import load_file, save_file
    out_dir, ids_file, logits_file = sys.argv[1:]
    model, info = transformers.AutoModelForCausalLM.from_pretrained(out_dir, output_loading_info=True)
    problems = {k: sorted(v) for k, v in info.items() if v}
    assert not problems, problems
    loaded = sorted(k for k, v in sys.modules.items() if v is not None and k.split(".")[0] in ("peft", "bitsandbytes", "qlowrank"))
    assert not loaded, loaded
    with torch.no_grad():
        logits = model(load_file(ids_file)["ids"]).logits.float()
    save_file({"logits": logits.contiguous()}, logits_file)
""")


def trained(folder: Path, bits: int | None, seed: int = 3) -> torch.nn.Module:
    """A quantized model whose LoRA factors are non-zero (as after training), computing in fp32."""
    quant = ql.QuantConfig(bits=bits, compute_dtype=torch.float32)
    model = ql.load_model(folder, quant=quant, lora=ql.LoraConfig(r=4, alpha=12), dtype="fp32", progress=False)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in ql.lora_layers(model):
            layer.lora_B.weight.copy_(torch.randn(layer.lora_B.weight.shape, generator=generator) * 0.05)
    return model


def load_without_qlowrank(out_dir: Path, ids: torch.Tensor, tmp_path: Path) -> torch.Tensor:
    """Logits of the export, loaded by plain transformers in a process where peft/bnb/qlowrank cannot import."""
    save_file({"ids": ids.contiguous()}, str(tmp_path / "ids.safetensors"))
    subprocess.run(
        [sys.executable, "-c", BLOCKED_LOADER, str(out_dir), str(tmp_path / "ids.safetensors"),
         str(tmp_path / "logits.safetensors")],
        check=True, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": ""},
    )
    return load_file(str(tmp_path / "logits.safetensors"))["logits"]


@pytest.mark.parametrize("arch,bits", [("llama", 4), ("gpt2", 4), ("mistral", 8)])
def test_fp32_export_reproduces_trained_model_without_qlowrank(checkpoints, tmp_path, arch, bits):
    model = trained(checkpoints[arch], bits)
    report = ql.export_merged(model, tmp_path / "merged", dtype=torch.float32, progress=False)
    tol = INT8_EXPORT_TOL if bits == 8 else FP32_EXPORT_TOL
    assert report["relative_logits_error"] < tol
    assert json.loads((tmp_path / "merged" / "qlowrank_export_report.json").read_text()) == report
    ids = token_batch()
    with torch.no_grad():
        expected = model(ids).logits.float()
    exported = load_without_qlowrank(tmp_path / "merged", ids, tmp_path)
    assert rel_error(exported, expected) < tol
    with ql.disable_lora(model), torch.no_grad():  # the LoRA update is really in the export
        assert rel_error(model(ids).logits.float(), expected) > 100 * FP32_EXPORT_TOL


def test_export_files_are_plain_and_weights_exact(checkpoints, tmp_path):
    model = trained(checkpoints["gpt2"], bits=4)
    ql.export_merged(model, tmp_path / "merged", dtype="fp32", max_shard_size=100_000, probe=False, progress=False)
    out = tmp_path / "merged"
    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config and config["architectures"] == ["GPT2LMHeadModel"]
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1 and all((out / s).is_file() for s in shards)
    tensors = {}
    for shard in shards:
        tensors.update(load_file(str(out / shard)))
    assert set(tensors) == set(index["weight_map"])
    assert not [k for k in tensors if "lora_" in k or "absmax" in k or "quant" in k]
    assert "lm_head.weight" not in tensors  # tied to wte: from_pretrained re-ties it
    layer = dict(ql.lora_layers(model))["transformer.h.0.attn.c_attn"]
    merged = ql.dequantize_weight(layer.base_layer) + layer.delta_weight()  # (out, in) float32
    assert torch.equal(tensors["transformer.h.0.attn.c_attn.weight"], merged.t())  # Conv1D layout (in, out)


def test_bf16_export_within_bf16_bound_and_from_original(checkpoints, tmp_path):
    model = trained(checkpoints["llama"], bits=4)
    report = ql.export_merged(model, tmp_path / "bf16", progress=False)  # default dtype: bf16
    assert report["dtype"] == "bfloat16" and report["relative_logits_error"] < BF16_EXPORT_TOL
    weights = load_file(str(tmp_path / "bf16" / "model-00001-of-00001.safetensors"))
    assert weights["model.layers.0.mlp.up_proj.weight"].dtype == torch.bfloat16

    fp16 = ql.export_merged(model, tmp_path / "fp16", dtype="fp16", probe=True, progress=False)
    assert fp16["probe_compute_dtype"] == "float32" and fp16["relative_logits_error"] < FP16_WEIGHTS_TOL

    original = ql.export_merged(model, tmp_path / "orig", dtype="fp32", base=checkpoints["llama"], progress=False)
    assert original["weights_from"] == f"original:{checkpoints['llama']}"
    float_weights = load_file(str(checkpoints["llama"] / "model.safetensors"))
    exported = load_file(str(tmp_path / "orig" / "model-00001-of-00001.safetensors"))
    layer = dict(ql.lora_layers(model))["model.layers.1.self_attn.v_proj"]
    key = "model.layers.1.self_attn.v_proj.weight"
    assert torch.equal(exported[key], float_weights[key] + layer.delta_weight())
    assert torch.equal(exported["model.norm.weight"], float_weights["model.norm.weight"])
    # Merging into the original weights no longer reproduces the quantized model exactly.
    assert original["relative_logits_error"] > 100 * FP32_EXPORT_TOL


def test_tokenizer_and_generation_config_travel_with_the_export(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {f"w{i}": i for i in range(255)} | {"[UNK]": 255}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    base = tmp_path / "base"
    tiny_model("llama").save_pretrained(base)
    transformers.PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]").save_pretrained(base)
    model = trained(base, bits=4)
    ql.export_merged(model, tmp_path / "merged", probe=False, progress=False)
    tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path / "merged")
    assert tokenizer("w1 w7 zz").input_ids == [1, 7, 255]
    assert (tmp_path / "merged" / "generation_config.json").is_file()


def test_existing_dir_kept_and_failure_leaves_nothing(checkpoints, tmp_path):
    model = trained(checkpoints["mistral"], bits=4)
    out = tmp_path / "merged"
    out.mkdir()
    (out / "precious.txt").write_text("keep")
    with pytest.raises(FileExistsError, match="overwrite=True"):
        ql.export_merged(model, out, progress=False)
    assert (out / "precious.txt").read_text() == "keep"

    layer = next(layer for _, layer in ql.lora_layers(model) if "layers.1" in _)
    with torch.no_grad():
        layer.lora_B.weight[0, 0] = float("nan")  # fails late: after shards were written
    with pytest.raises(ValueError, match="NaN"):
        ql.export_merged(model, out, overwrite=True, max_shard_size=50_000, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merged"]  # no half-written directory
    assert (out / "precious.txt").read_text() == "keep"

    with torch.no_grad():
        layer.lora_B.weight[0, 0] = 0.0
    ql.export_merged(model, out, overwrite=True, probe=False, progress=False)
    assert not (out / "precious.txt").exists() and (out / "config.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merged"]


def test_cli_export_reads_base_quantization_from_adapter(checkpoints, tmp_path, capsys):
    model = trained(checkpoints["llama"], bits=8)
    ql.save_adapter(model, tmp_path / "adapter")
    code = cli_main(["export", "--model", str(checkpoints["llama"]), "--adapter", str(tmp_path / "adapter"),
                     "--out", str(tmp_path / "merged"), "--dtype", "fp32", "--compute-dtype", "fp32"])
    assert code == 0
    report = json.loads((tmp_path / "merged" / "qlowrank_export_report.json").read_text())
    assert report["base_bits"] == 8  # from qlowrank_adapter.json, not the CLI's default
    assert report["relative_logits_error"] < INT8_EXPORT_TOL
    assert "relative_logits_error" in capsys.readouterr().out
    python_api = ql.export_merged(model, tmp_path / "api", dtype="fp32", probe=False, progress=False)
    assert python_api["total_bytes"] == report["total_bytes"]
    shard = "model-00001-of-00001.safetensors"
    cli_weights = load_file(str(tmp_path / "merged" / shard))
    api_weights = load_file(str(tmp_path / "api" / shard))
    assert all(torch.equal(cli_weights[k], api_weights[k]) for k in api_weights)

    code = cli_main(["export", "--model", str(checkpoints["llama"]), "--adapter", str(tmp_path / "adapter"),
                     "--out", str(tmp_path / "orig"), "--from-original", "--bits", "4", "--dtype", "fp32"])
    assert code == 0
    report = json.loads((tmp_path / "orig" / "qlowrank_export_report.json").read_text())
    assert report["base_bits"] == 4 and report["weights_from"].startswith("original:")
    assert cli_main(["export", "--model", str(checkpoints["llama"]), "--adapter", str(tmp_path / "adapter"),
                     "--out", str(tmp_path / "orig")]) == 2  # exists, no --overwrite: bad input
    assert "exists" in capsys.readouterr().err


# The streamed probe runs the program that from_pretrained(out_dir, dtype=...) builds (same
# class, config, weights cast to the same dtype, same modules in the same order); only each
# module's weights arrive just before it runs. So its logits are the same numbers and the
# figures are equal, not merely close (measured: identical on every case below).
STREAMED_PROBE_TOLERANCE = 0.0


def whole_model_figures(model: torch.nn.Module, out_dir: Path, compute_dtype: str) -> dict:
    """The probe as it was before issue 20: the export loaded whole by from_pretrained beside the model."""
    ids = probe_ids(model)
    exported = type(model).from_pretrained(str(out_dir), dtype=getattr(torch, compute_dtype))
    return compare_logits(model_logits(exported, ids), model_logits(model, ids))


@pytest.mark.parametrize("arch,bits,dtype", [("llama", 4, "bf16"), ("gpt2", 4, "fp32"), ("mistral", 8, "fp16")])
def test_streamed_probe_equals_the_whole_model_comparison(checkpoints, tmp_path, arch, bits, dtype):
    model = trained(checkpoints[arch], bits)   # gpt2: a tied head; fp16: probed in float32 on a CPU
    report = ql.export_merged(model, tmp_path / "merged", dtype=dtype, progress=False)
    whole = whole_model_figures(model, tmp_path / "merged", report["probe_compute_dtype"])
    assert set(whole) <= set(report)
    for name, value in whole.items():
        assert abs(report[name] - value) <= STREAMED_PROBE_TOLERANCE, (name, report[name], value)
    assert report["relative_logits_error"] > 0   # the figures measure something


class LiveExportBytes:
    """The most float tensor bytes alive at the end of any module's forward outside `model`.

    A real census: at each forward (hook on every nn.Module, whatever model it belongs to), the
    garbage collector's live objects are walked and the storages of float tensors that did not
    exist when the block began (the trained model's weights, quantization states and the rest)
    are summed. Activations count too.
    """

    def __init__(self, model: torch.nn.Module):
        self.skip = {id(m) for m in model.modules()}
        self.before = {t.untyped_storage().data_ptr() for t in _live_float_tensors()}
        self.peak = 0

    def __enter__(self):
        self.handle = torch.nn.modules.module.register_module_forward_hook(self._hook)
        return self

    def __exit__(self, *exc):
        self.handle.remove()

    def _hook(self, module, args, output) -> None:
        if id(module) in self.skip:
            return
        storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in _live_float_tensors()}
        self.peak = max(self.peak, sum(n for ptr, n in storages.items() if ptr not in self.before))


def _live_float_tensors() -> list[torch.Tensor]:
    return [o for o in gc.get_objects()
            if issubclass(type(o), torch.Tensor) and o.is_floating_point() and o.device.type != "meta"]


def test_probe_holds_one_module_of_the_export_at_a_time(tmp_path):
    # Weights large against the probe's 2 x 32-token activations: 4 layers, MLP 1024 wide.
    config = transformers.LlamaConfig(vocab_size=512, hidden_size=256, intermediate_size=1024, num_hidden_layers=4,
                                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / "base")
    model = trained(tmp_path / "base", bits=4)
    with LiveExportBytes(model) as streamed:
        report = ql.export_merged(model, tmp_path / "merged", dtype="fp32", progress=False)
    with LiveExportBytes(model) as whole:   # the same census around the probe as it was before
        whole_model_figures(model, tmp_path / "merged", "float32")
    weights = load_file(str(tmp_path / "merged" / "model-00001-of-00001.safetensors"))
    per_module: dict[str, int] = {}
    for key, tensor in weights.items():
        module = key.rpartition(".")[0]
        per_module[module] = per_module.get(module, 0) + tensor.nbytes
    largest, total = max(per_module.values()), report["total_bytes"]
    # Activations alive at once: the reference logits, the residual stream and an MLP's three
    # (tokens, intermediate) tensors, float32: 4 * 64 * (512 + 2 * 256 + 3 * 1024) bytes = 1 MiB;
    # twice that leaves room for attention's intermediates.
    activations = 2 * 4 * 64 * (512 + 2 * 256 + 3 * 1024)
    assert whole.peak >= total                    # the census sees a whole model when one is built
    assert largest <= streamed.peak <= largest + activations, (streamed.peak, largest)   # one module's weights at most
    assert streamed.peak < total / 4, (streamed.peak, largest, total, whole.peak)
