"""torchtune's QLoRA as a peer for benchmarks/vs_peft.py (`--libs torchtune`), on SmolLM2-135M.

Follows torchtune 0.6.1's recipes/lora_finetune_single_device.py for QLoRA: the Llama-3.2
LoRA component builder with quantize_base=True (torchao NF4, blocks of 64, double-quantized
scalers), built under a bf16 default dtype (so its LoRA factors and AdamW state are bf16),
only the adapter trainable, activation checkpointing on every TransformerSelfAttentionLayer,
CEWithChunkedOutputLoss (8 chunks, fp32 per chunk). vs_peft's worker supplies the batches,
the optimizer (torch AdamW, lr 2e-4) and the step schedule.

torchtune is not a qlowrank dependency. Install it beside the project, not into its venv:

    .venv/bin/python -m pip install --no-deps --target benchmarks/_cache/torchtune_site \
        torchtune==0.6.1 torchao==0.15.0 omegaconf antlr4-python3-runtime==4.9.3 sentencepiece tiktoken blobfile

torchao 0.15 is the newest that torchtune 0.6.1 imports (0.16/0.17 lack `int4_weight_only`,
0.18 lacks `torchao.dtypes.nf4tensor`); its NF4 code is plain PyTorch, so the "incompatible
torch version" notice about its C++ extensions does not matter here.
"""

from __future__ import annotations

from pathlib import Path

import torch

SITE = Path(__file__).resolve().parent / "_cache" / "torchtune_site"
SMOLLM2 = dict(vocab_size=49152, num_layers=30, num_heads=9, num_kv_heads=3, embed_dim=576,
               intermediate_dim=1536, norm_eps=1e-5, rope_base=100_000, max_seq_len=8192)


def _nf4_with_a_fitting_scaler_block():
    """torchao's double quantization needs (numel / 64) divisible by its scaler block (256),
    which SmolLM2's attention weights are not (576 x 576 gives 5184 scalers), and torchtune's
    builders do not expose the block size: halve it (to 64 at least) where 256 does not
    divide. q/k/v/o get 64, the MLP keeps 256; the NF4 reconstruction error is unchanged."""
    import torchao.dtypes.nf4tensor as nf4
    import torchtune.modules.low_precision.nf4_linear as nf4_linear
    import torchtune.modules.peft.lora as lora

    def to_nf4(tensor, block_size: int = 64, scaler_block_size: int = 256):
        while (tensor.numel() // block_size) % scaler_block_size and scaler_block_size > 64:
            scaler_block_size //= 2
        return nf4.NF4Tensor.from_tensor(tensor, block_size, scaler_block_size)

    lora.to_nf4 = nf4_linear.to_nf4 = to_nf4


def build(folder: Path):
    """(model, trainable params, loss_fn(model, x)) for torchtune's QLoRA on SmolLM2."""
    from safetensors.torch import load_file
    from torchtune import modules, training
    from torchtune.models.convert_weights import hf_to_tune
    from torchtune.models.llama3_2._component_builders import lora_llama3_2
    from torchtune.modules.loss import CEWithChunkedOutputLoss
    from torchtune.modules.peft import (
        get_adapter_params,
        set_trainable_params,
        validate_missing_and_unexpected_for_lora,
    )

    if folder.name != "smollm2":
        raise SystemExit("the torchtune peer is built for SmolLM2-135M only (--models smollm2)")
    _nf4_with_a_fitting_scaler_block()
    attention = ["q_proj", "k_proj", "v_proj", "output_proj"]
    with training.set_default_dtype(torch.bfloat16), torch.device("cpu"):
        # scale_factor=1 turns Llama-3's RoPE scaling into SmolLM2's plain RoPE
        model = lora_llama3_2(attention, apply_lora_to_mlp=True, apply_lora_to_output=False, **SMOLLM2,
                              scale_factor=1, lora_rank=16, lora_alpha=32, lora_dropout=0.0,
                              quantize_base=True, tie_word_embeddings=True)
    adapter = get_adapter_params(model)
    set_trainable_params(model, adapter)
    training.set_activation_checkpointing(model, auto_wrap_policy={modules.TransformerSelfAttentionLayer})
    state = hf_to_tune(load_file(str(folder / "model.safetensors")), num_heads=9, num_kv_heads=3, dim=576, head_dim=64)
    missing, unexpected = model.load_state_dict(state, strict=False)   # NF4Tensor.copy_ quantizes
    validate_missing_and_unexpected_for_lora(lora_attn_modules=attention, apply_lora_to_mlp=True,
                                             apply_lora_to_output=False, base_missing=missing,
                                             base_unexpected=unexpected)
    loss = CEWithChunkedOutputLoss()
    model.set_num_output_chunks(loss.num_output_chunks)

    def loss_fn(m, x: torch.Tensor) -> torch.Tensor:
        labels = torch.hstack((x[:, 1:], torch.full((x.shape[0], 1), loss.ignore_index, dtype=x.dtype)))  # (B, T)
        return loss(m(x), labels)

    return model, list(adapter.values()), loss_fn
