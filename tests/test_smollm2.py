"""The whole round trip on the real SmolLM2-135M-Instruct (GGUF): 4-bit load, train, adapter, bf16 export, plain load."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from pydoc_data.topics import topics

import qlowrank as ql

pytestmark = pytest.mark.slow

QUESTION = "What is the capital of France?"
NEW_TOKENS = 20
# bf16 export vs the trained model (4-bit base, bf16 compute): both round every weight and
# activation to bf16 (u = 2^-8), but at different points (the trained model rounds dequant(W)
# and the LoRA branch separately, the export rounds the merged W once). Over 30 layers this
# measured 0.016 relative logits error on the probe batch (argmax agreement 1.0); the bound
# 0.1 leaves ~6x headroom for other CPUs' bf16 kernels.
SMOLLM2_BF16_TOL = 0.1

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


def test_smollm2_gguf_4bit_train_adapter_export_plain_generate(tmp_path):
    from qlowrank.embedded import smollm2_gguf

    gguf = smollm2_gguf()
    import transformers

    tokenizer = transformers.AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    quant = ql.QuantConfig(bits=4, compute_dtype=torch.bfloat16)
    torch.manual_seed(0)
    # 1. load in 4-bit (GGUF path); 2. LoRA + 10 training steps
    model = ql.load_model(gguf, quant=quant, lora=ql.LoraConfig(r=8, alpha=16), device="cpu")
    text = "\n\n".join(topics[key] for key in sorted(topics))[:60_000]
    ids = tokenizer(text, return_tensors="pt").input_ids[0]
    windows = ids[: (len(ids) // 64) * 64].view(-1, 64)
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
    assert sum(losses[-3:]) < sum(losses[:3])  # it trained
    model.eval()

    # 3. save and reload the adapter into a fresh 4-bit base
    ql.save_adapter(model, tmp_path / "adapter")
    reloaded = ql.load_model(gguf, quant=quant, device="cpu")
    ql.load_adapter(reloaded, tmp_path / "adapter")
    probe = windows[30:31]
    with torch.no_grad():
        assert torch.equal(reloaded(probe).logits, model(probe).logits)
    del reloaded

    # 4. export bf16 (tokenizer written from the GGUF)
    report = ql.export_merged(model, tmp_path / "merged", dtype=torch.bfloat16)
    assert report["relative_logits_error"] < SMOLLM2_BF16_TOL
    assert json.loads((tmp_path / "merged" / "qlowrank_export_report.json").read_text())["dtype"] == "bfloat16"

    # 5. plain transformers loads it (peft / bitsandbytes / qlowrank blocked); 6. same greedy tokens
    result = subprocess.run(
        [sys.executable, "-c", PLAIN_GENERATE, str(tmp_path / "merged"), QUESTION, str(NEW_TOKENS)],
        check=True, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": ""},
    )
    plain = json.loads(result.stdout.strip().splitlines()[-1])
    assert plain["dtype"] == "torch.bfloat16"
    messages = [{"role": "user", "content": QUESTION}]
    prompt_ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                               return_dict=True).input_ids
    assert plain["prompt_ids"] == prompt_ids[0].tolist()  # the exported tokenizer + template are the model's
    with torch.no_grad():
        out = model.generate(prompt_ids, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False,
                             output_scores=True, return_dict_in_generate=True)
    ours = out.sequences[0, prompt_ids.shape[1]:].tolist()
    top2 = torch.stack(out.scores).float().topk(2, dim=-1).values  # (steps, 1, 2)
    margins = (top2[..., 0] - top2[..., 1]).flatten()
    assert len(ours) == NEW_TOKENS
    print(f"greedy: {tokenizer.decode(ours)!r}; smallest top-2 logit margin {margins.min():.3f}")
    assert plain["new"][:len(ours)] == ours, (tokenizer.decode(plain["new"]), tokenizer.decode(ours), margins.tolist())
