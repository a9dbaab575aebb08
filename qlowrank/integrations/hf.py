"""transformers.Trainer and TRL's trainers with a qlowrank model: checkpoints and save_model hold the PEFT-format adapter.

transformers.Trainer treats any model that is not a `peft.PeftModel` as a full model: `save_model`
and every periodic checkpoint write its whole state dict (the packed 4-bit weights included), and
`train(resume_from_checkpoint=...)` looks for that state dict. `AdapterCheckpoints` replaces those
two steps, and only those: it writes the adapter as `save_adapter` does (adapter_config.json +
adapter_model.safetensors, staged and renamed into place) and loads it back with `load_adapter`.
The optimizer, scheduler, RNG and trainer state stay Trainer's own, so a resumed run continues
the uninterrupted one.

    trainer = QlowrankTrainer(model=model, args=TrainingArguments(...), train_dataset=...)

    class QlowrankSFTTrainer(AdapterCheckpoints, trl.SFTTrainer):   # any Trainer subclass
        pass
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch
import transformers
from torch import nn

from ..adapter import ADAPTER_CONFIG, load_adapter, save_adapter
from ..atomic import staging_tag
from ..model.surgery import lora_layers

# transformers.trainer.TRAINING_ARGS_NAME: Trainer saves its arguments beside the model under this name.
TRAINING_ARGS_NAME = "training_args.bin"


class AdapterCheckpoints:
    """Mixin for `transformers.Trainer` and its subclasses (TRL's SFTTrainer, DPOTrainer): adapter-only saves.

    Put it first among the bases, so its `_save` / `_load_from_checkpoint` / `_load_best_model`
    replace Trainer's. One process or DDP; FSDP and DeepSpeed are refused (their saves gather a
    sharded state dict that this writer does not read).
    """

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        name = type(self).__name__
        if self.is_fsdp_enabled or self.is_deepspeed_enabled:
            raise ValueError(f"{name}: FSDP and DeepSpeed are not supported here; train with one process or DDP, "
                             "or use `qlowrank train` (its FSDP strategy saves the adapter)")
        model = self.accelerator.unwrap_model(self.model)
        if not dict(lora_layers(model)):
            raise ValueError(f"{name}: the model has no qlowrank LoRA layers; build it with qlowrank.load_model(..., "
                             "lora=LoraConfig(...)) or qlowrank.add_lora(model, lora) first")
        check_float32_factors(model, f"after {name} was built")

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        if not self.args.should_save:
            return
        folder = Path(output_dir if output_dir is not None else self.args.output_dir)
        write_adapter(self.accelerator.unwrap_model(self.model), folder)
        if self.processing_class is not None:
            self.processing_class.save_pretrained(str(folder))
        torch.save(self.args, folder / TRAINING_ARGS_NAME)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: nn.Module | None = None) -> None:
        read_adapter_into(self.accelerator.unwrap_model(model if model is not None else self.model),
                          Path(resume_from_checkpoint), type(self).__name__)

    def _load_best_model(self) -> None:
        read_adapter_into(self.accelerator.unwrap_model(self.model), Path(self.state.best_model_checkpoint),
                          type(self).__name__)


class QlowrankTrainer(AdapterCheckpoints, transformers.Trainer):
    """`transformers.Trainer` for a qlowrank model: saves, checkpoints and resumes its PEFT-format adapter."""


def check_float32_factors(model: nn.Module, when: str) -> None:
    """Refuse LoRA factors that are not float32 (TRL casts trainable parameters of a model that says it is 4/8-bit)."""
    cast = sorted({str(p.dtype) for name, p in model.named_parameters() if ".lora_" in name and p.dtype != torch.float32})
    if cast:
        flags = [flag for flag in ("is_loaded_in_4bit", "is_loaded_in_8bit") if getattr(model, flag, False)]
        why = f" (the model sets {' and '.join(flags)}, which makes TRL cast them to bf16)" if flags else ""
        raise ValueError(f"the LoRA factors are {', '.join(cast)} {when}, not float32{why}; load the model with "
                         "qlowrank.load_model (which sets neither flag) or cast the factors back with .float()")


def write_adapter(model: nn.Module, folder: Path) -> None:
    """The adapter files in `folder`, keeping whatever else it holds (`save_model()` into a run's output_dir)."""
    if not folder.exists() or not any(folder.iterdir()):
        save_adapter(model, folder, format="qlowrank")   # the whole folder staged, then renamed into place
        return
    # The folder already holds other things (checkpoint-N folders, a tokenizer) that must survive:
    # stage the adapter inside it, then move its files in, each rename atomic and the config last,
    # since adapter_config.json is what marks a folder as an adapter.
    staging = folder / f".adapter.partial-{staging_tag()}-trainer"
    try:
        save_adapter(model, staging, format="qlowrank")
        for name in sorted(os.listdir(staging), key=lambda n: n == ADAPTER_CONFIG):
            os.replace(staging / name, folder / name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def read_adapter_into(model: nn.Module, folder: Path, trainer: str) -> None:
    """Load the adapter of a checkpoint that `write_adapter` wrote into the model, in place."""
    if not (folder / ADAPTER_CONFIG).is_file():
        raise ValueError(f"{folder} holds no {ADAPTER_CONFIG}: {trainer} resumes only from checkpoints it wrote "
                         "(adapter files, not a full state dict); pass one of its checkpoint-N folders")
    load_adapter(model, folder)
