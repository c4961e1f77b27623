"""The policy-gradient loop's sample stage, chosen by the task (``Task.samples``): ``responses``
(one response per sample from the rollout backend, scored by the run's reward) or ``episodes``
(multi-turn episodes with the task's environment, rewarded by it: rlkit/loops/episodes.py). A
stage turns rows into an :class:`~rlkit.loops.experience.Experience` of ``group_size`` samples
per row, says what it measured about them, and how long a response may be."""

from __future__ import annotations

from rlkit.loops.experience import Experience
from rlkit.registry import Registry

SAMPLE_STAGES: Registry = Registry("sample stage")


def repeat(values: list, times: int) -> list:
    """Each value ``times`` times in a row (one per sample of its group)."""
    return [v for v in values for _ in range(times)]


class SampleStage:
    """What a sample stage provides; ``loop`` is the policy-gradient loop that owns it."""

    def __init__(self, loop):
        self.loop = loop

    def sample(self, rows: list[dict], timer) -> Experience:
        raise NotImplementedError

    def metrics(self, batch: Experience) -> dict[str, float]:
        """What the stage measured about a sampled batch, beyond rewards and lengths (over all processes)."""
        return {}

    @property
    def horizon(self) -> int:
        """The most sampled tokens one response may hold (the constant of ``seq-mean-token-sum-norm``)."""
        return self.loop.run.max_new_tokens


@SAMPLE_STAGES.register("responses")
class ResponseStage(SampleStage):
    """``group_size`` responses to each row's prompt from the rollout backend, scored by the reward."""

    def sample(self, rows: list[dict], timer) -> Experience:
        loop, run, size = self.loop, self.loop.run, self.loop.settings.group_size
        prompts = run.prompts(rows)
        with timer.phase("rollout"):
            rollout = loop.rollout.sample(
                run.encode(prompts),
                num_samples=size,
                max_new_tokens=run.max_new_tokens,
                logits_processor=loop.rollout_logits_processor(),
            )
        with timer.phase("reward"):
            sample_rows, sample_prompts = repeat(rows, size), repeat(prompts, size)
            completions, totals, per_term = run.score(sample_rows, sample_prompts, rollout.completion_ids())
        return Experience(
            sample_rows, sample_prompts, rollout.to(loop.engine.device), completions, totals, per_term, size
        )
