"""The task registry and prompt formatting."""

from __future__ import annotations

import dataclasses
from typing import Any

import datasets

from rlkit.config import ConfigError
from rlkit.registry import Registry

TASKS: Registry[type[Task]] = Registry("task")


class Task:
    """A dataset adapter. Subclasses set ``Options`` (a dataclass of the knobs
    accepted under ``task.options``) and implement :meth:`load_split`.
    ``evaluation`` names how :mod:`rlkit.eval` evaluates the task: ``generation``
    (greedy and sampled completions, verified) or ``pairs`` (held-out preference pairs)."""

    evaluation = "generation"

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

    def split(self, split: str) -> datasets.Dataset:
        rows = self.load_split(split)
        if split == "train" and self.cfg.max_train_rows:
            rows = rows.select(range(min(self.cfg.max_train_rows, len(rows))))
        return rows


def parse_options(options_cls: type, values: dict[str, Any]):
    """Build a task's options dataclass, rejecting unknown keys with the valid ones."""
    known = {f.name for f in dataclasses.fields(options_cls)}
    for key in values:
        if key not in known:
            raise ConfigError(f"task.options.{key}: unknown option; valid: {', '.join(sorted(known)) or '(none)'}")
    return options_cls(**dict(values))


def build_task(task_cfg) -> Task:
    return TASKS.get(task_cfg.name)(task_cfg)


def format_prompt(row: dict[str, Any], task_cfg, tokenizer) -> str:
    """The text the policy continues: the task's template, wrapped in the
    tokenizer's chat template when it has one (and ``use_chat_template`` is on)."""
    try:
        user_message = task_cfg.prompt_template.format(**row)
    except KeyError as error:
        raise ConfigError(
            f"task.prompt_template refers to {error}, which rows of task '{task_cfg.name}' lack; columns: {', '.join(row)}"
        ) from None
    if not (task_cfg.use_chat_template and getattr(tokenizer, "chat_template", None)):
        return user_message
    messages = [{"role": "user", "content": user_message}]
    if task_cfg.system_prompt:
        messages.insert(0, {"role": "system", "content": task_cfg.system_prompt})
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
