"""Mixtures of experts (Qwen3-MoE, Mixtral, gpt-oss, Qwen2-MoE, OLMoE): streamed loading through transformers' conversions, experts
stored 4/8-bit, LoRA on experts and routers in PEFT's target_parameters layout both ways (PEFT's all-linear MoE
adapters included), merged export, estimate vs measured."""

from __future__ import annotations

import json

import pytest
import torch
import transformers
from safetensors import safe_open

import qlowrank as ql
from qlowrank.nn import quant as quantlib
from qlowrank.nn.experts import ExpertWeights, FrozenExperts
from qlowrank.nn.router import LoraRouter
from conftest import adamw_losses, random_lora_b, rel_error

peft = pytest.importorskip("peft")

# Same bits: the float path runs transformers' arithmetic in the same order (measured 1e-7 .. 3e-7 on these models).
FLOAT_TOLERANCE = 1e-5
# NF4 round trip of N(0, 0.02) weights, blocksize 64: 0.091 per expert here, 0.092 in machine-notes; int8 0.006.
NF4_ERROR_BOUND = 0.11
INT8_ERROR_BOUND = 0.01
# Issue 32's target for 4-bit MoE blocks (a dense model's blocks are ~0.26x).
BLOCK_SHARE_BOUND = 0.30


def moe_config(family: str, hidden: int = 64, vocab: int = 256) -> transformers.PretrainedConfig:
    common = dict(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=hidden // 4)
    if family == "qwen3_moe":
        return transformers.Qwen3MoeConfig(intermediate_size=2 * hidden, moe_intermediate_size=hidden // 2,
                                           num_experts=8, num_experts_per_tok=2, **common)
    if family == "mixtral":
        return transformers.MixtralConfig(intermediate_size=hidden // 2, num_local_experts=4, num_experts_per_tok=2,
                                          **common)
    if family == "gpt_oss":
        return transformers.GptOssConfig(intermediate_size=hidden // 2, num_local_experts=4, num_experts_per_tok=2,
                                         layer_types=["sliding_attention", "full_attention"], **common)
    if family == "qwen2_moe":   # a shared expert (and its sigmoid gate) beside the routed ones, q/k/v biases
        common.pop("head_dim")    # not a Qwen2-MoE setting: hidden_size / heads
        return transformers.Qwen2MoeConfig(intermediate_size=2 * hidden, moe_intermediate_size=hidden // 2,
                                           shared_expert_intermediate_size=hidden, num_experts=4,
                                           num_experts_per_tok=2, **common)
    if family == "olmoe":   # q/k norms over the whole projection: as many key/value heads as heads (OLMoE-1B-7B)
        common.update(num_key_value_heads=4)
        common.pop("head_dim")
        return transformers.OlmoeConfig(intermediate_size=hidden // 2, num_experts=4, num_experts_per_tok=2, **common)
    raise ValueError(family)


FAMILIES = ["qwen3_moe", "mixtral", "gpt_oss", "qwen2_moe", "olmoe"]
# Where PEFT 0.21's all-linear adapts the router (`mlp.gate.weight`) and the experts (gpt-oss: attention only;
# Qwen2-MoE: attention, the shared expert and its gate, since its block holds nn.Linear layers besides the experts).
ROUTED_BY_PEFT = ["qwen3_moe", "mixtral", "olmoe"]
# Each family's router path inside a block.
ROUTER = {"qwen3_moe": "mlp.gate", "mixtral": "mlp.gate", "gpt_oss": "mlp.router", "qwen2_moe": "mlp.gate", "olmoe": "mlp.gate"}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """One save_pretrained checkpoint per family (per-expert tensors for Qwen3-MoE / Mixtral, fused for gpt-oss)."""
    root = tmp_path_factory.mktemp("moe")
    paths = {}
    for family in FAMILIES:
        torch.manual_seed(0)
        model = transformers.AutoModelForCausalLM.from_config(moe_config(family))
        model.save_pretrained(root / family)
        paths[family] = root / family
    return paths


def ids(seed: int = 1) -> torch.Tensor:
    return torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(seed))


def reference(path) -> torch.nn.Module:
    return transformers.AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()


def load(path, bits, lora=None) -> torch.nn.Module:
    quant = ql.QuantConfig(bits=bits, compute_dtype=torch.float32)
    return ql.load_model(path, quant=quant, lora=lora, device="cpu", progress=False, seed=0)


def expert_lora() -> ql.LoraConfig:
    return ql.LoraConfig(r=4, alpha=8, target_parameters=["experts"])


def expert_and_router_lora() -> ql.LoraConfig:
    return ql.LoraConfig(r=4, alpha=8, target_parameters=["experts", "router"])


@pytest.mark.parametrize("family", FAMILIES)
def test_streamed_load_matches_transformers(checkpoints, family):
    if family != "gpt_oss":   # the point: save_pretrained writes one tensor per expert
        with safe_open(str(checkpoints[family] / "model.safetensors"), "pt") as handle:
            assert any(".experts.3." in key for key in handle.keys())
    ours = load(checkpoints[family], None)
    with torch.no_grad():
        assert rel_error(ours(ids()).logits, reference(checkpoints[family])(ids()).logits) < FLOAT_TOLERANCE


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("bits", [4, 8])
def test_experts_stored_quantized_per_expert(checkpoints, family, bits):
    model = load(checkpoints[family], bits)
    ref = reference(checkpoints[family])
    experts = [m for m in model.modules() if isinstance(m, FrozenExperts)]
    assert len(experts) == 2
    original = ref.model.layers[0].mlp.experts
    frozen = experts[0]
    bound = NF4_ERROR_BOUND if bits == 4 else INT8_ERROR_BOUND
    for name in frozen.order:
        weights: ExpertWeights = getattr(frozen, name)
        stack = getattr(original, name).detach()
        stack = stack.transpose(1, 2) if original.is_transposed else stack   # (E, out, in)
        for e in range(weights.experts):
            assert rel_error(weights.weight(e, torch.float32), stack[e]) < bound
        # Per weight, the shared code books (a constant 1.1 KiB per stack) aside: NF4 0.5 B + block scales,
        # int8 1 B + one float32 scale per row of `in` weights.
        books = sum(getattr(weights, b).numel() * 4 for b in ("code", "code2") if hasattr(weights, b))
        per_weight = 0.6 if bits == 4 else 1.0 + 4 / weights.in_features + 0.01
        assert weights.stored_bytes() - books < stack.numel() * per_weight
    # Every float expert copy is gone: no 3-D float parameter remains (LLM.int8's codes are 3-D int8); the stored
    # stacks are frozen parameters (FSDP shards parameters, not buffers).
    assert not [n for n, p in model.named_parameters() if p.dim() == 3 and p.is_floating_point()]
    assert all(not p.requires_grad for name in frozen.order for p in getattr(frozen, name).parameters())
    assert ql.count_parameters(model).total == sum(p.numel() for p in ref.parameters())


@pytest.mark.parametrize("family", FAMILIES)
def test_moe_blocks_stored_near_dense_share(tmp_path, family):
    """A 4-bit MoE block holds <= 0.30x its bf16 bytes (the router stays float; it is tiny at real widths)."""
    torch.manual_seed(0)
    config = moe_config(family, hidden=256)
    float_model = transformers.AutoModelForCausalLM.from_config(config)
    float_model.save_pretrained(tmp_path)
    bf16_bytes = sum(p.numel() * 2 for p in float_model.model.layers[0].parameters())
    model = ql.load_model(tmp_path, quant=ql.QuantConfig(), device="cpu", progress=False)
    block = model.model.layers[0]
    stored = sum(t.numel() * t.element_size() for t in [*block.parameters(), *block.buffers()])
    assert stored / bf16_bytes <= BLOCK_SHARE_BOUND
    assert quantlib.is_quantized_linear(block.self_attn.q_proj)


@pytest.mark.parametrize("family", FAMILIES)
def test_expert_lora_round_trips_with_peft(checkpoints, family, tmp_path):
    ours = random_lora_b(load(checkpoints[family], None, expert_lora()))
    ql.save_adapter(ours, tmp_path / "ours")
    config = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    assert sorted(config["target_parameters"]) == sorted(
        ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"])
    theirs = peft.PeftModel.from_pretrained(reference(checkpoints[family]), str(tmp_path / "ours")).eval()
    with torch.no_grad():
        expected = ours(ids()).logits
        assert rel_error(theirs(ids()).logits, expected) < FLOAT_TOLERANCE
        with ql.disable_lora(ours):   # the LoRA update is really there: off, the logits move
            assert rel_error(ours(ids()).logits, expected) > 1e-3
    theirs.save_pretrained(str(tmp_path / "theirs"))
    back = ql.load_adapter(load(checkpoints[family], None), tmp_path / "theirs")
    with torch.no_grad():
        assert rel_error(back(ids()).logits, expected) < FLOAT_TOLERANCE


@pytest.mark.parametrize("family", FAMILIES)
def test_expert_and_router_lora_train_on_4bit_and_merge(checkpoints, family, tmp_path):
    model = load(checkpoints[family], 4, expert_and_router_lora())
    router = model.model.layers[0].get_submodule(ROUTER[family])
    assert isinstance(router, LoraRouter) and router.base_layer.weight.dtype == torch.float32   # never quantized
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert trainable and all(p.dtype == torch.float32 for p in trainable)
    batch = ids()

    def check_gradients(step: int) -> None:
        grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad and ("experts" in n or
                                                                                      ROUTER[family] in n)}
        assert any(ROUTER[family] in n for n in grads)
        # B starts at zero, so A's first gradient is zero; from the second step both factors learn.
        assert grads and all(g is not None and (step == 0 and "lora_A" in n or g.abs().sum() > 0)
                             for n, g in grads.items())

    losses = adamw_losses(model, batch, 4, after_backward=check_gradients)
    assert losses[-1] < losses[0]
    model.eval()
    ql.export_merged(model, tmp_path / "merged", dtype=torch.float32, progress=False)
    merged = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "merged"), dtype=torch.float32).eval()
    with torch.no_grad():
        assert rel_error(merged(batch).logits, model(batch).logits) < FLOAT_TOLERANCE
        # The router's update is folded in: the merged router weight moved off the frozen one, by the delta.
        folded = merged.model.layers[0].get_submodule(ROUTER[family]).weight
        assert rel_error(folded, router.base_layer.weight + router.delta_weight()) < FLOAT_TOLERANCE
        assert rel_error(folded, router.base_layer.weight) > 1e-4


def test_incomplete_expert_checkpoint_is_named(checkpoints, tmp_path):
    from safetensors.torch import save_file

    with safe_open(str(checkpoints["qwen3_moe"] / "model.safetensors"), "pt") as handle:
        tensors = {k: handle.get_tensor(k) for k in handle.keys() if k != "model.layers.1.mlp.experts.5.up_proj.weight"}
    save_file(tensors, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    (tmp_path / "config.json").write_text((checkpoints["qwen3_moe"] / "config.json").read_text())
    with pytest.raises(ValueError, match=r"model\.layers\.1\.mlp\.experts\.gate_up_proj"):
        load(tmp_path, 4)


def test_estimate_counts_quantized_experts(checkpoints):
    """The estimator's stand-in stores what the loader stores, byte for byte."""
    model = ql.load_model(checkpoints["qwen3_moe"], quant=ql.QuantConfig(), lora=expert_and_router_lora(),
                          device="cpu", progress=False)
    estimate = ql.estimate_memory(str(checkpoints["qwen3_moe"]), quant=ql.QuantConfig(),
                                  lora=expert_and_router_lora(), batch_size=1, seq_len=16, device="cpu")
    stored = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()]
                 if not t.requires_grad)
    # A bitsandbytes linear keeps its block scales in its quant_state, not in a parameter or buffer.
    stored += sum(quantlib.storage_bytes(m) - m.weight.numel() * m.weight.element_size()
                  for m in model.modules() if quantlib.is_quantized_linear(m))
    assert estimate.breakdown["base_weights"] == stored
    assert estimate.trainable_parameters == ql.count_parameters(model).trainable
    routers = sum(p.numel() for n, p in model.named_parameters() if ".mlp.gate.lora_" in n)
    assert routers == 2 * 4 * (64 + 8)   # 2 layers x r (H + E): the router LoRA is in both counts


def peft_all_linear(path, root) -> "peft.PeftModel":
    """PEFT 0.21's own all-linear adapter on a MoE model (random B), saved under `root`/theirs."""
    theirs = random_lora_b(peft.get_peft_model(reference(path), peft.LoraConfig(r=4, lora_alpha=8,
                                                                                target_modules="all-linear")))
    theirs.save_pretrained(str(root / "theirs"))
    return theirs


@pytest.mark.parametrize("family", ROUTED_BY_PEFT)
def test_peft_all_linear_moe_adapter_both_ways(checkpoints, family, tmp_path):
    """PEFT's all-linear on Qwen3-MoE / Mixtral: attention, experts (gate_up at 2r) and the router, both ways."""
    theirs = peft_all_linear(checkpoints[family], tmp_path)
    config = json.loads((tmp_path / "theirs" / "adapter_config.json").read_text())
    assert "gate.weight" in config["target_parameters"] and config["rank_pattern"] == {".*\\.gate_up_proj": 8}
    ours = ql.load_adapter(load(checkpoints[family], None), tmp_path / "theirs").eval()
    block = ours.model.layers[0]
    assert isinstance(block.mlp.gate, LoraRouter) and block.mlp.gate.r == 4
    assert (block.mlp.experts.gate_up_proj.r, block.mlp.experts.down_proj.r) == (8, 4)
    assert ql.count_parameters(ours).trainable == sum(p.numel() for p in theirs.parameters() if p.requires_grad)
    with torch.no_grad():
        expected = theirs(ids()).logits
        assert rel_error(ours(ids()).logits, expected) < FLOAT_TOLERANCE
        with ql.disable_lora(ours):   # off, every branch, the router's included, gives the base exactly
            assert rel_error(ours(ids()).logits, reference(checkpoints[family])(ids()).logits) < FLOAT_TOLERANCE
    ql.save_adapter(ours, tmp_path / "ours")
    with safe_open(str(tmp_path / "ours" / "adapter_model.safetensors"), "pt") as mine, \
            safe_open(str(tmp_path / "theirs" / "adapter_model.safetensors"), "pt") as peft_file:
        assert set(mine.keys()) == set(peft_file.keys())   # PEFT's key names, router and nesting included
    back = peft.PeftModel.from_pretrained(reference(checkpoints[family]), str(tmp_path / "ours")).eval()
    again = ql.load_adapter(load(checkpoints[family], None), tmp_path / "ours").eval()   # our patterns, read by us
    with torch.no_grad():
        assert rel_error(back(ids()).logits, ours(ids()).logits) < FLOAT_TOLERANCE
        assert rel_error(again(ids()).logits, ours(ids()).logits) < FLOAT_TOLERANCE


def test_peft_all_linear_qwen2_moe_adapter_both_ways(checkpoints, tmp_path):
    """PEFT's all-linear on Qwen2-MoE: attention, the shared expert and its (1, H) gate; no expert nor router LoRA."""
    path = checkpoints["qwen2_moe"]
    theirs = peft_all_linear(path, tmp_path)
    config = json.loads((tmp_path / "theirs" / "adapter_config.json").read_text())
    assert not config["target_parameters"] and any(t.endswith("mlp.shared_expert_gate") for t in config["target_modules"])
    ours = ql.load_adapter(load(path, None), tmp_path / "theirs").eval()
    block = ours.model.layers[0]
    assert block.mlp.shared_expert_gate.r == 4 and block.mlp.shared_expert.down_proj.r == 4
    assert not [n for n, _ in ours.named_parameters() if "lora_" in n and (".experts." in n or ".mlp.gate." in n)]
    assert ql.count_parameters(ours).trainable == sum(p.numel() for p in theirs.parameters() if p.requires_grad)
    with torch.no_grad():
        expected = theirs(ids()).logits
        assert rel_error(ours(ids()).logits, expected) < FLOAT_TOLERANCE
        assert rel_error(reference(path)(ids()).logits, expected) > 1e-3   # the adapter does something
    # qlowrank's own all-linear adapts the same layers, so its adapter has PEFT's keys.
    ql.save_adapter(random_lora_b(load(path, None, ql.LoraConfig(r=4, alpha=8))), tmp_path / "ours")
    with safe_open(str(tmp_path / "ours" / "adapter_model.safetensors"), "pt") as handle, \
            safe_open(str(tmp_path / "theirs" / "adapter_model.safetensors"), "pt") as peft_file:
        assert set(handle.keys()) == set(peft_file.keys())


def test_qwen2_moe_dense_layers_between_moe_layers_load(tmp_path):
    """mlp_only_layers: a plain MLP in layer 0, experts in layer 1; streamed, equal to transformers, experts 4-bit."""
    config = moe_config("qwen2_moe")
    config.mlp_only_layers = [0]
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path)
    with torch.no_grad():
        assert rel_error(load(tmp_path, None)(ids()).logits, reference(tmp_path)(ids()).logits) < FLOAT_TOLERANCE
    model = load(tmp_path, 4, expert_lora())
    assert [type(m).__name__ for m in model.modules() if isinstance(m, FrozenExperts)] == ["FrozenExperts"]
    assert quantlib.is_quantized_linear(model.model.layers[0].mlp.down_proj.base_layer)


@pytest.mark.parametrize("family", FAMILIES)
def test_router_lora_alone_round_trips_with_peft(checkpoints, family, tmp_path):
    """Router LoRA by PEFT's parameter name (gpt-oss's router is `mlp.router`), saved so PEFT reads it."""
    name = f"{ROUTER[family]}.weight"
    ours = random_lora_b(load(checkpoints[family], None, ql.LoraConfig(r=4, alpha=8, target_modules=["q_proj"],
                                                                       target_parameters=[name])))
    assert not [n for n, _ in ours.named_parameters() if "experts" in n and "lora_" in n]   # the router only
    ql.save_adapter(ours, tmp_path / "ours")
    assert json.loads((tmp_path / "ours" / "adapter_config.json").read_text())["target_parameters"] == [name]
    theirs = peft.PeftModel.from_pretrained(reference(checkpoints[family]), str(tmp_path / "ours")).eval()
    with torch.no_grad():
        expected = ours(ids()).logits
        assert rel_error(theirs(ids()).logits, expected) < FLOAT_TOLERANCE
        with ql.disable_lora(ours):
            assert rel_error(ours(ids()).logits, expected) > 1e-3


def test_router_target_that_matches_nothing_is_named(checkpoints):
    with pytest.raises(ValueError, match=r"\['gate\.weight'\] matched no fused MoE expert parameter nor router"):
        load(checkpoints["gpt_oss"], None, ql.LoraConfig(r=4, target_parameters=["experts", "gate.weight"]))


PIN_CHILD = r"""
import sys, torch, transformers
sys.path.insert(0, sys.argv[1])
from test_moe import moe_config
import qlowrank as ql
from qlowrank.heap import heap_statistics
from qlowrank.model.checkpointing import trim_heaps_before_backward

big = torch.empty(30 << 20, dtype=torch.uint8); big.fill_(1); del big   # glibc now raises its threshold to ~30 MiB
model = transformers.AutoModelForCausalLM.from_config(moe_config("qwen3_moe"))
ql.quantize_model(model, ql.QuantConfig(bits=4, compute_dtype=torch.float32))
trim_heaps_before_backward(model)
before = heap_statistics()["hblkhd"]
temporary = torch.empty(20 << 20, dtype=torch.uint8); temporary.fill_(1)
print(heap_statistics()["hblkhd"] - before)
"""


@pytest.mark.parametrize("trims", ["1", "0"])
def test_training_an_moe_on_cpu_pins_the_mmap_threshold(trims):
    """Routed experts fragment glibc's heaps (heap.py): a CPU MoE model's training pins the mmap threshold,
    so a 20 MiB temporary is mmapped (and returned on free) even after glibc raised its threshold past it."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    from qlowrank.heap import heap_statistics

    if not heap_statistics():
        pytest.skip("needs glibc >= 2.33 (mallinfo2)")
    out = subprocess.run([sys.executable, "-c", PIN_CHILD, str(Path(__file__).parent)], capture_output=True, text=True,
                         env={**os.environ, "QLOWRANK_HEAP_TRIM": trims}, timeout=300, check=True).stdout
    mmapped = int(out.strip().splitlines()[-1])
    if trims == "1":
        assert mmapped >= 20 << 20
    else:   # the control: without the pin the temporary lands in the heap
        assert mmapped < 20 << 20


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("bits", [4, 8, None])
def test_experts_streamed_one_at_a_time_equal_the_whole_stack(checkpoints, family, bits):
    """Loading quantizes each expert as it arrives (converted expert by expert, or read a slice at a time):
    the stored tensors equal those of quantizing transformers' own fused stack, bit for bit."""
    from qlowrank.nn.experts import freeze_experts

    model = load(checkpoints[family], bits)
    original = reference(checkpoints[family]).model.layers[1].mlp.experts
    if bits is None:   # a float base keeps transformers' 3-D parameters, filled expert by expert
        for name, param in original.named_parameters():
            assert torch.equal(getattr(model.model.layers[1].mlp.experts, name), param)
        return
    whole = freeze_experts(original, ql.QuantConfig(bits=bits, compute_dtype=torch.float32), "cpu", torch.float32)
    streamed = model.model.layers[1].mlp.experts
    for name in whole.order:
        ours, theirs = getattr(streamed, name), getattr(whole, name)
        assert ours.packed_names == theirs.packed_names
        for tensor in ours.packed_names:
            assert torch.equal(getattr(ours, tensor), getattr(theirs, tensor)), (name, tensor)
        assert (ours.bias is None) == (theirs.bias is None)
        assert ours.bias is None or torch.equal(ours.bias, theirs.bias)


@pytest.mark.parametrize("family", ["qwen3_moe", "mixtral"])
def test_per_expert_tensors_are_converted_expert_by_expert(checkpoints, family):
    """transformers' converter runs on each expert's tensors as soon as they are in: (1, ...) slices, never a
    whole float stack, and every expert of every target exactly once."""
    from qlowrank.model.convert import CheckpointConversions
    from qlowrank.model.stream import TensorSink, empty_model

    config = transformers.AutoConfig.from_pretrained(checkpoints[family])
    model = empty_model(config, torch.float32)
    sink = TensorSink(model, _settings())
    with safe_open(str(checkpoints[family] / "model.safetensors"), "pt") as handle:
        conversions = CheckpointConversions(model, list(handle.keys()), sink.expected, sliced=sink.streams_experts)
        seen: dict[str, list[int]] = {}
        for key in handle.keys():
            if conversions.feeds_group(key):
                for out in conversions.add(key, handle.get_tensor(key)):
                    assert out.expert is not None and out.tensor.shape[0] == 1
                    assert tuple(out.tensor.shape[1:]) == tuple(model.get_parameter(out.key).shape[1:])
                    seen.setdefault(out.key, []).append(out.expert)
    assert len(seen) == 2 * 2   # two layers x (gate_up, down)
    assert all(sorted(experts) == list(range(config.num_experts if family == "qwen3_moe" else
                                             config.num_local_experts)) for experts in seen.values())
    assert not conversions.incomplete()


def _settings():
    from qlowrank.model.stream import LoadSettings

    return LoadSettings(ql.QuantConfig(compute_dtype=torch.float32), torch.device("cpu"), torch.float32)
