"""VinePPO's Monte-Carlo state values (Kazemnejad et al. 2024, "VinePPO: Unlocking RL
Potential For LLM Reasoning Through Refined Credit Assignment", arXiv:2410.01679, Sec. 4).

A language environment can be reset to any intermediate state by feeding the prefix
back to the policy. Each sampled response is cut into steps; for the state s_j before
step j (the prompt plus the steps before it) ``K`` continuations eta_k ~ pi(. | s_j)
are sampled with the current policy, completed to the response's length budget, and
scored with the run's reward against the same row fields. Their mean is
V^_MC(s_j) = 1/K sum_k R(eta_k) (Eq. 5). The continuations only estimate values; the
policy is trained on the original responses (:func:`rlkit.algos.vine.vine_advantage`).

States that repeat (the prompt state of every sample of a group, and responses of one
group that share a prefix) are estimated once, as the authors' code does. All prefixes
are continued in one batched call of the rollout backend. This is the ``monte_carlo`` value
source of the policy-gradient loop (``algo/value_source=monte_carlo``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass

import torch

from rlkit.engine import all_reduce_sum
from rlkit.loops.values import VALUE_SOURCES, ValueSource
from rlkit.settings import Settings


@dataclass
class MonteCarloSettings(Settings):
    k: int = 9  # continuations per state, K of Eq. 5 (paper: 9; its ablation: 1 < 3 < 9)
    step_delimiter: str = (
        "\n"  # a step ends after a token whose text contains this (paper: reasoning steps, cut at newlines; "" = off)
    )
    step_tokens: int = 0  # also end a step after this many tokens (0 = off; the paper cuts only at step boundaries)
    max_states: int | None = None  # estimate at most this many states per response, the prompt included (null = all)

    def check(self) -> None:
        self.require_at_least_one("k")
        self.require_non_negative("step_tokens")
        self.require(
            self.max_states is None or self.max_states >= 1,
            "max_states",
            "must be at least 1 (the prompt state), or null",
        )


def delimiter_tokens(tokenizer, delimiter: str) -> torch.Tensor | None:
    """(vocab,) bool: the tokens whose text contains ``delimiter``; None when it is empty."""
    if not delimiter:
        return None
    texts = tokenizer.batch_decode([[i] for i in range(len(tokenizer))])
    return torch.tensor([delimiter in text for text in texts], dtype=torch.bool)


def split_steps(
    response_ids: torch.Tensor,
    response_mask: torch.Tensor,
    *,
    boundary: torch.Tensor | None,
    step_tokens: int,
    eos_token_id: int,
    max_steps: int | None = None,
) -> torch.Tensor:
    """(B, T) the step (0, 1, ...) of every response token; 0 on padding.

    A step ends after a token marked in ``boundary`` (a (vocab,) bool lookup, e.g. from
    :func:`delimiter_tokens`) or once it has ``step_tokens`` tokens (0 = no length cut).
    No step starts at padding or at an EOS: a trailing EOS stays with the step before it.
    With ``max_steps`` the steps from index ``max_steps - 1`` on are merged into one.
    """
    rows, width = response_ids.shape
    mask = response_mask.bool()
    if boundary is not None:
        boundary = boundary.to(response_ids.device)
        is_boundary = boundary[response_ids.clamp(0, len(boundary) - 1)] & (response_ids < len(boundary))
    else:
        is_boundary = torch.zeros_like(mask)
    may_start = mask & (response_ids != eos_token_id)  # a new step may begin at this token
    steps = torch.zeros(rows, width, dtype=torch.long, device=response_ids.device)
    current = torch.zeros(rows, dtype=torch.long, device=response_ids.device)
    length = torch.zeros_like(current)
    for t in range(width):
        steps[:, t] = current
        length += 1
        end = is_boundary[:, t] | ((length >= step_tokens) if step_tokens else torch.zeros_like(is_boundary[:, t]))
        end &= may_start[:, t + 1] if t + 1 < width else torch.zeros_like(end)
        current += end.long()
        length = length.masked_fill(end, 0)
    steps = steps * mask
    return steps.clamp(max=max_steps - 1) if max_steps else steps


@dataclasses.dataclass
class MonteCarloEstimate:
    """What :class:`MonteCarloValues` returns for one batch of responses.

    values: (B, T) V^_MC of the state each token's step starts from; 0 on padding.
    step_ids: (B, T) the step of each token (0, 1, ...); 0 on padding.
    prefixes: (S,) the response-token count of each estimated state's prefix (0 = the prompt).
    state_rows: (S,) the response whose prefix each state is.
    state_values: (S,) V^_MC of each estimated state.
    continuation_rewards: (S, K) the reward of every continuation.
    metrics: ``vine/*`` counts and means over all processes.
    """

    values: torch.Tensor
    step_ids: torch.Tensor
    prefixes: list[int]
    state_rows: list[int]
    state_values: torch.Tensor
    continuation_rewards: torch.Tensor
    metrics: dict[str, float]


@dataclasses.dataclass
class States:
    """The states to estimate: the prompt plus a response prefix, each prefix of a prompt once.

    prefixes: (S,) response tokens in each state's prefix; rows: (S,) the response it is a prefix of;
    row_states: for each response, the state each of its steps starts from."""

    prefixes: list[int]
    rows: list[int]
    row_states: list[list[int]]


def distinct_states(step_ids: torch.Tensor, batch) -> States:
    """The state before each step of each response; the same prefix of the same prompt is one state."""
    lengths, responses = batch.rollout.response_lengths.tolist(), batch.rollout.response_ids.tolist()
    group_index = batch.group_index.tolist()
    state_of: dict[tuple, int] = {}
    states = States([], [], [])
    for row, ids in enumerate(step_ids.tolist()):
        mine = []
        for t in range(lengths[row]):
            if t == 0 or ids[t] != ids[t - 1]:
                key = (group_index[row], tuple(responses[row][:t]))
                if key not in state_of:
                    state_of[key] = len(states.prefixes)
                    states.prefixes.append(t)
                    states.rows.append(row)
                mine.append(state_of[key])
        states.row_states.append(mine)
    return states


class MonteCarloEstimator:
    """V^_MC for every step of every response of an experience batch.

    ``sample_fn(prompt_ids, num_samples=, max_new_tokens=, min_new_tokens=) -> Rollout`` draws the
    continuations (the rollout backend, so that they come from the current policy exactly as the
    responses did); ``score_fn(rows, prompts, completion_ids) -> (completions, totals, per_term)``
    is the run's reward; ``max_new_tokens`` / ``min_new_tokens`` the responses' length budget.
    """

    def __init__(
        self,
        tokenizer,
        settings: MonteCarloSettings,
        sample_fn: Callable,
        score_fn: Callable,
        max_new_tokens: int,
        min_new_tokens: int = 0,
    ):
        self.tokenizer, self.settings = tokenizer, settings
        self.sample_fn, self.score_fn = sample_fn, score_fn
        self.max_new_tokens, self.min_new_tokens = max_new_tokens, min_new_tokens
        self.boundary = delimiter_tokens(tokenizer, settings.step_delimiter)

    def steps(self, rollout) -> torch.Tensor:
        return split_steps(
            rollout.response_ids,
            rollout.response_mask,
            boundary=self.boundary,
            step_tokens=self.settings.step_tokens,
            eos_token_id=self.tokenizer.eos_token_id,
            max_steps=self.settings.max_states,
        )

    @torch.no_grad()
    def __call__(self, batch) -> MonteCarloEstimate:
        rollout = batch.rollout
        step_ids = self.steps(rollout)
        states = distinct_states(step_ids, batch)
        continued, rewards = self.continue_states(batch, states)
        state_values = rewards.mean(-1)
        # back onto the tokens: every token carries the value of the state its step starts from
        num_steps = max(len(s) for s in states.row_states)
        padded = [s + [0] * (num_steps - len(s)) for s in states.row_states]
        step_state = torch.tensor(padded, dtype=torch.long, device=state_values.device)
        values = state_values[step_state.gather(1, step_ids)] * rollout.response_mask
        metrics = self.metrics(batch, states, state_values, continued)
        return MonteCarloEstimate(values, step_ids, states.prefixes, states.rows, state_values, rewards, metrics)

    def continue_states(self, batch, states: States):
        """K continuations of every state within its response's length budget, and their rewards (S, K)."""
        rollout, k = batch.rollout, self.settings.k
        responses = rollout.response_ids.tolist()
        prompts = [rollout.prompt_ids[row][rollout.prompt_mask[row].bool()].tolist() for row in states.rows]
        continued = self.sample_fn(
            [prompt + responses[row][:start] for prompt, row, start in zip(prompts, states.rows, states.prefixes)],
            num_samples=k,
            max_new_tokens=[self.max_new_tokens - start for start in states.prefixes],
            min_new_tokens=[max(0, self.min_new_tokens - start) for start in states.prefixes],
        )
        kept, continuation_ids = continued.response_lengths.tolist(), continued.response_ids.tolist()
        pairs = [(row, start) for row, start in zip(states.rows, states.prefixes) for _ in range(k)]
        completion_ids = [
            responses[row][:start] + ids[:n] for (row, start), ids, n in zip(pairs, continuation_ids, kept)
        ]
        _, totals, _ = self.score_fn(
            [batch.rows[r] for r, _ in pairs], [batch.prompts[r] for r, _ in pairs], completion_ids
        )
        rewards = torch.tensor(totals, dtype=torch.float32, device=rollout.response_ids.device).view(
            len(states.prefixes), k
        )
        return continued, rewards

    def metrics(self, batch, states: States, state_values: torch.Tensor, continued) -> dict[str, float]:
        """``vine/*`` counts and means over all processes."""
        total = {
            "states": float(len(states.prefixes)),
            "rows": float(len(batch)),
            "steps": float(sum(len(s) for s in states.row_states)),
            "value_sum": float(state_values.sum()),
            "tokens": float(continued.response_lengths.sum()),
            "response_tokens": float(batch.rollout.response_mask.sum()),
            "truncated": float(continued.truncated.sum()),
        }
        total = {key: all_reduce_sum(value) for key, value in total.items()}
        continuations = total["states"] * self.settings.k
        return {
            "vine/states": total["states"],
            "vine/continuations": continuations,
            "vine/continuations_per_response": continuations / max(total["rows"], 1.0),
            "vine/continuation_tokens_per_response_token": total["tokens"] / max(total["response_tokens"], 1.0),
            "vine/steps_per_response": total["steps"] / max(total["rows"], 1.0),
            "vine/value_mean": total["value_sum"] / max(total["states"], 1.0),
            "vine/continuation_truncated_frac": total["truncated"] / max(continuations, 1.0),
        }


@VALUE_SOURCES.register("monte_carlo", MonteCarloSettings)
class MonteCarloValues(ValueSource):
    """VinePPO's values (module docstring), sampled with the loop's rollout backend and scored
    with the run's reward; their reward failures are reported as ``vine/reward_failures/<term>``."""

    provides = ("values", "step_ids")

    def __init__(self, loop, settings, start_dir: str):
        super().__init__(loop, settings, start_dir)
        run = loop.run
        self.estimator = MonteCarloEstimator(
            run.tokenizer,
            settings,
            loop.rollout.sample,
            run.score,
            run.max_new_tokens,
            loop.settings.sampling.min_new_tokens,
        )

    def estimate(self, batch, timer) -> dict[str, float]:
        with timer.phase("mc_values"):
            estimate = self.estimator(batch)
        batch.values, batch.step_ids = estimate.values, estimate.step_ids
        failures = self.loop.run.reward.pop_failures()
        return {
            **estimate.metrics,
            **{f"vine/reward_failures/{name}": all_reduce_sum(float(n)) for name, n in failures.items()},
        }
