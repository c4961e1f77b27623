"""Multi-turn environments: a model replies, the environment observes and rewards, turn by turn.

Register one with ``@register_environment("name")`` on a subclass of :class:`Environment`
(it becomes ``env=name``), or point ``env=custom env.fn`` at ``package.module:Class``.
"""

from rlkit.envs import maze, navigation, tool_arith, twenty_questions, wordle  # noqa: F401  (register them)
from rlkit.envs.base import (
    ENVIRONMENTS,
    Environment,
    EnvSettings,
    StepResult,
    build_environment,
    make_environment,
    register_environment,
    resolve_environment,
)

__all__ = [
    "ENVIRONMENTS",
    "EnvSettings",
    "Environment",
    "StepResult",
    "build_environment",
    "make_environment",
    "register_environment",
    "resolve_environment",
]
