"""Rollout backends: what samples the policy's responses (the ``rollout`` config group).

A backend takes token-id prompts (with one length budget per prompt, or one for all) and the
loop's sampling settings and returns a
:class:`~rlkit.rollout.generate.Rollout`: token ids, masks and the behaviour log-probs it
sampled with. ``sync_weights()`` is called after every optimizer step, so that a backend
holding its own copy of the weights (an inference engine) samples from the current policy.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from rlkit.registry import Registry
from rlkit.rollout.generate import Rollout, left_pad, sample
from rlkit.settings import Settings

ROLLOUTS: Registry = Registry("rollout backend", group="rollout")


@dataclass
class HFRolloutSettings(Settings):
    # on CPU, Llama-family models decode through rlkit's hand-written step (rlkit/rollout/decoding.py,
    # measured 1.5-2.4x faster than transformers' generate); false: the model's own forward every step
    hand_written_step: bool = True


@ROLLOUTS.register("hf", HFRolloutSettings)
class HFRollout:
    """rlkit's own batched sampler (:func:`rlkit.rollout.generate.sample`) on the training
    process's policy module: one prefill per prompt shared by its samples, a KV cache, and
    exactly softmax(logits / temperature) (nucleus-truncated when asked). It samples from the
    module being trained, so weights never need syncing."""

    def __init__(self, settings: HFRolloutSettings, *, model, tokenizer, sampling):
        self.settings, self.model, self.tokenizer, self.sampling = settings, model, tokenizer, sampling

    def sample(
        self,
        prompt_ids: list[list[int]],
        *,
        num_samples: int,
        max_new_tokens: int | list[int],
        min_new_tokens: int | list[int] | None = None,
        greedy: bool = False,
        logits_processor=None,
    ) -> Rollout:
        """``num_samples`` responses to each prompt, samples of one prompt adjacent. Length budgets
        are per prompt or shared; ``min_new_tokens`` None: the sampling settings' (0 when greedy)."""
        if min_new_tokens is None:
            min_new_tokens = 0 if greedy else self.sampling.min_new_tokens
        device = next(self.model.parameters()).device
        ids, mask = left_pad(prompt_ids, self.tokenizer.pad_token_id, device)
        return sample(
            self.model,
            ids,
            mask,
            eos_token_id=self.tokenizer.eos_token_id,
            pad_token_id=self.tokenizer.pad_token_id,
            num_samples=num_samples,
            max_new_tokens=torch.as_tensor(max_new_tokens, device=device),
            min_new_tokens=torch.as_tensor(min_new_tokens, device=device),
            greedy=greedy,
            temperature=self.sampling.temperature,
            top_p=self.sampling.top_p,
            logits_processor=logits_processor,
            hand_written_step=self.settings.hand_written_step,
        )

    def sync_weights(self) -> None:
        """Nothing to do: the sampler runs the module the optimizer updates."""
