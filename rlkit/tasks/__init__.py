"""Tasks: dataset adapters that yield rows with ``question``, ``answer`` and
``solution`` columns (plus any others, which reach the reward functions)."""

from rlkit.tasks import (  # noqa: F401  (register the tasks)  # noqa: F401  (registers humaneval, code, math, sentiment, sql, summarize)
    arith,
    code,
    competition_math,
    environment,  # registers the environment task (task=maze, ..., task=env)
    gsm8k,
    preference,  # noqa: F401  (registers hh, preference, ranking)
    sentiment,
    sql,
    summarize,
)
from rlkit.tasks.base import TASKS, Task, build_task, format_prompt

__all__ = ["TASKS", "Task", "build_task", "format_prompt"]
