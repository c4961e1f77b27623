"""T-PPO: PPO on length-truncated rollouts (Fan et al. 2025, ByteDance Seed, "Truncated Proximal
Policy Optimization", arXiv:2506.15050), as the ``truncated_ppo`` loop.

Every process keeps a pool of ``prompts_per_step / processes x group_size`` in-flight responses.
One step (the paper's successive truncated rollout):

1. free slots take new prompts (``group_size`` responses each), so every step trains on a full batch;
2. the current policy generates at most ``truncation.window`` more tokens of every in-flight
   response, the prompt plus the response so far serving as its prompt;
3. a response that ended (EOS, or ``task.max_new_tokens`` tokens in all) is scored, once;
4. the policy trains on this window's tokens only -- the prompt and earlier windows are context
   (the paper's token filtering) -- with Extended GAE: a response that goes on bootstraps from
   the critic's value of its last state instead of 0 (:func:`rlkit.algos.gae.generalized_advantages`);
5. the value model trains apart from the policy, on every token of the responses that ended
   (whose return is known), never on cut-off ones;
6. the responses that go on stay in the pool; the next step continues them with the updated policy.

The pool is part of the loop's state: checkpoints hold every process's in-flight responses and a
resumed run continues them (with a different process count they are dealt out again, and any that
no longer fit are dropped -- harmless: their tokens already trained the policy, they just never
get a reward or train the value model).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from omegaconf import MISSING

from rlkit.algos import AdvantageInputs
from rlkit.algos.gae import generalized_advantages
from rlkit.algos.masked import explained_variance, masked_mean
from rlkit.engine import all_gather_objects, all_reduce_sum, rank, split_micro_batches, world_size
from rlkit.loops.experience import Experience
from rlkit.loops.policy_gradient import PolicyGradientLoop, PolicyGradientSettings
from rlkit.loops.registry import LOOPS
from rlkit.loops.update import PolicyUpdate, UpdateStats
from rlkit.metrics import mean_std
from rlkit.rollout.generate import Rollout, left_pad
from rlkit.settings import Checked


@dataclass
class InFlight:
    """One response being generated across steps (plain data: it goes into checkpoints as JSON)."""

    uid: int  # unique within its pool, for bookkeeping and tests
    row: int  # index of its prompt's row in run.train_rows
    prompt: str
    prompt_ids: list[int]
    tokens: list[int] = field(default_factory=list)  # the response so far
    # per-token reward shaping (the KL penalty) of those tokens, as computed when each was trained on
    shaping: list[float] = field(default_factory=list)


@dataclass
class Window:
    """One step's generation: ``rollout`` has the prompt plus each response so far as its
    (left-padded) prompt and this window's tokens as its response, row-aligned with ``slots``."""

    rollout: Rollout
    slots: list[InFlight]
    ended: torch.Tensor  # (B,) bool: the response ended in this window (EOS or the length cap)
    eos: torch.Tensor  # (B,) bool: ... with an EOS (ended & ~eos: cut by the length cap)

    def completion_ids(self, index: int) -> list[int]:
        """The whole response of row ``index`` so far, this window included."""
        n = int(self.rollout.response_mask[index].sum())
        return self.slots[index].tokens + self.rollout.response_ids[index, :n].tolist()


def right_pad(sequences: list[list], pad_value, dtype=torch.long) -> tuple[torch.Tensor, torch.Tensor]:
    """(values, mask), both (B, max length, at least 1), each sequence left-aligned."""
    width = max(1, max(len(s) for s in sequences))
    values = torch.full((len(sequences), width), pad_value, dtype=dtype)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for i, seq in enumerate(sequences):
        if seq:
            values[i, : len(seq)] = torch.tensor(seq, dtype=dtype)
            mask[i, : len(seq)] = 1
    return values, mask


class ResponsePool:
    """This process's in-flight responses: admitted with their prompt, extended by one window a
    step, retired (returned whole) when they end."""

    def __init__(self, capacity: int, window: int, max_tokens: int, pad_token_id: int):
        self.capacity, self.window, self.max_tokens = capacity, window, max_tokens
        self.pad_token_id = pad_token_id
        self.slots: list[InFlight] = []
        self.next_uid = 0

    def free(self) -> int:
        return self.capacity - len(self.slots)

    def admit(self, row: int, prompt: str, prompt_ids: list[int], count: int) -> None:
        """``count`` new responses to one prompt."""
        for _ in range(count):
            self.slots.append(InFlight(self.next_uid, row, prompt, list(prompt_ids)))
            self.next_uid += 1

    def generate(self, sample_fn: Callable, device=None) -> Window:
        """Extend every in-flight response by at most ``window`` tokens (never past ``max_tokens``).

        ``sample_fn(prompt_ids, prompt_mask, done, max_new_tokens) -> Rollout`` samples one
        continuation of each left-padded row (``done``, ``max_new_tokens``: (B,) tokens each
        response already has, and may add in this window)."""
        slots = list(self.slots)
        if not slots:
            raise RuntimeError("the response pool is empty: admit prompts first")
        prompt_ids, prompt_mask = left_pad([s.prompt_ids + s.tokens for s in slots], self.pad_token_id)
        done = torch.tensor([len(s.tokens) for s in slots], dtype=torch.long, device=device)
        step_tokens = (self.max_tokens - done).clamp(min=1, max=self.window)  # the length cap counts the whole response
        sampled = sample_fn(prompt_ids.to(device), prompt_mask.to(device), done, step_tokens)
        ids, mask = sampled.response_ids, sampled.response_mask
        eos = ~sampled.truncated
        ended = eos | (done.to(ids.device) + mask.sum(-1) >= self.max_tokens)
        rollout = Rollout(
            prompt_ids=sampled.prompt_ids,
            prompt_mask=sampled.prompt_mask,
            response_ids=ids.masked_fill(mask == 0, self.pad_token_id),
            response_mask=mask,
            truncated=~eos,
            log_probs=sampled.log_probs,
        )
        return Window(rollout, slots, ended, eos)

    def retire(self, window: Window, shaping: torch.Tensor) -> list[InFlight]:
        """Append the window's tokens (and their ``shaping`` rewards, (B, T)) to their responses;
        remove and return the responses that ended, in row order."""
        ended, going_on = [], []
        lengths = window.rollout.response_mask.sum(-1).tolist()
        for i, slot in enumerate(window.slots):
            slot.tokens += window.rollout.response_ids[i, : lengths[i]].tolist()
            slot.shaping += shaping[i, : lengths[i]].tolist()
            (ended if bool(window.ended[i]) else going_on).append(slot)
        self.slots = going_on
        return ended

    def state_dict(self) -> dict:
        return {"next_uid": self.next_uid, "slots": [dataclasses.asdict(s) for s in self.slots]}

    def load_state_dict(self, state: dict) -> None:
        self.next_uid = state["next_uid"]
        self.slots = [InFlight(**s) for s in state["slots"]][: self.capacity]


def whole_responses(
    slots: list[InFlight], scores: list[float], pad_token_id: int, device=None
) -> tuple[Rollout, torch.Tensor]:
    """The ended ``slots`` as one rollout of their original prompts and whole responses, and
    their (B, T) token rewards: the recorded shaping plus the score on the last token."""
    prompt_ids, prompt_mask = left_pad([s.prompt_ids for s in slots], pad_token_id)
    response_ids, response_mask = right_pad([s.tokens for s in slots], pad_token_id)
    rewards, _ = right_pad([s.shaping for s in slots], 0.0, dtype=torch.float32)
    last = (response_mask.sum(-1) - 1).clamp(min=0)
    rewards[torch.arange(len(slots)), last] += torch.tensor(scores, dtype=torch.float32) * (response_mask.sum(-1) > 0)
    rollout = Rollout(
        prompt_ids, prompt_mask, response_ids, response_mask, truncated=torch.zeros(len(slots), dtype=torch.bool)
    )
    return rollout.to(device), rewards.to(device)


@dataclass
class TruncationSettings(Checked):
    """T-PPO's successive truncated rollout (``algo.truncation``); ``task.max_new_tokens`` caps a whole response."""

    window: int = MISSING  # tokens per response per step, the paper's window length (paper: 8k of a 24k max response)
    value_lam: float = 1.0  # GAE lambda of the value model's targets on ended responses (1 = Monte-Carlo returns)

    def check(self) -> None:
        self.require_at_least_one("window")
        self.require(0 <= self.value_lam <= 1, "value_lam", "must be in [0, 1]")


@dataclass
class TruncatedPPOSettings(PolicyGradientSettings):
    truncation: TruncationSettings = field(default_factory=TruncationSettings)

    def check(self) -> None:
        super().check()
        self.require(
            self.value_source.name == "critic",
            "value_source",
            "T-PPO trains a value model apart from the policy "
            "(Extended GAE): use algo/value_source=critic with algo/advantage=gae",
        )
        self.require(
            self.group_filter.name == "none", "group_filter", "T-PPO samples a window per step: no group filter"
        )


@LOOPS.register("truncated_ppo", TruncatedPPOSettings)
class TruncatedPPOLoop(PolicyGradientLoop):
    """PPO with successive truncated rollouts and decoupled policy / value updates (T-PPO): the
    sample, reward, advantage and value-training stages are T-PPO's own; the log-prob and policy
    update stages are the policy-gradient loop's."""

    def __init__(self, run, model, reference_source: str):
        super().__init__(run, model, reference_source)
        s, tokenizer = self.settings, run.tokenizer
        capacity = run.cfg.trainer.prompts_per_step_global // world_size() * s.group_size
        self.pool = ResponsePool(capacity, s.truncation.window, run.max_new_tokens, tokenizer.pad_token_id)

    def step(self, step: int, timer):
        metrics = {"tppo/new_prompts": all_reduce_sum(float(self.refill()))}
        with timer.phase("rollout"):
            window = self.pool.generate(self.sample_window, self.engine.device)
        with timer.phase("reward"):
            batch, ended = self.score_window(window)
        metrics.update(
            {f"reward/{name}/failures": all_reduce_sum(float(n)) for name, n in self.run.reward.pop_failures().items()}
        )
        with timer.phase("log_probs"):
            self.score_tokens(batch)
            metrics.update(self.correct_rollout(batch))
        with timer.phase("values"):
            batch.values = self.value_source.values(batch.rollout)
        with timer.phase("advantages"):
            shaping, ended_scores = self.window_advantages(batch, window, ended)
        with timer.phase("update"):
            metrics.update(
                PolicyUpdate(self, batch).run(train_policy=self.value_source.trains_policy(step), train_values=False)
            )
            retired = self.pool.retire(window, shaping)
            metrics.update(self.train_value_model(retired, ended_scores, batch.rollout))
        self.sync_rollout(timer)
        metrics.update(self.control_kl(batch))
        metrics.update(self.window_metrics(window, retired, batch, ended))
        metrics["advantages/abs_mean"] = float(masked_mean(batch.advantages.abs(), batch.response_mask))
        metrics["tokens"] = all_reduce_sum(float(batch.rollout.attention_mask.sum()))
        samples = [batch.samples()[i] for i in ended]
        return metrics, samples

    def refill(self) -> int:
        """Fill the pool's free slots with new prompts, ``group_size`` responses each (the last
        prompt's group may be cut short). Prompts are drawn for all processes at once, so that every
        process reads the same data order whatever its number of free slots. Returns the prompts taken."""
        run, size = self.run, self.settings.group_size
        needs = all_gather_objects(-(-self.pool.free() // size))
        indices = self.sampler.next_global(sum(needs)) if sum(needs) else []
        start = sum(needs[: rank()])
        mine = indices[start : start + needs[rank()]]
        prompts = run.prompts([run.train_rows[i] for i in mine]) if mine else []
        for index, prompt, ids in zip(mine, prompts, run.encode(prompts)):
            self.pool.admit(index, prompt, ids, min(size, self.pool.free()))
        return len(mine)

    def sample_window(self, prompt_ids, prompt_mask, done, max_new_tokens: torch.Tensor) -> Rollout:
        """One window of every in-flight response from the rollout backend; EOS stays masked until
        the whole response (earlier windows included) has ``sampling.min_new_tokens`` tokens."""
        contexts = [ids[mask.bool()].tolist() for ids, mask in zip(prompt_ids, prompt_mask)]
        min_new = (self.settings.sampling.min_new_tokens - done).clamp(min=0)
        return self.rollout.sample(
            contexts,
            num_samples=1,
            max_new_tokens=max_new_tokens.tolist(),
            min_new_tokens=min_new.tolist(),
            logits_processor=self.rollout_logits_processor(),
        )

    def score_window(self, window: Window) -> tuple[Experience, list[int]]:
        """The window as an experience batch (each response its own group) with the rewards of the
        responses that ended (scored once, as whole responses); and the rows that ended."""
        run = self.run
        ended = window.ended.nonzero().squeeze(-1).tolist()
        rows = [run.train_rows[s.row] for s in window.slots]
        prompts = [s.prompt for s in window.slots]
        completions, scores = [""] * len(rows), [0.0] * len(rows)
        terms: dict[str, list[float]] = {}
        if ended:
            done, totals, terms = run.score(
                [rows[i] for i in ended], [prompts[i] for i in ended], [window.completion_ids(i) for i in ended]
            )
            for i, completion, total in zip(ended, done, totals):
                completions[i], scores[i] = completion, total
        return Experience(rows, prompts, window.rollout, completions, scores, terms, group_size=1), ended

    def window_advantages(
        self, batch: Experience, window: Window, ended: list[int]
    ) -> tuple[torch.Tensor, list[float]]:
        """Extended GAE over the window: the score on the last token of the responses that ended
        (normalised over those alone, all processes together), a bootstrap from the critic's value
        of the last state of those that go on. Returns the per-token shaping rewards (the KL
        penalty) that the pool records for the value model's later targets, and the normalised
        scores of the responses that ended."""
        mask, device = batch.response_mask, self.engine.device
        scores = torch.zeros(len(batch), dtype=torch.float32, device=device)
        if all_reduce_sum(float(len(ended))):  # every process normalises together, also one with no ended response
            scores[ended] = self.normalised_scores(
                torch.tensor([batch.scores[i] for i in ended], dtype=torch.float32, device=device)
            )
        shaping = self.token_rewards(torch.zeros_like(scores), batch)
        batch.token_rewards = self.token_rewards(scores, batch)
        last_values = batch.values.gather(1, (mask.sum(-1) - 1).clamp(min=0)[:, None]).squeeze(1)
        # EGAE: V(s_l) ~ V(s_{l-1})
        batch.bootstrap_values = torch.where(window.ended.to(device), torch.zeros_like(last_values), last_values)
        inputs = AdvantageInputs(
            batch.token_rewards,
            mask,
            torch.arange(len(batch), device=device),
            values=batch.values,
            bootstrap_values=batch.bootstrap_values,
        )
        batch.advantages, _ = self.advantage_fn(inputs, self.settings.advantage)
        return shaping, scores[ended].tolist()

    def train_value_model(self, ended: list[InFlight], scores: list[float], filler: Rollout) -> dict[str, float]:
        """``update_epochs`` x ``minibatches`` critic steps on every token of the responses that
        ended, regressing onto their GAE(gamma, truncation.value_lam) returns (no bootstrap: they
        are complete). The number that ended varies by step and process; every process pads its
        rows with zero-mask ones to the same count, so all take the same optimizer steps. No
        process has an ended response: no step."""
        s, critic = self.settings, self.value_source
        counts = all_gather_objects(len(ended))
        if max(counts) == 0:
            return {}
        unit = s.minibatches * critic.engine.gradient_accumulation_steps()
        rollout, rewards = self.value_batch(ended, scores, filler, -(-max(counts) // unit) * unit)
        mask, size = rollout.response_mask, len(rollout)
        old_values = critic.values(rollout)
        _, returns = generalized_advantages(rewards, old_values, mask, s.advantage.gamma, s.truncation.value_lam)
        returns = returns.float()
        real = torch.arange(size) < len(ended)
        stats, norms = UpdateStats(), []
        for _ in range(s.update_epochs):
            for minibatch in torch.randperm(size).split(size // s.minibatches):
                step_counts = (
                    all_reduce_sum(float(mask[minibatch].sum())),
                    all_reduce_sum(float(real[minibatch].sum())),
                    self.run.max_new_tokens,
                )
                micro_batches = [
                    minibatch[i]
                    for i in split_micro_batches(len(minibatch), critic.engine.gradient_accumulation_steps())
                ]
                norms.append(critic.step_on(rollout, returns, old_values, micro_batches, step_counts, stats))
        metrics = stats.means()
        metrics["critic/grad_norm"] = sum(norms) / len(norms)
        metrics["critic/explained_variance"] = explained_variance(old_values, returns, mask)
        return metrics

    def value_batch(
        self, ended: list[InFlight], scores: list[float], filler: Rollout, size: int
    ) -> tuple[Rollout, torch.Tensor]:
        """The ended responses as whole responses with their token rewards, padded to ``size`` rows
        with zero-mask copies (of an ended response, or of the window's first row)."""
        device = self.engine.device
        parts, reward_parts = [], []
        if ended:
            whole, rewards = whole_responses(ended, scores, self.pool.pad_token_id, device)
            parts, reward_parts = [whole], [rewards]
        if size > len(ended):
            source = parts[0] if parts else filler
            pad = source.select(torch.zeros(size - len(ended), dtype=torch.long))
            parts.append(dataclasses.replace(pad, response_mask=torch.zeros_like(pad.response_mask)))
            reward_parts.append(torch.zeros(pad.response_mask.shape, device=device))
        rollout = Rollout.concat(parts, self.pool.pad_token_id)
        width = rollout.response_ids.shape[1]
        return rollout, torch.cat([torch.nn.functional.pad(r, (0, width - r.shape[1])) for r in reward_parts])

    def window_metrics(
        self, window: Window, retired: list[InFlight], batch: Experience, ended: list[int]
    ) -> dict[str, float]:
        """Rewards and lengths of the responses that ended (over all processes), and the pool's state."""
        local = {
            "totals": [batch.scores[i] for i in ended],
            "terms": batch.reward_terms,
            "lengths": [len(s.tokens) for s in retired],
            "capped": [float(not bool(e)) for e, n in zip(window.eos.tolist(), window.ended.tolist()) if n],
            "window": window.rollout.response_lengths.tolist(),
        }
        gathered = all_gather_objects(local)
        flat = lambda key: [v for part in gathered for v in part[key]]  # noqa: E731
        num_ended = float(len(flat("totals")))
        metrics = {
            "tppo/ended": num_ended,
            "tppo/in_flight": all_reduce_sum(float(len(self.pool.slots))),
            "tppo/window_length_mean": mean_std(flat("window"))[0],
        }
        if num_ended:
            metrics["reward/mean"], metrics["reward/std"] = mean_std(flat("totals"))
            for name in sorted({n for part in gathered for n in part["terms"]}):
                values = [v for part in gathered for v in part["terms"].get(name, [])]
                metrics[f"reward/{name}/mean"], metrics[f"reward/{name}/std"] = mean_std(values)
            lengths = flat("lengths")
            metrics["response/length_mean"], metrics["response/length_max"] = mean_std(lengths)[0], float(max(lengths))
            metrics["response/truncated_frac"] = mean_std(flat("capped"))[0]
        return metrics

    def state_dict(self) -> dict:
        """Collective: gathers every process's in-flight responses."""
        return {**super().state_dict(), "in_flight": all_gather_objects(self.pool.state_dict())}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        pools = state.get("in_flight")
        if not pools:
            return
        if len(pools) == world_size():
            self.pool.load_state_dict(pools[rank()])
        else:  # another process count: deal the responses out again (any beyond the capacity are dropped)
            slots = [s for pool in pools for s in pool["slots"]]
            self.pool.load_state_dict(
                {"next_uid": max(p["next_uid"] for p in pools), "slots": slots[rank() :: world_size()]}
            )
