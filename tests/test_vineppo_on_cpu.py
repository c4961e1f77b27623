"""VinePPO: the per-step advantage against hand-worked values, the step splitter, and the
Monte-Carlo value estimator on a tiny model (prefixes, K continuations per state, values
in the reward's range), plus the preset and its validation."""

from __future__ import annotations

import functools
from types import SimpleNamespace

import pytest
import torch

from rlkit.algos import ADVANTAGE_ESTIMATORS, AdvantageInputs
from rlkit.algos.vine import vine_advantage
from rlkit.loops.mc_values import MonteCarloEstimator, MonteCarloSettings
from rlkit.loops.registry import SamplingSettings
from rlkit.rollout.backends import ROLLOUTS


def cfg(**changes):
    return ADVANTAGE_ESTIMATORS.make_settings("vine", **{"norm_by_std": False, **changes})


def close(actual, expected, atol=1e-6):
    torch.testing.assert_close(actual, torch.as_tensor(expected, dtype=actual.dtype), atol=atol, rtol=0)


def vine(rewards, mask, steps, values, **changes):
    inputs = AdvantageInputs(
        torch.tensor(rewards),
        torch.tensor(mask),
        torch.arange(len(mask)),
        values=torch.tensor(values),
        step_ids=torch.tensor(steps),
    )
    return vine_advantage(inputs, cfg(**changes))


# --------------------------------------------------------------------------- the estimator (Eq. 6)


def test_vine_is_registered():
    assert ADVANTAGE_ESTIMATORS.get("vine") is vine_advantage


def test_three_steps_and_a_padded_one_step_response():
    # row 0: steps [0 0 | 1 1 | 2], V = 0.5, 0.25, 1.0, score 1 on the last token
    #   A0 = 0 + 0.25 - 0.5 = -0.25;  A1 = 0 + 1.0 - 0.25 = 0.75;  A2 = 1 + 0 - 1.0 = 0
    # row 1: one step of two tokens then padding (junk rewards, step ids and values there), V = 0.4, score 0
    #   A0 = 0 + 0 - 0.4 = -0.4
    advantages, returns = vine(
        [[0.0, 0.0, 0.0, 0.0, 1.0], [0.0, 0.0, 9.0, 9.0, 9.0]],
        [[1, 1, 1, 1, 1], [1, 1, 0, 0, 0]],
        [[0, 0, 1, 1, 2], [0, 0, 7, 7, 7]],
        [[0.5, 0.5, 0.25, 0.25, 1.0], [0.4, 0.4, 99.0, 99.0, 99.0]],
    )
    close(advantages, [[-0.25, -0.25, 0.75, 0.75, 0.0], [-0.4, -0.4, 0.0, 0.0, 0.0]])
    # returns: r + V(s_next), the Monte-Carlo Q
    close(returns, [[0.25, 0.25, 1.0, 1.0, 1.0], [0.0, 0.0, 0.0, 0.0, 0.0]])


def test_one_step_response_is_score_minus_the_prompt_value():
    advantages, _ = vine([[0.0, 0.0, 1.0]], [[1, 1, 1]], [[0, 0, 0]], [[0.25, 0.25, 0.25]])
    close(advantages, [[0.75, 0.75, 0.75]])


def test_all_equal_values():
    # values equal to the score: no step changes the expected reward, no advantage anywhere
    advantages, _ = vine([[0.0, 0.0, 1.0]], [[1, 1, 1]], [[0, 1, 2]], [[1.0, 1.0, 1.0]])
    close(advantages, [[0.0, 0.0, 0.0]])
    # equal values below the score: the intermediate steps get 0, the last step R - V
    advantages, _ = vine([[0.0, 0.0, 1.0]], [[1, 1, 1]], [[0, 1, 2]], [[0.5, 0.5, 0.5]])
    close(advantages, [[0.0, 0.0, 0.5]])


def test_per_token_shaping_is_summed_per_step():
    # a KL penalty in the reward: rewards [-0.1, -0.1, 0.9] (score 1), steps [0 0 | 1], V = 0.5, 0.8
    # r0 = -0.2: A0 = -0.2 + 0.8 - 0.5 = 0.1;  r1 = 0.9: A1 = 0.9 + 0 - 0.8 = 0.1
    advantages, _ = vine([[-0.1, -0.1, 0.9]], [[1, 1, 1]], [[0, 0, 1]], [[0.5, 0.5, 0.8]])
    close(advantages, [[0.1, 0.1, 0.1]])


def test_whitening_over_the_batch():
    advantages, returns = vine(
        [[0.0, 0.0, 0.0, 0.0, 1.0], [0.0, 0.0, 9.0, 9.0, 9.0]],
        [[1, 1, 1, 1, 1], [1, 1, 0, 0, 0]],
        [[0, 0, 1, 1, 2], [0, 0, 0, 0, 0]],
        [[0.5, 0.5, 0.25, 0.25, 1.0], [0.4, 0.4, 0.0, 0.0, 0.0]],
        norm_by_std=True,
    )
    tokens = advantages[torch.tensor([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0]]).bool()].double()
    assert abs(float(tokens.mean())) < 1e-6 and abs(float(tokens.std(unbiased=False)) - 1) < 1e-5
    assert float(advantages[1, 2:].abs().sum()) == 0.0
    close(returns[0], [0.25, 0.25, 1.0, 1.0, 1.0])  # returns are not whitened


def test_without_values_or_step_ids_says_what_to_set():
    inputs = AdvantageInputs(torch.zeros(1, 2), torch.ones(1, 2), torch.zeros(1), values=torch.zeros(1, 2))
    with pytest.raises(ValueError, match="algo/value_source=monte_carlo"):
        vine_advantage(inputs, cfg())


def test_step_ids_with_a_gap_are_rejected():
    with pytest.raises(ValueError, match="without gaps"):
        vine([[0.0, 1.0]], [[1, 1]], [[0, 2]], [[0.5, 0.5]])


# --------------------------------------------------------------------------- step splitting


def test_split_steps_at_delimiters_lengths_eos_and_padding():
    from rlkit.loops.mc_values import split_steps

    eos, newline = 1, 5
    boundary = torch.zeros(10, dtype=torch.bool)
    boundary[newline] = True
    ids = torch.tensor(
        [
            [7, newline, 8, 8, newline, 9, eos],  # two lines and an answer
            [7, 8, newline, eos, 0, 0, 0],  # a newline right before EOS: EOS joins the last step
            [7, 7, 7, 7, 7, 7, 7],
        ]
    )  # no delimiter: one step (truncated)
    mask = torch.tensor([[1] * 7, [1, 1, 1, 1, 0, 0, 0], [1] * 7])
    steps = split_steps(ids, mask, boundary=boundary, step_tokens=0, eos_token_id=eos)
    assert steps.tolist() == [[0, 0, 1, 1, 1, 2, 2], [0, 0, 0, 0, 0, 0, 0], [0] * 7]
    by_length = split_steps(ids, mask, boundary=boundary, step_tokens=3, eos_token_id=eos)
    assert by_length.tolist() == [[0, 0, 1, 1, 1, 2, 2], [0, 0, 0, 0, 0, 0, 0], [0, 0, 0, 1, 1, 1, 2]]
    only_length = split_steps(ids, mask, boundary=None, step_tokens=2, eos_token_id=eos)
    assert only_length.tolist() == [[0, 0, 1, 1, 2, 2, 2], [0, 0, 1, 1, 0, 0, 0], [0, 0, 1, 1, 2, 2, 3]]
    capped = split_steps(ids, mask, boundary=boundary, step_tokens=0, eos_token_id=eos, max_steps=2)
    assert capped.tolist() == [[0, 0, 1, 1, 1, 1, 1], [0] * 7, [0] * 7]


# --------------------------------------------------------------------------- Monte-Carlo values on a tiny model


@pytest.fixture(scope="module")
def tiny():
    from rlkit.models import build_tiny_model

    arch = SimpleNamespace(
        hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4, vocab_size=96, max_position_embeddings=128
    )
    corpus = [f"{a}+{b}={a + b}\n#### {a + b}" for a in range(20) for b in range(20)]
    return build_tiny_model(arch, corpus, seed=0)


class RecordingReward:
    """The share of digits among a completion's characters (in [0, 1]); records every call."""

    def __init__(self):
        self.calls = []

    def __call__(self, prompts, completions, **fields):
        self.calls.append(dict(prompts=prompts, completions=completions, **fields))
        return [sum(c.isdigit() for c in text) / max(len(text), 1) for text in completions], {}

    def pop_failures(self):
        return {"digits": 0}


def hand_groups(tokenizer, device="cpu"):
    """Two prompts x two responses, tokenized by hand: responses 0 and 1 share their first line."""
    from rlkit.loops.experience import Experience
    from rlkit.rollout.generate import Rollout

    prompts = ["3+4=", "12+30="]
    texts = ["3+4=7\n#### 7", "3+4=7\n#### 8", "12+30=42\n#### 42", "12+30=4"]  # the last one is truncated
    encode = lambda text: tokenizer(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    responses = [encode(t) + [tokenizer.eos_token_id] for t in texts[:3]] + [encode(texts[3])]
    width = max(map(len, responses))
    response_ids = torch.full((4, width), tokenizer.pad_token_id)
    response_mask = torch.zeros(4, width, dtype=torch.long)
    for i, ids in enumerate(responses):
        response_ids[i, : len(ids)] = torch.tensor(ids)
        response_mask[i, : len(ids)] = 1
    encoded = tokenizer(
        [p for p in prompts for _ in range(2)],
        return_tensors="pt",
        padding=True,
        padding_side="left",
        add_special_tokens=False,
    )
    rollout = Rollout(
        encoded["input_ids"],
        encoded["attention_mask"],
        response_ids,
        response_mask,
        torch.tensor([False, False, False, True]),
    )
    rows = [
        {"question": p[:-1], "answer": a} for p, a in (("3+4=", "7"), ("3+4=", "7"), ("12+30=", "42"), ("12+30=", "42"))
    ]
    return (
        Experience(
            rows, [p for p in prompts for _ in range(2)], rollout.to(device), texts, [1.0, 0.0, 1.0, 0.0], {}, 2
        ),
        responses,
        width,
    )


def estimator_for(model, tokenizer, reward, settings, max_new_tokens, min_new_tokens=0, temperature=1.0, sampled=None):
    """The Monte-Carlo estimator with rlkit's own sampler (recording its calls into ``sampled``)
    and the run's reward scoring around ``reward``."""
    from rlkit.run import Run

    backend = ROLLOUTS.get("hf")(
        ROLLOUTS.make_settings("hf"),
        model=model,
        tokenizer=tokenizer,
        sampling=SamplingSettings(temperature=temperature),
    )

    def sample(prompt_ids, **kwargs):
        if sampled is not None:
            sampled.append((prompt_ids, kwargs))
        return backend.sample(prompt_ids, **kwargs)

    score = functools.partial(Run.score, SimpleNamespace(tokenizer=tokenizer, reward=reward, columns=Run.columns))
    return MonteCarloEstimator(tokenizer, settings, sample, score, max_new_tokens, min_new_tokens)


def test_mc_values_prefixes_k_continuations_and_range(tiny):
    model, tokenizer = tiny
    groups, responses, width = hand_groups(tokenizer)
    reward, k, sampled = RecordingReward(), 3, []
    max_new = width + 2
    estimator = estimator_for(
        model, tokenizer, reward, MonteCarloSettings(name="monte_carlo", k=k), max_new, sampled=sampled
    )
    torch.manual_seed(0)
    estimate = estimator(groups)

    # steps: a newline ends the first line; the truncated response has one step
    steps = estimate.step_ids
    newline_at = [r.index(tokenizer("\n", add_special_tokens=False)["input_ids"][0]) for r in responses[:3]]
    for row in range(3):
        assert (
            steps[row, : newline_at[row] + 1].eq(0).all()
            and steps[row, newline_at[row] + 1 : len(responses[row])].eq(1).all()
        )
    assert steps[3].eq(0).all()

    # states: each prompt once (shared by its group); rows 0 and 1 share their first line; row 2 has its own; row 3 none
    expected = [(0, 0), (0, newline_at[0] + 1), (2, 0), (2, newline_at[2] + 1)]
    assert list(zip(estimate.state_rows, estimate.prefixes)) == expected
    assert len(sampled) == 1  # one batched call for every prefix
    prefixes, kwargs = sampled[0]
    assert kwargs["num_samples"] == k and kwargs["max_new_tokens"] == [max_new - start for _, start in expected]
    for i, (row, start) in enumerate(expected):  # each continued from its prompt + response prefix, nothing else
        prompt = groups.rollout.prompt_ids[row][groups.rollout.prompt_mask[row].bool()].tolist()
        assert prefixes[i] == prompt + responses[row][:start]

    # the reward saw K completions per state, each the response prefix plus a continuation, with that row's fields
    (call,) = reward.calls
    assert len(call["completions"]) == len(expected) * k
    for i, (row, start) in enumerate(expected):
        for j in range(i * k, (i + 1) * k):
            ids = call["completion_ids"][j]
            assert ids[:start] == responses[row][:start] and len(ids) <= max_new  # within the response's length budget
            assert call["completions"][j] == tokenizer.decode(ids, skip_special_tokens=True)
            assert call["prompts"][j] == groups.prompts[row] and call["answer"][j] == groups.rows[row]["answer"]

    # V = mean reward of the K continuations, in the reward's range; tokens carry their step's state value
    assert estimate.continuation_rewards.shape == (len(expected), k)
    close(estimate.state_values, estimate.continuation_rewards.mean(-1))
    assert float(estimate.state_values.min()) >= 0.0 and float(estimate.state_values.max()) <= 1.0
    v = estimate.state_values
    for row, states in ((0, (0, 1)), (1, (0, 1)), (2, (2, 3)), (3, (2,))):
        n = len(responses[row])
        close(estimate.values[row, :n], torch.stack([v[states[s]] for s in steps[row, :n].tolist()]))
        assert float(estimate.values[row, n:].abs().sum()) == 0.0
    assert estimate.metrics["vine/states"] == 4 and estimate.metrics["vine/continuations"] == 4 * k
    assert estimate.metrics["vine/steps_per_response"] == pytest.approx(7 / 4)


def test_mc_values_force_the_budget_and_respect_min_new_tokens(tiny):
    model, tokenizer = tiny
    groups, responses, width = hand_groups(tokenizer)
    reward = RecordingReward()
    settings = MonteCarloSettings(name="monte_carlo", k=4, step_delimiter="", step_tokens=2)
    estimator = estimator_for(model, tokenizer, reward, settings, width, min_new_tokens=width - 1, temperature=2.0)
    torch.manual_seed(1)
    estimator(groups)
    for ids in reward.calls[0]["completion_ids"]:
        assert width - 1 <= len(ids) <= width  # no EOS before min_new_tokens, nothing past max_new_tokens
        assert tokenizer.eos_token_id not in ids[: width - 2]


# --------------------------------------------------------------------------- preset and validation


def test_vineppo_preset(config_error, compose_config):
    assert config_error("algo=vineppo") is None
    algo = compose_config("algo=vineppo").algo
    assert (algo.advantage.name, algo.policy_loss.name, algo.value_source.name, algo.value_source.step_delimiter) == (
        "vine",
        "clipped",
        "monte_carlo",
        "\n",
    )
    assert algo.value_source.k >= 1 and (
        algo.kl.coef,
        algo.kl.placement,
        algo.policy_loss.clip_low,
        algo.update_epochs,
    ) == (
        1e-4,
        "loss",
        0.2,
        2,
    )
    assert compose_config("algo=ppo").algo.value_source.name == "critic"  # nothing is sampled for other algorithms
