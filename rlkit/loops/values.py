"""Value sources: the policy-gradient loop's ``values`` stage (``algo/value_source=...``).

A value source estimates, for each sampled response, what the advantage estimator compares
its reward with: nothing (``none``: group baselines need no values), a learned critic
(``critic``, ``value_head``: rlkit/loops/critic.py), Monte-Carlo rollouts from intermediate
states (``monte_carlo``, VinePPO: rlkit/loops/mc_values.py) or the reward of the greedy response
(``greedy``, ReMax). It declares which :class:`~rlkit.algos.AdvantageInputs` it ``provides``;
an estimator declares which it reads, and the two must match.
"""

from __future__ import annotations

import torch

from rlkit.registry import Registry

VALUE_SOURCES: Registry = Registry("value source", group="algo/value_source")


class ValueSource:
    """No values: the estimator's baseline comes from the rewards themselves (e.g. the group mean).
    Subclasses override the hooks they need."""

    provides: tuple[str, ...] = ()  # the AdvantageInputs fields this source fills
    trains_with_policy = False  # its loss is added to the policy's loss (a value head on the policy's trunk)

    def __init__(self, loop, settings, start_dir: str):
        self.loop, self.settings = loop, settings

    @staticmethod
    def prepare(model, settings) -> None:
        """Change the policy model before its engine is built (e.g. attach a value head)."""

    def estimate(self, batch, timer) -> dict[str, float]:
        """Fill this source's fields of the experience batch; returns metrics."""
        return {}

    def trains_policy(self, step: int) -> bool:
        """Whether step ``step`` updates the policy (a critic may be pre-trained first)."""
        return True

    def loss_on_policy_engine(self, batch, index: torch.Tensor, counts, stats) -> torch.Tensor | float:
        """The value loss of rows ``index`` to add to the policy's loss (shared trunk only)."""
        return 0.0

    def optimizer_step(self, batch, micro_batches: list[torch.Tensor], counts, stats) -> float | None:
        """One optimizer step of a value model with its own engine on a minibatch; its gradient norm."""
        return None

    def extra_engines(self) -> dict:
        """Engines the checkpoint must hold besides the policy's."""
        return {}


VALUE_SOURCES.register("none")(ValueSource)


@VALUE_SOURCES.register("greedy")
class GreedyBaseline(ValueSource):
    """ReMax's baseline (Li et al. 2023, arXiv:2310.10505, Algorithm 1): each prompt is also
    decoded greedily and that response's reward is the baseline score of all its samples."""

    provides = ("baseline_scores",)

    def estimate(self, batch, timer) -> dict[str, float]:
        loop, run = self.loop, self.loop.run
        rows, prompts = batch.rows[:: batch.group_size], batch.prompts[:: batch.group_size]
        with timer.phase("rollout"):
            greedy = loop.rollout.sample(
                run.encode(prompts), num_samples=1, max_new_tokens=run.max_new_tokens, greedy=True
            )
        with timer.phase("reward"):
            _, totals, _ = run.score(rows, prompts, greedy.completion_ids())
        scores = torch.tensor(totals, dtype=torch.float32, device=batch.response_mask.device)
        batch.baseline_scores = scores.repeat_interleave(batch.group_size)
        return {}
