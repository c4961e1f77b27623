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
are continued in one batched :func:`rlkit.rollout.generate.sample` call.
"""

from __future__ import annotations

import dataclasses

import torch

from rlkit.engine import all_reduce_sum
from rlkit.rollout.generate import left_pad, sample


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


class MonteCarloValues:
    """V^_MC for every step of every response of a :class:`rlkit.rollout.groups.Groups` batch.

    ``reward`` is the run's reward (``reward(prompts, completions, **row_fields) ->
    (totals, per_term)``); ``vine`` the ``algo.vine`` node (k, step_delimiter, step_tokens,
    max_states); ``sampling`` the ``algo.sampling`` node (temperature, top_p, the length
    budget): continuations are drawn exactly as the responses were.
    """

    def __init__(self, tokenizer, reward, vine, sampling):
        self.tokenizer, self.reward, self.sampling = tokenizer, reward, sampling
        self.k, self.step_tokens, self.max_states = int(vine.k), int(vine.step_tokens), vine.max_states
        self.boundary = delimiter_tokens(tokenizer, vine.step_delimiter)

    @classmethod
    def from_run(cls, run) -> MonteCarloValues:
        return cls(run.tokenizer, run.reward, run.cfg.algo.vine, run.cfg.algo.sampling)

    def steps(self, rollout) -> torch.Tensor:
        return split_steps(
            rollout.response_ids,
            rollout.response_mask,
            boundary=self.boundary,
            step_tokens=self.step_tokens,
            eos_token_id=self.tokenizer.eos_token_id,
            max_steps=self.max_states,
        )

    @torch.no_grad()
    def __call__(self, model, groups) -> MonteCarloEstimate:
        rollout, tokenizer, k = groups.rollout, self.tokenizer, self.k
        step_ids = self.steps(rollout)
        lengths = rollout.response_lengths.tolist()
        responses = rollout.response_ids.tolist()
        group_index = groups.group_index.tolist()

        # the state before each step; the same prefix of the same prompt is one state
        state_of: dict[tuple, int] = {}
        prefixes, state_rows, row_states = [], [], []
        for row, ids in enumerate(step_ids.tolist()):
            states = []
            for t in range(lengths[row]):
                if t == 0 or ids[t] != ids[t - 1]:
                    key = (group_index[row], tuple(responses[row][:t]))
                    if key not in state_of:
                        state_of[key] = len(prefixes)
                        prefixes.append(t)
                        state_rows.append(row)
                    states.append(state_of[key])
            row_states.append(states)

        # prompt (left padding dropped) + response prefix, left-padded again
        device = rollout.response_ids.device
        parts = [
            torch.cat([rollout.prompt_ids[row][rollout.prompt_mask[row].bool()], rollout.response_ids[row, :start]])
            for row, start in zip(state_rows, prefixes)
        ]
        prefix_ids, prefix_mask = left_pad(parts, tokenizer.pad_token_id, device)
        # each continuation completes its response within the response's own length budget
        max_new, min_new = int(self.sampling.max_new_tokens), int(getattr(self.sampling, "min_new_tokens", 0))
        continued = sample(
            model,
            prefix_ids,
            prefix_mask,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            num_samples=k,
            max_new_tokens=torch.tensor([max_new - start for start in prefixes], device=device),
            min_new_tokens=torch.tensor([max(0, min_new - start) for start in prefixes], device=device),
            temperature=self.sampling.temperature,
            top_p=self.sampling.top_p,
        )
        kept, truncated = continued.response_lengths.tolist(), continued.truncated
        continuation_ids = continued.response_ids.tolist()
        completion_ids, rows, prompts = [], [], []
        for i, (row, start) in enumerate(zip(state_rows, prefixes)):
            for j in range(i * k, (i + 1) * k):
                completion_ids.append(responses[row][:start] + continuation_ids[j][: kept[j]])
                rows.append(groups.rows[row])
                prompts.append(groups.prompts[row])
        completions = tokenizer.batch_decode(completion_ids, skip_special_tokens=True)
        columns = {key: [r[key] for r in rows] for key in rows[0]}
        totals, _ = self.reward(prompts, completions, completion_ids=completion_ids, **columns)
        failures = self.reward.pop_failures() if hasattr(self.reward, "pop_failures") else {}
        rewards = torch.tensor(totals, dtype=torch.float32, device=device).view(len(prefixes), k)
        state_values = rewards.mean(-1)

        # back onto the tokens: every token carries the value of the state its step starts from
        num_steps = max(len(s) for s in row_states)
        step_state = torch.tensor([s + [0] * (num_steps - len(s)) for s in row_states], dtype=torch.long, device=device)
        values = state_values[step_state.gather(1, step_ids)] * rollout.response_mask

        num_states, num_rows = float(len(prefixes)), float(len(lengths))
        totals_global = {
            "states": all_reduce_sum(num_states),
            "rows": all_reduce_sum(num_rows),
            "steps": all_reduce_sum(float(sum(len(s) for s in row_states))),
            "value_sum": all_reduce_sum(float(state_values.sum())),
            "tokens": all_reduce_sum(float(sum(kept))),
            "response_tokens": all_reduce_sum(float(rollout.response_mask.sum())),
            "truncated": all_reduce_sum(float(truncated.sum())),
        }
        continuations = totals_global["states"] * k
        metrics = {
            "vine/states": totals_global["states"],
            "vine/continuations": continuations,
            "vine/continuations_per_response": continuations / max(totals_global["rows"], 1.0),
            "vine/continuation_tokens_per_response_token": totals_global["tokens"]
            / max(totals_global["response_tokens"], 1.0),
            "vine/steps_per_response": totals_global["steps"] / max(totals_global["rows"], 1.0),
            "vine/value_mean": totals_global["value_sum"] / max(totals_global["states"], 1.0),
            "vine/continuation_truncated_frac": totals_global["truncated"] / max(continuations, 1.0),
        }
        metrics.update({f"vine/reward_failures/{name}": all_reduce_sum(float(n)) for name, n in failures.items()})
        return MonteCarloEstimate(values, step_ids, prefixes, state_rows, state_values, rewards, metrics)
