"""Where task rows come from: local JSONL files (plain or gzipped), a directory of
per-split files, or a hub dataset; and a seeded held-out split for single-split sources.

Local files are read line by line and checked before any model is built: an empty file, a
truncated gzip stream, bytes that are not UTF-8, a line that is not a JSON object, and a field of
the wrong type are each a one-line :class:`ConfigError` naming the file, the line and the field.
"""

from __future__ import annotations

import dataclasses
import gzip
import json
import os
import zlib
from collections.abc import Callable, Iterator
from typing import Any

import datasets

from rlkit.settings import ConfigError

JSONL_SUFFIXES = (".jsonl", ".jsonl.gz", ".json", ".json.gz")
KINDS = {str: "text", int: "a number", float: "a number", bool: "true/false", list: "a list", dict: "an object"}


@dataclasses.dataclass(frozen=True)
class Field:
    """What a task needs of one field of its raw rows."""

    types: tuple[type, ...] = (str,)
    required: bool = True


TEXT = Field()
OPTIONAL_TEXT = Field((str,), required=False)
RowCheck = Callable[[dict], "str | None"]  # a task's own rule for one row: the problem, or None


def kind(value: Any) -> str:
    return "null" if value is None else KINDS.get(type(value), type(value).__name__)


def where(path: str, place: str | int) -> str:
    """``task.path: 'file' line 3`` (an int is a line number; JSON arrays give ``row N``)."""
    return f"task.path: '{path}' " + (f"line {place}" if isinstance(place, int) else place)


def read_lines(path: str) -> Iterator[tuple[int, str]]:
    """(line number, text) of every non-blank line of a plain or gzipped file."""
    number = 0
    try:
        with (gzip.open if path.endswith(".gz") else open)(path, "rb") as f:
            for number, raw in enumerate(f, 1):  # noqa: B007  (the number is reported after the loop)
                try:
                    text = raw.decode("utf-8")
                except UnicodeDecodeError as error:
                    raise ConfigError(
                        f"{where(path, number)}: not UTF-8 text (byte 0x{raw[error.start]:02x} at column "
                        f"{error.start + 1})"
                    ) from None
                if text.strip():
                    yield number, text
    except (EOFError, gzip.BadGzipFile, zlib.error) as error:
        raise ConfigError(
            f"task.path: '{path}' is not a complete gzip file (cut short or damaged after line {number}: {error})"
        ) from None
    except OSError as error:
        raise ConfigError(f"task.path: cannot read '{path}': {error.strerror or error}") from None


def read_records(path: str) -> list[tuple[int | str, dict]]:
    """(line number, object) of each line of a JSON Lines file, or (``row N``, object) of each
    element of a JSON array."""
    lines = list(read_lines(path))
    if not lines:
        raise ConfigError(f"task.path: '{path}' has no rows (the file is empty)")
    if path.endswith((".json", ".json.gz")) and lines[0][1].lstrip().startswith("["):
        try:
            values = json.loads("".join(text for _, text in lines))
        except ValueError as error:
            raise ConfigError(f"task.path: '{path}' is not valid JSON ({error})") from None
        records = [(f"row {i}", value) for i, value in enumerate(values if isinstance(values, list) else [values], 1)]
    else:
        records = []
        for number, text in lines:
            try:
                records.append((number, json.loads(text)))
            except ValueError as error:
                raise ConfigError(f"{where(path, number)}: not valid JSON ({error})") from None
    for number, value in records:
        if not isinstance(value, dict):
            raise ConfigError(f"{where(path, number)}: a row must be a JSON object, not {kind(value)}")
    return records


def check_rows(
    path: str, records: list[tuple[int | str, dict]], fields: dict[str, Field], check: RowCheck | None = None
) -> list[dict]:
    """The rows, each with every column (None where a row lacks it), after checking that each
    field the task reads has its type and each column one type throughout (what Arrow needs)."""
    first_kind: dict[str, tuple[str, int | str]] = {}
    for number, row in records:
        for name, field in fields.items():
            value = row.get(name)
            if value is None:
                if field.required:
                    raise ConfigError(f"{where(path, number)}: field '{name}' is missing")
            elif not isinstance(value, field.types) or (isinstance(value, bool) and bool not in field.types):
                expected = " or ".join(dict.fromkeys(KINDS.get(t, t.__name__) for t in field.types))
                raise ConfigError(f"{where(path, number)}: field '{name}' is {kind(value)}, expected {expected}")
        for name, value in row.items():
            seen = first_kind.setdefault(name, (kind(value), number))
            if value is not None and seen[0] == "null":
                first_kind[name] = (kind(value), number)
            elif value is not None and kind(value) != seen[0]:
                earlier = where(path, seen[1]).split("' ", 1)[1]
                raise ConfigError(f"{where(path, number)}: field '{name}' is {kind(value)}, but {seen[0]} on {earlier}")
        problem = check(row) if check else None
        if problem:
            raise ConfigError(f"{where(path, number)}: {problem}")
    columns = list(first_kind)
    return [{name: row.get(name) for name in columns} for _, row in records]


def read_json(path: str, fields: dict[str, Field] | None = None, check: RowCheck | None = None) -> datasets.Dataset:
    """The checked rows of one JSON or JSONL(.gz) file (see the module docstring)."""
    rows = check_rows(path, read_records(path), fields or {}, check)
    try:
        return datasets.Dataset.from_list(rows)
    except Exception as error:  # noqa: BLE001  (pyarrow's many conversion errors: nested values of mixed types)
        raise ConfigError(f"task.path: cannot read '{path}': {str(error).strip().splitlines()[0]}") from None


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


def load_split(
    path: str,
    split: str,
    options: SourceOptions,
    fields: dict[str, Field] | None = None,
    check: RowCheck | None = None,
) -> datasets.Dataset:
    """Rows of ``split`` ('train' or 'test') from ``path``: a directory with ``train`` and
    ``test`` JSONL files; a single JSONL file, split by :func:`held_out`; or a hub id,
    whose own splits are used unless ``options.hub_split`` names the one split to carve up.
    Rows of local files are checked against ``fields`` and ``check`` (see :func:`read_json`)."""
    test_size, seed, hub_config, hub_split = options.test_size, options.seed, options.hub_config, options.hub_split
    if os.path.isdir(path):
        file = split_file(path, split)
        if file is None:
            raise ConfigError(f"task.path='{path}': no {split}.jsonl (or .jsonl.gz) there")
        return read_json(file, fields, check)
    if os.path.isfile(path):
        return held_out(read_json(path, fields, check), split, test_size, seed)
    if path.startswith((".", "/")):
        raise ConfigError(f"task.path='{path}' does not exist")
    if hub_split:
        return held_out(load_hub(path, hub_config, split=hub_split), split, test_size, seed)
    return load_hub(path, hub_config, split=split)


def load_hub(path: str, *args, **kwargs):
    """``datasets.load_dataset(path, ...)`` of a Hugging Face Hub id; one line when the hub cannot give
    it (offline, or no such dataset)."""
    try:
        return datasets.load_dataset(path, *args, **kwargs)
    except (ConnectionError, FileNotFoundError) as error:  # datasets' DatasetNotFoundError is a FileNotFoundError
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ConfigError(
            f"task.path='{path}': not a local file or directory, and the Hugging Face Hub did not give it ({reason}); "
            "offline, set task.path to local files (docs/tasks-and-rewards.md says which each task reads)"
        ) from None


def held_out(rows: datasets.Dataset, split: str, test_size: int, seed: int) -> datasets.Dataset:
    """A seeded split of one source: ``test_size`` rows are 'test', the rest 'train'
    (the same rows for every training seed, so evaluations compare across runs)."""
    if not 0 < test_size < len(rows):
        raise ConfigError(
            f"task.options.test_size={test_size} must be between 1 and {len(rows) - 1} (the source has "
            f"{len(rows)} rows)"
        )
    parts = rows.train_test_split(test_size=test_size, seed=seed, shuffle=True)
    return parts["test" if split == "test" else "train"]


def read_text_lines(path: str) -> list[str]:
    """The non-blank lines of a UTF-8 text file (one-line errors as :func:`read_lines`, and for an empty file)."""
    lines = [text.rstrip("\n") for _, text in read_lines(path)]
    if not lines:
        raise ConfigError(f"task.path: '{path}' has no text (the file is empty)")
    return lines
