"""Rule rewards for numeric answers, and the reward registry / composition."""

from __future__ import annotations

from fractions import Fraction

import pytest
from omegaconf import OmegaConf

from rlkit.registry import UnknownNameError
from rlkit.rewards import REWARDS, CompositeReward, build_reward, resolve_reward_fn
from rlkit.rewards.math import answers_match, extract_answer, math_answer_reward, math_format_reward, parse_number
from rlkit.rewards.registry import RewardTermFn

# --------------------------------------------------------------------------- extract_answer


@pytest.mark.parametrize(
    "text, expected",
    [
        ("48/2 = 24\n48+24 = 72\n#### 72", "72"),
        ("#### 1,000", "1,000"),  # separators kept here; parse_number drops them
        ("so it costs #### $1,234.50 for 3 people", "1,234.50"),  # the $ is skipped, not the last number taken
        ("####-7", "-7"),
        ("#### 5 then, on reflection, #### 6", "6"),  # the last #### wins
        ("#### 9 and later \\boxed{4}", "9"),  # #### beats \boxed
    ],
)
def test_extract_answer_after_hashes(text, expected):
    assert extract_answer(text) == expected


@pytest.mark.parametrize(
    "text, expected",
    [
        ("The answer is \\boxed{42}.", "42"),
        ("so \\boxed{\\frac{1}{2}} is it", "\\frac{1}{2}"),  # one level of nested braces
        ("\\boxed{-\\dfrac{3}{4}}", "-\\dfrac{3}{4}"),
        ("first \\boxed{3} then \\boxed{ 4 }", "4"),  # the last box, stripped
        ("12 apples, answer \\boxed{7}", "7"),  # a box beats the last-number fallback
    ],
)
def test_extract_answer_boxed(text, expected):
    assert extract_answer(text) == expected


@pytest.mark.parametrize(
    "text, expected",
    [
        ("I have 3 apples and 4.5 pears.", "4.5"),
        ("The answer is 12.", "12"),
        ("a total of 1,250 dollars", "1,250"),
        ("it drops to -3 degrees", "-3"),
        ("three quarters: 3/4", "3/4"),
    ],
)
def test_extract_answer_falls_back_to_last_number(text, expected):
    assert extract_answer(text) == expected


@pytest.mark.parametrize("text", ["", "no numbers here", "#### and then nothing", "x = -."])
def test_extract_answer_none_without_a_number(text):
    assert extract_answer(text) is None


def test_empty_box_is_not_a_correct_answer():
    assert not answers_match(extract_answer("\\boxed{}"), "0")


# --------------------------------------------------------------------------- parse_number


@pytest.mark.parametrize(
    "text, expected",
    [
        ("42", Fraction(42)),
        ("-7", Fraction(-7)),
        ("1,000", Fraction(1000)),
        ("$5", Fraction(5)),
        ("50%", Fraction(50)),
        ("3.", Fraction(3)),  # a sentence's full stop
        ("1/2.", Fraction(1, 2)),
        ("\\frac{3}{4}.", Fraction(3, 4)),
        ("  7 ", Fraction(7)),
        ("0.50", Fraction(1, 2)),
        ("2/4", Fraction(1, 2)),
        ("\\frac{1}{2}", Fraction(1, 2)),
        ("\\dfrac{3}{4}", Fraction(3, 4)),
        ("-\\frac{1}{2}", Fraction(-1, 2)),
        ("\\$1,234.50", Fraction(246_9, 2)),  # 1234.5 = 2469/2
    ],
)
def test_parse_number(text, expected):
    assert parse_number(text) == expected


@pytest.mark.parametrize("text", [None, "", "abc", "1/0", "\\frac{1}{0}", "twelve"])
def test_parse_number_rejects_non_numbers(text):
    assert parse_number(text) is None


# --------------------------------------------------------------------------- answers_match


@pytest.mark.parametrize(
    "predicted, reference",
    [
        ("0.5", "1/2"),
        ("1/2", "0.5"),
        ("\\frac{1}{2}", "0.5"),
        ("\\frac{1}{2}", "1/2"),
        ("1,000", "1000"),
        ("$1,000.00", "1000"),
        ("-3", "-3.0"),
        ("abc", " abc "),  # non-numbers: exact match after stripping
    ],
)
def test_answers_match_equivalent(predicted, reference):
    assert answers_match(predicted, reference)


@pytest.mark.parametrize(
    "predicted, reference",
    [
        ("3", "4"),
        ("0.5", "1/3"),
        ("-3", "3"),
        ("1,000", "100"),
        ("abc", "abd"),
        ("12", "twelve"),
        (None, "1"),
    ],
)
def test_answers_match_mismatch(predicted, reference):
    assert not answers_match(predicted, reference)


# --------------------------------------------------------------------------- the registered math rewards


def test_math_rewards_are_registered():
    assert REWARDS.get("math_answer") is math_answer_reward
    assert REWARDS.get("math_format") is math_format_reward


def test_math_answer_reward():
    completions = ["2+2=4\n#### 4", "#### 1,000", "the answer is \\boxed{\\frac{1}{2}}", "#### 5", "no idea"]
    answers = ["4", "1000", "0.5", "6", "3"]
    # correct, correct (separator), correct (latex fraction), wrong number, no number
    assert math_answer_reward(["p"] * 5, completions, answer=answers, solution=["ignored"] * 5) == [
        1.0,
        1.0,
        1.0,
        0.0,
        0.0,
    ]


def test_math_format_reward_default_pattern():
    completions = ["work\n#### 42", "#### 42 apples", "answer 42", "#### 1,000.5  \n", "#### -3", "#### "]
    # ends in "#### <number>" (trailing whitespace stripped); text after the number or no number fails
    assert math_format_reward([""] * 6, completions) == [1.0, 0.0, 0.0, 1.0, 1.0, 0.0]


def test_math_format_reward_custom_pattern():
    assert math_format_reward(["", ""], ["x DONE", "DONE x"], pattern=r"DONE$") == [1.0, 0.0]


# --------------------------------------------------------------------------- CompositeReward


def test_composite_reward_weights_terms_and_returns_per_term_scores():
    seen = {}

    def first(prompts, completions, **fields):
        seen.update(fields)
        return [1, 0, 1]  # ints are accepted and turned into floats

    def second(prompts, completions, **fields):
        return [0.5, 1.0, 0.0]

    reward = CompositeReward([RewardTermFn("first", first, 2.0), RewardTermFn("second", second, -1.0)])
    totals, per_term = reward(["a", "b", "c"], ["x", "y", "z"], answer=["1", "2", "3"])
    # 2 * (1, 0, 1) - 1 * (0.5, 1, 0) = (1.5, -1.0, 2.0)
    assert totals == [1.5, -1.0, 2.0]
    assert per_term == {"first": [1.0, 0.0, 1.0], "second": [0.5, 1.0, 0.0]}
    assert all(isinstance(s, float) for s in per_term["first"])
    assert seen == {"answer": ["1", "2", "3"]}  # row fields reach the reward functions


def test_composite_reward_wrong_length_raises_naming_the_term():
    reward = CompositeReward([RewardTermFn("short", lambda p, c, **_: [1.0], 1.0)])
    with pytest.raises(ValueError, match="reward 'short' returned 1 scores for 2 completions"):
        reward(["a", "b"], ["x", "y"])


def test_composite_reward_needs_terms():
    with pytest.raises(ValueError, match="no terms"):
        CompositeReward([])


# --------------------------------------------------------------------------- build_reward / resolve_reward_fn


def reward_node(**overrides):
    node = {"name": "test", "terms": {}, "fn": None}
    node.update(overrides)
    return OmegaConf.create(node)


def test_build_reward_from_weighted_terms():
    cfg = reward_node(
        terms={
            "correct": {"fn": "math_answer", "weight": 1.0, "args": {}},
            "format": {"fn": "math_format", "weight": 0.5, "args": {}},
        }
    )
    reward = build_reward(cfg)
    assert [t.name for t in reward.terms] == ["correct", "format"]
    totals, per_term = reward(
        ["q1", "q2", "q3"], ["#### 4", "it is 5, #### 5 apples", "#### 7"], answer=["4", "5", "8"]
    )
    # row 1: correct 1, format 1 -> 1 + 0.5 = 1.5
    # row 2: "#### 5" is found, correct 1; ends with "apples", format 0 -> 1.0
    # row 3: wrong answer 0; format 1 -> 0.5
    assert per_term == {"correct": [1.0, 1.0, 0.0], "format": [1.0, 0.0, 1.0]}
    assert totals == [1.5, 1.0, 0.5]


def test_build_reward_binds_term_args():
    cfg = reward_node(terms={"done": {"fn": "math_format", "weight": 2.0, "args": {"pattern": "DONE$"}}})
    totals, per_term = build_reward(cfg)(["", ""], ["ok DONE", "#### 3"])
    # the bound pattern replaces the default "#### <number>" one
    assert per_term == {"done": [1.0, 0.0]}
    assert totals == [2.0, 0.0]


def test_build_reward_with_user_function(tmp_path, monkeypatch):
    (tmp_path / "rlkit_test_user_rewards.py").write_text(
        "def length_reward(prompts, completions, **fields):\n    return [float(len(c)) for c in completions]\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    # `fn` replaces `terms` entirely: the registered term below is not used
    cfg = reward_node(
        fn="rlkit_test_user_rewards:length_reward", terms={"x": {"fn": "math_answer", "weight": 1.0, "args": {}}}
    )
    reward = build_reward(cfg)
    assert [(t.name, t.weight) for t in reward.terms] == [("length_reward", 1.0)]
    totals, per_term = reward(["p", "p"], ["abc", "hello"])
    assert totals == [3.0, 5.0]
    assert per_term == {"length_reward": [3.0, 5.0]}


def test_build_reward_with_registered_name_as_fn():
    reward = build_reward(reward_node(fn="math_answer"))
    assert [t.name for t in reward.terms] == ["math_answer"]
    assert reward(["q"], ["#### 2"], answer=["2"])[0] == [1.0]


def test_build_reward_with_neither_fn_nor_terms_raises():
    with pytest.raises(ValueError, match="no terms"):
        build_reward(reward_node())


def test_resolve_reward_fn_registered_name():
    assert resolve_reward_fn("math_answer") is math_answer_reward


def test_resolve_reward_fn_missing_module():
    with pytest.raises(ValueError, match="cannot import reward module 'rlkit_no_such_module_xyz'"):
        resolve_reward_fn("rlkit_no_such_module_xyz:score")


def test_resolve_reward_fn_missing_attribute(tmp_path, monkeypatch):
    (tmp_path / "rlkit_test_attr_rewards.py").write_text(
        "NOT_A_FUNCTION = 3\n\ndef real(prompts, completions, **_):\n    return []\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    assert resolve_reward_fn("rlkit_test_attr_rewards:real").__name__ == "real"
    with pytest.raises(ValueError, match="module 'rlkit_test_attr_rewards' has no function 'missing'"):
        resolve_reward_fn("rlkit_test_attr_rewards:missing")
    with pytest.raises(ValueError, match="has no function 'NOT_A_FUNCTION'"):  # present but not callable
        resolve_reward_fn("rlkit_test_attr_rewards:NOT_A_FUNCTION")


def test_resolve_reward_fn_unknown_registered_name_lists_valid():
    with pytest.raises(UnknownNameError) as info:
        resolve_reward_fn("math_answr")
    message = str(info.value)
    assert message.startswith("unknown reward 'math_answr'; valid: ")
    assert "math_answer" in message and "math_format" in message
