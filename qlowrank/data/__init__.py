"""Training data: readers (JSONL, JSON, text, tables), tokenization and label masking, packing, batching."""

from .batch import LENGTH_GROUP_WINDOW, batch_width, collate, epoch_order, pack_examples, split_examples
from .example import DataError, Example, Fields
from .readers import TEXT_SUFFIXES, read_rows
from .tokenize import load_examples, tokenize_row

__all__ = ["DataError", "Example", "Fields", "LENGTH_GROUP_WINDOW", "TEXT_SUFFIXES", "batch_width", "collate",
           "epoch_order", "load_examples", "pack_examples", "read_rows", "split_examples", "tokenize_row"]
