"""The support matrix: every family through every path on a tiny random model; docs/models.md's table is what this finds.

Each (family, path) test records "yes", or "refused" where qlowrank raises a clear ValueError
for it (any other exception fails the test). The last test renders the table from those
records and compares it with the one in docs/models.md, so the page cannot claim a path that
does not work, nor miss one that does. After a change that makes a path work or refuses it,
regenerate the page:

    QLOWRANK_WRITE_MATRIX=1 .venv/bin/python -m pytest -q tests/test_support_matrix.py
"""

from __future__ import annotations

import importlib.util
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import gguf
import pytest
import torch
import transformers
from conftest import adamw_losses, random_lora_b, rel_error, tiny_tokenizer
from test_gguf_families import CONFIGS as DENSE_CONFIGS
from test_gguf_moe import _config as gguf_moe_config

import qlowrank as ql
from qlowrank.nn import quant as quantlib

peft = pytest.importorskip("peft")

DOCS = Path(__file__).resolve().parents[1] / "docs" / "models.md"
START, END = "<!-- support-matrix:start -->", "<!-- support-matrix:end -->"
# Float32 on both sides, the same weights: only the order of summation may differ (measured <= 4e-7).
FLOAT_TOLERANCE = 1e-5
MOE = ("qwen3_moe", "mixtral", "gpt_oss", "qwen2_moe", "olmoe")
FAMILIES = (*DENSE_CONFIGS, *MOE)
# transformers 5's fused expert parameters, the same names in all three MoE families.
EXPERT_PARAMETERS = ("mlp.experts.gate_up_proj", "mlp.experts.down_proj")
# path -> what the test proves (the docs' column legend).
PATHS = {
    "load HF": "streamed load of a save_pretrained checkpoint: float logits equal transformers' from_pretrained",
    "train 4-bit": "NF4 base + LoRA, three AdamW steps: the loss falls, only LoRA factors have gradients",
    "train 8-bit": "LLM.int8 base + LoRA, the same",
    "adapter to PEFT": "save_adapter, then PeftModel.from_pretrained on the float base: the same logits",
    "adapter from PEFT": "a PEFT adapter (random B) into load_adapter: PEFT's logits",
    "merged export": "4-bit + trained LoRA, export_merged: plain transformers gives the trained model's logits",
    "GGUF export": "the merged model as f32 GGUF, read by transformers' GGUF reader: the merged export's logits; "
                   "\"yes (llama.cpp)\" where transformers cannot read that architecture (or misreads it) and "
                   "llama-cpp-python ran the file instead, within tests/test_llamacpp.py's tolerances",
    "load GGUF": "load_model on that GGUF (qlowrank's streamed reader): the merged export's logits",
    "adapter GGUF": "save_gguf_adapter: every lora_a / lora_b pair names a tensor of the base GGUF, shapes (r, in) / (out, r); "
                    "MoE expert LoRA on its ffn_*_exps, (E, r, in) / (E, out, r)",
    "estimate": "estimate_memory's base bytes equal the 4-bit model's stored bytes, exactly",
}
# Architectures transformers 5.25's GGUF reader loads without an error but wrongly, so it cannot
# be the independent witness (tests/test_gguf_moe.py measures it); the "load GGUF" column reads
# these files with qlowrank's reader.
MISREAD_BY_TRANSFORMERS = {"mixtral": "builds a dense Llama from llama-with-experts",
                           "gpt_oss": "drops the expert and sink tensors"}
RESULTS: dict[str, dict[str, str]] = {}
# The cell of a path proved by llama.cpp, the one witness left where transformers cannot read a GGUF; without
# llama-cpp-python (the optional `llama` extra: not installed by .ci/run) that cell is "untested".
BY_LLAMACPP = "yes (llama.cpp)"
HAS_LLAMACPP = importlib.util.find_spec("llama_cpp") is not None


@dataclass
class Family:
    """One family's tiny checkpoint and what its paths build (lazily, shared between the paths)."""

    name: str
    root: Path
    tok: transformers.PreTrainedTokenizerBase
    cache: dict = field(default_factory=dict)

    @property
    def checkpoint(self) -> Path:
        return self.root / "base"

    @property
    def lora(self) -> ql.LoraConfig:
        experts = ["experts"] if self.name in MOE else []
        return ql.LoraConfig(r=4, alpha=8, target_parameters=experts)

    def ids(self) -> torch.Tensor:
        return torch.randint(0, len(self.tok), (2, 16), generator=torch.Generator().manual_seed(1))

    def load(self, bits: int | None, lora: bool = True) -> torch.nn.Module:
        quant = ql.QuantConfig(bits=bits, compute_dtype=torch.float32)
        return ql.load_model(self.checkpoint, quant=quant, lora=self.lora if lora else None, device="cpu",
                             progress=False, seed=0)

    def reference(self) -> torch.nn.Module:
        return transformers.AutoModelForCausalLM.from_pretrained(str(self.checkpoint), dtype=torch.float32).eval()


def family_config(name: str, vocab: int) -> transformers.PretrainedConfig:
    if name in MOE:   # with the values GGUF readers assume for what the file does not say
        return gguf_moe_config(name, vocab)
    config = DENSE_CONFIGS[name]()
    config.vocab_size = vocab
    return config


@pytest.fixture(scope="module")
def families(tmp_path_factory):
    tok = tiny_tokenizer()
    built: dict[str, Family] = {}

    def get(name: str) -> Family:
        if name not in built:
            root = tmp_path_factory.mktemp(name)
            torch.manual_seed(0)
            model = transformers.AutoModelForCausalLM.from_config(family_config(name, len(tok)))
            model.save_pretrained(root / "base")
            tok.save_pretrained(root / "base")
            built[name] = Family(name, root, tok)
        return built[name]

    return get


def logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits.float()


def trained(family: Family, bits: int) -> torch.nn.Module:
    """The family's model, quantized to `bits`, after three AdamW steps on one batch (cached per bits)."""
    key = f"trained-{bits}"
    if key not in family.cache:
        model = family.load(bits)

        def base_frozen(step: int) -> None:
            frozen_grads = [n for n, p in model.named_parameters() if p.grad is not None and "lora_" not in n]
            assert not frozen_grads, f"the base got gradients: {frozen_grads[:3]}"

        losses = adamw_losses(model, family.ids(), 3, after_backward=base_frozen)
        assert losses[-1] < losses[0], losses
        family.cache[key] = model.eval()
    return family.cache[key]


def merged(family: Family) -> Path:
    """The 4-bit trained model exported as fp32 safetensors (cached)."""
    out = family.root / "merged"
    if not out.exists():
        ql.export_merged(trained(family, 4), out, dtype=torch.float32, tokenizer=family.tok, probe=False,
                         progress=False)
    return out


def merged_logits(family: Family) -> torch.Tensor:
    if "merged-logits" not in family.cache:
        plain = transformers.AutoModelForCausalLM.from_pretrained(str(merged(family)), dtype=torch.float32).eval()
        family.cache["merged-logits"] = logits(plain, family.ids())
    return family.cache["merged-logits"]


def merged_gguf(family: Family) -> Path:
    out = family.root / "merged.gguf"
    if not out.exists():
        ql.export_merged(trained(family, 4), out, format="gguf", gguf_type="f32", tokenizer=family.tok, probe=False,
                         progress=False)
    return out


def check_load_hf(family: Family) -> None:
    ours = family.load(None, lora=False)
    assert rel_error(logits(ours, family.ids()), logits(family.reference(), family.ids())) < FLOAT_TOLERANCE


def check_train(bits: int):
    def check(family: Family) -> None:
        model = trained(family, bits)
        layers = [m for m in model.modules() if quantlib.is_quantized_linear(m)]
        assert layers and all(quantlib.quantized_bits(m) == bits for m in layers)
    return check


def check_adapter_to_peft(family: Family) -> None:
    ours = random_lora_b(family.load(None))
    ql.save_adapter(ours, family.root / "ours")
    theirs = peft.PeftModel.from_pretrained(family.reference(), str(family.root / "ours")).eval()
    expected = logits(ours, family.ids())
    assert rel_error(logits(theirs, family.ids()), expected) < FLOAT_TOLERANCE
    assert rel_error(logits(family.reference(), family.ids()), expected) > 1e-3   # the adapter does something


def check_adapter_from_peft(family: Family) -> None:
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear",
                             target_parameters=list(EXPERT_PARAMETERS) if family.name in MOE else None)
    theirs = random_lora_b(peft.get_peft_model(family.reference(), config))
    theirs.save_pretrained(str(family.root / "theirs"))
    ours = ql.load_adapter(family.load(None, lora=False), family.root / "theirs")
    assert rel_error(logits(ours, family.ids()), logits(theirs, family.ids())) < FLOAT_TOLERANCE


def check_merged_export(family: Family) -> None:
    assert rel_error(merged_logits(family), logits(trained(family, 4), family.ids())) < FLOAT_TOLERANCE


def check_gguf_export(family: Family) -> str | None:
    path = merged_gguf(family)
    why = MISREAD_BY_TRANSFORMERS.get(family.name)
    if why is None:
        try:
            read = transformers.AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                                     dtype=torch.float32).eval()
        except (ValueError, KeyError, NotImplementedError) as error:   # an architecture transformers cannot read
            why = f"cannot read it: {error}"
        else:
            assert rel_error(logits(read, family.ids()), merged_logits(family)) < FLOAT_TOLERANCE
            return None
    if not HAS_LLAMACPP:
        pytest.skip(f"no independent reader of {family.name}'s GGUF: transformers' reader {why}, "
                    "and llama-cpp-python is not installed")
    from test_llamacpp import _tolerance, llamacpp_logits

    tokens = family.ids()[0].tolist()
    reference = merged_logits(family)[0]
    assert rel_error(llamacpp_logits(path, tokens), reference) <= _tolerance(family.name)
    return BY_LLAMACPP


def check_load_gguf(family: Family) -> None:
    path = merged_gguf(family)
    ours = ql.load_model(path, quant=ql.QuantConfig(bits=None, compute_dtype=torch.float32), device="cpu",
                         progress=False)
    assert rel_error(logits(ours, family.ids()), merged_logits(family)) < FLOAT_TOLERANCE


def check_adapter_gguf(family: Family) -> None:
    model = trained(family, 4)
    path = family.root / "adapter.gguf"
    ql.save_gguf_adapter(model, path, overwrite=True)
    base = {t.name: tuple(reversed(t.shape.tolist())) for t in gguf.GGUFReader(str(merged_gguf(family))).tensors}
    reader = gguf.GGUFReader(str(path))
    tensors = {t.name: tuple(reversed(t.shape.tolist())) for t in reader.tensors}
    assert tensors and all(name.endswith((".lora_a", ".lora_b")) for name in tensors)
    # The MoE families' LoRA targets their experts: those pairs must be in the file, 3-D.
    assert any("_exps." in name for name in tensors) == (family.name in MOE)
    for name, shape in tensors.items():
        stem = name.rsplit(".", 1)[0]
        # (E, out, in) for ffn_*_exps, (out, in) otherwise; a (1, in) weight is stored squeezed to (in,)
        # (Qwen2-MoE's ffn_gate_inp_shexp), which llama.cpp reads as ne = [in, 1].
        *experts, out, inp = base[stem] if len(base[stem]) > 1 else (1, *base[stem])
        expected = (*experts, 4, inp) if name.endswith("lora_a") else (*experts, out, 4)
        assert shape == expected and len(shape) == (3 if "_exps." in name else 2), (name, shape, base[stem])
    alpha = reader.get_field("adapter.lora.alpha")
    assert alpha is not None and float(alpha.parts[alpha.data[0]][0]) == 8.0


def check_estimate(family: Family) -> None:
    model = family.load(4)
    estimate = ql.estimate_memory(str(family.checkpoint), quant=ql.QuantConfig(compute_dtype=torch.float32),
                                  lora=family.lora, batch_size=1, seq_len=16, device="cpu", dtype=torch.float32)
    stored = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()] if not t.requires_grad)
    # A bitsandbytes linear keeps its block scales in its quant_state, not in a parameter or buffer.
    stored += sum(quantlib.storage_bytes(m) - m.weight.numel() * m.weight.element_size()
                  for m in model.modules() if quantlib.is_quantized_linear(m))
    assert estimate.breakdown["base_weights"] == stored


CHECKS = {
    "load HF": check_load_hf, "train 4-bit": check_train(4), "train 8-bit": check_train(8),
    "adapter to PEFT": check_adapter_to_peft, "adapter from PEFT": check_adapter_from_peft,
    "merged export": check_merged_export, "GGUF export": check_gguf_export, "load GGUF": check_load_gguf,
    "adapter GGUF": check_adapter_gguf, "estimate": check_estimate,
}
assert list(CHECKS) == list(PATHS)


@pytest.mark.parametrize("path", list(PATHS))
@pytest.mark.parametrize("family", FAMILIES)
def test_path(families, family, path):
    cell = RESULTS.setdefault(family, {})
    try:
        outcome = CHECKS[path](families(family))
    except pytest.skip.Exception as skipped:
        cell[path] = "untested"
        raise skipped
    except ValueError as error:   # qlowrank's clear refusal: recorded, and the docs must say so
        cell[path] = "refused"
        print(f"{family} / {path}: refused: {error}")
        return
    cell[path] = outcome or "yes"


def render() -> str:
    header = "| family | " + " | ".join(PATHS) + " |"
    rows = [header, "|" + "---|" * (len(PATHS) + 1)]
    for family in FAMILIES:
        rows.append(f"| {family} | " + " | ".join(RESULTS[family][path] for path in PATHS) + " |")
    legend = "\n".join(f"- **{path}**: {what}." for path, what in PATHS.items())
    return f"{START}\n{chr(10).join(rows)}\n\n{legend}\n{END}"


def test_docs_table_is_what_the_tests_found():
    complete = all(len(RESULTS.get(family, {})) == len(PATHS) for family in FAMILIES)
    if not complete:
        pytest.skip("only part of the matrix ran (-k); the table is compared after a whole run")
    table = render()
    text = DOCS.read_text()
    if os.environ.get("QLOWRANK_WRITE_MATRIX") == "1":
        assert HAS_LLAMACPP, "write the table where llama-cpp-python is installed (pip install '.[llama]')"
        DOCS.write_text(re.sub(re.escape(START) + ".*?" + re.escape(END), lambda _: table, text, flags=re.S))
        text = DOCS.read_text()
    found = re.search(re.escape(START) + ".*?" + re.escape(END), text, flags=re.S)
    assert found, f"{DOCS} has no {START} ... {END} block"
    documented = found[0] if HAS_LLAMACPP else found[0].replace(f"| {BY_LLAMACPP} ", "| untested ")
    assert documented == table, ("docs/models.md's support matrix differs from what the tests found; regenerate it "
                               "with QLOWRANK_WRITE_MATRIX=1 (see this module's docstring)")
