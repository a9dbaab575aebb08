"""Which tokenizer travels with an export: the one given, else the model's enlarged one, else its checkpoint's.

Both writers ask the same question in the same order:
1. a tokenizer passed to `export_merged(tokenizer=...)`;
2. the tokenizer `add_tokens` enlarged (recorded in the model's QlowrankState);
3. the checkpoint the model was loaded from (`load_model` records it): a GGUF file's
   embedded tokenizer, or a folder's tokenizer files.
The safetensors writer copies a folder's files byte for byte (nothing is re-serialized);
the GGUF writer needs a tokenizer object, so it loads one.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from ..model.gguf_reader import load_gguf_tokenizer
from ..model.load import load_tokenizer
from ..state import state_of

# Files that make up a Hugging Face tokenizer, copied as they are from the source folder.
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model", "vocab.json",
    "merges.txt", "vocab.txt", "added_tokens.json", "chat_template.jinja", "chat_template.json",
)


@dataclass
class TokenizerSource:
    """Where an export's tokenizer comes from: an object, or a checkpoint on disk (or nothing)."""

    tokenizer: Any = None            # a tokenizer object (given, or enlarged by add_tokens)
    folder: Path | None = None       # the source checkpoint's folder
    gguf_file: str | None = None     # the source GGUF file's name inside `folder`

    def describe(self) -> str | None:
        """What the export report records: "given", the source path, or None."""
        if self.tokenizer is not None:
            return "given"
        if self.folder is None:
            return None
        return str(self.folder / self.gguf_file) if self.gguf_file else str(self.folder)


def find_tokenizer(model: nn.Module, tokenizer: Any = None) -> TokenizerSource:
    """The tokenizer an export of `model` carries, in the order of the module docstring."""
    tokenizer = tokenizer if tokenizer is not None else state_of(model).tokenizer
    if tokenizer is not None:
        return TokenizerSource(tokenizer=tokenizer)
    source = state_of(model).source
    if not source:
        return TokenizerSource()
    return TokenizerSource(folder=Path(source["path"]), gguf_file=source.get("gguf_file"))


def load_tokenizer_for(model: nn.Module, tokenizer: Any = None) -> Any:
    """A tokenizer object for `model` (GGUF files embed one); ValueError when none is known."""
    found = find_tokenizer(model, tokenizer)
    if found.tokenizer is not None:
        return found.tokenizer
    if found.folder is None:
        raise ValueError("GGUF export needs the tokenizer (a GGUF file carries it): pass tokenizer=..., "
                         "or load the model with qlowrank.load_model so its source is known")
    if found.gguf_file:
        return load_gguf_tokenizer(found.folder, found.gguf_file)
    return load_tokenizer(found.folder)   # names the folder if transformers cannot read it


def save_tokenizer(model: nn.Module, folder: Path, tokenizer: Any = None) -> str | None:
    """Write the export's tokenizer into `folder`; returns where it came from (None: no tokenizer known)."""
    found = find_tokenizer(model, tokenizer)
    if found.tokenizer is not None:
        found.tokenizer.save_pretrained(str(folder))
    elif found.gguf_file:
        gguf_tokenizer = load_gguf_tokenizer(found.folder, found.gguf_file)
        gguf_tokenizer.save_pretrained(str(folder))
    elif found.folder is not None:
        copied = [name for name in TOKENIZER_FILES if (found.folder / name).is_file()]
        for name in copied:
            shutil.copy2(found.folder / name, folder / name)
        if not copied:
            return None
    return found.describe()
