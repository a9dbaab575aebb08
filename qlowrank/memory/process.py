"""Process-level memory: from the tensor peak to what the OS (RSS) or the GPU driver (nvidia-smi) reports.

The tensor peak (`MemoryEstimate.total_bytes`) counts tensor storages only. A process holds
more: the Python runtime with torch, transformers and bitsandbytes loaded (and on a GPU the
CUDA context), and whatever the allocator keeps beyond the live tensors. The model here is

    process_bytes = runtime + tensor_peak + allocator_overhead(tensor_peak)

with each constant derived from measurement or from the allocator's source, cited below.
"""

from __future__ import annotations

# ---- CPU (RSS) --------------------------------------------------------------------------
# Runtime baseline: RSS of a training process whose tensors are negligible (a 2-layer
# 128-wide Llama, 4-bit, LoRA r=16, batch 2 x 64, three Trainer steps), minus its tensor
# peak. It holds the interpreter, the imported libraries' touched code and data, oneDNN /
# OpenMP thread pools and kernel caches, accelerate's state, tokenizer-free. Measured on the
# 2-core AMD EPYC (torch 2.13 CPU, transformers 5.24, bitsandbytes 0.50.2) by
# `benchmarks/process_memory.py --only tiny-4bit` (peak RSS 435 MiB with 2.4 MB of tensors).
CPU_RUNTIME_BYTES = 432 * 2**20
# RSS above the runtime follows the tensor peak plus a share for what stays in glibc's heaps
# (the autograd graph's small tensors, freed blocks not yet returned) and oneDNN's per-shape
# kernel caches. 10% is an ASSUMPTION, not yet fitted: benchmarks/process_memory.py, which
# measures it across configurations, has not run. Variable-length batches grow RSS beyond
# this (README, "Known limitations"), so for them the prediction is a lower bound.
CPU_HEAP_OVERHEAD_RATIO = 0.10

# ---- CUDA (nvidia-smi) ------------------------------------------------------------------
# nvidia-smi shows, per process, the CUDA context plus everything cudaMalloc'd, i.e. the
# caching allocator's *reserved* bytes (torch.cuda.memory_reserved), not the allocated ones.
# Context: the driver's code, the loaded kernels (torch, cuBLAS, bitsandbytes) and per-SM
# stacks. With lazy module loading (CUDA_MODULE_LOADING=LAZY, PyTorch's default since 1.13
# with CUDA >= 11.7) PyTorch's "CUDA semantics" notes and its issue tracker report roughly
# 300-500 MiB on recent data-centre GPUs; 500 MiB is taken, an assumption until
# a GPU run measures it (no GPU was lent so far; benchmarks/gpu_memory.py is where it goes).
CUDA_CONTEXT_BYTES = 500 * 2**20
# cuBLAS workspace: 4 MiB + 16 x 8 KiB... per handle; PyTorch's default CUBLAS_WORKSPACE_CONFIG
# for sm_90 is ":4096:8" (8 chunks of 4 MiB = 32 MiB), allocated through the caching allocator.
CUDA_CUBLAS_WORKSPACE_BYTES = 32 * 2**20
# Caching-allocator reserve above the allocated peak (c10/cuda/CUDACachingAllocator.cpp):
# requests are rounded up to 512 B; those under 1 MiB share 2 MiB segments, those of 1-10 MiB
# get 20 MiB segments, larger ones are rounded up to 2 MiB; freed blocks stay reserved and a
# request that no cached block fits grows the reserve (fragmentation). 10% above the tensor
# peak is an assumption, to be replaced by a measured ratio once a GPU is lent.
CUDA_RESERVE_RATIO = 0.10


def process_bytes(tensor_peak: int, device: str) -> int:
    """Predicted peak process memory for a tensor peak on `device` ("cpu": RSS, "cuda": nvidia-smi)."""
    if device == "cuda":
        return int(CUDA_CONTEXT_BYTES + CUDA_CUBLAS_WORKSPACE_BYTES + tensor_peak * (1 + CUDA_RESERVE_RATIO))
    return int(CPU_RUNTIME_BYTES + tensor_peak * (1 + CPU_HEAP_OVERHEAD_RATIO))


def process_breakdown(tensor_peak: int, device: str) -> dict[str, int]:
    """The process figure's parts: runtime (or CUDA context), tensors, allocator overhead."""
    total = process_bytes(tensor_peak, device)
    if device == "cuda":
        runtime = CUDA_CONTEXT_BYTES + CUDA_CUBLAS_WORKSPACE_BYTES
        return {"cuda_context": runtime, "tensors": tensor_peak, "allocator_reserve": total - runtime - tensor_peak}
    return {"runtime": CPU_RUNTIME_BYTES, "tensors": tensor_peak, "heap_overhead": total - CPU_RUNTIME_BYTES - tensor_peak}
