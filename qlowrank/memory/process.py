"""Process-level memory: from the tensor peak to what the OS (RSS) or the GPU driver (nvidia-smi) reports.

The tensor peak (`MemoryEstimate.total_bytes`) counts tensor storages only. A process holds
more, and on a CPU it holds two kinds of memory:

- **anonymous** (RssAnon): heaps, tensors, thread stacks. This is what has to fit: an OOM
  kill comes from it. `process_bytes` is its peak.
- **file-backed** (RssFile): pages of the libraries and of the memory-mapped checkpoint
  while it is read. Clean pages that the kernel drops under pressure; reported beside the
  anonymous peak as `file_backed_bytes` (an upper bound: how much of a mapped file stays
  resident depends on the page cache, 0.5-1.9 GB for the same 2.2 GB file).

Every term is a property of the model's shapes or a constant of the runtime measured once;
none is a share of the total model bytes unless the memory really grows with them:

    process_bytes = max(load_anon, train_anon)
    load_anon  = LOAD_RUNTIME + base (as held) + LOAD_TRANSIENT[bits] x bf16 bytes of the largest linear
    train_anon = RUNTIME + tensors + TEMPORARIES_KEPT x the temporaries' high-water mark
                 + LAYER_RESIDUE x layers x batch x seq x hidden x 2
                 + DEQUANT_KEPT x bf16 bytes of the dequantized weights below glibc's mmap ceiling
                 + INT8_KEPT x int8 bytes of the linears (8-bit bases, in place of TEMPORARIES_KEPT)
                 + (EXPERT_HOLES + EXPERT_LAYER x (MoE layers - 1)) x the bytes one MoE layer's routed experts dequantize
    with the multipliers of one of two regimes: untrimmed, and trimmed (checkpointed blocks of
    3072+ width hand the heaps' free pages back before their backward, `qlowrank/heap.py`: no
    layer residue, and one layer's int8 bytes).
    file_backed = RUNTIME_FILE + checkpoint bytes

Why the terms (measured on the 2-core EPYC, glibc malloc, torch 2.13 CPU, bitsandbytes 0.50):

- glibc serves a block from its heaps when it is smaller than the mmap threshold, which rises
  to the largest block freed so far, up to 32 MiB (`DEFAULT_MMAP_THRESHOLD_MAX`); larger
  blocks are mmapped and go back to the OS when freed. Freed heap blocks stay resident.
- The forward runs in the main thread and the backward in autograd's own thread: each
  allocates from its own arena, and neither arena gives back what the other needs. So the
  heaps hold more than one more copy of a pass's largest temporaries (TEMPORARIES_KEPT) beside
  the live tensors: the high-water mark of the temporaries, wherever in the pass it falls, not
  their share at the tensor peak (at 4 x 512 tokens of a 512-wide model the peak moves to the
  backward, where temporaries are 18 MiB of their 46 MiB high-water mark). A share of the
  activations was a term too; refitted on the high-water mark its multiplier came out negative
  (-0.07), so the activations are counted as live tensors only.
- A checkpointed forward leaves each decoder layer's boundary (batch x seq x hidden) alive
  between freed blocks of the same size: the heap keeps a few hidden-state blocks per layer
  that it cannot hand back (LAYER_RESIDUE; this is what grows with depth at long sequences).
- bitsandbytes dequantizes every frozen weight in each forward and backward. At 8B width the
  large ones (4096 x 14336 in bf16 = 112 MiB) are mmapped and return to the OS; the small
  ones (k/v projections, or every layer of a model under ~1.5k width) stay in the heaps
  (DEQUANT_KEPT). That is why the old ratio model (a share of all linear bytes) fitted models
  up to 1.1B and was 1.6-3x too high at 8B.
- LLM.int8 on a CPU (bitsandbytes' MatMul8bitFp) converts the int8 weight to the compute dtype
  in both passes (`CB.to(dtype).mul_(...)`, then `.to(copy=True)` in backward). At 8B width an
  8-bit base then holds about one more int8-sized copy of its linear weights beside the tensor
  estimate (INT8_KEPT): with it, an 8-bit base costs nearly as much process memory as a float
  one (2.2 vs 2.0 GiB at 2 layers of 8B width, seq 512), though its tensors are 20% smaller.
- A mixture of experts dequantizes each routed expert's weights (megabytes) one expert at a time,
  and on a CPU qlowrank pins glibc's mmap threshold at 16 MiB for it (`qlowrank/heap.py`), so the copies
  under 16 MiB come from the heaps. Where a pass saves tensors for backward (the recompute of a checkpointed
  block), each expert's small saved tensors (its routed tokens, its LoRA intermediates) land in
  the space the previous expert's freed weight left, and the next expert's weight no longer fits
  there: the heap grows with each expert routed to (EXPERT_HOLES x the layer's dequantized bytes).
  Lone blocks show the mechanism but not its size (`benchmarks/moe.py --replay`, moe.json "replay"):
  0.37-0.52 bytes held free per dequantized byte, growing with the experts (16 -> 32: 62 -> 149 MiB),
  27 MiB for a float stack, which is read in place, and no more for two blocks than for one; with
  or without LoRA on the experts the two shapes disagree (0.42x and 1.68x), so the term does not
  tell them apart. In the trainer the same bytes come out about four times larger, and each
  further MoE layer adds some (EXPERT_LAYER): fitted, not traced to an allocation (the trainer's
  heap also holds what loading fragmented). The tensor estimate counts each dequantized weight
  once, as the one transient it is.
- Loading copies each tensor out of the mapped file, and quantizing the largest linear takes
  a few transient copies of it (bf16 copy, float32 upcast for NF4, float16 for LLM.int8).

Every constant is measured or fitted on named configurations of `benchmarks/process_memory.py`
(the rest held out); where is written beside each. GPU terms follow at the end.
"""

from __future__ import annotations

from dataclasses import dataclass

MIB = 2**20

# ---- CPU ------------------------------------------------------------------------------
# Runtime, anonymous, while training: the RssAnon peak of training a model whose tensors are
# negligible ("tiny-4bit": a 2-layer 128-wide Llama, 2 MiB of tensors) minus those tensors:
# the interpreter and imported libraries' heaps, oneDNN / OpenMP pools, the autograd thread.
CPU_RUNTIME_BYTES = 327 * MIB
# Runtime, anonymous, while loading ("tiny-4bit" before training: no autograd thread yet).
CPU_LOAD_RUNTIME_BYTES = 300 * MIB
# File-backed pages of the runtime (the libraries' code): "tiny-4bit"'s RssFile, 96-101 MiB.
CPU_RUNTIME_FILE_BYTES = 100 * MIB
# glibc's mmap threshold ceiling (malloc/malloc.c: DEFAULT_MMAP_THRESHOLD_MAX on 64-bit):
# a block of this size or more is mmapped and returned to the OS when freed.
GLIBC_MMAP_CEILING = 32 * MIB
# The heap terms below are fitted together (least squares, `benchmarks/process_memory.py --fit`)
# on the training peaks of the configurations in that file's FIT list; the rest are held out.
# Temporaries (dequantized weights in flight, logits chunks, gradients flowing through the
# graph): the forward's arena and the backward's each keep about a copy of those of their pass.
# Not for LLM.int8: an 8-bit base keeps what INT8_KEPT says instead (measured: SmolLM2 8-bit
# keeps as much as 4-bit beyond its tensors, though its estimated temporaries are 2.2x).
CPU_TEMPORARIES_KEPT = 1.40
# Hidden-state blocks (batch x seq x hidden x 2 bytes) the heaps keep per decoder layer.
CPU_LAYER_RESIDUE = 2.88
# Share of the dequantized weights below GLIBC_MMAP_CEILING (bf16, summed over all quantized
# linears) that stays in the heaps.
CPU_DEQUANT_KEPT = 0.29
# LLM.int8 on a CPU: resident bytes beyond the tensor estimate per int8 byte of linear weight
# (in place of TEMPORARIES_KEPT). At 8B width it is what makes an 8-bit base hold nearly as
# much as a float one: 2.18 vs 1.96 GiB anonymous at 2 layers, seq 512 (tensors 1.19 vs 1.46 GiB).
# The one term proportional to model bytes: fitted on SmolLM2 8-bit and 2 layers of 8B width
# (untrimmed). Trimmed, it does not grow with depth: 2 -> 4 layers of 8B width added 94 MiB
# beyond the tensors where this term said +416 MiB, hence one layer's bytes there.
CPU_INT8_KEPT = 1.56
# Mixtures of experts (the module docstring): heap bytes kept per byte that one MoE layer's routed experts
# dequantize (`expert_facts.expert_facts`: experts hit x one expert's weights in the compute dtype), for the
# first layer and per further layer. Fitted together (least squares, `benchmarks/moe.py --fit-experts`,
# moe.json's "expert_fit") on qlowrank train's anonymous training peaks at the Qwen3-30B-A3B shape (4-bit,
# LoRA r=16 on attention and experts, checkpointing, batch 1): 1 and 2 layers at seq 1024 (vocabulary 49152),
# 4 layers at seq 1024 and 2048; each within 10% after the fit (-6.5%, +9.6%, -1.2%, -0.6%). Held out,
# gpt-oss-20b's shape at seq 1024: 4 layers +8.2%, but 1 layer +43%: there its holes match only the copies
# under the pinned threshold (down_proj, 15.8 MiB; gate_up's 31.6 MiB are mmapped), while from 1 to 4 layers
# it grows per layer far more than Qwen3-30B-A3B's shape does. Neither is traced; counting every copy
# over-estimates (the safe side). One layer's peak also moved between runs (whole runs of 3.6 and
# 4.1 GiB at Qwen3-30B-A3B's shape). With the heaps trimmed before each
# block's backward (hidden >= TRIM_MIN_HIDDEN) no earlier layer's holes survive: EXPERT_LAYER is then 0.
CPU_EXPERT_HOLES = 1.98
CPU_EXPERT_LAYER = 0.19
# Loading: transient bytes per bf16 byte of the largest quantized linear (bf16 copy out of
# the mapped file + the quantizer's upcast and scratch). A float base copies straight.
CPU_LOAD_TRANSIENT = {4: 4.44, 8: 1.87, None: 0.0}
# The heap terms by regime: as fitted above (the heaps keep what they are given), and with
# qlowrank.heap trimming the heaps before each checkpointed block's backward (blocks of
# TRIM_MIN_HIDDEN width on). Trimmed, no layer residue survives, so that term is 0 by
# construction, and LLM.int8's kept copy is one layer's (`int8_kept_params`). The other three
# are fitted on the three trimmed runs of `benchmarks/process_memory.py`'s FIT["trimmed_heap"]
# (8B width: 2 layers 4-bit seq 2048, 2 layers 8-bit seq 512, the full 32 layers at seq 2048),
# six other trimmed 8B-width runs held out. The temporaries mostly go back to the OS (0.12 of
# their high-water mark stays); what still grows with depth is ~60 MiB a layer at 8B width,
# carried by the dequantized-weights term (3.79 x the k/v projections' bf16 copies, 16 MiB a
# layer), fitted, not traced to an allocation: it does not depend on the sequence length (2 and
# 4 layers at seq 512-2048 and 32 at 2048 agree within 3%).
CPU_UNTRIMMED_KEPT = {"temporaries": CPU_TEMPORARIES_KEPT, "layer_residue": CPU_LAYER_RESIDUE,
                      "dequant": CPU_DEQUANT_KEPT, "int8": CPU_INT8_KEPT}
CPU_TRIMMED_KEPT = {"temporaries": 0.12, "layer_residue": 0.0, "dequant": 3.79, "int8": 2.26}

# Headroom the planner (`qlowrank train --batch auto`, `estimate --plan`) keeps under the
# budget, for the model's measured error: the worst under-prediction among every held-out
# training peak measured so far (benchmarks/RESULTS.md: "Process memory, anonymous" and the
# planner grids, 43 points): -30.5%, SmolLM2 at 4 x 512 tokens with every block checkpointed and
# attention recomputed (one of six fresh processes of that layout, which span 1228-1570 MiB).
# Covering it takes 1 / (1 - 0.305) = 1.44. Large widths run closer (8B width, 4 layers: -8% to
# -21%), so this wastes memory there; the model's next version has to earn a smaller figure.
CPU_PREDICTION_MARGIN = 0.44
# The same where every block trims the heaps before its backward (blocks of TRIM_MIN_HIDDEN width
# and more, checkpointed or not). The trimmed regime's worst held-out under-prediction is -11.0%
# (8B width, 4 layers, micro-batch 8 x 128; RESULTS.md, "two regimes"): covering it takes
# 1 / 0.89 = 1.124, rounded up to 15%. Wide layouts outside that regime (no checkpointing, kept
# blocks) ran -9.2% to +25.5% in the 8B-width planner grid of 13:00 (RESULTS.md, "8B-width grid
# again"), which 15% covers too; that grid was also what this figure was chosen after.
CPU_WIDE_PREDICTION_MARGIN = 0.15

# ---- CUDA (nvidia-smi) ------------------------------------------------------------------
# Sources, not measurements: no GPU has been lent yet. benchmarks/gpu_memory.py prints
# nvidia-smi's per-process figure beside torch.cuda.memory_reserved() and
# max_memory_allocated(), which measures both constants below on the first GPU run.
# On a GPU the CPU terms above do not apply to device memory: the device has no glibc heaps
# and no mapped checkpoint; the host process still holds the CPU runtime and, while loading,
# the mapped file (file-backed) and one tensor in flight.
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
# peak is an assumption (the counterpart of the glibc terms above).
CUDA_RESERVE_RATIO = 0.10
# Headroom for --batch auto on CUDA: the size of the allocator-reserve assumption, until measured.
CUDA_PREDICTION_MARGIN = 0.10


@dataclass(frozen=True)
class ModelFacts:
    """What the CPU process model needs beyond the tensor peak: shapes and sizes, read off the
    meta model and the simulated step by `estimate_memory`."""

    base_bytes: int = 0          # the frozen base as held while training (estimate's base_weights)
    linear_params: int = 0       # weights of the decoder's quantized linear layers
    base_params: int = 0         # every frozen parameter
    bits: int | None = None      # 4, 8 or None (a float base)
    source: str = "safetensors"  # "safetensors" (also a config alone: assumed) or "gguf"
    source_bytes: int = 0        # bytes of the checkpoint files loading maps
    largest_linear: int = 0      # weights of the largest quantized linear (out x in)
    heap_dequant_params: int = 0  # weights of quantized linears whose bf16 copy is under GLIBC_MMAP_CEILING
    layers: int = 0              # decoder layers
    hidden_tokens: int = 0       # batch x seq x hidden of one micro-batch
    temporary_bytes: int = 0     # the temporaries' high-water mark in a forward/backward (not only at the peak)
    heap_trimmed: bool = False   # the heaps are trimmed before the peak: every block checkpointed and wide (qlowrank.heap)
    blocks_trim: bool = False    # every block trims the heaps before its backward (wide blocks on a CPU)
    moe_layers: int = 0          # layers with fused MoE experts
    expert_dequant_bytes: int = 0  # one MoE layer's routed experts' weights, dequantized (0: a float base)


def prediction_margin(device: str, facts: ModelFacts | None = None) -> float:
    """The relative headroom to keep above a prediction on `device` (its measured error in the
    regime `facts` describe; CUDA: assumed)."""
    if device == "cuda":
        return CUDA_PREDICTION_MARGIN
    return CPU_WIDE_PREDICTION_MARGIN if facts is not None and facts.blocks_trim else CPU_PREDICTION_MARGIN


def heap_dequantized(shapes: list[tuple[int, int]]) -> int:
    """Weights of the linears (out, in) whose bf16 dequantized copy glibc serves from its heaps."""
    return sum(o * i for o, i in shapes if 2 * o * i < GLIBC_MMAP_CEILING)


def int8_kept_params(facts: ModelFacts) -> int:
    """The int8 weights whose float copies the heaps keep: all of them, or one layer's when the heaps
    are trimmed before each block's backward (then nothing of another layer survives)."""
    return facts.linear_params // max(1, facts.layers) if facts.heap_trimmed else facts.linear_params


def expert_holes(facts: ModelFacts) -> int:
    """Heap bytes the routed experts' dequantized weights leave behind (the module docstring)."""
    later = 0 if facts.heap_trimmed else CPU_EXPERT_LAYER * max(0, facts.moe_layers - 1)
    return int(facts.expert_dequant_bytes * (CPU_EXPERT_HOLES + later))


def training_terms(tensor_peak: int, facts: ModelFacts) -> dict[str, int]:
    """The anonymous training peak in parts (they sum to it); see the module docstring."""
    kept = CPU_TRIMMED_KEPT if facts.heap_trimmed else CPU_UNTRIMMED_KEPT
    terms = {
        "runtime": CPU_RUNTIME_BYTES,
        "tensors": tensor_peak,
        "temporaries_kept": kept["temporaries"] * facts.temporary_bytes if facts.bits != 8 else 0,
        "layer_residue": kept["layer_residue"] * facts.layers * facts.hidden_tokens * 2,
        "dequant_kept": kept["dequant"] * 2 * facts.heap_dequant_params if facts.bits in (4, 8) else 0,
        "int8_kept": kept["int8"] * int8_kept_params(facts) if facts.bits == 8 else 0,
        "expert_holes": expert_holes(facts),
    }
    return {k: int(v) for k, v in terms.items()}


def load_terms(facts: ModelFacts) -> dict[str, int]:
    """The anonymous loading peak in parts: runtime, the model as held, one tensor's transients."""
    transient = CPU_LOAD_TRANSIENT.get(facts.bits, 0.0) * 2 * facts.largest_linear
    return {"runtime": CPU_LOAD_RUNTIME_BYTES, "model": facts.base_bytes, "transient": int(transient)}


def process_breakdown(tensor_peak: int, device: str, facts: ModelFacts | None = None) -> dict[str, int]:
    """The process figure's parts. CUDA: context, tensors, allocator reserve. CPU: the training
    peak's anonymous parts (runtime, tensors, temporaries_kept, layer_residue,
    dequant_kept, int8_kept, expert_holes: they sum to `training_peak`), then `training_peak` and `load_peak` (anonymous; the
    larger is `process_bytes`). The reclaimable pages are apart: `file_backed_bytes`."""
    if device == "cuda":
        reserve = int(tensor_peak * CUDA_RESERVE_RATIO)
        return {"cuda_context": CUDA_CONTEXT_BYTES + CUDA_CUBLAS_WORKSPACE_BYTES, "tensors": tensor_peak,
                "allocator_reserve": reserve}
    facts = facts or ModelFacts()
    parts = training_terms(tensor_peak, facts)
    return {**parts, "training_peak": sum(parts.values()), "load_peak": sum(load_terms(facts).values())}


def file_backed_bytes(device: str, facts: ModelFacts | None = None) -> int:
    """Upper bound of the file-backed pages (CPU: libraries + the whole mapped checkpoint; CUDA: 0)."""
    if device == "cuda":
        return 0
    return CPU_RUNTIME_FILE_BYTES + (facts.source_bytes if facts else 0)


def process_bytes(tensor_peak: int, device: str, facts: ModelFacts | None = None) -> int:
    """Predicted peak process memory for a tensor peak on `device` ("cpu": anonymous RSS, the
    larger of loading and training; "cuda": what nvidia-smi shows)."""
    parts = process_breakdown(tensor_peak, device, facts)
    if device == "cuda":
        return sum(parts.values())
    return max(parts["training_peak"], parts["load_peak"])
