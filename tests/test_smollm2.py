"""The whole round trip on the real SmolLM2-135M-Instruct (GGUF): 4-bit load, seeded training, adapter, fp32 and bf16 exports, plain load.

Everything is seeded (LoRA init by `load_model(seed=)`, the batches are fixed windows of
fixed text), so the run is the same on every run of the test. What is asserted is what the
arithmetic supports: an fp32 export computes the trained model's function up to fp32
summation order, so its greedy tokens must be identical; a bf16 export rounds every weight
and activation to 8 significant bits, so it gets a derived logits tolerance and top-1
agreement wherever the top-2 margin is wider than the tolerated error, not identical tokens.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pydoc_data.topics import topics

import pytest
import torch

import qlowrank as ql

pytestmark = pytest.mark.slow

QUESTION = "What is the capital of France?"
NEW_TOKENS = 20
# fp32 export vs the trained model run with fp32 compute: both compute dequant(W) x + s B A x
# in fp32, the export as (dequant(W) + s B A) x, so only the summation order differs. fp32's
# unit roundoff is 2^-24 = 6e-8; with ~14 roundings per layer (7 matmuls, their inputs) over
# 30 layers adding in quadrature, sqrt(30 * 14) * 6e-8 = 1.2e-6 relative. 1e-5 leaves ~8x.
FP32_LOGITS_TOL = 1e-5
# bf16 export (weights stored in bf16, run in bf16 by plain transformers) vs the same fp32
# model: bf16 keeps 8 significant bits, unit roundoff u = 2^-8, a rounding error of RMS
# u / sqrt(3) = 2.3e-3. The same count of ~14 roundings per layer over 30 layers plus the
# head, in quadrature: sqrt(30 * 14 + 2) * 2.3e-3 = 0.047 relative logits error.
BF16_LOGITS_TOL = 0.05
# A position's argmax can only change if some logit moves by half the top-2 margin. An error
# of relative size BF16_LOGITS_TOL has per-logit RMS BF16_LOGITS_TOL * rms(logits); positions
# whose margin exceeds FLIP_MARGIN_SIGMAS times that must keep their top-1 token (a 3-sigma
# move of each of the two logits in opposite directions).
FLIP_MARGIN_SIGMAS = 6.0

PLAIN_GENERATE = textwrap.dedent("""
    import json, sys
    for name in ("peft", "bitsandbytes", "qlowrank"):
        sys.modules[name] = None  # not importable: the export must stand on its own
    import torch, transformers
    out_dir, question, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
    tokenizer = transformers.AutoTokenizer.from_pretrained(out_dir)
    model, info = transformers.AutoModelForCausalLM.from_pretrained(out_dir, output_loading_info=True)
    assert not any(info.values()), info
    messages = [{"role": "user", "content": question}]
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True).input_ids
    out = model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False)
    print(json.dumps({"prompt_ids": ids[0].tolist(), "new": out[0, ids.shape[1]:].tolist(), "dtype": str(model.dtype)}))
""")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """SmolLM2 in 4-bit with fp32 compute, LoRA r=8 (seed 0), 10 AdamW steps on fixed text."""
    import transformers

    from qlowrank.model.embedded import smollm2_gguf

    gguf = smollm2_gguf()
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    quant = ql.QuantConfig(bits=4, compute_dtype=torch.float32)
    model = ql.load_model(gguf, quant=quant, lora=ql.LoraConfig(r=8, alpha=16), device="cpu", seed=0)
    initial_a = next(iter(ql.lora_layers(model)))[1].lora_A.weight.detach().clone()
    text = "\n\n".join(topics[key] for key in sorted(topics))[:60_000]
    ids = tokenizer(text, return_tensors="pt").input_ids[0]
    windows = ids[: (len(ids) // 64) * 64].view(-1, 64)   # (N, 64)
    optimizer = torch.optim.AdamW(ql.lora_parameters(model), lr=1e-3)
    model.train()
    losses = []
    for step in range(10):
        batch = windows[2 * step: 2 * step + 2]
        loss = model(batch, labels=batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    model.eval()
    return {"model": model, "tokenizer": tokenizer, "gguf": gguf, "quant": quant, "losses": losses,
            "windows": windows, "dir": tmp_path_factory.mktemp("smollm2"), "initial_a": initial_a}


def test_training_is_seeded_and_the_adapter_reloads_exactly(trained):
    losses = trained["losses"]
    assert sum(losses[-3:]) < sum(losses[:3])  # it trained
    work = trained["dir"]
    ql.save_adapter(trained["model"], work / "adapter")
    reloaded = ql.load_model(trained["gguf"], quant=trained["quant"], device="cpu")
    ql.load_adapter(reloaded, work / "adapter")
    probe = trained["windows"][30:31]
    with torch.no_grad():
        assert torch.equal(reloaded(probe).logits, trained["model"](probe).logits)
    del reloaded
    # The same seed gives the same LoRA init: a fresh load draws the factors the run started from.
    again = ql.load_model(trained["gguf"], quant=trained["quant"], lora=ql.LoraConfig(r=8, alpha=16), device="cpu", seed=0)
    assert torch.equal(next(iter(ql.lora_layers(again)))[1].lora_A.weight, trained["initial_a"])


def _greedy(model, tokenizer):
    messages = [{"role": "user", "content": QUESTION}]
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                           return_dict=True).input_ids
    with torch.no_grad():
        out = model.generate(prompt, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False,
                             output_scores=True, return_dict_in_generate=True)
    top2 = torch.stack(out.scores).float().topk(2, dim=-1).values  # (steps, 1, 2)
    return prompt[0].tolist(), out.sequences[0, prompt.shape[1]:].tolist(), (top2[..., 0] - top2[..., 1]).flatten()


def test_fp32_export_gives_identical_greedy_tokens_in_plain_transformers(trained):
    model, tokenizer, work = trained["model"], trained["tokenizer"], trained["dir"]
    report = ql.export_merged(model, work / "merged-fp32", dtype=torch.float32, tokenizer=tokenizer)
    assert report["relative_logits_error"] < FP32_LOGITS_TOL, report
    result = subprocess.run(
        [sys.executable, "-c", PLAIN_GENERATE, str(work / "merged-fp32"), QUESTION, str(NEW_TOKENS)],
        check=True, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": ""},
    )
    plain = json.loads(result.stdout.strip().splitlines()[-1])
    assert plain["dtype"] == "torch.float32"
    prompt, ours, margins = _greedy(model, tokenizer)
    assert plain["prompt_ids"] == prompt   # the exported tokenizer + chat template are the model's
    print(f"greedy: {tokenizer.decode(ours)!r}; smallest top-2 logit margin {margins.min():.4f}")
    assert len(ours) == NEW_TOKENS and plain["new"] == ours, (tokenizer.decode(plain["new"]), tokenizer.decode(ours))


def test_bf16_export_stays_within_the_derived_logits_tolerance_and_keeps_clear_top1_tokens(trained):
    import transformers

    model, work = trained["model"], trained["dir"]
    ql.export_merged(model, work / "merged-bf16", dtype=torch.bfloat16, probe=False, progress=False)
    assert json.loads((work / "merged-bf16" / "qlowrank_export_report.json").read_text())["dtype"] == "bfloat16"
    plain = transformers.AutoModelForCausalLM.from_pretrained(work / "merged-bf16")
    assert plain.dtype == torch.bfloat16
    batch = trained["windows"][40:44]   # real text, 4 x 64 positions
    with torch.no_grad():
        reference = model(batch).logits.float()     # (4, 64, vocab)
        exported = plain(batch).logits.float()
    error = float((exported - reference).norm() / reference.norm())
    top2 = reference.topk(2, dim=-1).values
    margin = top2[..., 0] - top2[..., 1]                                        # (4, 64)
    clear = margin > FLIP_MARGIN_SIGMAS * BF16_LOGITS_TOL * reference.pow(2).mean().sqrt()
    agree = exported.argmax(-1) == reference.argmax(-1)
    print(f"bf16 export: relative logits error {error:.4f} (tolerance {BF16_LOGITS_TOL}); top-1 agreement "
          f"{agree.float().mean():.4f} overall, {agree[clear].float().mean():.4f} on {int(clear.sum())} clear positions")
    assert error < BF16_LOGITS_TOL
    assert clear.sum() > 0 and bool(agree[clear].all())
