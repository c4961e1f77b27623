"""A learned reward: the scalar score of a sequence-classification reward model."""

from __future__ import annotations

import torch

from rlkit.models.reward_model import encode_texts, load_reward_model, reward_scores
from rlkit.rewards.registry import REWARDS


@REWARDS.register("reward_model")
def reward_model_reward(
    prompts: list[str], completions: list[str], *, path: str, batch_size: int = 16, **_
) -> list[float]:
    """The score of the reward model at ``path`` (a local dir, e.g. an ``algo=rm`` checkpoint,
    or a hub id) on each prompt + completion, ``batch_size`` texts per forward pass."""
    model, tokenizer = load_reward_model(str(path))
    texts = [p + c for p, c in zip(prompts, completions)]
    scores: list[float] = []
    with torch.no_grad():
        for start in range(0, len(texts), int(batch_size)):
            scores += reward_scores(
                model, encode_texts(tokenizer, texts[start : start + int(batch_size)], model.device)
            ).tolist()
    return scores
