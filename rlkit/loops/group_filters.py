"""Group filters: what the policy-gradient loop does with sampled groups before training on them
(``algo/group_filter=...``). ``filter(batch, sample_more) -> (batch, metrics)``, where
``sample_more()`` samples and scores a fresh batch of the same size."""

from __future__ import annotations

from dataclasses import dataclass

from rlkit.engine import all_reduce_sum, mean_over_ranks
from rlkit.loops.experience import Experience
from rlkit.registry import Registry
from rlkit.settings import Settings

GROUP_FILTERS: Registry = Registry("group filter", group="algo/group_filter")


@GROUP_FILTERS.register("none")
def keep_all(batch: Experience, sample_more, settings: Settings, pad_token_id: int):
    """Train on every sampled group."""
    return batch, {}


@dataclass
class DynamicSamplingSettings(Settings):
    max_rounds: int = 3  # most rollout rounds per step before training on what was kept

    def check(self) -> None:
        self.require_at_least_one("max_rounds")


@GROUP_FILTERS.register("dynamic", DynamicSamplingSettings)
def dynamic_sampling(batch: Experience, sample_more, settings: DynamicSamplingSettings, pad_token_id: int):
    """DAPO's dynamic sampling (Yu et al. 2025, arXiv:2503.14476, Sec. 3.2): keep the groups whose
    rewards differ, sample more prompts until the batch is full or ``max_rounds`` rounds were
    sampled, then fill any shortfall with dropped groups (they add no policy gradient). Every
    process runs the same number of rounds."""
    target = batch.num_groups
    kept, dropped = batch.split_by_variance()
    parts_kept, parts_dropped, rounds = [kept], [dropped], 1

    def short() -> bool:
        return all_reduce_sum(float(sum(p.num_groups for p in parts_kept) < target)) > 0

    while rounds < settings.max_rounds and short():
        kept, dropped = sample_more().split_by_variance()
        parts_kept.append(kept)
        parts_dropped.append(dropped)
        rounds += 1
    num_kept = sum(p.num_groups for p in parts_kept)
    merged = Experience.concat([p for p in parts_kept + parts_dropped if p.num_groups], pad_token_id)
    kept_frac = mean_over_ranks({"f": min(num_kept, target) / target})["f"]
    return merged.first_groups(target), {"sampling/rounds": float(rounds), "sampling/kept_group_frac": kept_frac}
