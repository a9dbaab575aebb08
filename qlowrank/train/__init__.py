"""Training: the Trainer loop, data loading and masking, the chunked loss, optimizers and checkpoints."""

from ..config import TRAIN_OPTIMIZERS, TrainConfig
from ..data import (
    DataError,
    Example,
    Fields,
    collate,
    load_examples,
    pack_examples,
    read_rows,
    split_examples,
    tokenize_row,
)
from ..nn.loss import IGNORE_INDEX, causal_lm_loss, chunked_cross_entropy
from .checkpoint import (
    CheckpointError,
    find_resumable,
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    save_checkpoint,
    verify_checkpoint,
    write_manifest,
)
from .optim import build_optimizer, build_scheduler, lr_factor
from .signals import TrainingInterrupted
from .step import NonFiniteLossError
from .trainer import Trainer, TrainResult

__all__ = [
    "IGNORE_INDEX",
    "TRAIN_OPTIMIZERS",
    "CheckpointError",
    "DataError",
    "Example",
    "Fields",
    "NonFiniteLossError",
    "TrainConfig",
    "TrainResult",
    "Trainer",
    "TrainingInterrupted",
    "build_optimizer",
    "build_scheduler",
    "causal_lm_loss",
    "chunked_cross_entropy",
    "collate",
    "find_resumable",
    "latest_checkpoint",
    "list_checkpoints",
    "load_checkpoint",
    "load_examples",
    "lr_factor",
    "pack_examples",
    "read_rows",
    "save_checkpoint",
    "split_examples",
    "tokenize_row",
    "verify_checkpoint",
    "write_manifest",
]
