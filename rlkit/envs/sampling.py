"""A :data:`~rlkit.envs.episodes.SampleFn` over rlkit's own sampler (``rollout=hf``)."""

from __future__ import annotations

import torch

from rlkit.rollout.generate import left_pad, sample
from rlkit.rollout.logprobs import token_log_probs


def hf_sample_fn(model, tokenizer, temperature: float = 1.0, top_p: float = 1.0, greedy: bool = False):
    """Replies from :func:`rlkit.rollout.generate.sample`, one per context, stopping at EOS.

    Behaviour log-probs are the rollout's own when it carries them (``Rollout.log_probs``,
    once the rollout seam returns them); until then they are re-scored in one forward pass
    over the same left-padded context, as log softmax(logits / temperature) (with
    ``top_p < 1`` that is the untruncated distribution, the one training scores)."""
    device = next(model.parameters()).device

    def sample_fn(contexts: list[list[int]], max_new_tokens: list[int]) -> list[tuple[list[int], list[float]]]:
        ids, mask = left_pad(contexts, tokenizer.pad_token_id, device)
        rollout = sample(
            model,
            ids,
            mask,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            num_samples=1,
            max_new_tokens=torch.tensor(max_new_tokens, device=device),
            greedy=greedy,
            temperature=temperature,
            top_p=top_p,
        )
        log_probs = getattr(rollout, "log_probs", None)
        if log_probs is None:
            with torch.no_grad():
                log_probs, _ = token_log_probs(
                    model, rollout.sequences, rollout.attention_mask, rollout.response_ids.shape[1], temperature
                )
        lengths = rollout.response_lengths.tolist()
        return [
            (row[:n].tolist(), lp[:n].tolist()) for row, lp, n in zip(rollout.response_ids, log_probs.float(), lengths)
        ]

    return sample_fn
