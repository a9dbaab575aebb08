"""Configuration dataclasses: how the base is quantized and where LoRA adapters go.

Every field is validated on construction, so a typo fails at the call site with a message
that names the field and the values it accepts, not deep inside a training step.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, replace
from typing import Sequence

import torch

_QUANT_TYPES = ("nf4", "fp4")
_BITS = (4, 8, None)
_COMPUTE_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
_INITS = ("kaiming", "gaussian", "loftq", "pissa")
_SVDS = ("randomized", "full")


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

    def __post_init__(self) -> None:
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

    def layer_config(self, module_name: str) -> "LoraConfig":
        """This config with r and alpha resolved for one module (and the patterns dropped)."""
        r, alpha = self.rank_and_alpha(module_name)
        return replace(self, r=r, alpha=alpha, rank_pattern={}, alpha_pattern={})


def _pattern_value(pattern: dict, module_name: str, default):
    for key, value in pattern.items():
        if re.match(rf"(.*\.)?(?:{key})$", module_name):
            return value
    return default
