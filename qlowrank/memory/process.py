"""Process-level memory: from the tensor peak to what the OS (RSS) or the GPU driver (nvidia-smi) reports.

The tensor peak (`MemoryEstimate.total_bytes`) counts tensor storages only. A process holds
more: the Python runtime with torch, transformers and bitsandbytes loaded (and on a GPU the
CUDA context), and whatever the allocator keeps beyond the live tensors. On a CPU, loading
can also be the peak of the whole process: the checkpoint's pages are mapped while the
weights are copied (and quantized) out of them. So on a CPU

    process_bytes = max(load_peak, training_peak)
    load_peak     = LOAD_RUNTIME + source file bytes + base bytes + LOAD_QUANT_RATIO[bits] x linear bf16 bytes
    training_peak = RUNTIME + tensor_peak + min(HEAP_FLOOR, tensor_peak) + HEAP_RATIO[bits] x linear bf16 bytes

and for a .gguf source (transformers' reader dequantizes the whole file to float32 first)

    load_peak     = LOAD_RUNTIME + file bytes + GGUF_LOAD_RATIO x float32 bytes of the base
    training_peak = LOAD_RUNTIME + float32 bytes of the base + (tensor_peak - base)

"linear bf16 bytes" is 2 bytes per weight of the decoder's linear layers (the ones qlowrank
quantizes; not the embeddings or the head), whatever their storage. Every constant is
measured; where and how is written beside it.
"""

from __future__ import annotations

from dataclasses import dataclass

MIB = 2**20

# ---- CPU (RSS) --------------------------------------------------------------------------
# The CPU constants come from `flock /tmp/qlowrank-heavy.lock python benchmarks/process_memory.py`
# (each configuration in a fresh process; whole-process peak RSS = max(VmHWM while loading,
# VmHWM while training over 3 steps)), run 2026-11-29 04:06-04:27 UTC (12 configurations;
# 5 more at 05:36-05:45, after the fit, all held out) on the 2-core AMD EPYC,
# 24 GiB (torch 2.13.0 CPU, transformers 5.24, bitsandbytes 0.50.2, glibc malloc), plus two
# `qlowrank train` runs of tests/test_process_rss.py (named below). Raw figures:
# benchmarks/process_memory.json; `python benchmarks/process_memory.py --fit
# benchmarks/process_memory.json` re-derives every constant from the configurations named
# here (5 of the benchmark's 17 and that CLI configuration); the other 12 are held out
# (held-out error: median 2.0%, worst 6.2%; benchmarks/RESULTS.md).

# Runtime while training: the peak RSS of training a model whose tensors are negligible
# ("tiny-4bit": 2-layer 128-wide Llama, 2 MiB of tensors) minus those tensors. It holds the
# interpreter, the imported libraries (torch, transformers, bitsandbytes, accelerate,
# tensorboard when installed), oneDNN / OpenMP thread pools and the autograd engine's thread.
CPU_RUNTIME_BYTES = 441 * MIB
# Runtime while loading: "tiny-4bit"'s peak RSS while loading minus its file and weights
# (imports done, no training thread yet).
CPU_LOAD_RUNTIME_BYTES = 395 * MIB
# glibc keeps freed activations and temporaries in its heaps (one arena per thread that
# allocates: the main thread in forward, the autograd thread in backward), so RSS runs above
# the live tensors by about this much; never more than the tensors themselves (a model with
# 2 MiB of tensors shows 2 MiB at most; min(...) above). Fitted with the float-base ratio
# below from "llama-501M float b1 s256" and the `qlowrank train` run of tests/
# test_process_rss.py's "mid float b4 s256" (mean of two runs, 636 and 623 MiB), two
# equations for two unknowns.
CPU_HEAP_FLOOR_BYTES = 86 * MIB
# What the heaps keep in proportion to the decoder's weights (per bf16 byte of its linear
# layers): bitsandbytes dequantizes each frozen weight in every forward and backward (bf16
# for 4-bit; for LLM.int8 on a CPU a float copy plus int8 buffers), blocks below glibc's
# mmap threshold (which grows to the largest block freed, up to 32 MiB) stay in the heaps.
# 4: "llama-501M 4-bit b2 s256"; 8: "llama-501M 8-bit b1 s256"; None: with the floor above.
CPU_HEAP_RATIO = {4: 0.67, 8: 1.12, None: 0.078}
# Loading maps the checkpoint (its pages count in RSS while the weights are copied out) and
# quantizes tensor by tensor; the quantization's transient buffers, per bf16 byte of linear
# weight: 4 from "llama-501M 4-bit b2 s256", 8 from "llama-501M 8-bit b1 s256"; a float
# base copies and keeps its weights (0: "llama-501M float" measured -0.8%).
CPU_LOAD_QUANT_RATIO = {4: 0.15, 8: 0.068, None: 0.0}
# A .gguf file: transformers' reader dequantizes every tensor to float32 numpy arrays, then
# torch tensors, before qlowrank quantizes; the float32 model stays resident in the heaps
# afterwards and training reuses it. Peak while loading, per float32 byte of the base,
# beyond the mapped file: "demo (smollm2 4-bit b4 s160)" (the only GGUF measured).
CPU_GGUF_LOAD_RATIO = 1.35

# Headroom `qlowrank train --batch auto` keeps under --max-memory, for the model's measured
# error: the worst held-out error above (6.2%) plus the spread of one command's peak RSS from
# run to run (tests/test_process_rss.py, 2026-11-29: mid 8-bit 689-709 MiB, mid float 620-647
# MiB, the --batch auto run 799-825 MiB: up to 4%), rounded up. It is also that test's tolerance.
CPU_PREDICTION_MARGIN = 0.11

# ---- CUDA (nvidia-smi) ------------------------------------------------------------------
# Sources, not measurements: no GPU has been lent yet. benchmarks/gpu_memory.py prints
# nvidia-smi's per-process figure beside torch.cuda.memory_reserved() and
# max_memory_allocated(), which measures both constants below on the first GPU run.
# nvidia-smi shows, per process, the CUDA context plus everything cudaMalloc'd, i.e. the
# caching allocator's *reserved* bytes (torch.cuda.memory_reserved), not the allocated ones
# (PyTorch docs, "CUDA semantics" > "Memory management").
# Context: the driver's code, the loaded kernels (torch, cuBLAS, bitsandbytes) and per-SM
# stacks. With lazy module loading (CUDA_MODULE_LOADING=LAZY, PyTorch's default since 1.13
# with CUDA >= 11.7; PyTorch docs, "CUDA semantics" > "Lazy loading") the context of recent
# data-centre GPUs is reported at roughly 300-500 MiB in PyTorch's issue tracker; 500 MiB
# is taken.
CUDA_CONTEXT_BYTES = 500 * MIB
# cuBLAS workspace: PyTorch's default CUBLAS_WORKSPACE_CONFIG on Hopper is ":4096:8", eight
# 4 MiB chunks (aten/src/ATen/cuda/CublasHandlePool.cpp), allocated through the caching
# allocator.
CUDA_CUBLAS_WORKSPACE_BYTES = 32 * MIB
# Caching-allocator reserve above the allocated peak (c10/cuda/CUDACachingAllocator.cpp):
# requests are rounded up to 512 B; those under 1 MiB share 2 MiB segments, those of 1-10 MiB
# get 20 MiB segments, larger ones are rounded up to 2 MiB; freed blocks stay reserved and a
# request that no cached block fits grows the reserve (fragmentation). 10% above the tensor
# peak is an assumption.
CUDA_RESERVE_RATIO = 0.10
# Headroom for --batch auto on CUDA: the size of the allocator-reserve assumption, until measured.
CUDA_PREDICTION_MARGIN = 0.10


@dataclass(frozen=True)
class ModelFacts:
    """What the CPU process model needs beyond the tensor peak (from the estimate and the files)."""

    base_bytes: int = 0        # the frozen base as held while training (estimate's base_weights)
    linear_params: int = 0     # weights of the decoder's linear layers (the ones qlowrank quantizes)
    base_params: int = 0       # every frozen parameter (a GGUF's are dequantized to float32 on load)
    bits: int | None = None    # 4, 8 or None (a float base)
    source: str = "safetensors"   # "safetensors" (also a config alone: assumed) or "gguf"
    source_bytes: int = 0      # bytes of the checkpoint files loading maps (the .gguf file)


def prediction_margin(device: str) -> float:
    """The relative headroom to keep above a prediction on `device` (its measured error; CUDA: assumed)."""
    return CUDA_PREDICTION_MARGIN if device == "cuda" else CPU_PREDICTION_MARGIN


def process_breakdown(tensor_peak: int, device: str, facts: ModelFacts | None = None) -> dict[str, int]:
    """The process figure's parts. CUDA: context, tensors, allocator reserve. CPU: the training
    peak's parts (runtime, tensors, heap), then `training_peak`, `load_peak` (whichever is larger
    is the process peak)."""
    if device == "cuda":
        reserve = int(tensor_peak * CUDA_RESERVE_RATIO)
        return {"cuda_context": CUDA_CONTEXT_BYTES + CUDA_CUBLAS_WORKSPACE_BYTES, "tensors": tensor_peak,
                "allocator_reserve": reserve}
    facts = facts or ModelFacts()
    linear_bf16 = 2 * facts.linear_params
    if facts.source == "gguf":
        float32 = 4 * facts.base_params
        runtime, heap = CPU_LOAD_RUNTIME_BYTES, float32 - facts.base_bytes   # the float32 model stays in the heaps
        load = CPU_LOAD_RUNTIME_BYTES + facts.source_bytes + CPU_GGUF_LOAD_RATIO * float32
    else:
        runtime = CPU_RUNTIME_BYTES
        heap = min(CPU_HEAP_FLOOR_BYTES, tensor_peak) + CPU_HEAP_RATIO[facts.bits] * linear_bf16
        load = (CPU_LOAD_RUNTIME_BYTES + facts.source_bytes + facts.base_bytes
                + CPU_LOAD_QUANT_RATIO[facts.bits] * linear_bf16)
    training = runtime + tensor_peak + max(0, int(heap))
    return {"runtime": runtime, "tensors": tensor_peak, "heap": training - runtime - tensor_peak,
            "training_peak": training, "load_peak": int(load)}


def process_bytes(tensor_peak: int, device: str, facts: ModelFacts | None = None) -> int:
    """Predicted peak process memory for a tensor peak on `device` ("cpu": RSS, "cuda": nvidia-smi)."""
    parts = process_breakdown(tensor_peak, device, facts)
    if device == "cuda":
        return sum(parts.values())
    return max(parts["training_peak"], parts["load_peak"])
