"""Online policy-gradient RL from groups of sampled responses (GRPO and kin, PPO, ReMax, VinePPO).

One step is a sequence of stages over one :class:`~rlkit.loops.experience.Experience` batch:

    sample (rollout backend) -> reward -> group filter -> log-probs -> rollout correction -> values
    -> advantages -> update -> weight sync (the rollout backend takes the updated weights)

Which backend, filter, correction, value source, estimator, loss, aggregation and KL are used is config
(each a registered component with its own settings); this file never branches on an algorithm.
The task chooses the sample stage (rlkit/loops/sampling.py): single responses scored by the
reward, or multi-turn episodes with an environment (rlkit/loops/episodes.py), whose response
is everything after the opening prompt with only the sampled tokens in the loss.
Loops that change a stage (T-PPO's windows, NLPO's masked action space) subclass this one and
override that stage.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from omegaconf import MISSING

from rlkit.algos import ADVANTAGE_ESTIMATORS, KL_ESTIMATORS, LOSS_AGGREGATIONS, POLICY_LOSSES, AdvantageInputs
from rlkit.algos.advantages import EPISODE_INPUTS
from rlkit.algos.kl import KLSettings, adaptive_kl_coef
from rlkit.algos.masked import explained_variance, group_stats, masked_mean
from rlkit.algos.policy_losses import optional_inputs
from rlkit.algos.reward_norm import RunningMoments, batch_moments, normalise_scores
from rlkit.algos.rollout_correction import ROLLOUT_CORRECTIONS, mismatch_terms
from rlkit.engine import all_gather_objects, all_reduce_sum
from rlkit.loops.experience import Experience
from rlkit.loops.group_filters import GROUP_FILTERS
from rlkit.loops.registry import LOOPS, Loop, LoopSettings, SamplingSettings
from rlkit.loops.sampling import SAMPLE_STAGES
from rlkit.loops.update import PolicyUpdate
from rlkit.loops.values import VALUE_SOURCES
from rlkit.metrics import mean_std
from rlkit.rollout import token_log_probs
from rlkit.rollout.backends import ROLLOUTS
from rlkit.run import make_engine, reference_policy


@dataclass
class PolicyGradientSettings(LoopSettings):
    group_size: int = 8  # samples per prompt
    update_epochs: int = 1  # passes over each rollout batch
    minibatches: int = 1  # optimizer steps per epoch over one rollout batch
    # loss aggregation: token-mean | seq-mean-token-mean | seq-mean-token-sum | seq-mean-token-sum-norm
    loss_agg: str = "token-mean"
    entropy_coef: float = 0.0  # bonus on the policy's entropy (0 = off)
    reward_norm: str = "none"  # none | batch (whiten scores over the batch) | running (running mean/std, PPO-max)
    reward_clip: float = 0.0  # clip normalised scores into [-c, c] (PPO-max: 5 after normalisation); 0 = off
    sampling: SamplingSettings = field(default_factory=SamplingSettings)
    kl: KLSettings = field(default_factory=KLSettings)
    advantage: Any = MISSING  # advantage estimator (algo/advantage=...)
    policy_loss: Any = MISSING  # policy loss (algo/policy_loss=...)
    value_source: Any = MISSING  # value source (algo/value_source=none | critic | value_head | monte_carlo | greedy)
    group_filter: Any = MISSING  # what happens to sampled groups before training (algo/group_filter=none | dynamic)
    rollout_correction: Any = MISSING  # engine-trainer mismatch correction (algo/rollout_correction=none | tis | mask)

    def check(self) -> None:
        self.require_at_least_one("group_size", "update_epochs", "minibatches")
        self.require_non_negative("entropy_coef", "reward_clip")
        self.require_choice("loss_agg", LOSS_AGGREGATIONS.names())
        self.require_choice("reward_norm", ("none", "batch", "running"))
        estimator = ADVANTAGE_ESTIMATORS.get(self.advantage.name)
        reads = set(getattr(estimator, "inputs", ())) - set(EPISODE_INPUTS)  # episodes: the sample stage's
        provided = set(VALUE_SOURCES.get(self.value_source.name).provides)
        self.require(
            reads == provided,
            "value_source",
            f"advantage '{self.advantage.name}' reads {sorted(reads) or 'no values'}, "
            f"and this value source provides {sorted(provided) or 'none'}",
        )
        self.require(
            self.group_size > 1 or not getattr(estimator, "compares_within_groups", False),
            "group_size",
            f"advantage '{self.advantage.name}' compares the samples of a prompt: a group of one gets advantage 0",
        )
        pairwise = "group_index" in optional_inputs(POLICY_LOSSES.get(self.policy_loss.name))
        self.require(
            self.group_size == 2 or not pairwise,
            "group_size",
            f"policy loss '{self.policy_loss.name}' compares the two responses of a prompt: set algo.group_size=2",
        )
        raw = self.reward_norm == "none" and self.reward_clip == 0
        self.require(
            raw or "step_ids" not in provided,
            "reward_norm",
            "Monte-Carlo values are in raw reward units, so the scores must be too: reward_norm=none, reward_clip=0",
        )
        self.require(
            self.rollout_correction.name != "mask" or self.sampling.top_p == 1,
            "rollout_correction",
            "the sequence ratio would also count top-p's renormalisation (about top_p per token, the trainer "
            "scores the "
            "whole distribution), dropping most responses: use algo.sampling.top_p=1 or algo/rollout_correction=tis",
        )


@LOOPS.register("policy_gradient", PolicyGradientSettings)
class PolicyGradientLoop(Loop):
    reshapes_sampling = False  # rollout_logits_processor reshapes the sampling distribution (needs rollout=hf)

    def __init__(self, run, model, reference_source: str):
        super().__init__(run)
        s = self.settings
        self.optimizer_steps = run.cfg.trainer.max_steps * s.update_epochs * s.minibatches
        value_source_cls = VALUE_SOURCES.get(s.value_source.name)
        value_source_cls.prepare(model, s.value_source)
        self.engine = make_engine(
            run,
            model,
            optim=self.optim(),
            batch_size_global=self.minibatch_size_global(),
            total_steps=self.optimizer_steps,
        )
        self.rollout = build_rollout(run, self.engine.module, s.sampling)
        self.sample_stage = SAMPLE_STAGES.get(run.task.samples)(self)
        self.value_source = value_source_cls(self, s.value_source, reference_source)
        self.filter_groups = GROUP_FILTERS.get(s.group_filter.name)
        self.policy_loss_fn = POLICY_LOSSES.get(s.policy_loss.name)
        # the extra inputs this loss names (reference log-probs, groups)
        self.loss_inputs = optional_inputs(self.policy_loss_fn)
        needs_reference = s.kl.coef != 0 or "ref_log_prob" in self.loss_inputs
        self.reference = reference_policy(run, reference_source, self.engine) if needs_reference else None
        self.kl_coef = s.kl.coef  # adapted each step when algo.kl.target is set
        self.reward_moments = RunningMoments()
        self.advantage_fn = ADVANTAGE_ESTIMATORS.get(s.advantage.name)
        self.kl_fn = KL_ESTIMATORS.get(s.kl.estimator)
        self.correct = ROLLOUT_CORRECTIONS.get(s.rollout_correction.name)
        # behaviour log-probs from another engine (or a correction asked for) are compared with the trainer's
        self.compares_behaviour = self.rollout.own_weights or s.rollout_correction.name != "none"
        self.needs_old_log_probs = (
            s.update_epochs > 1
            or s.minibatches > 1
            or s.kl.target is not None
            or (self.reference is not None and s.kl.placement == "reward")
            or self.compares_behaviour
        )

    @property
    def horizon(self) -> int:
        """The most sampled tokens one response may hold (the sample stage says)."""
        return self.sample_stage.horizon

    def minibatch_size_global(self) -> int:
        """Samples per optimizer step over all processes."""
        s = self.settings
        return self.run.cfg.trainer.prompts_per_step_global * s.group_size // s.minibatches

    def step(self, step: int, timer):
        batch, metrics = self.collect(timer)
        with timer.phase("log_probs"):
            self.score_tokens(batch)
            metrics.update(self.correct_rollout(batch))
        metrics.update(self.value_source.estimate(batch, timer))
        with timer.phase("advantages"):
            self.estimate_advantages(batch)
        with timer.phase("update"):
            metrics.update(PolicyUpdate(self, batch).run(train_policy=self.value_source.trains_policy(step)))
        self.sync_rollout(timer)
        metrics.update(self.after_update(step, timer))
        metrics.update(self.control_kl(batch))
        metrics.update(batch_metrics(batch))
        return metrics, batch.samples()

    # ------------------------------------------------------------------ stages

    def collect(self, timer) -> tuple[Experience, dict[str, float]]:
        """Sample and score a batch of groups; the group filter may replace some (DAPO)."""
        prompts_global = self.run.cfg.trainer.prompts_per_step_global
        batch = self.sample(self.next_rows(prompts_global), timer)
        metrics = {**rollout_metrics(batch), **self.sample_stage.metrics(batch)}
        batch, filter_metrics = self.filter_groups(
            batch,
            lambda: self.sample(self.next_rows(prompts_global), timer),
            self.settings.group_filter,
            self.run.tokenizer.pad_token_id,
        )
        metrics.update(filter_metrics)
        metrics.update(
            {f"reward/{name}/failures": all_reduce_sum(float(n)) for name, n in self.run.reward.pop_failures().items()}
        )
        return batch, metrics

    def sample(self, rows: list[dict], timer) -> Experience:
        """``group_size`` samples of each row, rewarded: the task's sample stage (responses or episodes)."""
        return self.sample_stage.sample(rows, timer)

    def score_tokens(self, batch: Experience) -> None:
        """Log-probs of the sampled tokens under the sampling policy (when the update needs them
        apart from its own forward) and under the frozen reference (when a KL term reads them)."""
        if self.needs_old_log_probs:
            batch.old_log_probs = self.score(self.engine, batch.rollout)
        if self.reference is not None:
            batch.ref_log_probs = self.score(self.reference, batch.rollout)

    def correct_rollout(self, batch: Experience) -> dict[str, float]:
        """Where the behaviour log-probs come from another engine (or a correction is asked for): log
        how far they are from the trainer's (``rollout/mismatch_*``) and let the rollout correction
        weight tokens or drop responses for the update (``batch.token_weights``, ``batch.kept``)."""
        behaviour = batch.rollout.log_probs
        if not self.compares_behaviour or behaviour is None:
            return {}
        mask = batch.response_mask
        correction = self.correct(batch.old_log_probs, behaviour, mask, self.settings.rollout_correction)
        batch.token_weights, batch.kept = correction.token_weights, correction.kept
        return {**mismatch_metrics(batch.old_log_probs, behaviour, mask), **correction_metrics(correction.stats, mask)}

    def estimate_advantages(self, batch: Experience) -> None:
        scores = self.normalised_scores(torch.tensor(batch.scores, dtype=torch.float32, device=self.engine.device))
        batch.token_rewards = self.token_rewards(scores, batch)
        inputs = AdvantageInputs(
            batch.token_rewards,
            batch.response_mask,
            batch.group_index.to(scores.device),
            values=batch.values,
            baseline_scores=batch.baseline_scores,
            step_ids=batch.step_ids,
            bootstrap_values=batch.bootstrap_values,
            turn_index=batch.turn_index,
            state_keys=batch.state_keys,
        )
        batch.advantages, batch.returns = self.advantage_fn(inputs, self.settings.advantage)

    def after_update(self, step: int, timer) -> dict[str, float]:
        """Hook run after the policy's update of step ``step`` (NLPO refreshes its mask policy); its metrics."""
        return {}

    # ------------------------------------------------------------------ pieces the stages share

    def rollout_logits_processor(self):
        """Hook for loops whose policy samples from a reshaped distribution (NLPO's masked action
        space): a fresh ``logits_processor(ids_so_far, scores) -> scores`` for each sampled rollout
        (not the greedy baseline), or None. The same loop's :meth:`log_probs` must score that distribution."""
        return None

    def log_probs(self, model, rollout, index, with_entropy: bool = False, entropy_grad: bool = False):
        """Per-token log-probs (and entropies) of rollout rows ``index`` under ``model``:
        the one place the loop turns a model into log pi(y_t | ...)."""
        return token_log_probs(
            model,
            rollout.sequences[index],
            rollout.attention_mask[index],
            rollout.response_ids.shape[1],
            self.settings.sampling.temperature,
            with_entropy=with_entropy,
            entropy_grad=entropy_grad,
        )

    @torch.no_grad()
    def score(self, model, rollout) -> torch.Tensor:
        """Per-token log-probs of the rollout's responses under ``model``, micro-batched."""
        micro = self.run.cfg.trainer.micro_batch_per_device
        return torch.cat(
            [self.log_probs(model, rollout, slice(i, i + micro))[0] for i in range(0, len(rollout), micro)]
        )

    def token_rewards(self, scores: torch.Tensor, batch: Experience) -> torch.Tensor:
        """The scores placed on the responses' tokens (:meth:`Experience.reward_tokens`: an
        episode's rewards on the ends of their turns), minus ``beta * KL`` per token when the KL
        penalty is placed in the reward."""
        rewards = batch.reward_tokens(scores)
        if batch.ref_log_probs is not None and self.settings.kl.placement == "reward":
            rewards -= self.kl_coef * self.kl_fn(batch.old_log_probs, batch.ref_log_probs) * batch.response_mask
        return rewards

    def normalised_scores(self, scores: torch.Tensor) -> torch.Tensor:
        """Scores whitened by running or batch statistics and clipped, as ``reward_norm``
        and ``reward_clip`` say (PPO-max); unchanged by default."""
        s = self.settings
        if s.reward_norm == "running":
            self.reward_moments.update(scores)
            mean, var = self.reward_moments.mean, self.reward_moments.var
        elif s.reward_norm == "batch":
            mean, var = batch_moments(scores)
        elif s.reward_clip:
            return scores.clamp(-s.reward_clip, s.reward_clip)
        else:
            return scores
        return normalise_scores(scores, mean, var, s.reward_clip)

    def control_kl(self, batch: Experience) -> dict[str, float]:
        """Log the KL per response of this step's rollouts and, with ``kl.target`` set,
        adapt the KL coefficient toward it (Ziegler et al. 2019)."""
        if batch.ref_log_probs is None or batch.old_log_probs is None:
            return {}
        num_samples = all_reduce_sum(float(len(batch)))
        kl = (
            all_reduce_sum(float(((batch.old_log_probs - batch.ref_log_probs) * batch.response_mask).sum()))
            / num_samples
        )
        metrics = {"kl/response_kl": kl, "kl/coef": self.kl_coef}
        kl_settings = self.settings.kl
        if kl_settings.target is not None:
            self.kl_coef = adaptive_kl_coef(self.kl_coef, kl, kl_settings.target, kl_settings.horizon, int(num_samples))
        return metrics

    def extra_engines(self) -> dict:
        return self.value_source.extra_engines()

    def state_dict(self) -> dict:
        return {**super().state_dict(), "kl_coef": self.kl_coef, "reward_moments": self.reward_moments.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.kl_coef = state.get("kl_coef", self.kl_coef)
        self.reward_moments = RunningMoments(**state.get("reward_moments", {}))


def build_rollout(run, model, sampling: SamplingSettings):
    """The configured rollout backend (``rollout=...``) sampling from ``model``."""
    settings = run.rollout_settings
    return ROLLOUTS.get(settings.name)(settings, model=model, tokenizer=run.tokenizer, sampling=sampling)


def batch_metrics(batch: Experience) -> dict[str, float]:
    metrics = {"advantages/abs_mean": float(masked_mean(batch.advantages.abs(), batch.response_mask))}
    if batch.values is not None:
        metrics["critic/explained_variance"] = explained_variance(batch.values, batch.returns, batch.response_mask)
    metrics["tokens"] = all_reduce_sum(float(batch.rollout.attention_mask.sum()))
    return metrics


def mismatch_metrics(trainer_log_probs, behaviour_log_probs, mask) -> dict[str, float]:
    """Over all processes' response tokens: the k3 estimate of KL(pi_b || pi_old) per token and the
    extreme ratios pi_old / pi_b (rlkit.algos.rollout_correction.mismatch_terms)."""
    terms = mismatch_terms(trainer_log_probs, behaviour_log_probs, mask)
    ratios = terms["ratio"][mask.bool()]
    local = {
        "kl": float(terms["kl"].sum()),
        "tokens": float(mask.sum()),
        "max": float(ratios.max()) if len(ratios) else 1.0,
        "min": float(ratios.min()) if len(ratios) else 1.0,
    }
    gathered = all_gather_objects(local)
    return {
        "rollout/mismatch_kl": sum(g["kl"] for g in gathered) / max(sum(g["tokens"] for g in gathered), 1.0),
        "rollout/mismatch_max_ratio": max(g["max"] for g in gathered),
        "rollout/mismatch_min_ratio": min(g["min"] for g in gathered),
    }


def correction_metrics(stats: dict[str, torch.Tensor], mask: torch.Tensor) -> dict[str, float]:
    """``rollout_correction/<stat>`` over all processes: (B, T) stats averaged over response tokens, (B,) over "
    "responses."""
    metrics = {}
    for name, value in stats.items():
        per_token = value.dim() == 2
        total = all_reduce_sum(float((value * mask).sum() if per_token else value.sum()))
        count = all_reduce_sum(float(mask.sum() if per_token else len(value)))
        metrics[f"rollout_correction/{name}"] = total / max(count, 1.0)
    return metrics


def rollout_metrics(batch: Experience) -> dict[str, float]:
    """Reward per term, zero-variance groups, lengths and truncation, over all processes."""
    _, group_std, _ = group_stats(torch.tensor(batch.scores), batch.group_index)
    local = {
        "totals": batch.scores,
        "terms": batch.reward_terms,
        "lengths": batch.response_mask.sum(-1).tolist(),  # sampled tokens (an episode's observations left out)
        "truncated": batch.rollout.truncated.tolist(),
        "zero_var": (group_std == 0).float().tolist(),
    }
    gathered = all_gather_objects(local)
    flat = lambda key: [v for part in gathered for v in part[key]]  # noqa: E731
    metrics = {}
    metrics["reward/mean"], metrics["reward/std"] = mean_std(flat("totals"))
    for name in batch.reward_terms:
        metrics[f"reward/{name}/mean"], metrics[f"reward/{name}/std"] = mean_std(
            [v for part in gathered for v in part["terms"][name]]
        )
    lengths = flat("lengths")
    metrics["response/length_mean"], _ = mean_std(lengths)
    metrics["response/length_max"] = float(max(lengths))
    metrics["response/truncated_frac"] = mean_std([float(t) for t in flat("truncated")])[0]
    metrics["reward/zero_variance_group_frac"] = mean_std(flat("zero_var"))[0]
    return metrics
