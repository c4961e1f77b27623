"""Rewards: ``f(prompts, completions, **row_fields) -> list[float]``.

``row_fields`` are the dataset's columns for the same rows, as lists (the
contract of TRL's reward functions). Register one with
``@REWARDS.register("name")``, or point ``reward.fn`` at ``package.module:function``.
"""

from rlkit.rewards import (  # noqa: F401  (task rewards: code_tests, math_verify, answer_tags, repetition_penalty, vader_*, classifier_sentiment, sql_execution, rouge, bleu)
    code,
    math,  # noqa: F401  (registers the math rewards)
    math_equivalence,
    reward_model,  # noqa: F401  (registers reward_model: a learned scalar reward)
    rules,
    sentiment,
    shaping,  # noqa: F401  (registers the shaping rewards: overlong_penalty)
    sql,
    text,
)
from rlkit.rewards.registry import REWARDS, CompositeReward, build_reward, resolve_reward_fn

__all__ = ["REWARDS", "CompositeReward", "build_reward", "resolve_reward_fn"]
