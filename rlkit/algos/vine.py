"""VinePPO's per-step advantage from Monte-Carlo state values (the values come from
:mod:`rlkit.loops.mc_values`; this is the pure tensor part)."""

from __future__ import annotations

import torch

from rlkit.algos.advantages import (
    ADVANTAGE_ESTIMATORS,
    AdvantageInputs,
    NormalisedSettings,
    _float_mask,
    _normalise_over_batch,
    uses,
)


def per_step(step_ids: torch.Tensor, mask: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, T) token tensors -> (steps (B, T) long, 0 on padding; step_values (B, S) float64,
    each step's value read at its first token)."""
    valid = mask.bool()
    steps = step_ids.long().clamp(min=0) * valid
    previous = torch.nn.functional.pad(steps[:, :-1], (1, 0), value=-1)
    first = valid & (steps != previous)
    num_steps = int(steps.max()) + 1 if steps.numel() else 1
    scratch = torch.where(first, steps, torch.full_like(steps, num_steps))  # others write a discarded column
    step_values = torch.zeros(steps.shape[0], num_steps + 1, dtype=torch.float64, device=steps.device)
    step_values.scatter_(1, scratch, values.to(torch.float64))
    present = torch.zeros_like(step_values).scatter_(1, scratch, 1.0)[:, :num_steps]
    if bool((present[:, 1:] > present[:, :-1]).any()):
        raise ValueError("step_ids must number each response's steps 0, 1, 2, ... without gaps")
    return steps, step_values[:, :num_steps]


@ADVANTAGE_ESTIMATORS.register("vine", NormalisedSettings)
@uses("values", "step_ids")
@torch.no_grad()
def vine_advantage(inputs: AdvantageInputs, settings: NormalisedSettings) -> tuple[torch.Tensor, torch.Tensor]:
    """VinePPO (Kazemnejad et al. 2024, "VinePPO: Unlocking RL Potential For LLM Reasoning
    Through Refined Credit Assignment", arXiv:2410.01679, Sec. 4).

    The response is a sequence of steps j = 0 .. n-1; s_j is the prompt plus the steps
    before j, and ``inputs.values`` holds V^_MC(s_j) on every token of step j:
      V^_MC(s_j) = 1/K sum_k R(eta_k),  eta_1..eta_K ~ pi(. | s_j)        (Eq. 5)
    (estimated by the ``monte_carlo`` value source, :mod:`rlkit.loops.mc_values`). Each step's advantage
      A^_MC(s_j, a_j) = r(s_j, a_j) + V^_MC(s_{j+1}) - V^_MC(s_j)          (Eq. 6, gamma = 1)
    is given to every token of step j, where r(s_j, a_j) is the sum of the step's token
    rewards (the score sits on the last token, plus any per-token KL shaping) and the value
    after the last step is 0 (terminal state; the paper puts R(x; y) in r of the final
    action, Eq. 1-3, which is the same as giving the terminal state the value R and the
    final step r = 0). With one step per response this is R - V^_MC(prompt), REINFORCE
    with an independent Monte-Carlo baseline. The policy update is PPO's, unchanged.

    ``inputs.step_ids`` (B, T) numbers each response's steps 0, 1, ... (contiguous; padding
    is ignored). Returns (A, r + V^_MC(s_{j+1})), the Monte-Carlo Q estimate, per token; with
    ``norm_by_std`` the advantages are whitened over every response token of the batch,
    all processes included (as the authors' code does).
    """
    if inputs.values is None or inputs.step_ids is None:
        raise ValueError(
            "advantage 'vine' needs Monte-Carlo state values and step ids (AdvantageInputs.values, .step_ids): "
            "set algo/value_source=monte_carlo"
        )
    mask = _float_mask(inputs.response_mask)
    steps, step_values = per_step(inputs.step_ids, inputs.response_mask, inputs.values)
    step_rewards = torch.zeros_like(step_values).scatter_add_(1, steps, inputs.token_rewards.to(torch.float64) * mask)
    # 0 past the last step (a missing step has value 0 too)
    next_values = torch.nn.functional.pad(step_values[:, 1:], (0, 1))
    step_returns = step_rewards + next_values
    advantages = (step_returns - step_values).gather(1, steps) * mask
    returns = step_returns.gather(1, steps) * mask
    if settings.norm_by_std:
        advantages = _normalise_over_batch(advantages, inputs.response_mask, settings.eps, divide=True)
    return advantages.float(), returns.float()
