"""Batched sampling of responses: one prefill per prompt, then token-by-token decoding on a shared KV cache."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass

import torch

from rlkit.engine import all_reduce_sum, is_sharded
from rlkit.models.kv_cache import output_cache
from rlkit.rollout.decoding import decoding_step, reserve_cache
from rlkit.rollout.logprobs import position_ids_from_mask


@dataclass
class Rollout:
    """Left-padded prompts and right-padded responses, row-aligned.

    response_mask is 1 up to and including the first EOS; a response without an
    EOS within ``max_new_tokens`` is ``truncated``. ``log_probs`` are the behaviour
    log-probs: each sampled token's log-prob under the distribution it was drawn from
    (temperature, top-p and any logits processor applied), 0 on padding; None for greedy
    decoding. ``loss_mask`` marks the response tokens the policy sampled where that is not all
    of them (a multi-turn episode's observations are not); None: every response token was.
    """

    prompt_ids: torch.Tensor  # (B, P)
    prompt_mask: torch.Tensor  # (B, P)
    response_ids: torch.Tensor  # (B, T)
    response_mask: torch.Tensor  # (B, T)
    truncated: torch.Tensor  # (B,) bool
    log_probs: torch.Tensor | None = None  # (B, T) float32
    loss_mask: torch.Tensor | None = None  # (B, T) 1 on sampled tokens; None: response_mask

    @property
    def sampled_mask(self) -> torch.Tensor:
        """1 on the response tokens the policy sampled: what losses, KL and advantages cover."""
        return self.response_mask if self.loss_mask is None else self.loss_mask

    @property
    def sequences(self) -> torch.Tensor:
        return torch.cat([self.prompt_ids, self.response_ids], dim=1)

    @property
    def attention_mask(self) -> torch.Tensor:
        return torch.cat([self.prompt_mask, self.response_mask], dim=1)

    @property
    def response_lengths(self) -> torch.Tensor:
        return self.response_mask.sum(-1)

    def completion_ids(self) -> list[list[int]]:
        """Each response's token ids up to and including EOS (the rewards' ``completion_ids`` argument)."""
        return [ids[:n].tolist() for ids, n in zip(self.response_ids, self.response_lengths.tolist())]

    def __len__(self) -> int:
        return self.prompt_ids.shape[0]

    def _map(self, fn) -> Rollout:
        return Rollout(
            **{f.name: None if (v := getattr(self, f.name)) is None else fn(v) for f in dataclasses.fields(self)}
        )

    def to(self, device) -> Rollout:
        return self._map(lambda t: t.to(device))

    def select(self, index: torch.Tensor) -> Rollout:
        return self._map(lambda t: t[index])

    @staticmethod
    def concat(parts: list[Rollout], pad_token_id: int) -> Rollout:
        """Rows of several rollouts; prompts re-padded on the left, responses on the right."""
        prompt_width = max(p.prompt_ids.shape[1] for p in parts)
        response_width = max(p.response_ids.shape[1] for p in parts)
        left = lambda t, value: torch.nn.functional.pad(t, (prompt_width - t.shape[1], 0), value=value)  # noqa: E731
        right = lambda t, value: torch.nn.functional.pad(t, (0, response_width - t.shape[1]), value=value)  # noqa: E731
        return Rollout(
            prompt_ids=torch.cat([left(p.prompt_ids, pad_token_id) for p in parts]),
            prompt_mask=torch.cat([left(p.prompt_mask, 0) for p in parts]),
            response_ids=torch.cat([right(p.response_ids, pad_token_id) for p in parts]),
            response_mask=torch.cat([right(p.response_mask, 0) for p in parts]),
            truncated=torch.cat([p.truncated for p in parts]),
            log_probs=None
            if any(p.log_probs is None for p in parts)
            else torch.cat([right(p.log_probs, 0.0) for p in parts]),
            loss_mask=None
            if all(p.loss_mask is None for p in parts)
            else torch.cat([right(p.sampled_mask, 0) for p in parts]),
        )


def response_mask_from_eos(
    response_ids: torch.Tensor, eos_token_id: int, lengths: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(mask up to and including the first EOS, whether no EOS occurred), looking only at
    each row's first ``lengths`` tokens when given."""
    within = (
        torch.ones_like(response_ids, dtype=torch.bool)
        if lengths is None
        else torch.arange(response_ids.shape[1], device=response_ids.device) < lengths[:, None]
    )
    is_eos = (response_ids == eos_token_id) & within
    eos_seen_before = (is_eos.cumsum(-1) - is_eos.long()) > 0
    return (~eos_seen_before & within).long(), ~is_eos.any(-1)


def left_pad(sequences, pad_token_id: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, mask), both (B, longest), of token sequences (lists or 1-D tensors), each
    right-aligned: the prompt layout :func:`sample` takes."""
    width = max(len(seq) for seq in sequences)
    ids = torch.full((len(sequences), width), pad_token_id, dtype=torch.long, device=device)
    mask = torch.zeros((len(sequences), width), dtype=torch.long, device=device)
    for row, seq in enumerate(sequences):
        if len(seq):
            ids[row, width - len(seq) :] = torch.as_tensor(seq, dtype=torch.long, device=device)
            mask[row, width - len(seq) :] = 1
    return ids, mask


def generate(model, tokenizer, prompts: list[str], **kwargs) -> Rollout:
    """:func:`sample` for prompt strings (tokenized without special tokens, left-padded)."""
    device = next(model.parameters()).device
    encoded = tokenizer(prompts, return_tensors="pt", padding=True, padding_side="left", add_special_tokens=False).to(
        device
    )
    return sample(
        model,
        encoded["input_ids"],
        encoded["attention_mask"],
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **kwargs,
    )


@torch.no_grad()
def sample(
    model,
    prompt_ids: torch.Tensor,
    prompt_mask: torch.Tensor,
    *,
    eos_token_id: int,
    pad_token_id: int,
    num_samples: int,
    max_new_tokens: int | torch.Tensor,
    min_new_tokens: int | torch.Tensor = 0,
    greedy: bool = False,
    temperature: float = 1.0,
    top_p: float = 1.0,
    logits_processor: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
    share_prompt: bool = True,
    hand_written_step: bool = True,
) -> Rollout:
    """``num_samples`` responses to each left-padded prompt, samples of one prompt adjacent.

    Each prompt is prefilled once and its KV cache repeated for its samples
    (``share_prompt``; False prefills every row, as ``transformers``' ``generate``
    does, with the same result to float tolerance). Tokens are drawn (:func:`draw`) from
    exactly softmax(logits / temperature), optionally nucleus-truncated: no top-k or
    repetition penalty from the model's defaults. EOS is masked for the first
    ``min_new_tokens`` tokens; a response without EOS stops (truncated) at
    ``max_new_tokens``. Either may be a (num prompts,) tensor: one value per prompt.
    ``logits_processor(ids_so_far, scores) -> scores`` may reshape each step's
    distribution (``transformers``' processor signature). On CPU, Llama-family models decode
    through a hand-written step (:func:`~rlkit.rollout.decoding.decoding_step`) unless
    ``hand_written_step`` is False.
    """
    was_training = model.training
    model.eval()
    sharded = is_sharded(model)

    def per_row(value):
        return torch.as_tensor(value, device=prompt_ids.device).expand(len(prompt_ids)).repeat_interleave(num_samples)

    cap, floor = per_row(max_new_tokens), per_row(min_new_tokens)
    if not share_prompt:
        prompt_ids, prompt_mask = (
            prompt_ids.repeat_interleave(num_samples, 0),
            prompt_mask.repeat_interleave(num_samples, 0),
        )
    positions = position_ids_from_mask(prompt_mask)
    output = model(
        input_ids=prompt_ids, attention_mask=prompt_mask, position_ids=positions, use_cache=True, logits_to_keep=1
    )
    cache, logits = output_cache(output), output.logits[:, -1]
    repeat = share_prompt and num_samples > 1
    reserve_cache(cache, num_samples if repeat else 1, prompt_ids.shape[1] + int(cap.max()))
    if repeat:
        logits = logits.repeat_interleave(num_samples, 0)
        prompt_ids, prompt_mask = (
            prompt_ids.repeat_interleave(num_samples, 0),
            prompt_mask.repeat_interleave(num_samples, 0),
        )
        positions = positions.repeat_interleave(num_samples, 0)
    rows = prompt_ids.shape[0]
    next_position = positions[:, -1:] + 1
    tokens: list[torch.Tensor] = []
    chosen_log_probs: list[torch.Tensor] = []
    finished = torch.zeros(rows, dtype=torch.bool, device=prompt_ids.device)
    done = False
    with decoding_step(model, cache, prompt_mask, hand_written_step) as step:
        while True:
            if not done:
                scores = logits.float()
                if logits_processor is not None:
                    scores = logits_processor(torch.cat([prompt_ids, *[t[:, None] for t in tokens]], dim=1), scores)
                scores[floor > len(tokens), eos_token_id] = float("-inf")
                if greedy:
                    token = scores.argmax(-1)
                else:
                    probs = sampling_probs(scores, temperature, top_p)
                    token = draw(probs)
                    chosen_log_probs.append((probs.gather(1, token[:, None]).squeeze(1) / probs.sum(-1)).log())
                token = token.masked_fill(finished, pad_token_id)
                tokens.append(token)
                finished |= (token == eos_token_id) | (cap <= len(tokens))
                done = bool(finished.all())
            # ZeRO-3: a rank that is done keeps running (discarded) forwards until every rank is,
            # because the ranks gather the sharded parameters together
            if (all_reduce_sum(float(not done)) if sharded else float(not done)) == 0:
                break
            logits, next_position = step(token, next_position), next_position + 1
    model.train(was_training)
    response_ids = torch.stack(tokens, dim=1)
    response_mask, truncated = response_mask_from_eos(response_ids, eos_token_id, cap)
    return Rollout(
        prompt_ids=prompt_ids,
        prompt_mask=prompt_mask,
        response_ids=response_ids.masked_fill(response_mask == 0, pad_token_id),
        response_mask=response_mask,
        truncated=truncated,
        log_probs=None if greedy else torch.stack(chosen_log_probs, dim=1).masked_fill(response_mask == 0, 0.0),
    )


def draw(probs: torch.Tensor) -> torch.Tensor:
    """One token per row from (unnormalised) ``probs`` by inverse-CDF sampling: one uniform
    number per row, ten times cheaper on CPU than ``torch.multinomial`` (which draws an
    exponential number per vocabulary entry). Tokens of probability 0 are never drawn."""
    cdf = probs.cumsum(-1)
    total = cdf[:, -1:]
    # strictly below the total mass, even where u * total rounds up to it: the first position
    # whose cumulative mass exceeds the threshold then always has a probability above 0
    threshold = torch.minimum(torch.rand_like(total) * total, torch.nextafter(total, torch.zeros_like(total)))
    return torch.searchsorted(cdf, threshold, right=True).squeeze(1)


def sampling_probs(scores: torch.Tensor, temperature: float, top_p: float) -> torch.Tensor:
    """softmax(scores / temperature), restricted to the smallest set of tokens whose
    probability reaches ``top_p`` (nucleus sampling, Holtzman et al. 2020) when top_p < 1."""
    probs = torch.softmax(scores / temperature if temperature != 1.0 else scores, dim=-1)
    if top_p >= 1.0:
        return probs
    sorted_probs, order = probs.sort(dim=-1, descending=True)
    outside = sorted_probs.cumsum(-1) - sorted_probs >= top_p  # the mass before this token already reaches top_p
    sorted_probs = sorted_probs.masked_fill(outside, 0.0)
    return torch.zeros_like(probs).scatter(-1, order, sorted_probs)


def decode_responses(tokenizer, rollout: Rollout) -> list[str]:
    return tokenizer.batch_decode(
        rollout.response_ids * rollout.response_mask + tokenizer.pad_token_id * (1 - rollout.response_mask),
        skip_special_tokens=True,
    )
