"""Masked action spaces over the vocabulary, for NLPO (Ramamurthy et al. 2023, "Is Reinforcement
Learning (Not) for Natural Language Processing", arXiv:2210.01241, Algorithm 1).

NLPO's policy acts only among the tokens of the *mask policy's* top-p set: at each state the
policy's logits outside that set are -inf and it renormalises over what is left,

    pi_theta^M(a | s) = pi_theta(a | s) 1[a in M_psi(s)] / pi_theta(M_psi(s) | s),

and PPO's ratio pi_theta^M / pi_theta_old^M is taken between such masked distributions. The
set is nucleus (top-p, Holtzman et al. 2020) truncation of the mask policy pi_psi:

    M_psi(s) = {a : pi_psi(a | s) >= c},  c the largest threshold with pi_psi(M_psi(s) | s) >= p,

i.e. the smallest set of most-probable tokens whose mass reaches p, *with every token tied at
the threshold included*, so the set is a function of the distribution alone (not of a sort's
tie order) and recomputing it later over the same state gives the same set.
"""

from __future__ import annotations

import torch


def top_p_mask(logits: torch.Tensor, p: float, temperature: float = 1.0, min_tokens_to_keep: int = 1) -> torch.Tensor:
    """(..., V) bool: True on the top-p set of softmax(logits / temperature) (see the module
    docstring); at least ``min_tokens_to_keep`` tokens (the most probable ones, and whatever
    ties the last of them). ``p >= 1`` keeps every token."""
    if p >= 1.0:
        return torch.ones_like(logits, dtype=torch.bool)
    probs = torch.softmax(logits.float() / temperature if temperature != 1.0 else logits.float(), dim=-1)
    sorted_probs = probs.sort(dim=-1, descending=True).values
    mass_before = torch.nn.functional.pad(sorted_probs.cumsum(-1)[..., :-1], (1, 0))  # exclusive prefix sums
    # >= 1: mass_before[0] = 0
    kept = (mass_before < p).sum(-1, keepdim=True).clamp(min=min_tokens_to_keep, max=probs.shape[-1])
    threshold = sorted_probs.gather(-1, kept - 1)  # probability of the least probable kept token
    return probs >= threshold


def masked_log_probs(
    logits: torch.Tensor,
    targets: torch.Tensor,
    mask: torch.Tensor,
    temperature: float = 1.0,
    with_entropy: bool = False,
    entropy_grad: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """log pi^M(target) under softmax(logits / temperature) restricted to ``mask`` and renormalised,
    (B, T) from (B, T, V) logits, (B, T) targets and a (B, T, V) bool mask; -inf where the target
    lies outside the mask. With ``with_entropy`` also the entropy of the masked distribution
    (detached unless ``entropy_grad``). An all-True mask gives the plain log-softmax."""
    scaled = logits.float() / temperature if temperature != 1.0 else logits.float()
    masked = scaled.masked_fill(~mask, float("-inf"))
    log_norm = torch.logsumexp(masked, dim=-1)
    log_probs = masked.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - log_norm
    entropy = None
    if with_entropy:
        with torch.set_grad_enabled(entropy_grad and torch.is_grad_enabled()):
            # masked entries have probability 0; 0 * -inf would be nan, so they contribute 0 * 0
            entropy = log_norm - (torch.softmax(masked, dim=-1) * scaled.masked_fill(~mask, 0.0)).sum(-1)
    return log_probs, entropy
