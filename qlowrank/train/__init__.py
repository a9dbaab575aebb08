"""Training: the Trainer loop, data loading and masking, the chunked loss, optimizers and checkpoints."""

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
from .optim import OPTIMIZERS, build_optimizer, build_scheduler, lr_factor
from .signals import TrainingInterrupted
from .trainer import NonFiniteLossError, TrainConfig, Trainer, TrainResult

__all__ = [
    "CheckpointError", "TrainingInterrupted", "find_resumable", "verify_checkpoint", "write_manifest",
    "DataError", "Example", "IGNORE_INDEX", "NonFiniteLossError", "OPTIMIZERS", "TrainConfig", "TrainResult", "Trainer",
    "build_optimizer", "build_scheduler", "causal_lm_loss", "chunked_cross_entropy", "collate", "latest_checkpoint",
    "Fields", "list_checkpoints", "load_checkpoint", "load_examples", "lr_factor", "pack_examples", "read_rows", "save_checkpoint",
    "split_examples", "tokenize_row",
]
