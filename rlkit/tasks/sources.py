"""Where task rows come from: local JSONL files (plain or gzipped), a directory of
per-split files, or a hub dataset; and a seeded held-out split for single-split sources."""

from __future__ import annotations

import dataclasses
import os

import datasets

from rlkit.config import ConfigError

JSONL_SUFFIXES = (".jsonl", ".jsonl.gz", ".json", ".json.gz")


def read_json(path: str) -> datasets.Dataset:
    """The rows of one JSON or JSONL(.gz) file; a malformed file is a one-line :class:`ConfigError`
    naming it and the parser's complaint."""
    try:
        return datasets.load_dataset("json", data_files={"rows": path}, split="rows")
    except datasets.exceptions.DatasetGenerationError as error:
        cause = error.__cause__ or error
        raise ConfigError(f"task.path: cannot read '{path}': {str(cause).strip().splitlines()[0]}") from error


def split_file(directory: str, split: str) -> str | None:
    """``<directory>/<split>.jsonl`` (or .jsonl.gz, .json), if there is one."""
    for suffix in JSONL_SUFFIXES:
        path = os.path.join(directory, split + suffix)
        if os.path.isfile(path):
            return path
    return None


@dataclasses.dataclass
class SourceOptions:
    """The ``task.options`` of a task whose rows :func:`load_split` reads; tasks extend it."""

    test_size: int = 200  # rows held out for evaluation when the source has a single split
    seed: int = 0  # data seed of that held-out split, independent of the training seed
    hub_config: str | None = None  # a hub dataset's configuration name
    hub_split: str | None = None  # a hub dataset's only split, to carve into train/test (null: use its own splits)


def load_split(path: str, split: str, options: SourceOptions) -> datasets.Dataset:
    """Rows of ``split`` ('train' or 'test') from ``path``: a directory with ``train`` and
    ``test`` JSONL files; a single JSONL file, split by :func:`held_out`; or a hub id,
    whose own splits are used unless ``options.hub_split`` names the one split to carve up."""
    test_size, seed, hub_config, hub_split = options.test_size, options.seed, options.hub_config, options.hub_split
    if os.path.isdir(path):
        file = split_file(path, split)
        if file is None:
            raise ConfigError(f"task.path='{path}': no {split}.jsonl (or .jsonl.gz) there")
        return read_json(file)
    if os.path.isfile(path):
        return held_out(read_json(path), split, test_size, seed)
    if path.startswith((".", "/")):
        raise ConfigError(f"task.path='{path}' does not exist")
    if hub_split:
        return held_out(datasets.load_dataset(path, hub_config, split=hub_split), split, test_size, seed)
    return datasets.load_dataset(path, hub_config, split=split)


def held_out(rows: datasets.Dataset, split: str, test_size: int, seed: int) -> datasets.Dataset:
    """A seeded split of one source: ``test_size`` rows are 'test', the rest 'train'
    (the same rows for every training seed, so evaluations compare across runs)."""
    if not 0 < test_size < len(rows):
        raise ConfigError(
            f"task.options.test_size={test_size} must be between 1 and {len(rows) - 1} (the source has {len(rows)} rows)"
        )
    parts = rows.train_test_split(test_size=test_size, seed=seed, shuffle=True)
    return parts["test" if split == "test" else "train"]
