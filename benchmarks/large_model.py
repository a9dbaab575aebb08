"""The Llama-3-8B shape end to end on this machine: write, load to NF4, train, adapter round trip, export.

    python benchmarks/large_model.py                       # the full Llama-3-8B shape (16 GB of shards)
    python benchmarks/large_model.py --layers 4            # 8B widths, 4 layers (1.14B parameters with --vocab 32000)
    python benchmarks/large_model.py --preset mistral-7b   # or qwen2.5-7b

One process runs every phase in turn; a thread samples /proc/self/status every 10 ms, so each
phase gets its peak anonymous memory (RssAnon: heap and tensors, what has to fit; there is no
kernel high-water mark for it), its peak file-backed memory (RssFile: pages of the memory-mapped
checkpoint, which the kernel reclaims under pressure) and VmHWM (their sum's high-water mark).
Each phase's anonymous peak is printed beside `estimate_memory`'s prediction for it.

Phases: random bf16 shards written one layer at a time (never the whole model in memory);
`load_model` to NF4 + LoRA r=16 on every linear layer; training with checkpointing at batch 1
for --steps steps at seq 512, at seq 512 with 4 accumulated micro-batches, at seq 2048 (in that
order, so a longer phase's heap does not inflate a shorter one's figure; each phase has a fresh
AdamW); save the adapter, free the model, load the base again with the adapter, compare logits;
export a merged bf16 checkpoint (with its fidelity probe). Everything is written to a temporary
folder that is removed at the end (--keep to keep it). Results go to benchmarks/large_model.json.
"""

from __future__ import annotations

import argparse
import gc
import json
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import transformers
from accelerate import init_empty_weights
from safetensors.torch import save_file

import qlowrank as ql
from qlowrank.memory import format_bytes
from qlowrank.memory.sampler import StatusSampler
from qlowrank.nn.loss import causal_lm_loss

GIB = 2**30
PRESETS = {  # the published configs' shapes (random weights)
    "llama3-8b": dict(model_type="llama", hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                      num_attention_heads=32, num_key_value_heads=8, vocab_size=128256, rope_theta=500000.0,
                      max_position_embeddings=8192, tie_word_embeddings=False),
    "mistral-7b": dict(model_type="mistral", hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                       num_attention_heads=32, num_key_value_heads=8, vocab_size=32000, rope_theta=1000000.0,
                       max_position_embeddings=32768, tie_word_embeddings=False, sliding_window=None),
    "qwen2.5-7b": dict(model_type="qwen2", hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                       num_attention_heads=28, num_key_value_heads=4, vocab_size=152064, rope_theta=1000000.0,
                       max_position_embeddings=32768, tie_word_embeddings=False),
}


@dataclass
class Phase:
    """One row of the table."""

    name: str
    predicted_anon: int | None
    measured: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0
    note: str = ""


def build_config(preset: str, layers: int | None, vocab: int | None) -> transformers.PretrainedConfig:
    fields = dict(PRESETS[preset])
    model_type = fields.pop("model_type")
    if layers:
        fields["num_hidden_layers"] = layers
    if vocab:
        fields["vocab_size"] = vocab
    return transformers.AutoConfig.for_model(model_type, **fields)


def write_shards(config: transformers.PretrainedConfig, folder: Path, seed: int = 0) -> int:
    """Random bf16 weights (std 0.02, norms 1), one safetensors shard per decoder layer plus one for the rest."""
    folder.mkdir(parents=True, exist_ok=True)
    with init_empty_weights():
        skeleton = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    shapes = {k: tuple(v.shape) for k, v in skeleton.state_dict().items()}
    del skeleton
    groups: dict[str, list[str]] = {}
    for key in shapes:
        parts = key.split(".")
        # One shard per decoder layer; the embeddings and the head (1 GiB each at vocab 128k) apart.
        group = f"layer{int(parts[2]):03d}" if parts[:2] == ["model", "layers"] else parts[-2]
        groups.setdefault(group, []).append(key)
    generator = torch.Generator().manual_seed(seed)
    weight_map, total = {}, 0
    names = sorted(groups)
    for index, group in enumerate(names):
        shard = f"model-{index + 1:05d}-of-{len(names):05d}.safetensors"
        tensors = {}
        for key in groups[group]:
            if key.endswith("norm.weight"):
                tensors[key] = torch.ones(shapes[key], dtype=torch.bfloat16)
            else:
                # drawn in bf16 directly: no float32 copy of a 1 GiB embedding
                tensors[key] = torch.randn(shapes[key], generator=generator, dtype=torch.bfloat16).mul_(0.02)
            weight_map[key] = shard
        save_file(tensors, str(folder / shard), metadata={"format": "pt"})
        total += sum(t.numel() * t.element_size() for t in tensors.values())
        del tensors
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1))
    config.save_pretrained(folder)
    return total


def estimate(folder: Path, seq: int, grad_accum: int) -> ql.MemoryEstimate:
    return ql.estimate_memory(folder, quant=QUANT, lora=LORA, batch_size=1, seq_len=seq, gradient_checkpointing=True,
                              optimizer="adamw", device="cpu", grad_accum=grad_accum)


def write_in_child(args, folder: Path) -> int:
    """write_shards in a child process, so that its heap is not part of the later phases' figures
    (a user's training process never wrote the checkpoint); returns the bytes written."""
    command = [sys.executable, __file__, "--write-only", str(folder), "--preset", args.preset]
    command += [f"--layers={args.layers}"] if args.layers else []
    command += [f"--vocab={args.vocab}"] if args.vocab else []
    subprocess.run(command, check=True)
    return sum(f.stat().st_size for f in folder.glob("*.safetensors"))


def predicted(est: ql.MemoryEstimate | None, part: str) -> int | None:
    """The estimate's anonymous prediction for a phase: its load peak or its training peak."""
    if est is None:
        return None
    parts = est.process_breakdown
    return parts.get(part, est.process_bytes)


def train_steps(model, seq: int, steps: int, grad_accum: int, vocab: int) -> list[float]:
    optimizer = torch.optim.AdamW(ql.lora_parameters(model), lr=1e-4)
    generator = torch.Generator().manual_seed(seq)
    losses = []
    for _ in range(steps):
        total = 0.0
        for _ in range(grad_accum):
            ids = torch.randint(0, vocab, (1, seq), generator=generator)
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = causal_lm_loss(model, ids, ids) / grad_accum
            loss.backward()
            total += loss.item()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(total)
    del optimizer
    gc.collect()
    return losses


@torch.no_grad()
def probe_logits(model, vocab: int) -> torch.Tensor:
    ids = torch.randint(0, vocab, (1, 32), generator=torch.Generator().manual_seed(7))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        return model(ids).logits.float()


QUANT = ql.QuantConfig(bits=4, quant_type="nf4", double_quant=True, compute_dtype=torch.bfloat16)
LORA = ql.LoraConfig(r=16, alpha=32, target_modules="all-linear")


ESTIMATES: dict[str, dict] = {}   # the estimates behind the predictions, kept in the JSON


def run(args) -> list[Phase]:
    config = build_config(args.preset, args.layers, args.vocab)
    root = Path(tempfile.mkdtemp(prefix="qlowrank-large-", dir=args.dir))
    base, adapter, merged = Path(args.base) if args.base else root / "base", root / "adapter", root / "merged"
    sampler = StatusSampler().start()
    phases: list[Phase] = []

    def phase(name: str, predicted_anon: int | None, work, note: str = ""):
        gc.collect()
        sampler.reset()
        started = time.perf_counter()
        result = work()
        sampler.sample()
        row = Phase(name, predicted_anon, dict(sampler.peaks), time.perf_counter() - started, note)
        if callable(note):
            row.note = note(result)
        phases.append(row)
        print(f"  {name}: anon {format_bytes(row.measured.get('RssAnon', 0))}, file {format_bytes(row.measured.get('RssFile', 0))}, "
              f"{row.seconds:.0f} s {row.note}", flush=True)
        return result

    try:
        if args.base:   # a checkpoint written before (by --keep or --write-only): not written again
            size = sum(f.stat().st_size for f in base.glob("*.safetensors"))
        else:
            size = phase("write shards (child process)", None, lambda: write_in_child(args, base),
                         lambda n: f"({n / GIB:.1f} GiB bf16)")
        est512, est_accum, est2048 = (estimate(base, 512, 1), estimate(base, 512, 4), estimate(base, 2048, 1))
        ESTIMATES.update({"seq 512": est512.to_dict(), "seq 512 accum 4": est_accum.to_dict(),
                          "seq 2048": est2048.to_dict()})
        model = phase("load NF4 + LoRA", predicted(est512, "load_peak"),
                      lambda: ql.load_model(base, quant=QUANT, lora=LORA, device="cpu", progress=False, seed=0))
        ql.enable_gradient_checkpointing(model)
        model.train()
        vocab = config.vocab_size
        for name, seq, accum, est in (("train seq 512", 512, 1, est512), ("train seq 512 accum 4", 512, 4, est_accum),
                                      ("train seq 2048", 2048, 1, est2048)):
            if seq in args.skip_seq:
                continue
            phase(name, predicted(est, "training_peak"), lambda: train_steps(model, seq, args.steps, accum, vocab),
                  lambda losses: "losses " + " ".join(f"{x:.3f}" for x in losses))
        model.eval()
        before = probe_logits(model, vocab)
        phase("save adapter", None, lambda: ql.save_adapter(model, adapter))
        del model
        gc.collect()
        # No prediction: this process still holds the training phases' freed heap, which a user's
        # fresh process would not; the load phase above is the load figure.
        reloaded = phase("reload base + adapter", None,
                         lambda: ql.load_adapter(ql.load_model(base, quant=QUANT, device="cpu", progress=False), adapter))
        after = probe_logits(reloaded, vocab)
        difference = float((after - before).norm() / before.norm())
        phases[-1].note = f"logits relative difference {difference:.2e}"
        largest_shard = max(p.stat().st_size for p in base.glob("*.safetensors"))
        if args.skip_export:
            return phases
        report = phase("export merged bf16", None,
                       lambda: ql.export_merged(reloaded, merged, dtype=torch.bfloat16, progress=False))
        phases[-1].note = (f"largest shard {format_bytes(largest_shard)}; probe relative logits error "
                           f"{report.get('relative_logits_error', float('nan')):.2e}")
        del reloaded
        print(f"\nmodel: {args.preset}, {config.num_hidden_layers} layers, vocab {config.vocab_size}, "
              f"{size / GIB:.1f} GiB of bf16 shards; tensor estimate at seq 2048: "
              f"{format_bytes(est2048.total_bytes)}", flush=True)
    finally:
        sampler.stop()
        if args.keep:
            print(f"kept {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)
    return phases


def table(phases: list[Phase]) -> str:
    lines = [f"{'phase':<24}{'predicted anon':>16}{'measured anon':>16}{'error':>8}{'file-backed':>14}{'VmHWM':>12}"
             f"{'wall':>8}  note"]
    for p in phases:
        anon = p.measured.get("RssAnon", 0)
        error = f"{100 * (p.predicted_anon - anon) / anon:+.1f}%" if p.predicted_anon and anon else "-"
        lines.append(f"{p.name:<24}{format_bytes(p.predicted_anon) if p.predicted_anon else '-':>16}"
                     f"{format_bytes(anon):>16}{error:>8}{format_bytes(p.measured.get('RssFile', 0)):>14}"
                     f"{format_bytes(p.measured.get('VmHWM', 0)):>12}{p.seconds:>7.0f}s  {p.note}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="llama3-8b")
    parser.add_argument("--layers", type=int, default=None, help="decoder layers (default: the preset's)")
    parser.add_argument("--vocab", type=int, default=None, help="vocabulary size (default: the preset's)")
    parser.add_argument("--steps", type=int, default=3, help="optimizer steps per training phase")
    parser.add_argument("--skip-seq", type=int, nargs="*", default=[], help="sequence lengths to leave out")
    parser.add_argument("--skip-export", action="store_true", help="stop after the adapter round trip")
    parser.add_argument("--dir", default=None, help="where the temporary folder goes (default: the system's)")
    parser.add_argument("--keep", action="store_true", help="keep the written checkpoint, adapter and export")
    parser.add_argument("--base", default=None, help="an already written checkpoint of this shape to use")
    parser.add_argument("--write-only", metavar="DIR", default=None, help="only write the random shards to DIR")
    parser.add_argument("--json", default=str(Path(__file__).with_name("large_model.json")))
    args = parser.parse_args(argv)
    if args.write_only:
        write_shards(build_config(args.preset, args.layers, args.vocab), Path(args.write_only))
        return 0
    torch.manual_seed(0)
    phases = run(args)
    print()
    print(table(phases))
    record = {"argv": sys.argv[1:], "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
              "phases": [p.__dict__ for p in phases], "estimates": ESTIMATES}
    Path(args.json).write_text(json.dumps(record, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
