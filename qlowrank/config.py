"""Configuration dataclasses: how the base is quantized, where LoRA adapters go and how training runs.

Every field is validated on construction, so a typo fails at the call site with a message
that names the field and the values it accepts, not deep inside a training step.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field, replace

import torch

_QUANT_TYPES = ("nf4", "fp4")
_BITS = (4, 8, None)
_COMPUTE_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
_INITS = ("kaiming", "gaussian", "loftq", "pissa")
_SVDS = ("randomized", "full")
_PRECISIONS = ("bf16", "fp32", "auto")
# What a run minimises (train/objective.py, train/preference.py): supervised cross-entropy, or
# preference pairs with DPO (reference: the base with LoRA off) or ORPO (no reference).
OBJECTIVES = ("sft", "dpo", "orpo")

# Optimizers the Trainer builds over the LoRA factors (train/optim.py) and the estimator models
# (memory/estimator.py): torch's AdamW (two fp32 states), bitsandbytes' block-wise 8-bit AdamW,
# plain or paged (its states may move to CPU memory under pressure; the same bytes), and SGD
# without momentum (no state: the floor for full fine-tuning comparisons).
TRAIN_OPTIMIZERS = ("adamw", "adamw8bit", "paged_adamw8bit", "sgd")
# How several training processes hold the model. None: every rank holds all of it (one
# process, or DDP); "fsdp": the frozen base and the factors are split over the ranks (FSDP2,
# train/parallel.py), each rank gathering one decoder block at a time.
SHARDINGS = (None, "fsdp")
# Rows of logits alive at once in the chunked loss (nn/loss.py): 256 x 49152 fp32 = 48 MiB.
DEFAULT_CHUNK_TOKENS = 256


def parse_dtype(value: torch.dtype | str, field_name: str = "dtype") -> torch.dtype:
    """Turn 'bf16' / 'bfloat16' / torch.bfloat16 (and the fp16 / fp32 likes) into a torch dtype."""
    if isinstance(value, torch.dtype):
        return value
    aliases = {
        "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
        "fp16": torch.float16, "float16": torch.float16, "half": torch.float16,
        "fp32": torch.float32, "float32": torch.float32, "float": torch.float32,
    }
    key = str(value).lower().removeprefix("torch.")
    if key not in aliases:
        raise ValueError(f"{field_name}={value!r} is not a dtype qlowrank knows; use one of bf16, fp16, fp32")
    return aliases[key]


@dataclass
class QuantConfig:
    """How the frozen base weights are stored.

    4-bit follows QLoRA (Dettmers et al. 2023, arXiv 2305.14314): NF4 or FP4 blocks with an
    absmax scale per block, optionally double-quantized (the scales themselves in 8 bits).
    8-bit is LLM.int8() (Dettmers et al. 2022, arXiv 2208.07339): row-wise int8 weights.
    """

    bits: int | None = 4                   # 4, 8, or None for an unquantized (float) base
    quant_type: str = "nf4"                # 4-bit code book: "nf4" (normal float) or "fp4"
    double_quant: bool = True              # quantize the 4-bit absmax scales too (~0.37 bit/param saved)
    blocksize: int = 64                    # weights per 4-bit absmax block
    compute_dtype: torch.dtype | str = torch.bfloat16  # dtype the base matmul runs in
    int8_threshold: float = 6.0            # LLM.int8 outlier threshold on activations (0 disables)
    skip_modules: Sequence[str] = ()       # linear layer names (or name suffixes) kept in float while loading

    def __post_init__(self) -> None:
        if self.bits not in _BITS:
            raise ValueError(f"QuantConfig.bits={self.bits!r} is not supported; use 4, 8 or None (no quantization)")
        if self.quant_type not in _QUANT_TYPES:
            raise ValueError(f"QuantConfig.quant_type={self.quant_type!r} is not supported; use one of {_QUANT_TYPES}")
        if not isinstance(self.blocksize, int) or self.blocksize not in (32, 64, 128, 256, 512, 1024, 2048, 4096):
            raise ValueError(
                f"QuantConfig.blocksize={self.blocksize!r} is not supported; use a power of two from 32 to 4096 (64 is the QLoRA default)"
            )
        if not isinstance(self.double_quant, bool):
            raise ValueError(f"QuantConfig.double_quant={self.double_quant!r} must be True or False")
        self.compute_dtype = parse_dtype(self.compute_dtype, "QuantConfig.compute_dtype")
        if self.compute_dtype not in _COMPUTE_DTYPES:
            raise ValueError(f"QuantConfig.compute_dtype={self.compute_dtype} is not supported; use bf16, fp16 or fp32")
        if not isinstance(self.int8_threshold, (int, float)) or self.int8_threshold < 0:
            raise ValueError(f"QuantConfig.int8_threshold={self.int8_threshold!r} must be a number >= 0 (0 disables outliers)")
        names = (self.skip_modules,) if isinstance(self.skip_modules, str) else tuple(self.skip_modules or ())
        if not all(isinstance(n, str) and n for n in names):
            raise ValueError(f"QuantConfig.skip_modules={self.skip_modules!r} must be linear layer names (or suffixes)")
        self.skip_modules = names

    def check_device(self, device: torch.device | str) -> None:
        """Refuse combinations that run but are unusable on the given device."""
        if torch.device(device).type == "cpu" and self.compute_dtype == torch.float16:
            raise ValueError(
                "QuantConfig.compute_dtype=float16 on a CPU is refused: CPU fp16 matmuls are ~3000x slower "
                "than bf16 here (no fp16 kernels). Use compute_dtype=torch.bfloat16 (or torch.float32)."
            )


@dataclass
class LoraConfig:
    """Where low-rank adapters go and how they are scaled.

    LoRA (Hu et al. 2021, arXiv 2106.09685): y = W x + (alpha / r) * B A x with A (r x in)
    random and B (out x r) zero, so training starts from the base model exactly. rsLoRA
    (Kalajdzievski 2023, arXiv 2312.03732) scales by alpha / sqrt(r) instead.
    """

    r: int = 16                            # rank of the update B A
    alpha: float = 32                      # scale numerator
    dropout: float = 0.0                   # dropout on the LoRA branch's input only
    target_modules: str | Sequence[str] = "all-linear"  # "all-linear", module names, or a regex
    exclude_modules: Sequence[str] = field(default_factory=lambda: ["lm_head"])  # never wrapped
    use_rslora: bool = False               # alpha / sqrt(r) scaling
    init: str = "kaiming"                  # "kaiming" (loralib) / "gaussian" (N(0, 1/r)) A with zero B, or the
                                           # quantization-aware "loftq" (arXiv 2310.08659) / "pissa" (arXiv 2404.02948)
    loftq_iters: int = 1                   # LoftQ alternations; > 1 makes the frozen base NF4(W - s B A)
    svd: str = "randomized"                # LoftQ / PiSSA SVD: "randomized" (rank r + 8, 4 power steps) or "full"
    use_dora: bool = False                 # DoRA (arXiv 2402.09353): trainable magnitude x normalised (W + s B A)
    rank_pattern: dict = field(default_factory=dict)   # module-name regex -> r (PEFT's meaning)
    alpha_pattern: dict = field(default_factory=dict)  # module-name regex -> alpha (PEFT's meaning)
    modules_to_save: Sequence[str] = field(default_factory=list)  # full-precision trainable modules (lm_head, ...)
    # MoE parameters to adapt (PEFT's `target_parameters`): fused expert stacks such as
    # "mlp.experts.gate_up_proj" and router weights such as "mlp.gate.weight" (a full path or a
    # suffix), "experts" for every expert projection, "router" for every router. Empty: experts
    # and routers stay frozen (attention, dense MLPs and shared experts are linears).
    target_parameters: Sequence[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if isinstance(self.target_parameters, str):
            self.target_parameters = [self.target_parameters]
        self.target_parameters = list(self.target_parameters or [])
        if not all(isinstance(n, str) and n for n in self.target_parameters):
            raise ValueError(f"LoraConfig.target_parameters={self.target_parameters!r} must be parameter names "
                             "(e.g. 'mlp.experts.gate_up_proj', 'mlp.gate.weight'), 'experts' or 'router'")
        if not isinstance(self.r, int) or isinstance(self.r, bool) or self.r < 1:
            raise ValueError(f"LoraConfig.r={self.r!r} must be a positive integer (typical: 8, 16, 64)")
        if not isinstance(self.alpha, (int, float)) or self.alpha <= 0:
            raise ValueError(f"LoraConfig.alpha={self.alpha!r} must be a positive number (typical: 2 * r)")
        if not isinstance(self.dropout, (int, float)) or not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"LoraConfig.dropout={self.dropout!r} must be in [0, 1)")
        if self.init not in _INITS:
            raise ValueError(f"LoraConfig.init={self.init!r} is not supported; use one of {_INITS}")
        if self.svd not in _SVDS:
            raise ValueError(f"LoraConfig.svd={self.svd!r} is not supported; use one of {_SVDS}")
        if not isinstance(self.loftq_iters, int) or self.loftq_iters < 1:
            raise ValueError(f"LoraConfig.loftq_iters={self.loftq_iters!r} must be an integer >= 1 (the paper uses 1 to 5)")
        for name, kind in (("rank_pattern", int), ("alpha_pattern", (int, float))):
            pattern = getattr(self, name)
            if not isinstance(pattern, dict) or not all(
                    isinstance(k, str) and isinstance(v, kind) and not isinstance(v, bool) and v > 0 for k, v in pattern.items()):
                raise ValueError(f"LoraConfig.{name}={pattern!r} must map module names (or regexes) to positive numbers")
            setattr(self, name, dict(pattern))
        if isinstance(self.modules_to_save, str):
            self.modules_to_save = [self.modules_to_save]
        self.modules_to_save = list(self.modules_to_save or [])
        if isinstance(self.target_modules, str):
            if self.target_modules != "all-linear":
                try:
                    re.compile(self.target_modules)
                except re.error as err:
                    raise ValueError(
                        f"LoraConfig.target_modules={self.target_modules!r} is neither 'all-linear' nor a valid regex: {err}"
                    ) from None
        else:
            names = list(self.target_modules)
            if not names or not all(isinstance(n, str) and n for n in names):
                raise ValueError(
                    f"LoraConfig.target_modules={self.target_modules!r} must be 'all-linear', a regex, or a non-empty list of module names"
                )
            self.target_modules = names
        if isinstance(self.exclude_modules, str):
            self.exclude_modules = [self.exclude_modules]
        self.exclude_modules = list(self.exclude_modules or [])

    @property
    def scaling(self) -> float:
        """The factor applied to B A: alpha / r, or alpha / sqrt(r) with rsLoRA."""
        return self.alpha / (self.r ** 0.5 if self.use_rslora else self.r)

    def rank_and_alpha(self, module_name: str) -> tuple[int, float]:
        """(r, alpha) for one module: rank_pattern / alpha_pattern override the defaults.

        PEFT's rule: a key matches a module whose full name is the key or ends with
        "." + key, the key read as a regex; the first matching key wins.
        """
        return (_pattern_value(self.rank_pattern, module_name, self.r),
                _pattern_value(self.alpha_pattern, module_name, self.alpha))

    def layer_config(self, module_name: str) -> LoraConfig:
        """This config with r and alpha resolved for one module (and the patterns dropped)."""
        r, alpha = self.rank_and_alpha(module_name)
        return replace(self, r=r, alpha=alpha, rank_pattern={}, alpha_pattern={})


def _pattern_value(pattern: dict, module_name: str, default):
    for key, value in pattern.items():
        if re.match(rf"(.*\.)?(?:{key})$", module_name):
            return value
    return default


@dataclass
class TrainConfig:
    """How the training loop runs: steps, micro-batch, optimizer, schedule, objective, outputs.

    Every field has a `qlowrank train` flag of the same name (dashes for underscores; `out_dir`
    is `--out`, `batch_size` is `--batch`). The rest of a run (model, base, adapter, sequence
    length, checkpointing, processes, device) is in `RunSpec`, which holds one of these."""

    out_dir: str = "qlowrank-out"       # adapter, checkpoints/, metrics.jsonl, memory.json go here
    steps: int | None = None            # optimizer steps; None: run `epochs` epochs
    epochs: float = 1.0                 # used when steps is None
    batch_size: int = 4                 # sequences per micro-batch, per process
    grad_accum: int = 1                 # micro-batches per optimizer step
    lr: float = 2e-4                    # peak learning rate (of lora_A; lora_B: lr * lora_plus_ratio)
    lora_plus_ratio: float = 1.0        # LoRA+ (arXiv 2402.12354): B's lr multiplier; 1 = plain LoRA
    optimizer: str = "adamw"            # one of TRAIN_OPTIMIZERS
    weight_decay: float = 0.0
    warmup_steps: int = 0               # linear warmup, then cosine decay to min_lr_ratio * lr
    min_lr_ratio: float = 0.0
    max_grad_norm: float | None = 1.0   # gradient clipping; None or 0 disables
    precision: str = "auto"             # bf16 | fp32 | auto (bf16 where the device supports it)
    chunk_tokens: int | None = DEFAULT_CHUNK_TOKENS  # chunked loss rows; None: naive full logits
    eval_every: int = 0                 # evaluate every N steps (0: only before and after training)
    save_every: int = 0                 # checkpoint every N steps (0: only at the end)
    keep_checkpoints: int | None = 2    # newest checkpoints kept (None: all)
    log_every: int = 1                  # metrics.jsonl line every N steps
    seed: int = 0                       # data order and dropout (torch and random are seeded at the start of a
                                        # fresh run); the CLI also seeds LoRA init and the eval split with it
    profile_memory: bool = True         # measure the first step with MemoryProfiler
    progress: bool = True               # tqdm bar
    sharding: str | None = None         # one of SHARDINGS: None (one process, or DDP) | "fsdp"
    compile: bool = False               # torch.compile each decoder block (compile.py): a one-off compile of ~40 s
                                        # on a CPU; checkpointed blocks run eagerly (benchmarks/RESULTS.md)
    offload_activations: bool = False   # CUDA: tensors saved for backward wait in host memory (model/offload.py);
                                        # with checkpointing the GPU then holds about one block's activations
    group_by_length: bool = True        # batch examples of similar length (data.epoch_order): less padding
    pad_multiple: int = 64              # pad each batch's length up to a multiple of this (at most the run's
                                        # longest example). Every new batch shape makes the CPU's kernels
                                        # (oneDNN) keep memory for it, so RSS grew each step with free
                                        # lengths; 64 bounds the shapes (benchmarks/soak.py: finer steps of
                                        # 24 with grouping let RSS grow 7.5% in 120 steps). 1: no rounding
    objective: str = "sft"              # one of OBJECTIVES; dpo / orpo train on prompt / chosen / rejected pairs
    beta: float = 0.1                   # DPO's beta: how far the policy may move from the reference (TRL's default)
    label_smoothing: float = 0.0        # DPO: assumed share of flipped preference labels (cDPO), in [0, 0.5)
    orpo_lambda: float = 0.1            # ORPO's lambda: weight of the odds-ratio term beside the NLL (TRL's beta)

    def __post_init__(self) -> None:
        if self.precision not in _PRECISIONS:
            raise ValueError(f"TrainConfig.precision={self.precision!r}: use bf16, fp32 or auto (fp16 needs loss "
                             "scaling and is unusable on CPUs; bf16 does not)")
        if self.optimizer not in TRAIN_OPTIMIZERS:
            raise ValueError(f"TrainConfig.optimizer={self.optimizer!r} is not supported; use one of {TRAIN_OPTIMIZERS}")
        for name in ("batch_size", "grad_accum", "log_every", "pad_multiple"):
            if getattr(self, name) < 1:
                raise ValueError(f"TrainConfig.{name}={getattr(self, name)} must be >= 1")
        if self.steps is not None and self.steps < 1:
            raise ValueError(f"TrainConfig.steps={self.steps} must be >= 1 (or None to train for `epochs`)")
        if self.steps is None and self.epochs <= 0:
            raise ValueError(f"TrainConfig.epochs={self.epochs} must be > 0")
        if self.objective not in OBJECTIVES:
            raise ValueError(f"TrainConfig.objective={self.objective!r} is not supported; use one of {OBJECTIVES}")
        if not self.beta > 0 or not self.orpo_lambda > 0:
            raise ValueError(f"TrainConfig.beta={self.beta} and orpo_lambda={self.orpo_lambda} must be > 0")
        if not 0.0 <= self.label_smoothing < 0.5:
            raise ValueError(f"TrainConfig.label_smoothing={self.label_smoothing} must be in [0, 0.5) (a share of "
                             "flipped labels; 0.5 would make the preferences meaningless)")
        if self.sharding not in SHARDINGS:
            raise ValueError(f"TrainConfig.sharding={self.sharding!r}: use None (DDP on several processes) or 'fsdp'")


@dataclass(frozen=True)
class RunSpec:
    """One training run, described once: what the CLI, the estimator, the planner and the Trainer read.

    The model and how its base and adapters are built, the shape of each step, what a step keeps
    in memory, the training loop (`train`), how many processes share it and where it runs.
    `qlowrank train` flags and `--config` files are its fields; `estimate_memory(spec)`,
    `plan(spec, budget)` (which returns a spec) and `Trainer(model, spec)` read it and nothing else.
    Frozen: who changes a run returns a new spec (`dataclasses.replace`, `with_train`).
    """

    model: object = None                   # model folder, config.json or .gguf (Python: also a transformers config)
    quant: QuantConfig = field(default_factory=QuantConfig)   # how the frozen base is stored (bits None: float)
    lora: LoraConfig | None = field(default_factory=LoraConfig)  # the adapters; None: full fine-tuning of a float
                                           # base (estimates and profiles only)
    train: TrainConfig = field(default_factory=TrainConfig)   # the loop: micro-batch, accumulation, optimizer,
                                           # schedule, objective, loss chunk, compile, offload, sharding
    seq_len: int = 512                     # longest sequence in tokens (estimates pad every batch to it)
    packing: bool = False                  # short examples packed into seq_len windows
    checkpointing: bool = True             # recompute each decoder block in backward (model/checkpointing.py)
    keep_blocks: int = 0                   # with checkpointing: the last N blocks keep their activations
    keep_attention: bool | None = None     # with checkpointing: blocks keep their attention output (None: decided
                                           # by sequence length, as enable_gradient_checkpointing does)
    processes: int = 1                     # training processes (torchrun's WORLD_SIZE); figures are one rank's
    device: str | None = None              # "cpu" or "cuda" (None: cuda when one is present)

    def __post_init__(self) -> None:
        if self.device not in (None, "cpu", "cuda"):
            raise ValueError(f"RunSpec.device={self.device!r}: use 'cpu' or 'cuda' (or None: cuda when present)")
        for name in ("seq_len", "processes"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"RunSpec.{name}={value!r} must be a positive integer")
        if not isinstance(self.keep_blocks, int) or self.keep_blocks < 0:
            raise ValueError(f"RunSpec.keep_blocks={self.keep_blocks!r} must be an integer >= 0")
        if self.lora is None and self.quant.bits is not None:
            raise ValueError(f"a {self.quant.bits}-bit base cannot be fully fine-tuned; give an adapter "
                             "(LoraConfig) or a float base (QuantConfig(bits=None))")
        if self.train.offload_activations and self.device_type != "cuda":
            raise ValueError("activation offloading moves activations from a GPU to host memory; on a CPU they are "
                             "in host memory already: drop it (--offload-activations), or run on CUDA")
        self.quant.check_device(self.device_type)

    @property
    def device_type(self) -> str:
        """"cuda" or "cpu": `device`, or cuda when one is present."""
        return self.device or ("cuda" if torch.cuda.is_available() else "cpu")

    @property
    def dtype(self) -> torch.dtype:
        """The compute dtype: of activations, of the base's matmuls and of the weights kept in float."""
        return parse_dtype(self.quant.compute_dtype, "QuantConfig.compute_dtype")

    @property
    def pairs(self) -> bool:
        """Preference pairs (DPO / ORPO): each example is two sequences, chosen and rejected."""
        return self.train.objective != "sft"

    @property
    def global_batch(self) -> int:
        """Examples per optimizer step, over every process."""
        return self.train.batch_size * self.train.grad_accum * self.processes

    def with_train(self, **changes) -> RunSpec:
        """This spec with some TrainConfig fields changed (validated again)."""
        return replace(self, train=replace(self.train, **changes))

    def describe(self) -> dict:
        """The spec's memory-relevant choices as plain values (the estimate's table and JSON show them)."""
        t = self.train
        return {"model": _model_name(self.model), "bits": self.quant.bits, "r": self.lora.r if self.lora else None,
                "batch_size": t.batch_size, "seq_len": self.seq_len, "grad_accum": t.grad_accum,
                "packing": self.packing, "objective": t.objective, "gradient_checkpointing": self.checkpointing,
                "keep_blocks": self.keep_blocks, "keep_attention": self.keep_attention, "optimizer": t.optimizer,
                "dtype": str(self.dtype).removeprefix("torch."), "device": self.device_type,
                "chunked_loss": bool(t.chunk_tokens), "chunk_tokens": t.chunk_tokens, "processes": self.processes,
                "sharding": t.sharding, "offload_activations": t.offload_activations, "compile": t.compile}


def _model_name(model: object) -> str:
    if model is None or isinstance(model, (str, bytes)) or hasattr(model, "__fspath__"):
        return str(model or "")
    return getattr(model, "_name_or_path", "") or getattr(model, "model_type", "")


# Keyword names of `estimate_memory` / `plan_run` (the Python API's thin builders of a spec) that are
# TrainConfig fields, and the two that are spelled differently there.
_TRAIN_KEYWORDS = ("batch_size", "grad_accum", "optimizer", "objective", "sharding", "compile",
                   "offload_activations", "chunk_tokens")
_RENAMED_KEYWORDS = {"gradient_checkpointing": "checkpointing"}


def spec_from_keywords(model: object, base: RunSpec | None = None, **keywords) -> RunSpec:
    """A RunSpec for `model` from keyword arguments (estimate_memory's and plan_run's names): RunSpec
    fields, TrainConfig fields of `_TRAIN_KEYWORDS`, `gradient_checkpointing`, `dtype` (the compute
    dtype) and `chunked_loss` (False: the model's own loss over full logits). Unknown names are refused."""
    base = base or RunSpec()
    train = {k: keywords.pop(k) for k in _TRAIN_KEYWORDS if k in keywords}
    if "chunked_loss" in keywords:
        chunked = keywords.pop("chunked_loss")
        train.setdefault("chunk_tokens", (base.train.chunk_tokens or DEFAULT_CHUNK_TOKENS) if chunked else None)
    if train.get("optimizer") not in (None, *TRAIN_OPTIMIZERS):
        raise ValueError(f"optimizer={train['optimizer']!r} is not supported; use one of {TRAIN_OPTIMIZERS}")
    fields = {_RENAMED_KEYWORDS.get(k, k): v for k, v in keywords.items()}
    quant = fields.pop("quant", base.quant) or QuantConfig(bits=None)
    if "dtype" in fields:
        quant = replace(quant, compute_dtype=parse_dtype(fields.pop("dtype"), "dtype"))
    unknown = sorted(set(fields) - set(RunSpec.__dataclass_fields__))
    if unknown:
        raise TypeError(f"unknown run options {unknown}; use RunSpec's fields, TrainConfig's {list(_TRAIN_KEYWORDS)}, "
                        "gradient_checkpointing, dtype or chunked_loss")
    return replace(base, model=model, quant=quant, train=replace(base.train, **train), **fields)
