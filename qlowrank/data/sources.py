"""Tabular data sources read through the `datasets` library: Parquet, CSV, and `save_to_disk` folders.

`datasets` is an optional extra (`pip install 'qlowrank[datasets]'`); JSONL / JSON / text
files never need it. Each row comes back as a plain dict with its 1-based row number, so a
bad row is reported as `file:row N:` just like a JSONL row is reported as `file:line:`.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any, Iterator

TABLE_SUFFIXES = (".parquet", ".csv")


class SourceError(ValueError):
    """A table or saved dataset that cannot be read; data.py turns it into a DataError."""


def is_table_source(path: Path) -> bool:
    """True for a .parquet / .csv file or a folder written by `Dataset.save_to_disk`."""
    return path.suffix in TABLE_SUFFIXES or path.is_dir()


def _datasets():
    try:
        import datasets
    except ImportError:
        raise SourceError("reading Parquet, CSV or saved datasets needs the `datasets` package: "
                          "pip install 'qlowrank[datasets]' (or pip install datasets)") from None
    return datasets


@contextlib.contextmanager
def _quiet(datasets):
    # `datasets` draws a progress bar for every file it reads; a data file is read in a moment.
    # It also logs its own ERROR line for a broken file, next to the one line qlowrank prints.
    was_disabled = datasets.utils.are_progress_bars_disabled()
    verbosity = datasets.logging.get_verbosity()
    datasets.utils.disable_progress_bars()
    datasets.logging.set_verbosity(datasets.logging.CRITICAL)
    try:
        yield
    finally:
        datasets.logging.set_verbosity(verbosity)
        if not was_disabled:
            datasets.utils.enable_progress_bars()


def _open(path: Path):
    datasets = _datasets()
    with _quiet(datasets):
        if path.is_dir():
            if not any((path / name).is_file() for name in ("dataset_info.json", "state.json", "dataset_dict.json")):
                raise SourceError(f"{path}: a data folder must be a dataset saved with `save_to_disk` "
                                  "(it has no dataset_info.json / dataset_dict.json)")
            try:
                loaded = datasets.load_from_disk(str(path))
            except (OSError, ValueError, KeyError) as err:   # its files missing or damaged: raised inside datasets
                raise SourceError(f"{path}: not a readable saved dataset ({type(err).__name__}: {err})") from err
            if isinstance(loaded, datasets.DatasetDict):
                return _one_split(path, loaded)
            return loaded
        try:
            if path.suffix == ".parquet":
                return datasets.Dataset.from_parquet(str(path), keep_in_memory=True)
            return datasets.Dataset.from_csv(str(path), keep_in_memory=True)
        except Exception as err:   # pyarrow / pandas parse errors have many types
            kind = "Parquet" if path.suffix == ".parquet" else "CSV"
            raise SourceError(f"{path}: not a readable {kind} file ({type(err).__name__}: {err})") from None


def _one_split(path: Path, splits) -> Any:
    """The 'train' split of a saved DatasetDict, or its only split."""
    if "train" in splits:
        return splits["train"]
    if len(splits) == 1:
        return next(iter(splits.values()))
    raise SourceError(f"{path}: a saved DatasetDict with splits {sorted(splits)} and no 'train'; "
                      f"pass the split's own folder (e.g. {path / sorted(splits)[0]})")


def read_table_rows(path: Path) -> Iterator[tuple[int, dict]]:
    """Yield (1-based row number, row) of a Parquet / CSV file or a saved dataset.

    Columns are shared by every row of a table, so a row of a mixed-format table has the
    other formats' columns set to None (Parquet) or empty (CSV); those are dropped, which
    lets one table hold text rows and prompt/completion rows as a JSONL file can.
    """
    for number, row in enumerate(_open(path), 1):
        yield number, {key: value for key, value in row.items() if value is not None}
