"""Token-in/token-out multi-turn episodes, batched over environments.

Each episode's sequence grows by appending token ids only: the opening prompt is
tokenised once, every reply is kept exactly as sampled (ids and behaviour
log-probs), and every observation is tokenised once with the chat template's turn
delimiters (:mod:`rlkit.envs.chat`). Nothing is decoded and encoded again, so the
tokens trained on are the tokens sampled (the multi-turn bug of TRL issue 5224 and
verl issues 3960, 6719 cannot happen). The loss mask is 1 on sampled tokens only.

A turn is one observation followed by one reply; ``turn_index`` gives each token its
turn (the opening prompt is turn 0's observation).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Hashable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch

from rlkit.envs.base import Environment, StepResult
from rlkit.envs.chat import TurnDelimiters, encode, first_prompt, turn_delimiters

# (contexts, max new tokens per context) -> one (token ids, behaviour log-probs) per context;
# a reply stops after its first stop token (EOS / end of turn), which it includes.
SampleFn = Callable[[list[list[int]], list[int]], list[tuple[list[int], list[float]]]]
# (episode numbers, contexts, max new tokens) -> replies: a SampleFn that may look at the environments
ActFn = Callable[[list[int], list[list[int]], list[int]], list[tuple[list[int], list[float]]]]


@dataclasses.dataclass
class Turn:
    observation: str  # what the reply answered
    reply: str  # the reply's text (special tokens removed), as the environment read it
    reward: float
    state_key: Hashable  # the environment state the reply was made in (GiGPO's anchor)
    info: dict[str, Any]
    feedback: str = ""  # the observation the environment gave back


@dataclasses.dataclass
class Episode:
    """One episode as token ids, with everything the credit assignment needs."""

    row: dict[str, Any]
    token_ids: list[int]
    loss_mask: list[int]  # 1 on sampled tokens
    log_probs: list[float]  # behaviour log-probs of sampled tokens, 0.0 elsewhere
    turn_index: list[int]
    prompt_length: int  # tokens of the opening prompt
    turns: list[Turn] = dataclasses.field(default_factory=list)
    done: bool = False  # the environment ended the episode
    truncated: str | None = None  # "turns" or "tokens": a limit ended it first
    error: str | None = None  # the environment raised; the episode ended there

    @property
    def rewards(self) -> list[float]:
        return [turn.reward for turn in self.turns]

    @property
    def total_reward(self) -> float:
        return sum(self.rewards)

    @property
    def state_keys(self) -> list[Hashable]:
        return [turn.state_key for turn in self.turns]

    def count(self, key: str) -> int:
        """Sum of an ``info`` count over the turns (``invalid_action``, ``tool_calls``, ``tool_errors``)."""
        return sum(int(turn.info.get(key, 0)) for turn in self.turns)

    @property
    def finished(self) -> bool:
        return self.done or self.truncated is not None or self.error is not None


@dataclasses.dataclass(frozen=True)
class EpisodeSettings:
    max_turns: int | None = None  # replies per episode; None: each environment's options.max_turns
    max_total_tokens: int = 512  # the whole sequence, prompt included
    max_reply_tokens: int = 64  # one reply
    step_workers: int = 0  # > 0: step this many environments at a time on threads (tools that wait on subprocesses)


def run_episodes(
    sample_fn: SampleFn,
    tokenizer,
    envs: Sequence[Environment],
    rows: Sequence[dict[str, Any]],
    settings: EpisodeSettings = EpisodeSettings(),
) -> list[Episode]:
    """Play ``envs[i]`` on ``rows[i]`` with replies from ``sample_fn``, all episodes turn by turn."""
    return play(lambda _, contexts, budgets: sample_fn(contexts, budgets), tokenizer, envs, rows, settings)


def run_expert_episodes(
    tokenizer,
    envs: Sequence[Environment],
    rows: Sequence[dict[str, Any]],
    settings: EpisodeSettings = EpisodeSettings(),
) -> list[Episode]:
    """Episodes of each environment's scripted expert, in the same token layout as
    sampled ones: warm-start demonstrations (train on ``loss_mask``). The expert's
    reply is its text tokenised once, closed by EOS; its log-probs are 0."""

    def expert(indices: list[int], _contexts, budgets: list[int]) -> list[tuple[list[int], list[float]]]:
        replies = []
        for i, budget in zip(indices, budgets):
            ids = (encode(tokenizer, envs[i].expert_action()) + [tokenizer.eos_token_id])[:budget]
            replies.append((ids, [0.0] * len(ids)))
        return replies

    return play(expert, tokenizer, envs, rows, settings)


def play(
    act: ActFn, tokenizer, envs: Sequence[Environment], rows: Sequence[dict[str, Any]], settings: EpisodeSettings
) -> list[Episode]:
    if len(envs) != len(rows):
        raise ValueError(f"{len(envs)} environments for {len(rows)} rows")
    delimiters = {prompt: turn_delimiters(tokenizer, prompt) for prompt in {env.system_prompt for env in envs}}
    observations = [env.reset(row) for env, row in zip(envs, rows)]
    episodes = [open_episode(tokenizer, env, row, obs) for env, row, obs in zip(envs, rows, observations)]
    with ThreadPoolExecutor(max(1, settings.step_workers)) as pool:
        while True:
            for episode in episodes:
                if not episode.finished and len(episode.token_ids) >= settings.max_total_tokens:
                    episode.truncated = "tokens"
            active = [i for i, episode in enumerate(episodes) if not episode.finished]
            if not active:
                return episodes
            budgets = [
                min(settings.max_reply_tokens, settings.max_total_tokens - len(episodes[i].token_ids)) for i in active
            ]
            replies = act(active, [list(episodes[i].token_ids) for i in active], budgets)
            if len(replies) != len(active):
                raise ValueError(f"the sampler gave {len(replies)} replies for {len(active)} contexts")
            for i, budget, (ids, log_probs) in zip(active, budgets, replies):
                check_reply(ids, log_probs, budget)
                append(episodes[i], ids, 1, list(log_probs), len(episodes[i].turns))
            texts = [tokenizer.decode(ids, skip_special_tokens=True) for ids, _ in replies]
            stepped = pool.map(
                take_turn,
                [envs[i] for i in active],
                [episodes[i] for i in active],
                [observations[i] for i in active],
                texts,
            )
            for i, (ids, _), observation in zip(active, replies, list(stepped)):
                observations[i] = observation
                if not episodes[i].finished:
                    add_observation(episodes[i], envs[i], ids, observation, tokenizer, delimiters, settings)


def add_observation(
    episode: Episode,
    env: Environment,
    reply_ids: list[int],
    observation: str,
    tokenizer,
    delimiters: dict[str | None, TurnDelimiters],
    settings: EpisodeSettings,
) -> None:
    """Append the next observation's tokens, or end the episode at the turn or token limit."""
    if len(episode.turns) >= (settings.max_turns or env.options.max_turns):
        episode.truncated = "turns"
        return
    stop = tokenizer.decode(reply_ids[-1:]) if reply_ids[-1] == tokenizer.eos_token_id else None
    ids = encode(tokenizer, delimiters[env.system_prompt].observation_text(observation, stop))
    if len(episode.token_ids) + len(ids) >= settings.max_total_tokens:
        episode.truncated = "tokens"  # no room left for the observation and a reply to it
        return
    append(episode, ids, 0, [0.0] * len(ids), len(episode.turns))


def open_episode(tokenizer, env: Environment, row: dict[str, Any], observation: str) -> Episode:
    """An episode holding its opening prompt: system prompt, first observation, generation prompt."""
    ids = encode(tokenizer, first_prompt(tokenizer, observation, env.system_prompt))
    return Episode(row, ids, [0] * len(ids), [0.0] * len(ids), [0] * len(ids), len(ids))


def take_turn(env: Environment, episode: Episode, observation: str, reply: str) -> str:
    """Step the environment with the reply and record the turn; returns the next observation.
    An exception inside the environment ends the episode with the error recorded."""
    state = None
    try:
        state = env.state_key()
        result = env.step(reply)
    except Exception as error:  # noqa: BLE001  (an environment bug ends its episode, not the run)
        episode.error = f"{type(error).__name__}: {error}"
        result = StepResult("", 0.0, True, {})
    episode.turns.append(Turn(observation, reply, float(result.reward), state, dict(result.info), result.observation))
    episode.done = bool(result.done)
    return result.observation


def append(episode: Episode, ids: list[int], loss: int, log_probs: list[float], turn: int) -> None:
    episode.token_ids += ids
    episode.loss_mask += [loss] * len(ids)
    episode.log_probs += log_probs
    episode.turn_index += [turn] * len(ids)


def check_reply(ids: list[int], log_probs: Sequence[float], budget: int) -> None:
    if len(ids) != len(log_probs):
        raise ValueError(f"the sampler gave {len(ids)} tokens but {len(log_probs)} log-probs")
    if not 0 < len(ids) <= budget:
        raise ValueError(f"the sampler gave {len(ids)} tokens for a budget of {budget}")


def episodes_to_tensors(episodes: Sequence[Episode], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Right-padded (B, T) tensors of episodes: ``input_ids``, ``attention_mask``,
    ``loss_mask``, ``old_log_probs`` (behaviour log-probs) and ``turn_index``."""
    width = max(len(e.token_ids) for e in episodes)

    def pad(rows: list[list], value, dtype) -> torch.Tensor:
        return torch.tensor([row + [value] * (width - len(row)) for row in rows], dtype=dtype)

    return {
        "input_ids": pad([e.token_ids for e in episodes], pad_token_id, torch.long),
        "attention_mask": pad([[1] * len(e.token_ids) for e in episodes], 0, torch.long),
        "loss_mask": pad([e.loss_mask for e in episodes], 0, torch.long),
        "old_log_probs": pad([e.log_probs for e in episodes], 0.0, torch.float32),
        "turn_index": pad([e.turn_index for e in episodes], 0, torch.long),
    }
