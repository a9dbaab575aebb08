"""Benchmark: mixtures of experts at real widths (random weights, 4 layers), and the full models on paper.

    flock /tmp/qlowrank-heavy.lock .venv/bin/python benchmarks/moe.py --paper        # full depth, estimate only
    flock /tmp/qlowrank-heavy.lock .venv/bin/python benchmarks/moe.py --measure qwen3-30b-a3b [--seqs 1024 2048]
    flock /tmp/qlowrank-heavy.lock .venv/bin/python benchmarks/moe.py --heap --seqs 1024   # glibc settings, 1 layer

Shapes: Qwen3-30B-A3B (hidden 2048, 128 experts of 768, top-8, 32/4 heads of 128, 48 layers) and gpt-oss-20b
(hidden 2880, 32 experts of 2880, top-4, 24 layers). `--measure` writes a 4-layer checkpoint of the shape into a
temporary folder (per-expert tensors for Qwen3-MoE, as the hub stores them; fused for gpt-oss), then, each in a
fresh process sampled through /proc (anonymous memory), measures: qlowrank's 4-bit load, transformers +
BitsAndBytesConfig(load_in_4bit) loading the same folder, and qlowrank training steps (LoRA r=16 on attention and
experts, checkpointing, bf16) at each sequence length, with the estimate beside each figure and the share of step
time spent dequantizing experts. `--paper` estimates the full-depth models' GPU peak at batch 1 x 2048 (NF4, LoRA
r=16 all-linear, checkpointing) against Unsloth's published figures. Results go to benchmarks/moe.json.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "moe.json"
GIB = 2**30
UNSLOTH_GB = {"qwen3-30b-a3b": 17.5, "gpt-oss-20b": 12.8}   # their published QLoRA VRAM figures


def config(shape: str, layers: int):
    import transformers

    if shape == "qwen3-30b-a3b":
        return transformers.Qwen3MoeConfig(
            vocab_size=151936, hidden_size=2048, intermediate_size=6144, moe_intermediate_size=768,
            num_hidden_layers=layers, num_attention_heads=32, num_key_value_heads=4, head_dim=128, num_experts=128,
            num_experts_per_tok=8, tie_word_embeddings=False, max_position_embeddings=40960)
    if shape == "gpt-oss-20b":
        return transformers.GptOssConfig(
            vocab_size=201088, hidden_size=2880, intermediate_size=2880, num_hidden_layers=layers,
            num_attention_heads=64, num_key_value_heads=8, head_dim=64, num_local_experts=32, num_experts_per_tok=4,
            layer_types=(["sliding_attention", "full_attention"] * layers)[:layers])
    raise ValueError(shape)


def lora(experts: bool):
    import qlowrank as ql

    return ql.LoraConfig(r=16, alpha=32, target_parameters=["experts"] if experts else [])


def write_checkpoint(shape: str, folder: Path) -> int:
    """Random bf16 weights, one shard per layer; Qwen3-MoE's experts one tensor per expert (the hub's layout)."""
    import torch
    import transformers
    from accelerate import init_empty_weights
    from safetensors.torch import save_file

    cfg = config(shape, 4)
    with init_empty_weights():
        shapes = {k: tuple(v.shape) for k, v in transformers.AutoModelForCausalLM.from_config(cfg).state_dict().items()}
    generator = torch.Generator().manual_seed(0)
    groups: dict[str, dict[str, tuple]] = {}
    for key, size in shapes.items():
        parts = key.split(".")
        group = f"layer{parts[2]}" if parts[:2] == ["model", "layers"] else "rest"
        if shape == "qwen3-30b-a3b" and key.endswith(("experts.gate_up_proj", "experts.down_proj")):
            stem = key.rsplit(".", 1)[0]
            experts, out_features, in_features = size
            names = (["gate_proj", "up_proj"], out_features // 2) if key.endswith("gate_up_proj") else (["down_proj"], out_features)
            for e in range(experts):
                for name in names[0]:
                    groups.setdefault(group, {})[f"{stem}.{e}.{name}.weight"] = (names[1], in_features)
            continue
        groups.setdefault(group, {})[key] = size
    weight_map, total = {}, 0
    for index, (group, members) in enumerate(sorted(groups.items())):
        shard = f"model-{index + 1:05d}-of-{len(groups):05d}.safetensors"
        tensors = {k: (torch.ones(s, dtype=torch.bfloat16) if "norm" in k else
                       torch.randn(s, generator=generator, dtype=torch.bfloat16).mul_(0.02)) for k, s in members.items()}
        save_file(tensors, str(folder / shard), metadata={"format": "pt"})
        total += sum(t.numel() * 2 for t in tensors.values())
        weight_map.update(dict.fromkeys(tensors, shard))
        del tensors
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total},
                                                                    "weight_map": weight_map}))
    cfg.save_pretrained(folder)
    write_tokenizer_and_data(folder)
    return total


def write_tokenizer_and_data(folder: Path) -> None:
    """SmolLM2's real tokenizer (its ids fit any vocabulary here) and rows of Python's docs longer than any --seq."""
    from pydoc_data.topics import topics

    from qlowrank.model.embedded import smollm2_gguf
    from qlowrank.model.load import load_tokenizer

    load_tokenizer(smollm2_gguf()).save_pretrained(folder)
    text = " ".join(topics[key] for key in sorted(topics))
    with open(folder / "data.jsonl", "w") as handle:
        for start in range(0, 40 * 20000, 20000):   # ~20k characters: > 2048 tokens each
            handle.write(json.dumps({"text": text[start:start + 20000]}) + "\n")


def stored_by_part(model) -> dict[str, int]:
    from qlowrank.nn import quant as quantlib
    from qlowrank.nn.experts import ExpertWeights

    parts = {"experts": 0, "attention": 0, "router_and_norms": 0, "embeddings_and_head": 0}
    for name, module in model.named_modules():
        if isinstance(module, ExpertWeights):
            parts["experts"] += module.stored_bytes()
        elif quantlib.is_quantized_linear(module):
            parts["attention"] += quantlib.storage_bytes(module)
        elif ".experts" not in name and "self_attn" not in name and "lora_" not in name:
            size = sum(p.numel() * p.element_size() for p in module.parameters(recurse=False))
            key = "router_and_norms" if ".layers." in name else "embeddings_and_head"
            parts[key] += size
    return parts


def child_load(folder: str) -> dict:
    import qlowrank as ql

    start = time.time()
    model = ql.load_model(folder, quant=ql.QuantConfig(), device="cpu", progress=False)
    return {"seconds": round(time.time() - start, 1), "stored": stored_by_part(model)}


def child_transformers(folder: str) -> dict:
    import torch
    import transformers

    start = time.time()
    quant = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                            bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.bfloat16)
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, quantization_config=quant, device_map="cpu",
                                                              dtype=torch.bfloat16)
    three_d = sum(p.numel() * p.element_size() for p in model.parameters() if p.dim() == 3)
    return {"seconds": round(time.time() - start, 1), "experts_bytes_left_float": three_d}


def child_train(folder: str, seq: int, steps: int = 2) -> dict:
    import torch

    import qlowrank as ql
    from qlowrank.nn.experts import ExpertWeights

    model = ql.load_model(folder, quant=ql.QuantConfig(), lora=lora(True), device="cpu", progress=False, seed=0)
    ql.enable_gradient_checkpointing(model)
    model.train()
    spent = [0.0]
    weight = ExpertWeights.weight

    def timed(self, index, dtype):   # the benchmark's own stopwatch around qlowrank's dequantization
        begin = time.perf_counter()
        result = weight(self, index, dtype)
        spent[0] += time.perf_counter() - begin
        return result

    ExpertWeights.weight = timed
    optimizer = torch.optim.AdamW(ql.lora_parameters(model), lr=1e-4)
    vocab = model.config.vocab_size
    times = []
    for step in range(steps):
        ids = torch.randint(0, vocab, (1, seq), generator=torch.Generator().manual_seed(step))
        spent[0] = 0.0
        begin = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        times.append((time.perf_counter() - begin, spent[0]))
    last, dequant = times[-1]
    return {"step_seconds": round(last, 2), "dequant_share": round(dequant / last, 3)}


def train_flags(folder: str, seq: int) -> list[str]:
    """`qlowrank train` for the measured run: 4-bit, LoRA r=16 on attention and experts, checkpointing, 2 steps."""
    return ["train", "--model", folder, "--data", f"{folder}/data.jsonl", "--out", f"{folder}/out-{seq}",
            "--bits", "4", "--lora-rank", "16", "--lora-alpha", "32", "--target-parameters", "experts",
            "--seq", str(seq), "--batch", "1", "--steps", "2", "--eval-fraction", "0", "--no-progress",
            "--device", "cpu", "--save-every", "0"]


def child_cli(folder: str, seq: int) -> dict:
    """The trainer itself (what a user runs), so that its anonymous peak is compared with its own estimate."""
    from qlowrank.cli.main import main

    start = time.time()
    code = main(train_flags(folder, seq))
    return {"exit": code, "seconds": round(time.time() - start, 1)}


def trainer_estimate(folder: str, seq: int):
    """What `qlowrank train --dry-run` predicts for exactly train_flags(folder, seq)."""
    from qlowrank.cli.main import build_parser
    from qlowrank.cli.sizing import estimate_for_args
    from qlowrank.cli.train import resolve_options

    parsed = resolve_options(build_parser().parse_args(train_flags(folder, seq)))
    return estimate_for_args(parsed, int(parsed.batch))


def run_child(kind: str, *args, env: dict | None = None) -> dict:
    from qlowrank.memory.sampler import wait_sampled

    command = [sys.executable, __file__, "--child", kind, *map(str, args)]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, text=True, env=env)
    code, peaks = wait_sampled(process)
    out = process.stdout.read()
    if code != 0:
        raise RuntimeError(f"{kind} failed with exit code {code}")
    result = json.loads(out.strip().splitlines()[-1])
    result["anon_peak_gib"] = round(peaks.get("RssAnon", 0) / GIB, 3)
    return result


def estimate(source, seq: int, experts: bool, device: str):
    import qlowrank as ql

    return ql.estimate_memory(source, quant=ql.QuantConfig(), lora=lora(experts), batch_size=1, seq_len=seq,
                              gradient_checkpointing=True, device=device)


def measure(shape: str, seqs: list[int]) -> dict:
    with tempfile.TemporaryDirectory(prefix="qlowrank-moe-") as tmp:
        folder = Path(tmp)
        written = run_child("write", shape, folder)["bytes"]
        result = {"shape": shape, "layers": 4, "checkpoint_gib": round(written / GIB, 2)}
        result["qlowrank_load"] = run_child("load", folder)
        result["transformers_bnb_load"] = run_child("transformers", folder)
        result["load_estimate_gib"] = round(estimate(folder, seqs[0], True, "cpu").process_breakdown.get(
            "load_peak", 0) / GIB, 3)
        for seq in seqs:
            # A hand-written loop (bf16 autocast, the full loss) for the step time and the dequantization share.
            result[f"loop_seq{seq}"] = run_child("train", folder, seq)
            est = trainer_estimate(str(folder), seq)
            measured = run_child("cli", folder, seq)
            result[f"trainer_seq{seq}"] = {
                **measured, "estimate_process_gib": round(est.process_bytes / GIB, 3),
                "estimate_tensor_gib": round(est.total_bytes / GIB, 3),
                "estimate_error": round(est.process_bytes / (measured["anon_peak_gib"] * GIB) - 1, 3)}
    return result


# glibc settings for --heap: the pinned threshold qlowrank sets (heap.pin_mmap_threshold), glibc's own
# dynamic one (QLOWRANK_HEAP_TRIM=0 turns the pin off) and fixed thresholds below it.
HEAP_SETTINGS = {
    "pinned 16 MiB (qlowrank)": {},
    "glibc default": {"QLOWRANK_HEAP_TRIM": "0"},
    "fixed 8 MiB": {"QLOWRANK_HEAP_TRIM": "0", "MALLOC_MMAP_THRESHOLD_": str(8 << 20)},
    "fixed 4 MiB": {"QLOWRANK_HEAP_TRIM": "0", "MALLOC_MMAP_THRESHOLD_": str(4 << 20)},
}


def heap(seq: int) -> dict:
    """`qlowrank train` on one layer of the Qwen3-30B-A3B shape (vocab cut to SmolLM2's) under each HEAP_SETTINGS."""
    import os

    import torch
    import transformers

    with tempfile.TemporaryDirectory(prefix="qlowrank-moe-heap-") as tmp:
        folder = Path(tmp)
        cfg = config("qwen3-30b-a3b", 1)
        cfg.vocab_size = 49152
        torch.manual_seed(0)
        transformers.AutoModelForCausalLM.from_config(cfg).to(torch.bfloat16).save_pretrained(folder)
        write_tokenizer_and_data(folder)
        est = trainer_estimate(str(folder), seq)
        rows = {"seq": seq, "estimate_tensor_gib": round(est.total_bytes / GIB, 3),
                "estimate_process_gib": round(est.process_bytes / GIB, 3)}
        for name, env in HEAP_SETTINGS.items():
            rows[name] = run_child("cli", folder, seq, env={**os.environ, **env})
            print(name, rows[name], flush=True)
    return rows


def child_probe(folder: str, seq: int) -> dict:
    """`qlowrank train` in this process, with /proc and glibc's heap counters (mallinfo2, all arenas) sampled
    together: at the anonymous peak, how much is in the heaps in use, in the heaps free, and mmapped."""
    import threading

    from qlowrank.cli.main import main
    from qlowrank.heap import heap_statistics
    from qlowrank.memory.sampler import read_status
    from qlowrank.model import checkpointing

    fields = ("RssAnon", "arena", "uordblks", "fordblks", "hblkhd")
    best: dict[str, dict[str, int]] = {"load": {}, "train": {}}
    phase = ["load"]
    series: list[list[float]] = []
    stop = threading.Event()
    begin = time.time()
    pin = checkpointing.pin_mmap_threshold

    def pinned(*args) -> bool:   # the trainer pins the threshold once, as its training set-up ends
        phase[0] = "train"
        return pin(*args)

    checkpointing.pin_mmap_threshold = pinned

    def sample() -> None:
        while not stop.is_set():
            now = {**read_status(), **heap_statistics()}
            series.append([round(time.time() - begin, 2), *(round(now.get(k, 0) / GIB, 3) for k in fields)])
            last = best[phase[0]]
            if now.get("RssAnon", 0) > last.get("RssAnon", 0):
                # malloc_info walks every free chunk: only when the peak has grown by 64 MiB since the last one
                fresh = now["RssAnon"] > last.get("arenas_at", 0) + 64 * 2**20
                best[phase[0]] = {**now, "seconds": round(time.time() - begin, 2),
                                  "arenas": heap_arenas() if fresh else last.get("arenas"),
                                  "arenas_at": now["RssAnon"] if fresh else last["arenas_at"]}
            stop.wait(0.05)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    code = main(train_flags(folder, seq))
    stop.set()
    thread.join()
    peaks = {name: {**{k: (round(v / GIB, 3) if k != "seconds" else v) for k, v in row.items()
                       if k in (*fields, "seconds")}, "arenas (heap, free) GiB": row.get("arenas")}
             for name, row in best.items()}
    return {"exit": code, "peaks_gib": peaks, "series": series[::max(1, len(series) // 60)]}


def heap_arenas() -> list[tuple[float, float]]:
    """(bytes the arena holds, bytes free in it) in GiB for each glibc arena, from malloc_info's XML."""
    import ctypes
    import re

    libc = ctypes.CDLL("libc.so.6")
    libc.fopen.restype = ctypes.c_void_p
    libc.fopen.argtypes = [ctypes.c_char_p, ctypes.c_char_p]
    libc.malloc_info.argtypes = [ctypes.c_int, ctypes.c_void_p]
    libc.fclose.argtypes = [ctypes.c_void_p]
    path = f"/tmp/qlowrank-malloc-info-{__import__('os').getpid()}.xml"
    handle = libc.fopen(path.encode(), b"w")
    libc.malloc_info(0, handle)
    libc.fclose(handle)
    text = Path(path).read_text()
    Path(path).unlink()
    rows = []
    for heap in re.findall(r'<heap nr="\d+">(.*?)</heap>', text, re.S):
        held = int(re.search(r'<system type="current" size="(\d+)"', heap).group(1))
        free = sum(int(x) for x in re.findall(r'<total type="(?:fast|rest)" count="\d+" size="(\d+)"', heap))
        rows.append((round(held / GIB, 3), round(free / GIB, 3)))
    return rows


# --replay: lone MoE blocks (Qwen3-MoE's, random weights), experts of each shape's size but fewer of them,
# n = tokens x top-k / experts = 64 (Qwen3-30B-A3B's at seq 1024) or 128 (gpt-oss-20b's): hidden, intermediate,
# experts, top-k, tokens, blocks, LoRA on the experts, bits (0: the bf16 stack kept)
REPLAYS = {"qwen3-30b-a3b experts": (2048, 768, 32, 8, 256, 1, 1, 4), "16 experts": (2048, 768, 16, 8, 128, 1, 1, 4), "no expert LoRA": (2048, 768, 32, 8, 256, 1, 0, 4),
           "bf16 stack": (2048, 768, 32, 8, 256, 1, 1, 0), "2 blocks": (2048, 768, 32, 8, 256, 2, 1, 4),
           "gpt-oss-20b experts": (2880, 2880, 8, 4, 256, 1, 1, 4), "gpt-oss no expert LoRA": (2880, 2880, 8, 4, 256, 1, 0, 4)}


def child_replay(*shape: int) -> dict:
    """Forward and checkpointed backward of lone FrozenExperts blocks under the pinned mmap threshold, twice:
    the anonymous growth over the built blocks, and how much of it glibc holds free (not tensors)."""
    import threading

    import torch
    import transformers
    from torch.utils.checkpoint import checkpoint
    from transformers.models.qwen3_moe import modeling_qwen3_moe

    import qlowrank as ql
    from qlowrank.heap import heap_statistics, pin_mmap_threshold, release_free_heap
    from qlowrank.memory.sampler import read_status
    from qlowrank.nn.experts import freeze_experts

    hidden, inter, experts, top_k, tokens, count, with_lora, bits = shape
    cfg = transformers.Qwen3MoeConfig(hidden_size=hidden, moe_intermediate_size=inter, num_experts=experts,
                                      num_experts_per_tok=top_k, num_hidden_layers=1)
    torch.manual_seed(0)
    blocks = []
    for _ in range(count):
        block = modeling_qwen3_moe.Qwen3MoeSparseMoeBlock(cfg).to(torch.bfloat16).requires_grad_(False)
        block.experts = freeze_experts(block.experts, ql.QuantConfig(bits=bits) if bits else None, "cpu", torch.bfloat16)
        for name in block.experts.order if with_lora else ():
            getattr(block.experts, name).add_lora(ql.LoraConfig(r=16, alpha=32, target_parameters=["experts"]), None)
        blocks.append(block)
    release_free_heap()
    pin_mmap_threshold()
    start, best, stop = {**read_status(), **heap_statistics()}, {}, threading.Event()

    def sample() -> None:
        while not stop.is_set():
            now = {**read_status(), **heap_statistics()}
            if now["RssAnon"] > best.get("RssAnon", 0):
                best.update(now)
            stop.wait(0.005)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    for _ in range(2):
        x = torch.randn(1, tokens, hidden).mul_(0.5).to(torch.bfloat16).requires_grad_(True)
        for block in blocks:
            x = x + checkpoint(block, x, use_reentrant=False)
        x.float().pow(2).mean().backward()
        del x
        for block in blocks:
            for param in block.parameters():
                param.grad = None
    stop.set()
    thread.join()
    dequant = experts * 3 * hidden * inter * 2 if bits else 0   # bf16 weights of every expert (gate, up, down)
    growth = best["RssAnon"] - start["RssAnon"]
    in_use = best["uordblks"] - start["uordblks"] + best["hblkhd"] - start["hblkhd"]
    return {"growth_mib": round(growth / 2**20), "in_use_growth_mib": round(in_use / 2**20),
            "held_free_mib": round((growth - in_use) / 2**20), "dequant_mib": round(dequant / 2**20),
            "held_free_per_dequant_byte": round((growth - in_use) / dequant, 2) if dequant else None}


def replay() -> dict:
    rows = {}
    for name, shape in REPLAYS.items():
        rows[name] = {"shape": shape, **run_child("replay", *shape)}
        print(name, rows[name], flush=True)
    return rows


def small_checkpoint(shape: str, layers: int, folder: Path, top_k: int | None = None) -> None:
    """`layers` layers of `shape` with SmolLM2's vocabulary (49152), written by save_pretrained (per-expert tensors)."""
    import torch
    import transformers

    cfg = config(shape, layers)
    cfg.vocab_size = 49152
    if top_k is not None:
        cfg.num_experts_per_tok = top_k
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16).save_pretrained(folder)
    write_tokenizer_and_data(folder)


def probe(shape: str, layers: int, seqs: list[int], top_k: int | None, env: dict) -> dict:
    """The trainer's anonymous peak split by glibc's counters, beside the --dry-run estimate, per sequence length."""
    import os

    with tempfile.TemporaryDirectory(prefix="qlowrank-moe-probe-") as tmp:
        folder = Path(tmp)
        small_checkpoint(shape, layers, folder, top_k)
        rows = {}
        for seq in seqs:
            est = trainer_estimate(str(folder), seq)
            measured = run_child("probe", folder, seq, env={**os.environ, **env})
            rows[seq] = {"estimate_tensor_gib": round(est.total_bytes / GIB, 3),
                         "estimate_process_gib": round(est.process_bytes / GIB, 3),
                         "estimate_parts_gib": {k: round(v / GIB, 3) for k, v in est.process_breakdown.items()},
                         "estimate_tensor_parts_gib": {k: round(v / GIB, 3) for k, v in est.breakdown.items()},
                         **measured}
            print(seq, {k: v for k, v in rows[seq].items() if k != "series"}, flush=True)
    return rows


FIT_SHAPE = "qwen3-30b-a3b"   # --fit-experts fits on this shape's training peaks; the other is held out


def training_points(results: dict) -> list[tuple[str, int, int | None, int, float]]:
    """(shape, layers, vocabulary (None: the shape's), seq, measured anonymous training peak GiB) in moe.json."""
    points = []
    for shape in ("qwen3-30b-a3b", "gpt-oss-20b"):
        for key, row in results.get(shape, {}).items():
            if key.startswith("trainer_seq"):   # the whole run's peak; its load peak is below (load_estimate too)
                points.append((shape, results[shape]["layers"], None, int(key.removeprefix("trainer_seq")),
                               row["anon_peak_gib"]))
        for key, rows in results.get("probe", {}).items():
            name, layers, *rest = key.split()
            if name == shape and not rest and not rows["env"]:
                points += [(shape, int(layers.removesuffix("L")), 49152, int(seq), row["peaks_gib"]["train"]["RssAnon"])
                           for seq, row in rows.items() if seq != "env" and "peaks_gib" in row]
    return points


def fit_experts(results: dict) -> dict:
    """Least squares of (measured - the estimate without expert_holes) = a D + b D (layers - 1) on FIT_SHAPE's
    points, D the bytes one MoE layer's routed experts dequantize; every point's error with the fitted a, b."""
    import numpy

    from qlowrank.memory import process

    rows, fit_x, fit_y = [], [], []
    for shape, layers, vocab, seq, measured in training_points(results):
        cfg = config(shape, layers)
        cfg.vocab_size = vocab or cfg.vocab_size
        est = estimate(cfg, seq, True, "cpu")
        parts, dequant = est.process_breakdown, est.facts.expert_dequant_bytes
        rest = (parts["training_peak"] - parts["expert_holes"]) / GIB
        rows.append({"shape": shape, "layers": layers, "vocab": cfg.vocab_size, "seq": seq, "measured_gib": measured,
                     "without_expert_holes_gib": round(rest, 3), "dequant_gib": round(dequant / GIB, 3),
                     "held_out": shape != FIT_SHAPE})
        if shape == FIT_SHAPE:
            fit_x.append([dequant / GIB, dequant / GIB * (layers - 1)])
            fit_y.append(measured - rest)
    (first, later), *_ = numpy.linalg.lstsq(numpy.array(fit_x), numpy.array(fit_y), rcond=None)
    for row in rows:
        predicted = row["without_expert_holes_gib"] + row["dequant_gib"] * (first + later * (row["layers"] - 1))
        current = row["without_expert_holes_gib"] + row["dequant_gib"] * (
            process.CPU_EXPERT_HOLES + process.CPU_EXPERT_LAYER * (row["layers"] - 1))
        predicted = float(predicted)
        row.update(fitted_gib=round(predicted, 3), fitted_error=round(predicted / row["measured_gib"] - 1, 3),
                   with_process_py_gib=round(current, 3), process_py_error=round(current / row["measured_gib"] - 1, 3))
        print(row, flush=True)
    return {"CPU_EXPERT_HOLES": round(float(first), 2), "CPU_EXPERT_LAYER": round(float(later), 2), "points": rows}


def paper() -> dict:
    rows = {}
    layers = {"qwen3-30b-a3b": 48, "gpt-oss-20b": 24}
    for shape, depth in layers.items():
        est = estimate(config(shape, depth), 2048, False, "cuda")
        rows[shape] = {"layers": depth, "tensor_gib": round(est.total_bytes / GIB, 2),
                       "process_gib": round(est.process_bytes / GIB, 2),
                       "breakdown_gib": {k: round(v / GIB, 2) for k, v in est.breakdown.items()},
                       "unsloth_gb": UNSLOTH_GB[shape], "fits_24_gib": est.process_bytes < 24 * GIB}
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--paper", action="store_true")
    parser.add_argument("--measure", choices=["qwen3-30b-a3b", "gpt-oss-20b"])
    parser.add_argument("--seqs", type=int, nargs="+", default=[1024, 2048])
    parser.add_argument("--heap", action="store_true", help="one layer of Qwen3-30B-A3B under glibc settings")
    parser.add_argument("--probe", choices=["qwen3-30b-a3b", "gpt-oss-20b"],
                        help="split the trainer's peak by glibc's counters, at --layers layers (vocabulary 49152)")
    parser.add_argument("--layers", type=int, default=1)
    parser.add_argument("--top-k", type=int, help="--probe: experts per token (default: the shape's)")
    parser.add_argument("--env", nargs="*", default=[], help="--probe: NAME=VALUE for the trainer's environment")
    parser.add_argument("--tag", default="", help="--probe: a name for this run in the JSON")
    parser.add_argument("--fit-experts", action="store_true", help="fit process.py's expert terms on moe.json's points")
    parser.add_argument("--replay", action="store_true", help="lone MoE blocks: the heap kept per dequantized byte")
    parser.add_argument("--child", nargs="+")
    args = parser.parse_args(argv)
    if args.child:
        kind, *rest = args.child
        if kind == "write":
            print(json.dumps({"bytes": write_checkpoint(rest[0], Path(rest[1]))}))
        else:
            if kind == "replay":
                print(json.dumps(child_replay(*map(int, rest))))
                return 0
            job = {"load": child_load, "transformers": child_transformers, "train": child_train, "cli": child_cli,
                   "probe": child_probe}[kind]
            print(json.dumps(job(rest[0], *map(int, rest[1:]))))
        return 0
    results = json.loads(RESULTS.read_text()) if RESULTS.is_file() else {}
    if args.paper:
        results["paper"] = paper()
        for shape, row in results["paper"].items():
            print(f"{shape:15s} {row['layers']} layers, batch 1 x 2048, NF4 + LoRA r16: tensors {row['tensor_gib']} GiB, "
                  f"process {row['process_gib']} GiB (Unsloth: {row['unsloth_gb']} GB)")
    if args.heap:
        results["heap"] = heap(args.seqs[0])
    if args.replay:
        results["replay"] = replay()
    if args.fit_experts:
        results["expert_fit"] = fit_experts(results)
        print({k: v for k, v in results["expert_fit"].items() if k != "points"})
    if args.probe:
        env = dict(item.split("=", 1) for item in args.env)
        key = f"{args.probe} {args.layers}L" + (f" top{args.top_k}" if args.top_k else "") + (f" {args.tag}" if args.tag else "")
        results.setdefault("probe", {})[key] = {"env": env, **probe(args.probe, args.layers, args.seqs, args.top_k, env)}
    if args.measure:
        results[args.measure] = measure(args.measure, args.seqs)
        print(json.dumps(results[args.measure], indent=1))
    RESULTS.write_text(json.dumps(results, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
