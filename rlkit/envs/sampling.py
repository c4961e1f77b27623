"""A :data:`~rlkit.envs.episodes.SampleFn` over a rollout backend (``rollout=hf``, ``rollout=vllm``)."""

from __future__ import annotations


def backend_sample_fn(backend, greedy: bool = False):
    """Replies from ``backend.sample`` (:mod:`rlkit.rollout.backends`), one per context,
    each stopping after EOS, with the behaviour log-probs the backend sampled with.

    A greedy reply is the argmax at every step: its behaviour probability is 1 and its
    log-probs are 0 (the backend returns none then)."""

    def sample_fn(contexts: list[list[int]], max_new_tokens: list[int]) -> list[tuple[list[int], list[float]]]:
        rollout = backend.sample(contexts, num_samples=1, max_new_tokens=list(max_new_tokens), greedy=greedy)
        lengths = rollout.response_lengths.tolist()
        if rollout.log_probs is None and not greedy:
            raise ValueError("the rollout backend returned no behaviour log-probs for sampled replies")
        log_probs = (
            [[0.0] * n for n in lengths] if greedy else [lp[:n].tolist() for lp, n in zip(rollout.log_probs, lengths)]
        )
        return [(ids[:n].tolist(), lp) for ids, n, lp in zip(rollout.response_ids, lengths, log_probs)]

    return sample_fn
