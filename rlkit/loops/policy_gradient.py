"""Online policy-gradient RL from groups of sampled responses (GRPO and kin, PPO).

rollout -> reward -> log-probs (and critic values) -> advantages -> update. Which
estimator, loss, aggregation, KL and critic are used is config; this file never
branches on an algorithm.
"""

from __future__ import annotations

import torch

from rlkit.algos import ADVANTAGE_ESTIMATORS, KL_ESTIMATORS, POLICY_LOSSES, AdvantageInputs, aggregate_loss
from rlkit.algos.kl import adaptive_kl_coef
from rlkit.algos.masked import group_stats, masked_mean
from rlkit.algos.policy_losses import optional_inputs
from rlkit.algos.reward_norm import RunningMoments, batch_moments, normalise_scores
from rlkit.engine import (
    all_gather_objects,
    all_reduce_sum,
    mean_over_ranks,
    optimizer_step,
    split_micro_batches,
    world_size,
)
from rlkit.loops.critic import Critic
from rlkit.loops.mc_values import MonteCarloValues
from rlkit.loops.registry import LOOPS, Loop
from rlkit.metrics import mean_std
from rlkit.models.value_head import attach_value_head
from rlkit.rollout import generate, token_log_probs
from rlkit.rollout.generate import decode_responses
from rlkit.rollout.groups import Groups
from rlkit.run import load_frozen, make_engine


@LOOPS.register("policy_gradient")
class PolicyGradientLoop(Loop):
    def __init__(self, run, model, reference_source: str):
        super().__init__(run)
        cfg, algo = run.cfg, run.cfg.algo
        self.algo = algo
        samples_global = cfg.trainer.prompts_per_step_global * algo.group_size
        optimizer_steps = cfg.trainer.max_steps * algo.update_epochs * algo.minibatches
        if algo.critic.type == "shared_head":
            attach_value_head(model)
        self.engine = make_engine(
            run, model, lr=algo.lr, batch_size_global=samples_global // algo.minibatches, total_steps=optimizer_steps
        )
        self.critic = (
            None
            if algo.critic.type == "none"
            else Critic(run, self.engine, reference_source, samples_global // algo.minibatches, optimizer_steps)
        )
        # VinePPO: Monte-Carlo values of each response step from extra policy continuations (algo.vine.k > 0), in the critic's place
        self.mc_values = MonteCarloValues.from_run(run) if algo.vine.k else None
        self.policy_loss_fn = POLICY_LOSSES.get(algo.policy_loss)
        self.loss_inputs = optional_inputs(
            self.policy_loss_fn
        )  # extra inputs this loss names (reference log-probs, groups)
        needs_reference = algo.kl.coef != 0 or "ref_log_prob" in self.loss_inputs
        self.reference = load_frozen(run, reference_source, self.engine.device) if needs_reference else None
        self.kl_coef = algo.kl.coef  # adapted each step when algo.kl.target is set
        self.reward_moments = RunningMoments()
        self.advantage_fn = ADVANTAGE_ESTIMATORS.get(algo.advantage)
        self.kl_fn = KL_ESTIMATORS.get(algo.kl.estimator)
        # rows with all-zero advantages add no gradient when the loss vanishes there and nothing else trains on them
        self.skip_zero_advantage_rows = (
            getattr(self.policy_loss_fn, "vanishes_at_zero_advantage", False)
            and algo.entropy_coef == 0
            and (self.reference is None or algo.kl.placement != "loss")
            and algo.critic.type != "shared_head"
        )
        self.needs_old_log_probs = (
            algo.update_epochs > 1
            or algo.minibatches > 1
            or algo.kl.target is not None
            or (self.reference is not None and algo.kl.placement == "reward")
        )

    def step(self, step: int, timer):
        run, algo = self.run, self.algo
        groups = self.sample_groups(self.next_rows(run.cfg.trainer.prompts_per_step_global), timer)
        metrics = rollout_metrics(groups)
        if algo.dynamic_sampling:
            groups, sampling_metrics = self.refill(groups, timer)
            metrics.update(sampling_metrics)
        metrics.update(
            {f"reward/{name}/failures": all_reduce_sum(float(n)) for name, n in run.reward.pop_failures().items()}
        )
        rollout = groups.rollout
        with timer.phase("log_probs"):
            old_log_probs = self.score(self.engine, rollout) if self.needs_old_log_probs else None
            ref_log_probs = self.score(self.reference, rollout) if self.reference is not None else None
            old_values = self.critic.values(rollout) if self.critic is not None else None
        step_ids = None
        if self.mc_values is not None:
            with timer.phase("mc_values"):
                estimate = self.mc_values(self.engine.module, groups)
            old_values, step_ids = estimate.values, estimate.step_ids
            metrics.update(estimate.metrics)
        with timer.phase("advantages"):
            scores = self.normalised_scores(torch.tensor(groups.totals, dtype=torch.float32, device=self.engine.device))
            baseline = (
                None
                if groups.baseline is None
                else torch.tensor(groups.baseline, dtype=torch.float32, device=scores.device)
            )
            token_rewards = self.token_rewards(scores, rollout.response_mask, old_log_probs, ref_log_probs)
            inputs = AdvantageInputs(
                token_rewards,
                rollout.response_mask,
                groups.group_index.to(scores.device),
                values=old_values,
                baseline_scores=baseline,
                step_ids=step_ids,
            )
            advantages, returns = self.advantage_fn(inputs, algo)
        with timer.phase("update"):
            train_policy = step > algo.critic.pretrain_steps
            metrics.update(
                self.update(
                    rollout,
                    inputs.group_index,
                    advantages,
                    old_log_probs,
                    ref_log_probs,
                    returns,
                    old_values,
                    train_policy,
                )
            )
        metrics.update(self.control_kl(old_log_probs, ref_log_probs, rollout.response_mask))
        metrics["advantages/abs_mean"] = float(masked_mean(advantages.abs(), rollout.response_mask))
        if old_values is not None:
            metrics["critic/explained_variance"] = explained_variance(old_values, returns, rollout.response_mask)
        metrics["tokens"] = all_reduce_sum(float(rollout.attention_mask.sum()))
        samples = [
            {"prompt": p, "completion": c, "reward": r, "answer": row.get("answer", "")}
            for p, c, r, row in zip(groups.prompts, groups.completions, groups.totals, groups.rows)
        ]
        return metrics, samples

    def sample_groups(self, rows: list[dict], timer) -> Groups:
        """``group_size`` responses per prompt, scored (plus a greedy baseline when asked)."""
        run, algo, tokenizer = self.run, self.algo, self.run.tokenizer
        prompts = run.prompts(rows)
        with timer.phase("rollout"):
            rollout = generate(
                self.engine.module,
                tokenizer,
                prompts,
                num_samples=algo.group_size,
                max_new_tokens=algo.sampling.max_new_tokens,
                min_new_tokens=algo.sampling.min_new_tokens,
                temperature=algo.sampling.temperature,
                top_p=algo.sampling.top_p,
                logits_processor=self.rollout_logits_processor(),
            )
            greedy = (
                generate(
                    self.engine.module,
                    tokenizer,
                    prompts,
                    num_samples=1,
                    max_new_tokens=algo.sampling.max_new_tokens,
                    greedy=True,
                )
                if algo.baseline_rollout == "greedy"
                else None
            )
        with timer.phase("reward"):
            repeat = lambda values: [v for v in values for _ in range(algo.group_size)]  # noqa: E731
            sample_rows, sample_prompts = repeat(rows), repeat(prompts)
            completions = decode_responses(tokenizer, rollout)
            totals, per_term = run.reward(
                sample_prompts, completions, completion_ids=rollout.completion_ids(), **run.columns(sample_rows)
            )
            baseline = None
            if greedy is not None:
                greedy_totals, _ = run.reward(
                    prompts,
                    decode_responses(tokenizer, greedy),
                    completion_ids=greedy.completion_ids(),
                    **run.columns(rows),
                )
                baseline = repeat(greedy_totals)
        return Groups(
            sample_rows,
            sample_prompts,
            rollout.to(self.engine.device),
            completions,
            totals,
            per_term,
            baseline,
            algo.group_size,
        )

    def refill(self, groups: Groups, timer) -> tuple[Groups, dict[str, float]]:
        """DAPO's dynamic sampling (Yu et al. 2025, Sec. 3.2): keep groups whose rewards
        differ, sample more prompts until the batch is full or ``max_sampling_rounds``
        is reached, then fill any shortfall with dropped groups (they add no policy
        gradient). Every process runs the same number of rounds."""
        target = groups.num_groups
        kept, dropped = groups.split_by_variance()
        parts_kept, parts_dropped, rounds = [kept], [dropped], 1
        while (
            rounds < self.algo.max_sampling_rounds
            and all_reduce_sum(float(sum(p.num_groups for p in parts_kept) < target)) > 0
        ):
            more = self.sample_groups(self.next_rows(self.run.cfg.trainer.prompts_per_step_global), timer)
            kept, dropped = more.split_by_variance()
            parts_kept.append(kept)
            parts_dropped.append(dropped)
            rounds += 1
        num_kept = sum(p.num_groups for p in parts_kept)
        merged = Groups.concat([p for p in parts_kept + parts_dropped if p.num_groups], self.run.tokenizer.pad_token_id)
        metrics = {
            "sampling/rounds": float(rounds),
            "sampling/kept_group_frac": mean_over_ranks({"f": min(num_kept, target) / target})["f"],
        }
        return merged.first_groups(target), metrics

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
            self.algo.sampling.temperature,
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

    def token_rewards(self, scores, response_mask, old_log_probs, ref_log_probs) -> torch.Tensor:
        """The score on each response's last token, minus ``beta * KL`` per token
        when the KL penalty is placed in the reward."""
        last = (response_mask.sum(-1) - 1).clamp(min=0)
        rewards = torch.zeros(response_mask.shape, dtype=torch.float32, device=scores.device)
        rewards[torch.arange(len(scores)), last] = scores
        if ref_log_probs is not None and self.algo.kl.placement == "reward":
            rewards -= self.kl_coef * self.kl_fn(old_log_probs, ref_log_probs) * response_mask
        return rewards

    def normalised_scores(self, scores: torch.Tensor) -> torch.Tensor:
        """Scores whitened by running or batch statistics and clipped, as ``reward_norm``
        and ``reward_clip`` say (PPO-max); unchanged by default."""
        algo = self.algo
        if algo.reward_norm == "running":
            self.reward_moments.update(scores)
            mean, var = self.reward_moments.mean, self.reward_moments.var
        elif algo.reward_norm == "batch":
            mean, var = batch_moments(scores)
        elif algo.reward_clip:
            return scores.clamp(-algo.reward_clip, algo.reward_clip)
        else:
            return scores
        return normalise_scores(scores, mean, var, algo.reward_clip)

    def control_kl(self, old_log_probs, ref_log_probs, response_mask) -> dict[str, float]:
        """Log the KL per response of this step's rollouts and, with ``kl.target`` set,
        adapt the KL coefficient toward it (Ziegler et al. 2019)."""
        if ref_log_probs is None or old_log_probs is None:
            return {}
        num_samples = all_reduce_sum(float(len(response_mask)))
        kl = all_reduce_sum(float(((old_log_probs - ref_log_probs) * response_mask).sum())) / num_samples
        metrics = {"kl/response_kl": kl, "kl/coef": self.kl_coef}
        if self.algo.kl.target is not None:
            self.kl_coef = adaptive_kl_coef(
                self.kl_coef, kl, self.algo.kl.target, self.algo.kl.horizon, int(num_samples)
            )
        return metrics

    def update(
        self, rollout, group_index, advantages, old_log_probs, ref_log_probs, returns, old_values, train_policy: bool
    ) -> dict[str, float]:
        """``update_epochs`` passes of ``minibatches`` optimizer steps over the rollout: the
        policy loss (unless the critic is still pre-training) and, with a critic, the value
        loss (added to the policy's loss on a shared trunk, else stepped on its own engine)."""
        algo, size = self.algo, len(rollout)
        critic = self.critic
        sums: dict[str, list[float]] = {}
        grad_norms, critic_grad_norms = [], []
        policy_objective = [
            0.0
        ]  # summed over micro-batches and ranks: the minibatch's policy loss, however it is split

        def record(stats: dict, prefix: str, mask) -> None:
            weight = float(mask.sum())
            for key, value in stats.items():
                total = sums.setdefault(prefix + key, [0.0, 0.0])
                total[0] += float(value.detach()) * weight
                total[1] += weight

        def policy_loss(index, counts):
            mask = rollout.response_mask[index]
            log_prob, entropy = self.log_probs(
                self.engine, rollout, index, with_entropy=True, entropy_grad=algo.entropy_coef != 0
            )
            old = old_log_probs[index] if old_log_probs is not None else log_prob.detach()
            extras = {
                name: {"ref_log_prob": ref_log_probs, "group_index": group_index}[name][index]
                for name in self.loss_inputs
            }
            loss, stats = self.policy_loss_fn(log_prob, old, advantages[index], mask, algo, **extras)
            policy_objective[0] += float(
                aggregate_loss(loss.detach(), mask, algo.loss_agg, *counts)
            )  # this micro-batch's share
            if ref_log_probs is not None:
                kl = self.kl_fn(log_prob, ref_log_probs[index])
                stats["kl"] = masked_mean(kl, mask)
                if algo.kl.placement == "loss":
                    loss = loss + self.kl_coef * kl
            if algo.entropy_coef:
                loss = loss - algo.entropy_coef * entropy
            stats["entropy"] = masked_mean(entropy, mask)
            record(stats, "actor/", mask)
            return aggregate_loss(loss, mask, algo.loss_agg, *counts)

        def value_loss(index, counts):
            loss, stats = critic.loss(index, rollout, returns, old_values, counts)
            record(stats, "critic/", rollout.response_mask[index])
            return loss

        def engine_loss(index, counts):
            loss = policy_loss(index, counts) if train_policy else 0.0
            return loss + algo.critic.coef * value_loss(index, counts) if critic is not None and critic.shared else loss

        # whole groups stay in one micro-batch where the minibatches allow: they share one prompt pass (pairwise losses need them)
        unit = (
            algo.group_size
            if "group_index" in self.loss_inputs or (size // algo.group_size) % algo.minibatches == 0
            else 1
        )
        skipped = [0, 0]
        for _ in range(algo.update_epochs):
            order = (torch.randperm(size // unit)[:, None] * unit + torch.arange(unit)).flatten()
            for minibatch in order.split(size // algo.minibatches):
                counts = (
                    all_reduce_sum(float(rollout.response_mask[minibatch].sum())),
                    len(minibatch) * world_size(),
                    algo.sampling.max_new_tokens,
                )
                units = minibatch.view(-1, unit)
                micro_batches = [
                    units[i].flatten()
                    for i in split_micro_batches(len(units), self.engine.gradient_accumulation_steps())
                ]
                if train_policy or (critic is not None and critic.shared):
                    policy_batches = (
                        self.rows_with_gradient(minibatch, advantages, rollout.response_mask)
                        if self.skip_zero_advantage_rows
                        else micro_batches
                    )
                    skipped[0] += len(minibatch) - sum(len(b) for b in policy_batches)
                    skipped[1] += len(minibatch)
                    grad_norms.append(
                        optimizer_step(self.engine, policy_batches, lambda index: engine_loss(index, counts))
                    )
                if critic is not None and not critic.shared:
                    critic_grad_norms.append(
                        optimizer_step(critic.engine, micro_batches, lambda index: value_loss(index, counts))
                    )
        metrics = mean_over_ranks({key: total / max(weight, 1.0) for key, (total, weight) in sums.items()})
        for key, norms in (("actor/grad_norm", grad_norms), ("critic/grad_norm", critic_grad_norms)):
            if norms:
                metrics[key] = sum(norms) / len(norms)
        if train_policy and grad_norms:
            metrics["actor/pg_loss"] = all_reduce_sum(policy_objective[0]) / len(
                grad_norms
            )  # mean over optimizer steps
        metrics["actor/lr"] = self.engine.get_lr()[0]
        if skipped[1]:
            metrics["actor/skipped_zero_advantage_frac"] = mean_over_ranks({"f": skipped[0] / skipped[1]})["f"]
        return metrics

    def rows_with_gradient(
        self, rows: torch.Tensor, advantages: torch.Tensor, response_mask: torch.Tensor
    ) -> list[torch.Tensor]:
        """``rows`` split into the engine's micro-batches, leaving out responses whose
        advantages are all zero: under a loss that vanishes there (and nothing else
        trained on them) they add exactly no gradient, so their forward and backward are
        skipped. The loss keeps its global normalisation, so the update is unchanged.
        Each micro-batch keeps at least one row (DeepSpeed steps every micro-batch)."""
        num_micro_batches = self.engine.gradient_accumulation_steps()
        active = ((advantages[rows] * response_mask[rows]) != 0).any(-1)
        kept = torch.cat([rows[active], rows[~active][: max(0, num_micro_batches - int(active.sum()))]])
        return [kept[part] for part in split_micro_batches(len(kept), num_micro_batches)]

    def extra_engines(self) -> dict:
        return self.critic.extra_engines() if self.critic is not None else {}

    def state_dict(self) -> dict:
        return {**super().state_dict(), "kl_coef": self.kl_coef, "reward_moments": self.reward_moments.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.kl_coef = state.get("kl_coef", self.kl_coef)
        self.reward_moments = RunningMoments(**state.get("reward_moments", {}))


def explained_variance(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor) -> float:
    """1 - Var(R - V) / Var(R) over response tokens: 1 for a perfect critic, <= 0 for a useless one."""
    residual_var = float(masked_mean((returns - values - masked_mean(returns - values, mask)) ** 2, mask))
    returns_var = float(masked_mean((returns - masked_mean(returns, mask)) ** 2, mask))
    return 1.0 - residual_var / returns_var if returns_var > 0 else float("nan")


def rollout_metrics(groups: Groups) -> dict[str, float]:
    """Reward per term, zero-variance groups, lengths and truncation, over all processes."""
    _, group_std, _ = group_stats(torch.tensor(groups.totals), groups.group_index)
    local = {
        "totals": groups.totals,
        "terms": groups.per_term,
        "lengths": groups.rollout.response_lengths.tolist(),
        "truncated": groups.rollout.truncated.tolist(),
        "zero_var": (group_std == 0).float().tolist(),
    }
    gathered = all_gather_objects(local)
    flat = lambda key: [v for part in gathered for v in part[key]]  # noqa: E731
    metrics = {}
    metrics["reward/mean"], metrics["reward/std"] = mean_std(flat("totals"))
    for name in groups.per_term:
        metrics[f"reward/{name}/mean"], metrics[f"reward/{name}/std"] = mean_std(
            [v for part in gathered for v in part["terms"][name]]
        )
    lengths = flat("lengths")
    metrics["response/length_mean"], _ = mean_std(lengths)
    metrics["response/length_max"] = float(max(lengths))
    metrics["response/truncated_frac"] = mean_std([float(t) for t in flat("truncated")])[0]
    metrics["reward/zero_variance_group_frac"] = mean_std(flat("zero_var"))[0]
    return metrics
