"""T-PPO (Fan et al. 2025, arXiv:2506.15050): Extended GAE against hand-worked values, the
truncated-rollout pool against a scripted sampler (responses longer than a window are
continued across steps, each is scored once, when it ends), the config checks, and the
loop end to end: in-flight responses survive a checkpoint and are continued after resume."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch

from rlkit.algos import ADVANTAGE_ESTIMATORS, AdvantageInputs
from rlkit.algos.gae import gae_advantage, generalized_advantages
from rlkit.loops.tppo import InFlight, ResponsePool, whole_responses
from rlkit.rollout.generate import Rollout, left_pad, response_mask_from_eos


def close(actual, expected, atol=1e-6):
    torch.testing.assert_close(actual, torch.as_tensor(expected, dtype=actual.dtype), atol=atol, rtol=0)


# --------------------------------------------------------------------------- Extended GAE

# Row 0: 3 tokens, cut off (goes on); row 1: 2 tokens, ended with reward 0.5; padding holds junk.
MASK = torch.tensor([[1, 1, 1], [1, 1, 0]])
REWARDS = torch.tensor([[0.0, 0.0, 0.0], [0.0, 0.5, 100.0]])
VALUES = torch.tensor([[0.5, 0.2, 0.4], [1.0, -1.0, 100.0]])
LAST_VALUE_BOOTSTRAP = torch.tensor([0.4, 0.0])  # T-PPO: V(s_l) ~ V(s_{l-1}) for the cut-off row, 0 for the ended one


def egae(gamma, lam, bootstrap=LAST_VALUE_BOOTSTRAP):
    return generalized_advantages(REWARDS, VALUES, MASK, gamma, lam, bootstrap)


def test_egae_gamma_lambda_one_is_rewards_plus_bootstrap_minus_values():
    advantages, returns = egae(1.0, 1.0)
    # row 0: A_t = 0 + 0.4 - V_t;  row 1 (ended): A_t = sum_{k>=t} r_k - V_t = [0.5 - 1, 0.5 + 1]
    close(advantages, [[-0.1, 0.2, 0.0], [-0.5, 1.5, 0.0]])
    close(returns, [[0.4, 0.4, 0.4], [0.5, 0.5, 0.0]])


def test_egae_hand_values_gamma_lambda_half():
    advantages, returns = egae(0.5, 0.5)
    # row 0: next values [0.2, 0.4, 0.4 (bootstrap)]; deltas = [.1 - .5, .2 - .2, .2 - .4] = [-.4, 0, -.2]
    #        A2 = -.2, A1 = 0 + .25 * -.2 = -.05, A0 = -.4 + .25 * -.05 = -.4125
    # row 1: deltas = [0 + .5 * -1 - 1, .5 + 0 - (-1)] = [-1.5, 1.5]; A1 = 1.5, A0 = -1.5 + .25 * 1.5 = -1.125
    close(advantages, [[-0.4125, -0.05, -0.2], [-1.125, 1.5, 0.0]])
    close(returns, [[0.0875, 0.15, 0.2], [-0.125, 0.5, 0.0]])


def test_egae_lambda_zero_is_the_one_step_td_error_with_the_bootstrap_at_the_cut():
    advantages, _ = egae(1.0, 0.0)
    close(advantages, [[-0.3, 0.2, 0.0], [-2.0, 1.5, 0.0]])  # row 1: delta_0 = 0 + (-1) - 1


def test_a_cut_off_response_differs_from_the_same_tokens_treated_as_ended():
    truncated, _ = egae(1.0, 1.0)
    ended, _ = egae(1.0, 1.0, bootstrap=None)  # plain GAE: V = 0 after the last token
    close(ended[0], [-0.5, -0.2, -0.4])  # a terminal state with no reward: every token looks bad
    close(truncated[0] - ended[0], [0.4, 0.4, 0.4])  # the bootstrap, discounted by (gamma lambda)^(l-1-t) = 1
    close(truncated[1], ended[1])  # bootstrap 0: the ended row is unchanged


def test_bootstrap_zero_reduces_to_plain_gae_and_padding_is_ignored():
    for gamma, lam in ((1.0, 0.95), (0.9, 0.5), (1.0, 1.0)):
        plain = generalized_advantages(REWARDS, VALUES, MASK, gamma, lam)
        zeros = generalized_advantages(REWARDS, VALUES, MASK, gamma, lam, torch.zeros(2))
        for a, b in zip(plain, zeros):
            close(a, b)
    junk = REWARDS.clone(), VALUES.clone()
    junk[0][1, 2], junk[1][1, 2] = -7.0, 3.0
    for a, b in zip(generalized_advantages(*junk, MASK, 0.9, 0.5, LAST_VALUE_BOOTSTRAP), egae(0.9, 0.5)):
        close(a, b)


def test_bootstrap_lands_on_each_rows_last_token_whatever_its_length():
    # row 1 (length 2) cut off with an explicit bootstrap 2.0: gamma = lambda = 1 gives 0.5 + 2 - V_t
    advantages, returns = generalized_advantages(REWARDS, VALUES, MASK, 1.0, 1.0, torch.tensor([0.0, 2.0]))
    close(advantages[1], [1.5, 3.5, 0.0])
    close(returns[1], [2.5, 2.5, 0.0])
    close(advantages[0], [-0.5, -0.2, -0.4])
    # an empty row (no tokens this window) is left alone
    empty, _ = generalized_advantages(
        torch.zeros(1, 3), torch.ones(1, 3), torch.zeros(1, 3, dtype=torch.long), 1.0, 1.0, torch.tensor([5.0])
    )
    close(empty, [[0.0, 0.0, 0.0]])


def test_the_registered_gae_estimator_reads_the_bootstrap_values():
    cfg = ADVANTAGE_ESTIMATORS.make_settings("gae", gamma=1.0, lam=1.0, norm_by_std=False)
    inputs = AdvantageInputs(REWARDS, MASK, torch.tensor([0, 1]), values=VALUES, bootstrap_values=LAST_VALUE_BOOTSTRAP)
    advantages, returns = gae_advantage(inputs, cfg)
    close(advantages, [[-0.1, 0.2, 0.0], [-0.5, 1.5, 0.0]])
    close(returns, [[0.4, 0.4, 0.4], [0.5, 0.5, 0.0]])
    plain, _ = gae_advantage(dataclasses.replace(inputs, bootstrap_values=None), cfg)
    close(plain[0], [-0.5, -0.2, -0.4])


# --------------------------------------------------------------------------- the truncated-rollout pool

EOS, PAD = 2, 0
WINDOW, MAX_TOKENS = 4, 10
# Each prompt is one marker token; its response is scripted (tokens >= 10 are ordinary).
SCRIPTS = {
    101: [11, 12, 13, EOS],  # 4 tokens: ends in its first window
    102: [21, 22, 23, 24, 25, 26, EOS],  # 7 tokens: continued once, ends in its second window
    103: list(range(30, 45)),  # no EOS: cut at MAX_TOKENS = 10 in its third window
    104: [41, EOS],
    105: [51, 52, 53, 54, 55, EOS],
}


class ScriptedSampler:
    """Stands in for the policy: each row continues its prompt's script from where its
    response stands, and checks that it was given the prompt plus the response so far."""

    def __init__(self):
        self.calls = []

    def __call__(self, prompt_ids, prompt_mask, done, max_new_tokens):
        self.calls.append(max_new_tokens.tolist())
        rows, width = [], int(max_new_tokens.max())
        for ids, mask, n, cap in zip(prompt_ids.tolist(), prompt_mask.tolist(), done.tolist(), max_new_tokens.tolist()):
            seen = [t for t, m in zip(ids, mask) if m]
            script = SCRIPTS[seen[0]]
            assert seen[1:] == script[:n], "the continuation's prompt must be the prompt plus the response so far"
            piece = script[n : n + cap]
            rows.append(piece + [PAD] * (width - len(piece)))
        response_ids = torch.tensor(rows)
        response_mask, truncated = response_mask_from_eos(response_ids, EOS, max_new_tokens)
        return Rollout(
            prompt_ids, prompt_mask, response_ids.masked_fill(response_mask == 0, PAD), response_mask, truncated
        )


def run_pool(pool: ResponsePool, queue: list[int], steps: int, sampler=None):
    """The loop's bookkeeping without a model: refill, generate a window, score what ended, retire."""
    sampler = sampler or ScriptedSampler()
    ended_at, scored, windows = {}, [], []
    for step in range(1, steps + 1):
        while pool.free() and queue:
            marker = queue.pop(0)
            pool.admit(row=marker, prompt=f"p{marker}", prompt_ids=[marker], count=1)
        assert pool.free() == 0 or not queue, "free slots must be refilled"
        window = pool.generate(sampler)
        windows.append(window)
        for i in window.ended.nonzero().squeeze(-1).tolist():
            scored.append((window.slots[i].row, window.completion_ids(i)))
        lengths = window.rollout.response_mask.sum(-1)
        assert int(lengths.max()) <= WINDOW
        for slot in pool.retire(window, torch.full(window.rollout.response_mask.shape, -0.01)):
            ended_at[slot.row] = (step, slot.tokens, slot.shaping)
    return ended_at, scored, windows


def expected(marker: int) -> list[int]:
    script = SCRIPTS[marker]
    return script[: min(len(script), MAX_TOKENS)]


def test_responses_longer_than_a_window_are_continued_and_scored_once_when_they_end():
    pool = ResponsePool(capacity=3, window=WINDOW, max_tokens=MAX_TOKENS, pad_token_id=PAD)
    ended_at, scored, windows = run_pool(pool, [101, 102, 103, 104, 105], steps=4)
    assert {m: step for m, (step, _, _) in ended_at.items()} == {101: 1, 104: 2, 102: 2, 103: 3, 105: 4}
    for marker, (_, tokens, shaping) in ended_at.items():
        assert tokens == expected(marker)
        assert shaping == pytest.approx([-0.01] * len(tokens))  # one shaping reward per token, recorded as generated
    assert sorted(m for m, _ in scored) == sorted(SCRIPTS), "every response is scored exactly once"
    assert all(ids == expected(m) for m, ids in scored), "the reward sees the whole response, not the window"
    # step 1: 101 ends with EOS; 103 is cut off (no EOS, 4 of 10 tokens) and goes on
    first = windows[0]
    assert [s.row for s in first.slots] == [101, 102, 103]
    assert first.ended.tolist() == [True, False, False] and first.eos.tolist() == [True, False, False]
    # step 3: 103 reaches the length cap with 2 tokens in its window: ended, without EOS
    third = windows[2]
    row = [s.row for s in third.slots].index(103)
    assert int(third.rollout.response_mask[row].sum()) == 2 and bool(third.ended[row]) and not bool(third.eos[row])
    assert not pool.slots


def test_the_pool_survives_a_json_round_trip_mid_response():
    pool = ResponsePool(capacity=3, window=WINDOW, max_tokens=MAX_TOKENS, pad_token_id=PAD)
    queue = [101, 102, 103, 104, 105]
    run_pool(pool, queue, steps=1)
    state = json.loads(json.dumps(pool.state_dict()))
    assert [(s["row"], len(s["tokens"])) for s in state["slots"]] == [(102, 4), (103, 4)]
    restored = ResponsePool(capacity=3, window=WINDOW, max_tokens=MAX_TOKENS, pad_token_id=PAD)
    restored.load_state_dict(state)
    ended_at, _, _ = run_pool(restored, list(queue), steps=3)
    uninterrupted, _, _ = run_pool(pool, list(queue), steps=3)
    assert ended_at == uninterrupted
    assert ended_at[102][1] == expected(102) and ended_at[103][1] == expected(103)


def test_a_window_never_runs_past_the_length_cap():
    pool = ResponsePool(capacity=1, window=WINDOW, max_tokens=6, pad_token_id=PAD)
    sampler = ScriptedSampler()
    pool.admit(row=103, prompt="p", prompt_ids=[103], count=1)
    first = pool.generate(sampler)
    pool.retire(first, torch.zeros(1, WINDOW))
    second = pool.generate(sampler)
    assert sampler.calls == [[4], [2]]  # only the 2 tokens left are generated
    assert bool(second.ended[0]) and second.completion_ids(0) == SCRIPTS[103][:6]


def test_whole_responses_put_the_score_on_the_last_token_after_the_recorded_shaping():
    a = InFlight(0, 101, "p", [101, 7], tokens=[11, 12, EOS], shaping=[-0.1, -0.2, -0.3])
    b = InFlight(1, 102, "q", [102], tokens=[21], shaping=[0.0])
    rollout, rewards = whole_responses([a, b], [1.0, 0.5], PAD)
    assert rollout.prompt_ids.tolist() == [[101, 7], [PAD, 102]] and rollout.prompt_mask.tolist() == [[1, 1], [0, 1]]
    assert rollout.response_ids.tolist() == [[11, 12, EOS], [21, PAD, PAD]] and rollout.response_mask.tolist() == [
        [1, 1, 1],
        [1, 0, 0],
    ]
    close(rewards, [[-0.1, -0.2, 0.7], [0.5, 0.0, 0.0]])


def test_left_pad():
    ids, mask = left_pad([[5, 6, 7], [8]], PAD)
    assert ids.tolist() == [[5, 6, 7], [PAD, PAD, 8]] and mask.tolist() == [[1, 1, 1], [0, 0, 1]]


# --------------------------------------------------------------------------- config checks


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["algo.truncation.window=0"], "algo.truncation.window=0: must be at least 1"),
        (["algo.truncation.value_lam=1.5"], "algo.truncation.value_lam=1.5: must be in [0, 1]"),
        (["algo/value_source=value_head"], "algo.value_source=value_head: T-PPO trains a value model apart"),
        (["algo/group_filter=dynamic"], "algo.group_filter=dynamic: T-PPO samples a window per step"),
        (
            ["algo=ppo", "algo.truncation.window=8"],
            "algo.truncation: algo preset 'ppo' (loop policy_gradient) has no setting",
        ),
    ],
)
def test_truncation_config_checks(config_error, overrides, message):
    assert config_error("algo=tppo") is None
    assert message in (config_error("algo=tppo", *overrides) or "")


# --------------------------------------------------------------------------- end to end


def distinct_characters(prompts, completions, **_) -> list[float]:
    return [len(set(c)) / (len(c) + 1) for c in completions]


def train_tppo(compose_config, run_dir: Path, *extra: str) -> list[dict]:
    from conftest import small_split_overrides

    from rlkit.trainer import train

    overrides = small_split_overrides(*extra, drop=("algo.group_size",))
    train(
        compose_config(
            "algo=tppo",
            f"reward.fn={__name__}:distinct_characters",
            "algo.optim.lr=1e-3",
            "algo.truncation.window=8",
            *overrides,
        ),
        str(run_dir),
    )
    return [
        json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if '"tppo/in_flight"' in line
    ]


@pytest.mark.slow
def test_in_flight_responses_are_checkpointed_and_continued_after_resume(compose_config, tmp_path):
    """window 8 of 24 tokens: the first batch needs three steps. Stop after two, resume: the
    third step must finish the responses the checkpoint holds, not start new ones."""
    run_dir = tmp_path / "run"
    train_tppo(compose_config, run_dir, "trainer.max_steps=2", "trainer.save_every=1")
    state = json.loads((run_dir / "checkpoints" / "2" / "trainer_state.json").read_text())
    [pool] = state["loop"]["in_flight"]
    assert len(pool["slots"]) == 8 and {len(s["tokens"]) for s in pool["slots"]} <= {8, 16}
    assert any(len(s["tokens"]) == 16 for s in pool["slots"]), "no response of the first batch went on past two windows"
    assert (run_dir / "checkpoints" / "2" / "training_state_critic").is_dir()
    steps = train_tppo(compose_config, run_dir, "trainer.max_steps=3", "trainer.save_every=1")
    assert [m["step"] for m in steps] == [1, 2, 3]
    resumed = steps[2]
    assert resumed["response/length_max"] == 24.0, "the responses in flight at the checkpoint were not continued"
    assert resumed["tppo/ended"] >= sum(len(s["tokens"]) == 16 for s in pool["slots"])
    assert "critic/value_loss" in resumed  # the value model trained on them
