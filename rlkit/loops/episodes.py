"""The sample stage of an environment task: ``group_size`` multi-turn episodes per row, played
token-in/token-out through the rollout backend (:func:`rlkit.envs.episodes.run_episodes`) and
rewarded by the environment, turn by turn.

In the experience batch an episode's prompt is its opening prompt and its response everything
after it: replies and observations alike, as one sequence of token ids exactly as sampled and
tokenised. Only the sampled tokens carry loss (``Rollout.loss_mask``); the old log-probs are
the ones the backend sampled with; each turn's reward sits on the turn's last token
(:meth:`~rlkit.loops.experience.Experience.reward_tokens`), and the turns and environment states
reach the advantage estimators that read them (``gigpo``, ``turn_gae``).
"""

from __future__ import annotations

import torch

from rlkit.engine import all_gather_objects
from rlkit.envs.episodes import Episode, run_episodes
from rlkit.envs.sampling import backend_sample_fn
from rlkit.envs.stats import episode_metrics, render_episode
from rlkit.loops.experience import Experience
from rlkit.loops.sampling import SAMPLE_STAGES, SampleStage, repeat
from rlkit.rollout.generate import Rollout, left_pad


@SAMPLE_STAGES.register("episodes")
class EpisodeStage(SampleStage):
    """Plays a fresh environment per sample (samples of one row adjacent: one group per instance)."""

    def __init__(self, loop):
        super().__init__(loop)
        self.task = loop.run.task
        self.task.check_tokenizer(loop.run.tokenizer)
        self.settings = self.task.episode_settings()

    @property
    def horizon(self) -> int:
        return self.settings.max_total_tokens

    def sample(self, rows: list[dict], timer) -> Experience:
        loop, run, size = self.loop, self.loop.run, self.loop.settings.group_size
        sample_rows = repeat(rows, size)
        envs = [self.task.make_env() for _ in sample_rows]
        with timer.phase("rollout"):  # the environments step in between the backend's replies
            episodes = run_episodes(backend_sample_fn(loop.rollout), run.tokenizer, envs, sample_rows, self.settings)
        return episode_experience(episodes, sample_rows, size, run.tokenizer, loop.engine.device)

    def metrics(self, batch: Experience) -> dict[str, float]:
        """``env/`` metrics of the batch's episodes (:func:`rlkit.envs.stats.episode_metrics`), over all processes."""
        local = episode_metrics(batch.episodes, [self.task.prototype] * len(batch.episodes))
        return mean_of_dicts(all_gather_objects(local))


def episode_experience(episodes: list[Episode], rows: list[dict], group_size: int, tokenizer, device) -> Experience:
    """The experience batch of ``episodes`` (see the module docstring)."""
    pad = tokenizer.pad_token_id
    prompt_ids, prompt_mask = left_pad([e.token_ids[: e.prompt_length] for e in episodes], pad, device)
    width = max(1, *(len(e.token_ids) - e.prompt_length for e in episodes))

    def right(name: str, value, dtype) -> torch.Tensor:
        rows_after = [getattr(e, name)[e.prompt_length :] for e in episodes]
        return torch.tensor([r + [value] * (width - len(r)) for r in rows_after], dtype=dtype, device=device)

    response_ids = right("token_ids", pad, torch.long)
    rollout = Rollout(
        prompt_ids=prompt_ids,
        prompt_mask=prompt_mask,
        response_ids=response_ids,
        response_mask=right("turn_index", -1, torch.long).ne(-1).long(),  # every token after the opening prompt
        truncated=torch.tensor([e.truncated is not None for e in episodes], device=device),
        log_probs=right("log_probs", 0.0, torch.float32),
        loss_mask=right("loss_mask", 0, torch.long),
    )
    prompts = tokenizer.batch_decode([e.token_ids[: e.prompt_length] for e in episodes], skip_special_tokens=True)
    completions = [render_episode(e) for e in episodes]
    scores = [e.total_reward for e in episodes]
    return Experience(rows, prompts, rollout, completions, scores, {}, group_size, episodes=episodes)


def mean_of_dicts(parts: list[dict[str, float]]) -> dict[str, float]:
    """Each key's mean over the dicts that have it (a turn only some processes' episodes reached)."""
    keys = sorted({key for part in parts for key in part})
    return {key: sum(p[key] for p in parts if key in p) / sum(key in p for p in parts) for key in keys}
