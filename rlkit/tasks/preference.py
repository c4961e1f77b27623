"""Preference and ranking data: prompts with responses ranked best first.

Every row has ``question`` (the prompt), ``responses`` (best first), ``scores``
(descending), ``chosen`` / ``rejected`` (the best and the worst response), and
``solution`` = ``chosen`` (so ``algo=sft`` and the warm start train on the preferred
side) and an empty ``answer``. Rows that cannot be used (a missing field, an empty response,
chosen == rejected, ...) are counted by reason, logged and reported; they never crash
a run. A file that is not JSON Lines (an empty file, a cut-short gzip stream, bytes that are not
UTF-8, a line that is not a JSON object, a field of the wrong type) is a one-line error naming
the file, line and field (:mod:`rlkit.tasks.sources`). Evaluation is on held-out pairs
(:mod:`rlkit.eval.pairs`).

``task.path``: a hub id, a local ``.jsonl`` / ``.jsonl.gz`` file, or a directory with
``train`` and ``test`` files. ``task.options.test_fraction`` carves a seeded held-out
split from the training rows (needed when there is only one file).
"""

from __future__ import annotations

import collections
import dataclasses
import glob
import logging
import os
import random

import datasets

from rlkit.settings import ConfigError
from rlkit.tasks.base import TASKS, Task
from rlkit.tasks.sources import OPTIONAL_TEXT, Field, check_rows, load_hub, read_records

log = logging.getLogger(__name__)

HH_ASSISTANT = "\n\nAssistant:"
# Types of the fields a preference row may have; a missing one makes the row unusable (skipped).
PREFERENCE_FIELDS = {
    **dict.fromkeys(("prompt", "chosen", "rejected"), OPTIONAL_TEXT),
    **{name: Field((list,), required=False) for name in ("responses", "scores")},
}


class Malformed(ValueError):
    """A row that cannot be used; the message is the reason counted in the report."""


class PreferenceTask(Task):
    """JSONL rows ``{"prompt", "chosen", "rejected"}``."""

    evaluation = "pairs"

    default_path: str | None = None

    @dataclasses.dataclass
    class Options:
        test_fraction: float = 0.0  # > 0: hold out this fraction of the training rows as the test split
        split_seed: int = 0  # the data seed of that split (independent of the training seed)
        hub_data_dir: str | None = None  # hub datasets only: a subset directory, e.g. harmless-base
        max_prompt_chars: int = 0  # > 0: keep only the prompt's last N characters (long dialogues on small models)
        max_response_chars: int = 0  # > 0: keep only each response's first N characters

    def __init__(self, task_cfg):
        super().__init__(task_cfg)
        if not 0 <= self.options.test_fraction < 1:
            raise ConfigError(f"task.options.test_fraction={self.options.test_fraction} must be in [0, 1)")
        self._splits: dict[str, list[dict]] | None = None
        self.malformed: dict[str, collections.Counter] = {}

    def parse(self, raw: dict) -> tuple[str, list[str], list[float]]:
        """(prompt, responses best first, scores) of one raw row; raises :class:`Malformed`."""
        prompt, chosen, rejected = (_text(raw, key) for key in ("prompt", "chosen", "rejected"))
        return prompt, [chosen, rejected], [1.0, 0.0]

    def load_split(self, split: str) -> datasets.Dataset:
        if self._splits is None:
            self._splits = self._load()
        return datasets.Dataset.from_list(self._splits[split])

    @property
    def summary(self) -> dict[str, int | str]:
        """Malformed-row counts for the run report."""
        out: dict[str, int | str] = {}
        for split, counts in self.malformed.items():
            out[f"malformed_rows_{split}"] = sum(counts.values())
            if counts:
                out[f"malformed_reasons_{split}"] = ", ".join(f"{reason}: {n}" for reason, n in counts.most_common())
        return out

    def _load(self) -> dict[str, list[dict]]:
        sources = self._sources()
        splits = {name: self._rows(name, raw) for name, raw in sources.items()}
        if self.options.test_fraction:
            rows = splits["train"]
            random.Random(self.options.split_seed).shuffle(rows)
            cut = int(round(len(rows) * self.options.test_fraction))
            splits = {"test": rows[:cut], "train": rows[cut:]}
        elif "test" not in splits:
            raise ConfigError(
                f"task.path='{self.cfg.path}' has no test split: set task.options.test_fraction (e.g. 0.1)"
            )
        for name, rows in splits.items():
            if not rows:
                raise ConfigError(f"task.path='{self.cfg.path}': the {name} split has no usable rows")
        return splits

    def _sources(self) -> dict[str, datasets.Dataset]:
        path = self.cfg.path or self.default_path
        if path is None:
            raise ConfigError(
                f"task.path is required for task '{self.cfg.name}': a .jsonl(.gz) file, a directory or a hub id"
            )
        if os.path.isfile(path):
            return {"train": _read_jsonl([path])}
        if os.path.isdir(path):
            found = {split: sorted(glob.glob(os.path.join(path, f"{split}*.jsonl*"))) for split in ("train", "test")}
            if not found["train"]:
                raise ConfigError(f"task.path='{path}': no train*.jsonl(.gz) file there")
            return {split: _read_jsonl(files) for split, files in found.items() if files}
        if os.path.exists(path) or path.startswith((".", "/")):
            raise ConfigError(f"task.path='{path}' is neither a .jsonl(.gz) file, a directory nor a hub id")
        loaded = load_hub(path, data_dir=self.options.hub_data_dir)
        return {split: loaded[split] for split in ("train", "test") if split in loaded}

    def _rows(self, split: str, raw_rows) -> list[dict]:
        rows, counts = [], collections.Counter()
        for raw in raw_rows:
            try:
                if not isinstance(raw, dict):
                    raise Malformed("not a JSON object")
                prompt, responses, scores = self.parse(raw)
                rows.append(self._row(prompt, responses, scores))
            except Malformed as reason:
                counts[str(reason)] += 1
        self.malformed[split] = counts
        if counts:
            log.warning(
                "task %s, %s split: skipped %d malformed rows of %d (%s)",
                self.cfg.name,
                split,
                sum(counts.values()),
                sum(counts.values()) + len(rows),
                ", ".join(f"{r}: {n}" for r, n in counts.most_common()),
            )
        return rows

    def _row(self, prompt: str, responses: list[str], scores: list[float]) -> dict:
        o = self.options
        if o.max_prompt_chars:
            prompt = prompt[-o.max_prompt_chars :]
        if o.max_response_chars:
            responses = [r[: o.max_response_chars] for r in responses]
        if len(responses) < 2:
            raise Malformed("fewer than 2 responses")
        if any(not r.strip() for r in responses):
            raise Malformed("empty response")
        ranked = sorted(zip(scores, responses), key=lambda pair: -pair[0])
        if ranked[0][0] == ranked[-1][0]:
            raise Malformed("all scores equal")
        if ranked[0][1] == ranked[-1][1]:
            raise Malformed("chosen == rejected")
        return {
            "question": prompt,
            "responses": [r for _, r in ranked],
            "scores": [float(s) for s, _ in ranked],
            "chosen": ranked[0][1],
            "rejected": ranked[-1][1],
            "solution": ranked[0][1],
            "answer": "",
        }


@TASKS.register("preference")
class GenericPreferenceTask(PreferenceTask):
    pass


@TASKS.register("hh")
class HHTask(PreferenceTask):
    """Anthropic HH-RLHF (Bai et al. 2022): ``chosen`` and ``rejected`` are whole dialogues
    (``\\n\\nHuman: ... \\n\\nAssistant: ...``) that differ in the last assistant turn; the
    prompt is the shared text up to and including the last ``\\n\\nAssistant:``."""

    default_path = "Anthropic/hh-rlhf"

    def parse(self, raw: dict) -> tuple[str, list[str], list[float]]:
        prompt, chosen = split_dialogue(_text(raw, "chosen"))
        rejected_prompt, rejected = split_dialogue(_text(raw, "rejected"))
        if prompt != rejected_prompt:
            raise Malformed("chosen and rejected dialogues differ before the last assistant turn")
        return prompt, [chosen, rejected], [1.0, 0.0]


@TASKS.register("ranking")
class RankingTask(PreferenceTask):
    """JSONL rows ``{"prompt", "responses": [...], "scores": [...]}`` (higher score = better)."""

    def parse(self, raw: dict) -> tuple[str, list[str], list[float]]:
        prompt = _text(raw, "prompt")
        responses, scores = raw.get("responses"), raw.get("scores")
        if not isinstance(responses, list) or not isinstance(scores, list):
            raise Malformed("missing responses or scores list")
        if len(responses) != len(scores):
            raise Malformed("responses and scores differ in length")
        if not all(isinstance(r, str) for r in responses) or not all(isinstance(s, (int, float)) for s in scores):
            raise Malformed("a response is not text or a score not a number")
        return prompt, responses, scores


def split_dialogue(text: str) -> tuple[str, str]:
    """(prompt up to and including the last ``\\n\\nAssistant:``, the final reply)."""
    cut = text.rfind(HH_ASSISTANT)
    if cut < 0:
        raise Malformed("no '\\n\\nAssistant:' turn")
    cut += len(HH_ASSISTANT)
    return text[:cut], text[cut:]


def _text(raw: dict, key: str) -> str:
    value = raw.get(key)
    if not isinstance(value, str):
        raise Malformed(f"missing '{key}'")
    return value


def _read_jsonl(files: list[str]) -> list[dict]:
    """The rows of JSONL files (gzipped or not), checked as :mod:`rlkit.tasks.sources` does."""
    return [row for file in files for row in check_rows(file, read_records(file), PREFERENCE_FIELDS)]
