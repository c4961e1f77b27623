"""Multi-turn environments: a model replies, the environment observes and rewards, turn by turn.

Register one with ``@ENVIRONMENTS.register("name")`` on a subclass of
:class:`Environment`, or point ``env.fn`` at ``package.module:Class``.
"""

from rlkit.envs import maze, navigation, tool_arith, twenty_questions, wordle  # noqa: F401  (register them)
from rlkit.envs.base import ENVIRONMENTS, Environment, StepResult, build_environment, resolve_environment

__all__ = ["ENVIRONMENTS", "Environment", "StepResult", "build_environment", "resolve_environment"]
