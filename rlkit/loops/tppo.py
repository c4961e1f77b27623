"""T-PPO: PPO on length-truncated rollouts (Fan et al. 2025, ByteDance Seed, "Truncated Proximal
Policy Optimization", arXiv:2506.15050), as the ``truncated_ppo`` loop.

Every process keeps a pool of ``prompts_per_step / processes x group_size`` in-flight responses.
One step (the paper's successive truncated rollout):

1. free slots take new prompts (``group_size`` responses each), so every step trains on a full batch;
2. the current policy generates at most ``truncation.window`` more tokens of every in-flight
   response, the prompt plus the response so far serving as its prompt;
3. a response that ended (EOS, or ``sampling.max_new_tokens`` tokens in all) is scored, once;
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

from rlkit.algos import AdvantageInputs
from rlkit.algos.gae import generalized_advantages
from rlkit.algos.masked import masked_mean
from rlkit.engine import (
    all_gather_objects,
    all_reduce_sum,
    mean_over_ranks,
    optimizer_step,
    rank,
    split_micro_batches,
    world_size,
)
from rlkit.loops.policy_gradient import PolicyGradientLoop, explained_variance
from rlkit.loops.registry import LOOPS
from rlkit.metrics import mean_std
from rlkit.rollout.generate import Rollout, left_pad, sample


@dataclass
class InFlight:
    """One response being generated across steps (plain data: it goes into checkpoints as JSON)."""

    uid: int  # unique within its pool, for bookkeeping and tests
    row: int  # index of its prompt's row in run.train_rows
    prompt: str
    prompt_ids: list[int]
    tokens: list[int] = field(default_factory=list)  # the response so far
    shaping: list[float] = field(
        default_factory=list
    )  # per-token reward shaping (the KL penalty) of those tokens, as computed when each was trained on


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


@LOOPS.register("truncated_ppo")
class TruncatedPPOLoop(PolicyGradientLoop):
    """PPO with successive truncated rollouts and decoupled policy / value updates (T-PPO)."""

    def __init__(self, run, model, reference_source: str):
        super().__init__(run, model, reference_source)
        # The value model trains on ended responses, apart from the policy's update on the window:
        # kept out of self.critic, so that PolicyGradientLoop.update trains the policy alone.
        self.value_model, self.critic = self.critic, None
        algo, tokenizer = self.algo, run.tokenizer
        capacity = run.cfg.trainer.prompts_per_step_global // world_size() * algo.group_size
        self.pool = ResponsePool(capacity, algo.truncation.window, algo.sampling.max_new_tokens, tokenizer.pad_token_id)

    def step(self, step: int, timer):
        run, algo, tokenizer = self.run, self.algo, self.run.tokenizer
        metrics = {"tppo/new_prompts": all_reduce_sum(float(self.refill()))}
        with timer.phase("rollout"):
            window = self.pool.generate(self.sample_window, self.engine.device)
        rollout, device = window.rollout, self.engine.device
        ended = window.ended.nonzero().squeeze(-1).tolist()
        with timer.phase("reward"):
            ended_slots = [window.slots[i] for i in ended]
            completion_ids = [window.completion_ids(i) for i in ended]
            completions = tokenizer.batch_decode(completion_ids, skip_special_tokens=True) if ended else []
            rows = [run.train_rows[s.row] for s in ended_slots]
            totals, per_term = (
                run.reward(
                    [s.prompt for s in ended_slots], completions, completion_ids=completion_ids, **run.columns(rows)
                )
                if ended
                else ([], {})
            )
        metrics.update(
            {f"reward/{name}/failures": all_reduce_sum(float(n)) for name, n in run.reward.pop_failures().items()}
        )
        num_ended = all_reduce_sum(float(len(ended)))
        with timer.phase("log_probs"):
            old_log_probs = self.score(self.engine, rollout) if self.needs_old_log_probs else None
            ref_log_probs = self.score(self.reference, rollout) if self.reference is not None else None
            old_values = self.value_model.values(rollout)
        with timer.phase("advantages"):
            mask = rollout.response_mask
            scores = torch.zeros(len(rollout), dtype=torch.float32, device=device)
            if num_ended:  # every process normalises together, also one with no ended response
                scores[ended] = self.normalised_scores(torch.tensor(totals, dtype=torch.float32, device=device))
            shaping = self.token_rewards(torch.zeros_like(scores), mask, old_log_probs, ref_log_probs)
            token_rewards = self.token_rewards(scores, mask, old_log_probs, ref_log_probs)
            last_values = old_values.gather(1, (mask.sum(-1) - 1).clamp(min=0)[:, None]).squeeze(1)
            bootstrap = torch.where(
                window.ended.to(device), torch.zeros_like(last_values), last_values
            )  # EGAE: V(s_l) ~ V(s_{l-1})
            inputs = AdvantageInputs(
                token_rewards,
                mask,
                torch.arange(len(rollout), device=device),
                values=old_values,
                bootstrap_values=bootstrap,
            )
            advantages, _ = self.advantage_fn(inputs, algo)
        with timer.phase("update"):
            train_policy = step > algo.critic.pretrain_steps
            metrics.update(
                self.update(
                    rollout, inputs.group_index, advantages, old_log_probs, ref_log_probs, None, None, train_policy
                )
            )
            retired = self.pool.retire(window, shaping)
            metrics.update(self.train_value_model(retired, scores[ended].tolist(), rollout))
        metrics.update(self.control_kl(old_log_probs, ref_log_probs, mask))
        metrics.update(self.window_metrics(window, retired, totals, per_term, num_ended))
        metrics["advantages/abs_mean"] = float(masked_mean(advantages.abs(), mask))
        metrics["tokens"] = all_reduce_sum(float(rollout.attention_mask.sum()))
        samples = [
            {"prompt": s.prompt, "completion": c, "reward": r, "answer": row.get("answer", "")}
            for s, c, r, row in zip(ended_slots, completions, totals, rows)
        ]
        return metrics, samples

    def refill(self) -> int:
        """Fill the pool's free slots with new prompts, ``group_size`` responses each (the last
        prompt's group may be cut short). Prompts are drawn for all processes at once, so that every
        process reads the same data order whatever its number of free slots. Returns the prompts taken."""
        run, size = self.run, self.algo.group_size
        needs = all_gather_objects(-(-self.pool.free() // size))
        indices = self.sampler.next_global(sum(needs)) if sum(needs) else []
        start = sum(needs[: rank()])
        mine = indices[start : start + needs[rank()]]
        prompts = run.prompts([run.train_rows[i] for i in mine]) if mine else []
        for index, prompt in zip(mine, prompts):
            ids = run.tokenizer(prompt, add_special_tokens=False)["input_ids"]
            self.pool.admit(index, prompt, ids, min(size, self.pool.free()))
        return len(mine)

    def sample_window(self, prompt_ids, prompt_mask, done, max_new_tokens: torch.Tensor) -> Rollout:
        """One window of every in-flight response; EOS stays masked until the whole response
        (earlier windows included) has ``sampling.min_new_tokens`` tokens."""
        algo, tokenizer = self.algo, self.run.tokenizer
        hook = getattr(self, "rollout_logits_processor", None)  # a loop's reshaped sampling distribution, if any
        return sample(
            self.engine.module,
            prompt_ids,
            prompt_mask,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            num_samples=1,
            max_new_tokens=max_new_tokens,
            min_new_tokens=(algo.sampling.min_new_tokens - done).clamp(min=0),
            temperature=algo.sampling.temperature,
            top_p=algo.sampling.top_p,
            logits_processor=hook() if hook else None,
        )

    def train_value_model(self, ended: list[InFlight], scores: list[float], filler: Rollout) -> dict[str, float]:
        """``update_epochs`` x ``minibatches`` critic steps on every token of the responses that
        ended, regressing onto their GAE(gamma, truncation.value_lam) returns (no bootstrap: they
        are complete). The number that ended varies by step and process; every process pads its
        rows with zero-mask ones to the same count, so all take the same optimizer steps. No
        process has an ended response: no step."""
        algo, critic = self.algo, self.value_model
        counts = all_gather_objects(len(ended))
        if max(counts) == 0:
            return {}
        engine = critic.engine
        unit = algo.minibatches * engine.gradient_accumulation_steps()
        size = -(-max(counts) // unit) * unit
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
        rewards = torch.cat([torch.nn.functional.pad(r, (0, width - r.shape[1])) for r in reward_parts])
        mask = rollout.response_mask
        old_values = critic.values(rollout)
        _, returns = generalized_advantages(rewards, old_values, mask, algo.gamma, algo.truncation.value_lam)
        returns = returns.float()
        real = torch.arange(size) < len(ended)
        sums: dict[str, list[float]] = {}
        norms = []

        def value_loss(index, counts):
            loss, stats = critic.loss(index, rollout, returns, old_values, counts)
            weight = float(mask[index].sum())
            for key, value in stats.items():
                total = sums.setdefault("critic/" + key, [0.0, 0.0])
                total[0] += float(value.detach()) * weight
                total[1] += weight
            return loss

        for _ in range(algo.update_epochs):
            for minibatch in torch.randperm(size).split(size // algo.minibatches):
                counts = (
                    all_reduce_sum(float(mask[minibatch].sum())),
                    all_reduce_sum(float(real[minibatch].sum())),
                    algo.sampling.max_new_tokens,
                )
                micro_batches = [
                    minibatch[i] for i in split_micro_batches(len(minibatch), engine.gradient_accumulation_steps())
                ]
                norms.append(optimizer_step(engine, micro_batches, lambda index: value_loss(index, counts)))
        metrics = mean_over_ranks({key: total / max(weight, 1.0) for key, (total, weight) in sums.items()})
        metrics["critic/grad_norm"] = sum(norms) / len(norms)
        metrics["critic/explained_variance"] = explained_variance(old_values, returns, mask)
        return metrics

    def window_metrics(
        self, window: Window, retired: list[InFlight], totals: list[float], per_term: dict, num_ended: float
    ) -> dict[str, float]:
        """Rewards and lengths of the responses that ended (over all processes), and the pool's state."""
        local = {
            "totals": totals,
            "terms": per_term,
            "lengths": [len(s.tokens) for s in retired],
            "capped": [float(not bool(e)) for e, n in zip(window.eos.tolist(), window.ended.tolist()) if n],
            "window": window.rollout.response_lengths.tolist(),
        }
        gathered = all_gather_objects(local)
        flat = lambda key: [v for part in gathered for v in part[key]]  # noqa: E731
        metrics = {
            "tppo/ended": num_ended,
            "tppo/in_flight": all_reduce_sum(float(len(self.pool.slots))),
            "tppo/window_length_mean": mean_std(flat("window"))[0],
        }
        if num_ended:
            metrics["reward/mean"], metrics["reward/std"] = mean_std(flat("totals"))
            for name in sorted({n for part in gathered for n in part["terms"]}):
                metrics[f"reward/{name}/mean"], metrics[f"reward/{name}/std"] = mean_std(
                    [v for part in gathered for v in part["terms"].get(name, [])]
                )
            lengths = flat("lengths")
            metrics["response/length_mean"], metrics["response/length_max"] = mean_std(lengths)[0], float(max(lengths))
            metrics["response/truncated_frac"] = mean_std(flat("capped"))[0]
        return metrics

    def extra_engines(self) -> dict:
        return self.value_model.extra_engines()

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
