"""Per-token log-probabilities (and entropies) of responses under a model."""

from __future__ import annotations

import torch

from rlkit.engine import all_reduce_sum, is_sharded
from rlkit.models.kv_cache import cache_argument, output_cache


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions that skip left padding, matching what ``generate`` used."""
    return (attention_mask.cumsum(-1) - 1).clamp(min=0)


def response_logits(
    model, sequences: torch.Tensor, attention_mask: torch.Tensor, num_response_tokens: int, share_prompt: bool = True
) -> torch.Tensor:
    """(B, T, V) logits predicting the last ``num_response_tokens`` tokens of each row.

    Rows that repeat a prompt (the samples of a group) share one forward pass over
    it when ``share_prompt``: the distinct prompts run once, their KV cache is
    gathered per row (gradients flow back through the gather) and the responses
    attend to it. Same logits as one pass over whole rows, to float tolerance.
    """
    positions = position_ids_from_mask(attention_mask)
    prompt_width = sequences.shape[1] - num_response_tokens
    whole_rows = not share_prompt or num_response_tokens < 2 or (torch.is_grad_enabled() and checkpointing(model))
    sharded = is_sharded(model)
    if sharded:  # ZeRO-3 ranks gather parameters together: all must run the same passes
        whole_rows = all_reduce_sum(float(whole_rows)) > 0
    if not whole_rows:
        prompts = torch.cat([sequences[:, :prompt_width], attention_mask[:, :prompt_width]], dim=1)
        distinct, row_prompt = torch.unique(prompts, dim=0, return_inverse=True)
        whole_rows = len(distinct) == len(sequences) and not sharded  # nothing to share
    if whole_rows:
        return model(
            input_ids=sequences,
            attention_mask=attention_mask,
            position_ids=positions,
            logits_to_keep=num_response_tokens + 1,
            use_cache=False,
        ).logits[:, :-1]
    prompt_ids, prompt_mask = distinct[:, :prompt_width], distinct[:, prompt_width:]
    prefix = model(
        input_ids=prompt_ids,
        attention_mask=prompt_mask,
        position_ids=position_ids_from_mask(prompt_mask),
        use_cache=True,
        logits_to_keep=1,
    )
    cache = output_cache(prefix)
    cache.batch_select_indices(row_prompt)
    rest = model(
        input_ids=sequences[:, prompt_width:-1],
        attention_mask=attention_mask[:, :-1],
        position_ids=positions[:, prompt_width:-1],
        use_cache=True,
        **cache_argument(model, cache),
    ).logits
    return torch.cat([prefix.logits[row_prompt], rest], dim=1)


def checkpointing(model) -> bool:
    """Whether activation checkpointing is on (it drops a forward's KV cache in training)."""
    inner = getattr(model, "module", model)  # a DeepSpeed engine wraps the model
    flag = (
        "is_activation_checkpointing"
        if hasattr(type(inner), "is_activation_checkpointing")
        else "is_gradient_checkpointing"
    )
    return bool(getattr(inner, flag, False))


def token_log_probs(
    model,
    sequences: torch.Tensor,
    attention_mask: torch.Tensor,
    num_response_tokens: int,
    temperature: float = 1.0,
    with_entropy: bool = False,
    entropy_grad: bool = False,
    share_prompt: bool = True,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """log pi(y_t | x, y_<t) for the last ``num_response_tokens`` tokens, from
    logits divided by ``temperature`` (the sampling distribution); (B, T) each.
    The entropy is detached unless ``entropy_grad`` (an entropy bonus needs it)."""
    logits = response_logits(model, sequences, attention_mask, num_response_tokens, share_prompt).float()
    if temperature != 1.0:
        logits = logits / temperature
    log_norm = torch.logsumexp(logits, dim=-1)
    targets = sequences[:, -num_response_tokens:]
    log_probs = torch.gather(logits, -1, targets.unsqueeze(-1)).squeeze(-1) - log_norm
    entropy = None
    if with_entropy:
        with torch.set_grad_enabled(entropy_grad and torch.is_grad_enabled()):
            entropy = log_norm - (torch.softmax(logits, dim=-1) * logits).sum(-1)
    return log_probs, entropy
