"""The task registry and prompt formatting."""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Iterator
from typing import Any

import datasets
import torch

from rlkit.models.sequences import supervised_batch
from rlkit.registry import Registry
from rlkit.settings import ConfigError

TASKS: Registry[type[Task]] = Registry("task")


class Task:
    """A dataset adapter. Subclasses set ``Options`` (a dataclass of the knobs
    accepted under ``task.options``) and implement :meth:`load_split`.
    ``evaluation`` names how :mod:`rlkit.eval` evaluates the task: ``generation``
    (greedy and sampled completions, verified), ``pairs`` (held-out preference pairs) or
    ``episodes`` (held-out environment instances played turn by turn). ``samples`` names the
    policy-gradient loop's sample stage for it (rlkit/loops/sampling.py): ``responses`` (one
    response per sample, scored by the reward) or ``episodes`` (multi-turn, rewarded by an environment)."""

    evaluation = "generation"
    samples = "responses"
    chat_template: str | None = None  # given to a tokenizer trained here (the tiny model's), when the task needs one

    @dataclasses.dataclass
    class Options:
        pass

    def __init__(self, task_cfg):
        self.cfg = task_cfg
        self.options = parse_options(self.Options, task_cfg.options)

    def load_split(self, split: str) -> datasets.Dataset:
        """Rows with at least ``question``, ``answer`` and ``solution``; split is 'train' or 'test'."""
        raise NotImplementedError

    def answer_key(self, completion: str) -> Any:
        """The final answer of a completion for majority voting (maj@k), or None: tasks
        without a comparable final answer leave maj@k out."""
        return None

    def metrics(self, completions: list[str], rows: list[dict]) -> dict[str, float]:
        """Extra held-out metrics of greedy completions (e.g. ROUGE against reference
        summaries), reported beside accuracy and reward."""
        return {}

    def corpus(self, rows) -> Iterator[str]:
        """The text of ``rows`` that the tiny model's tokenizer is trained on."""
        return (f"{row['question']}\n{row['solution']}" for row in rows)

    def supervised_batch(self, run, rows: list[dict], device) -> dict[str, torch.Tensor]:
        """Supervised examples of ``rows`` (SFT, the warm start): each formatted prompt and its
        reference solution, the loss on the solution (:func:`rlkit.models.sequences.supervised_batch`)."""
        return supervised_batch(run.tokenizer, run.prompts(rows), [row["solution"] for row in rows], device)

    def split(self, split: str) -> datasets.Dataset:
        rows = self.load_split(split)
        if len(rows) == 0:
            raise ConfigError(f"task {self.cfg.name}: the {split} split has no usable rows (task.path={self.cfg.path})")
        if split == "train" and self.cfg.max_train_rows:
            rows = rows.select(range(min(self.cfg.max_train_rows, len(rows))))
        self.check_row(rows[0])
        return rows

    def check_row(self, row: dict[str, Any]) -> None:
        """Fail now, not at the first rollout, when ``task.prompt_template`` names a column the rows lack."""
        user_message(row, self.cfg)


def parse_options(options_cls: type, values: dict[str, Any]):
    """Build a task's options dataclass, rejecting unknown keys (listing the valid ones) and values
    of the wrong type (``task.options`` is untyped in the schema, so Hydra cannot)."""
    hints = typing.get_type_hints(options_cls)
    for key, value in values.items():
        if key not in hints:
            raise ConfigError(f"task.options.{key}: unknown option; valid: {', '.join(sorted(hints)) or '(none)'}")
        if not matches(value, hints[key]):
            raise ConfigError(f"task.options.{key}={value!r} must be {describe_type(hints[key])}")
    return options_cls(**dict(values))


def type_options(annotation) -> tuple:
    """The types a value of ``annotation`` may have (``X | None`` gives both)."""
    return typing.get_args(annotation) if isinstance(annotation, types.UnionType) else (annotation,)


def matches(value: Any, annotation) -> bool:
    """A config value of the annotated type; bools are not numbers, ints are floats."""
    allowed = type_options(annotation)
    if isinstance(value, bool):
        return bool in allowed
    if isinstance(value, int) and float in allowed:
        return True
    return isinstance(value, tuple(t for t in allowed if isinstance(t, type)))


def describe_type(annotation) -> str:
    names = {int: "an integer", float: "a number", str: "text", bool: "true or false", type(None): "null"}
    return " or ".join(names.get(t, getattr(t, "__name__", str(t))) for t in type_options(annotation))


def build_task(task_cfg, env_settings=None) -> Task:
    """The task ``task_cfg`` names; an environment task also takes the ``env`` node's settings."""
    cls = TASKS.get(task_cfg.name)
    return cls(task_cfg) if env_settings is None else cls(task_cfg, env_settings)


def user_message(row: dict[str, Any], task_cfg) -> str:
    """``task.prompt_template`` filled with the row's columns."""
    try:
        return task_cfg.prompt_template.format(**row)
    except KeyError as error:
        raise ConfigError(
            f"task.prompt_template refers to {error}, which rows of task '{task_cfg.name}' lack; columns: "
            f"{', '.join(row)}"
        ) from None
    except (IndexError, ValueError) as error:
        raise ConfigError(
            f"task.prompt_template={task_cfg.prompt_template!r} is not a valid template ({error}); "
            "name columns in braces, e.g. '{question}', and write a literal brace as '{{' or '}}'"
        ) from None


def format_prompt(row: dict[str, Any], task_cfg, tokenizer) -> str:
    """The text the policy continues: the task's template, wrapped in the
    tokenizer's chat template when it has one (and ``use_chat_template`` is on)."""
    message = user_message(row, task_cfg)
    if not (task_cfg.use_chat_template and getattr(tokenizer, "chat_template", None)):
        return message
    messages = [{"role": "user", "content": message}]
    if task_cfg.system_prompt:
        messages.insert(0, {"role": "system", "content": task_cfg.system_prompt})
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
