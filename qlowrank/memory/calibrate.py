"""The calibrated process estimate: the model cut to one and two decoder blocks, trained in fresh processes, extrapolated by depth.

The analytic process model (`process.py`) predicts what glibc's heaps keep from terms fitted on
a few machines' runs. `estimate --calibrate` measures it instead, on this machine: a fresh
subprocess builds the model at its real widths and vocabulary with 1 block, another with 2
(random weights, quantized and adapted as the run will be, checkpointing and heap trims as the
Trainer arranges them), trains `CALIBRATION_STEPS` steps at the run's micro-batch and sequence
length, and samples its anonymous peak (RssAnon). What each holds beyond its exact tensor
estimate is its residual; the residual's growth from 1 to 2 blocks is taken as what each further
block adds:

    calibrated = tensors(L blocks) + residual(2) + (L - 2) x max(0, residual(2) - residual(1))

It costs two short trainings of one and two blocks (seconds for small models, about a minute
each at Llama-3-8B's widths and seq 2048). It covers the training peak; loading is the analytic
model's (`load_peak`), and the larger of the two is the figure.
"""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from dataclasses import dataclass

import torch
import transformers

from ..config import LoraConfig, QuantConfig, RunSpec
from .meta_model import layer_count, with_depth

# Steps each stand-in trains (the peak is over all of them): the first allocates the optimizer's
# states and the kernels' scratch, the second reuses the heaps as every later step does.
CALIBRATION_STEPS = 2
STAND_IN_DEPTHS = (1, 2)


@dataclass(frozen=True)
class Calibration:
    """The two stand-ins' measurements and the extrapolated training peak."""

    anon_peaks: dict[int, int]      # blocks -> measured anonymous peak of the stand-in's training
    tensor_peaks: dict[int, int]    # blocks -> the stand-in's exact tensor estimate
    layers: int                     # the whole model's decoder blocks
    tensor_peak: int                # the whole model's tensor estimate

    def residual(self, blocks: int) -> int:
        """What the `blocks`-block stand-in held beyond its tensors."""
        return self.anon_peaks[blocks] - self.tensor_peaks[blocks]

    @property
    def per_block(self) -> int:
        """What each block beyond the second adds beyond its tensors (measured: 2 blocks less 1)."""
        return max(0, self.residual(2) - self.residual(1))

    @property
    def training_bytes(self) -> int:
        """The extrapolated anonymous training peak of the whole model."""
        return self.tensor_peak + self.residual(2) + max(0, self.layers - 2) * self.per_block


def stand_in_run(spec: RunSpec) -> dict:
    """The stand-ins' run shape (plain values, for a child process) from the run's spec.

    Raises:
        ValueError: settings the stand-ins do not reproduce yet (a CUDA run, full fine-tuning,
            partial checkpointing, packing, preference pairs, several processes, an optimizer other than AdamW).
    """
    unsupported = {"--device cuda (the stand-ins measure this machine's CPU process: give --device cpu)":
                   spec.device_type == "cuda",
                   "--r 0 (full fine-tuning)": spec.lora is None,
                   "--keep-blocks": bool(spec.keep_blocks),
                   "--packing": spec.packing,
                   f"--objective {spec.train.objective}": spec.pairs,
                   f"--processes {spec.processes}": spec.processes > 1,
                   f"--optimizer {spec.train.optimizer}": spec.train.optimizer != "adamw"}
    refused = [name for name, present in unsupported.items() if present]
    if refused:
        raise ValueError(f"--calibrate does not reproduce {', '.join(refused)} yet; drop it, or use the analytic estimate")
    quant = dataclasses.asdict(spec.quant)
    quant["compute_dtype"] = str(spec.dtype).removeprefix("torch.")
    lora = dataclasses.asdict(spec.lora)
    lora["target_modules"] = lora["target_modules"] if isinstance(lora["target_modules"], str) else list(lora["target_modules"])
    return {"quant": quant, "lora": lora, "batch_size": spec.train.batch_size, "seq_len": spec.seq_len,
            "grad_accum": spec.train.grad_accum, "gradient_checkpointing": spec.checkpointing,
            "keep_attention": spec.keep_attention, "dtype": str(spec.dtype).removeprefix("torch.")}


def calibrate_training_peak(config: transformers.PretrainedConfig, tensor_peak: int, estimate_for,
                            run: dict) -> Calibration:
    """Measure the 1- and 2-block stand-ins of `config` and extrapolate to its depth.

    Args:
        config: the model's config.
        tensor_peak: the whole model's tensor estimate for the run.
        estimate_for: config -> its MemoryEstimate for the run (the caller's settings), for the stand-ins.
        run: the run's shape for the stand-ins: quant and lora (as dicts), batch_size, seq_len,
            grad_accum, gradient_checkpointing, keep_attention, dtype (a string).
    """
    anon, tensors = {}, {}
    for blocks in STAND_IN_DEPTHS:
        cut = with_depth(config, blocks)
        tensors[blocks] = estimate_for(cut).total_bytes
        anon[blocks] = _measure_in_subprocess(cut, run)
    return Calibration(anon, tensors, layer_count(config), tensor_peak)


def _measure_in_subprocess(config: transformers.PretrainedConfig, run: dict) -> int:
    payload = json.dumps({"config": config.to_dict(), "run": run})
    result = subprocess.run([sys.executable, "-m", "qlowrank.memory.calibrate"], input=payload, text=True,
                            capture_output=True)
    if result.returncode != 0:
        raise RuntimeError(f"the calibration stand-in failed:\n{result.stderr[-2000:]}")
    return int(json.loads(result.stdout.strip().splitlines()[-1])["anon_peak"])


def train_stand_in(config: transformers.PretrainedConfig, run: dict) -> int:
    """In this (fresh) process: build `config` at random, quantize and adapt it, train
    CALIBRATION_STEPS steps of the run's shape, and return the anonymous peak of the training."""
    from ..heap import release_free_heap
    from ..model.checkpointing import (
        enable_gradient_checkpointing,
        trim_heaps_before_backward,
    )
    from ..model.surgery import random_adapted_model
    from ..nn.loss import causal_lm_loss
    from .sampler import StatusSampler

    dtype = getattr(torch, run["dtype"])
    run["quant"]["compute_dtype"] = getattr(torch, run["quant"]["compute_dtype"])
    torch.manual_seed(0)
    model = random_adapted_model(config, QuantConfig(**run["quant"]), LoraConfig(**run["lora"]), dtype)
    if run["gradient_checkpointing"]:
        enable_gradient_checkpointing(model, keep_attention=run["keep_attention"])
    trim_heaps_before_backward(model)
    model.train()
    release_free_heap()   # as loading ends: what building and quantizing freed is not the run's
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    generator = torch.Generator().manual_seed(0)
    autocast = torch.autocast("cpu", dtype=dtype) if dtype != torch.float32 else torch.autocast("cpu", enabled=False)
    with StatusSampler() as sampler:
        for _ in range(CALIBRATION_STEPS):
            for _ in range(run["grad_accum"]):
                tokens = torch.randint(0, int(config.vocab_size), (run["batch_size"], run["seq_len"]), generator=generator)
                with autocast:
                    loss = causal_lm_loss(model, tokens, tokens) / run["grad_accum"]
                loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    return sampler.anon_peak


def _main() -> None:
    payload = json.loads(sys.stdin.read())
    config = transformers.AutoConfig.for_model(**payload["config"])
    print(json.dumps({"anon_peak": train_stand_in(config, payload["run"])}))


if __name__ == "__main__":
    _main()
