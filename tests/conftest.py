"""Shared fixtures and helpers: tiny random models and tokenizers built from configs, data, tolerances."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from pydoc_data.topics import topics

import pytest
import torch
import transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

import qlowrank as ql
from qlowrank.data import Example, tokenize_row
from qlowrank.train import TrainConfig

DEVICES = [
    "cpu",
    pytest.param("cuda", marks=[
        pytest.mark.cuda,
        pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU"),
    ]),
]

VOCAB = 256


def tiny_config(arch: str) -> transformers.PretrainedConfig:
    """A 2-layer model of the given family, small enough to build in milliseconds."""
    common = dict(vocab_size=VOCAB, num_hidden_layers=2)
    if arch == "llama":
        return transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_attention_heads=4,
                                        num_key_value_heads=2, tie_word_embeddings=False, **common)
    if arch == "mistral":
        return transformers.MistralConfig(hidden_size=64, intermediate_size=128, num_attention_heads=4,
                                          num_key_value_heads=2, sliding_window=8, **common)
    if arch == "qwen2":
        return transformers.Qwen2Config(hidden_size=64, intermediate_size=128, num_attention_heads=4,
                                        num_key_value_heads=2, **common)
    if arch == "gpt2":
        return transformers.GPT2Config(vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=64,
                                       bos_token_id=0, eos_token_id=0)
    if arch == "bert":
        return transformers.BertConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128,
                                       num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=64)
    raise ValueError(arch)


def tiny_model(arch: str, seed: int = 0, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """A random causal LM (or BERT masked LM) in eval mode, from `tiny_config`."""
    torch.manual_seed(seed)
    config = tiny_config(arch)
    auto = transformers.AutoModelForMaskedLM if arch == "bert" else transformers.AutoModelForCausalLM
    model = auto.from_config(config, dtype=dtype)
    return model.eval()


def token_batch(batch: int = 2, seq: int = 16, seed: int = 1) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (batch, seq), generator=generator)


@pytest.fixture(params=DEVICES)
def device(request) -> str:
    return request.param


def rel_error(a: torch.Tensor, b: torch.Tensor) -> float:
    """Relative Frobenius error ||a - b|| / ||b||."""
    return float((a - b).norm() / b.norm())


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    """Tiny Llama, GPT-2 and Mistral models saved as ordinary Hugging Face checkpoints."""
    root = tmp_path_factory.mktemp("ckpt")
    folders = {}
    for arch in ("llama", "gpt2", "mistral"):
        tiny_model(arch).save_pretrained(root / arch)
        folders[arch] = root / arch
    return folders


SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
# SmolLM2's ChatML layout, without its default system prompt.
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def tiny_tokenizer(vocab_size: int = 320) -> PreTrainedTokenizerFast:
    """A real byte-level BPE tokenizer trained in ~0.1 s on Python's docs, with a ChatML template."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([topics[k] for k in sorted(topics)[:10]], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>",
                                   chat_template=CHAT_TEMPLATE)


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """A tiny Llama checkpoint with a real BPE tokenizer, and a prompt/completion data file."""
    root = tmp_path_factory.mktemp("cli")
    tok = tiny_tokenizer()
    model = tiny_llama(tok)
    model.save_pretrained(root / "model")
    tok.save_pretrained(root / "model")
    with open(root / "data.jsonl", "w") as handle:
        for key in sorted(topics)[:24]:
            handle.write(json.dumps({"prompt": f"Topic {key}:\n", "completion": topics[key][:120]}) + "\n")
    (root / "run.json").write_text(json.dumps({"model": str(root / "model"), "data": [str(root / "data.jsonl")],
                                               "seq": 64, "batch": 2, "r": 4, "lr": 5e-3, "steps": 50,
                                               "out": str(root / "out"), "no_progress": True}))
    return root


def doc_examples(tok, n=24):
    keys = sorted(topics)[:n]
    rows = [{"prompt": f"Topic {k}:\n", "completion": topics[k].split("\n\n")[1][:80]} for k in keys]
    return [tokenize_row(r, tok) for r in rows]


def tiny_llama(tok, seed=0, head_scale=1.0) -> torch.nn.Module:
    """A random 2-layer Llama (hidden 64) over `tok`'s vocabulary, its output head scaled by `head_scale`."""
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
    model = transformers.AutoModelForCausalLM.from_config(config)
    # LoRA leaves the 0.02-init head frozen, which bounds the logits (and so the loss): scale it so the loss can fall.
    model.lm_head.weight.data.mul_(head_scale)
    return model


def trainable_model(tok, seed=0, dropout=0.0, head_scale=8.0, checkpointing=False):
    model = tiny_llama(tok, seed, head_scale)
    ql.quantize_model(model, ql.QuantConfig(bits=4, compute_dtype=torch.float32))
    ql.add_lora(model, ql.LoraConfig(r=8, alpha=16, dropout=dropout))
    if checkpointing:
        ql.enable_gradient_checkpointing(model)
    return model


def train_config(tmp_path, **kw):
    base = dict(out_dir=str(tmp_path / "out"), batch_size=4, lr=1e-2, precision="fp32", progress=False,
                profile_memory=False, chunk_tokens=64)
    return TrainConfig(**{**base, **kw})


# Relative logits error allowed between qlowrank and PEFT computing the same adapter on the
# same base in float32. The only difference is where the scale is applied (PEFT: s * (B A x);
# qlowrank: (s B) A x), a few float32 roundings (2^-24 each). Measured <= 3.1e-7 on these
# tiny models (4-bit and float bases, scale 3); 1e-5 leaves 30x headroom and is still far
# below the adapter's own effect on the logits (asserted > 100x TOL in each test).
FP32_REL_TOL = 1e-5
# LLM.int8 quantizes activations row-wise at run time (step = absmax / 127, ~0.019 sigma
# for these hidden sizes); inputs that differ by float rounding can land on different codes,
# so the same adapter on the same 8-bit base differs by one code step here and there.
# Measured 5e-4 .. 1.9e-3; bound 0.02 = one full step of relative error.
INT8_REL_TOL = 0.02


def perturb_b(model: torch.nn.Module, seed: int = 3, std: float = 0.05) -> None:
    """Give every B a non-zero value, so the adapter changes the logits."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in ql.lora_layers(model):
            layer.lora_B.weight.copy_(torch.randn(layer.lora_B.weight.shape, generator=generator) * std)


def logits(model, ids) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits.float()


# fp32 on CPU: the packed row and the lone example run the same arithmetic on a different
# sequence length, so reductions may be blocked differently; measured: 0 (Llama, Mistral)
# and 1.3e-7 relative (Qwen2, GPT-2). 1e-5 is that with two orders of margin; the leak
# between examples that packing must prevent moves these losses by >1e-3.
FP32_LOSS_TOLERANCE = 1e-5
# 4-bit base + LoRA under bf16 autocast: the same shapes argument, but each difference is
# rounded at bf16's 2^-8; measured worst 6.6e-5 relative over 5 seeds. 2e-3 = 30x that.
BF16_LOSS_TOLERANCE = 2e-3


def random_examples(lengths: list[int], seed: int = 0) -> list[Example]:
    generator = torch.Generator().manual_seed(seed)
    out = []
    for n in lengths:
        ids = torch.randint(1, VOCAB, (n,), generator=generator).tolist()
        out.append(Example(ids, list(ids), f"ex{len(out)}"))
    return out


def planned_flags(out: str) -> list[str]:
    """The train flags of the layout `train --batch auto` printed it chose."""
    found = re.search(r"batch auto: micro-batch (\d+) x grad-accum (\d+) = global batch \d+, (no checkpointing|"
                      r"checkpointing \((?:last (\d+) of \d+ blocks kept|all \d+ blocks), attention (kept|recomputed)\))", out)
    micro, accum, layout, kept, attention = found.groups()
    flags = ["--batch", micro, "--grad-accum", accum]
    if layout == "no checkpointing":
        return [*flags, "--no-checkpointing"]
    return [*flags, "--keep-blocks", kept or "0", "--keep-attention", "on" if attention == "kept" else "off"]


def random_lora_b(model: torch.nn.Module, std: float = 0.05, seed: int = 3) -> torch.nn.Module:
    """Every `lora_B` set to seeded N(0, std) noise (B starts at zero, so an adapter would do nothing); in eval mode."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * std)
    return model.eval()


def adamw_losses(model: torch.nn.Module, batch: torch.Tensor, steps: int, lr: float = 1e-2,
                 after_backward=None) -> list[float]:
    """Train the trainable parameters on one batch for `steps` AdamW steps; the losses.

    `after_backward(step)` runs once the gradients exist, before the optimizer step (to inspect them).
    """
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    losses = []
    for step in range(steps):
        loss = model(batch, labels=batch).loss
        loss.backward()
        if after_backward is not None:
            after_backward(step)
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return losses


# ---- several processes (tests/test_distributed*.py): launch, wait, read a run's metrics, sample ranks ----
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]


def start_process(cmd: list, cwd) -> subprocess.Popen:
    """Start `cmd` in its own session with one thread per process (two ranks share this machine's cores)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([*cmd], cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            start_new_session=True)


def finish_process(process: subprocess.Popen, timeout: float = 300) -> str:
    """Wait for `process` (killing its whole session on a timeout); its stdout, after asserting it succeeded."""
    try:
        out, err = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        raise
    assert process.returncode == 0, err[-4000:]
    return out


def run_metrics(out: Path, key: str = "loss") -> dict[int, float]:
    """{step: value} of `key` ("loss", "eval_loss") in a run's metrics.jsonl."""
    return {m["step"]: m[key] for m in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if key in m}


def child_pids(pid: int) -> list[int]:
    """The processes whose parent is `pid`, read through /proc."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid:
                found.append(int(entry.name))
    return found


def children_anon_peaks(process: subprocess.Popen, interval: float = 0.01) -> list[int]:
    """Until `process` exits: the anonymous (RssAnon) peak of each of its children (a launcher's ranks)."""
    from qlowrank.memory.sampler import StatusSampler

    samplers: dict[int, StatusSampler] = {}
    while process.poll() is None:
        for pid in child_pids(process.pid):
            samplers.setdefault(pid, StatusSampler(pid))
        for sampler in samplers.values():
            try:
                sampler.sample()
            except OSError:   # that rank has exited
                pass
        time.sleep(interval)
    return [sampler.anon_peak for sampler in samplers.values()]
