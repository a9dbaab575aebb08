"""Training data: readers (JSONL, JSON, text, tables), row layouts, tokenization and label masking, packing, batching."""

from .batch import LENGTH_GROUP_WINDOW, batch_width, collate, epoch_order, pack_examples, split_examples
from .example import DataError, Example, Fields
from .layouts import FORMATS, LAYOUTS, Layout, detect
from .readers import TEXT_SUFFIXES, read_rows
from .stats import DataStats, end_of_turn_ids
from .encode import load_examples, tokenize_row, tokenize_sample

__all__ = ["DataError", "DataStats", "Example", "FORMATS", "Fields", "LAYOUTS", "LENGTH_GROUP_WINDOW", "Layout",
           "TEXT_SUFFIXES", "batch_width", "collate", "detect", "end_of_turn_ids", "epoch_order", "load_examples",
           "pack_examples", "read_rows", "split_examples", "tokenize_row", "tokenize_sample"]
