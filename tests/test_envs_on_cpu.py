"""Environments (rlkit/envs): each one's rules, its expert, held-out splits, the registry."""

from __future__ import annotations

import json

import datasets
import pytest

from rlkit.config import ConfigError
from rlkit.envs import ENVIRONMENTS, build_environment, resolve_environment
from rlkit.envs.base import expert_messages, instance_key
from rlkit.envs.maze import MazeEnv, open_moves, shortest_path
from rlkit.envs.navigation import NavigationEnv
from rlkit.envs.tool_arith import ToolArithmeticEnv
from rlkit.envs.twenty_questions import OBJECTS, QUESTIONS, TwentyQuestionsEnv
from rlkit.envs.wordle import WORDS, WordleEnv, feedback

ALL = ["maze", "navigation", "tool_arith", "twenty_questions", "wordle"]


def play_expert(env, row) -> tuple[float, int, bool]:
    """(total reward, turns, done) of the expert's episode within the turn limit."""
    env.reset(row)
    total = 0.0
    for turn in range(1, env.options.max_turns + 1):
        result = env.step(env.expert_action())
        total += result.reward
        if result.done:
            return total, turn, True
    return total, env.options.max_turns, False


# --------------------------------------------------------------------------- every environment


def test_registry_lists_the_environments():
    assert set(ALL) <= set(ENVIRONMENTS.names())


@pytest.mark.parametrize("name", ALL)
def test_splits_are_reproducible_disjoint_and_json(name):
    env = build_environment(name, {"test_size": 20})
    test, train = env.rows("test", 20), env.rows("train", 60)
    assert len(test) == 20 and len(train) == 60
    assert len({instance_key(r) for r in test}) == 20  # distinct held-out instances
    assert not {instance_key(r) for r in test} & {instance_key(r) for r in train}
    assert build_environment(name, {"test_size": 20}).rows("train", 60) == train
    assert build_environment(name, {"test_size": 20, "seed": 1}).rows("test", 20) != test
    assert json.loads(json.dumps(train)) == train
    assert datasets.Dataset.from_list(train).to_list() == train  # one schema for all rows: a task's dataset


@pytest.mark.parametrize("name", ALL)
def test_expert_solves_every_held_out_instance(name):
    env = build_environment(name, {"test_size": 40})
    results = [play_expert(env, row) for row in env.rows("test", 40)]
    assert all(done and env.success(total) for total, _, done in results), results


@pytest.mark.parametrize("name", ALL)
def test_episodes_are_deterministic_given_the_row(name):
    env = build_environment(name, {"test_size": 5})
    row = env.rows("test", 1)[0]
    first = expert_messages(env, row)
    assert expert_messages(build_environment(name, {"test_size": 5}), row) == first
    assert [m["role"] for m in first[:3]] == ["system", "user", "assistant"]


@pytest.mark.parametrize("name", ALL)
def test_state_keys_are_hashable_and_repeat_with_the_state(name):
    env = build_environment(name, {"test_size": 5})
    row = env.rows("test", 1)[0]
    env.reset(row)
    start = env.state_key()
    hash(start)
    env.step(env.expert_action())
    assert env.state_key() != start
    env.reset(row)
    assert env.state_key() == start


def test_registry_errors_are_one_line_config_errors():
    with pytest.raises(ConfigError, match="unknown environment.*valid: .*maze"):
        resolve_environment("mase")
    with pytest.raises(ConfigError, match="cannot import module 'no_such_module'"):
        resolve_environment("no_such_module:Env")
    with pytest.raises(ConfigError, match="not a subclass"):
        resolve_environment("rlkit.envs.maze:shortest_path")
    with pytest.raises(ConfigError, match="env.sise: unknown option; valid: .*size"):
        build_environment("maze", {"sise": 3})


def test_a_users_environment_resolves_by_module_and_class():
    assert resolve_environment("rlkit.envs.maze:MazeEnv") is MazeEnv


# --------------------------------------------------------------------------- maze

GRID = ["..#", ".#.", "..."]  # (0,0) start; (0,2) reachable only around the bottom


def maze_at(start=(0, 0), goal=(0, 2), **options) -> MazeEnv:
    env = MazeEnv(options)
    env.reset({"grid": GRID, "start": list(start), "goal": list(goal)})
    return env


def test_maze_moves_walls_and_goal():
    assert open_moves(GRID, (0, 0)) == ["south", "east"]
    assert open_moves(GRID, (1, 0)) == ["north", "south"]
    assert shortest_path(GRID, (0, 0), (1, 2)) == ["south", "south", "east", "east", "north"]
    assert shortest_path([".#", "#."], (0, 0), (1, 1)) is None
    env = maze_at(goal=(1, 2))
    assert env.describe() == "At (0, 0). Goal (1, 2). Open: south, east."
    blocked = env.step("I go north")
    assert (blocked.observation.startswith("Blocked."), env.position, blocked.info) == (True, (0, 0), {})
    invalid = env.step("jump")
    assert invalid.info == {"invalid_action": 1} and env.position == (0, 0)
    for move in ["south", "south", "east", "east"]:
        assert not env.step(move).done
    final = env.step("North.")
    assert (final.reward, final.done, env.state_key()) == (1.0, True, (1, 2))


def test_maze_step_penalty():
    env = maze_at(step_penalty=0.1)
    assert env.step("south").reward == -0.1
    assert maze_at().step("south").reward == 0.0


def test_maze_rows_have_a_path_of_at_least_min_distance():
    env = MazeEnv({"size": 4, "min_distance": 4, "test_size": 10})
    for row in env.rows("test", 10):
        assert len(shortest_path(row["grid"], tuple(row["start"]), tuple(row["goal"]))) >= 4
    with pytest.raises(ConfigError, match="min_distance"):
        MazeEnv({"size": 3, "min_distance": 9})


# --------------------------------------------------------------------------- wordle


def test_wordle_feedback_follows_the_repeated_letter_rule():
    assert feedback("speed", "abide") == "--Y-Y"  # the second e finds no copy left
    assert feedback("level", "hello") == "YG--Y"
    assert feedback("crane", "crane") == "GGGGG"
    assert feedback("eerie", "there") == "Y-Y-G"


def test_wordle_word_list_is_clean():
    assert len(WORDS) == len(set(WORDS)) >= 400
    assert all(len(w) == 5 and w.isalpha() and w.islower() for w in WORDS)


def test_wordle_rules():
    env = WordleEnv({"max_guesses": 2})
    assert env.reset({"secret": "crane"}) == "2 guesses left."
    invalid = env.step("xyzzy qwert")
    assert invalid.info == {"invalid_action": 1} and env.history == []
    first = env.step("Train.")
    assert (first.observation, first.done) == ("train: -GG-Y. 1 guesses left.", False)
    last = env.step("plant")
    assert (last.done, last.reward) == (True, 0.0) and "the word was crane" in last.observation
    env.reset({"secret": "crane"})
    assert (env.step("crane").reward, env.state_key()) == (1.0, (("crane", "GGGGG"),))


def test_wordle_vocabulary_restricts_guesses_and_secrets():
    env = WordleEnv({"vocabulary": 50, "test_size": 10})
    assert len(env.words) == 50 and {r["secret"] for r in env.rows("train", 100)} <= set(env.words)
    with pytest.raises(ConfigError, match="vocabulary"):
        WordleEnv({"vocabulary": 1})


# --------------------------------------------------------------------------- twenty questions


def test_twenty_questions_table_is_consistent():
    """Every object is told apart by the questions; every question is read as itself."""
    assert len({frozenset(a) for a in OBJECTS.values()}) == len(OBJECTS)
    assert all(attributes <= set(QUESTIONS) for attributes in OBJECTS.values())
    env = TwentyQuestionsEnv()
    env.reset({"secret": "dog", "candidates": ["cat", "dog"]})
    for attribute, (question, _) in QUESTIONS.items():
        env.step(question)
        assert list(env.answers)[-1] == attribute


def test_twenty_questions_oracle():
    env = TwentyQuestionsEnv()
    assert env.reset({"secret": "duck", "candidates": ["duck", "eagle", "whale"]}) == "One of: duck, eagle, whale."
    assert env.step("Can it swim?").observation == "Yes."
    assert env.step("is it bigger than a person").observation == "No."
    assert env.step("Tell me a joke").info == {"invalid_action": 1}
    wrong = env.step("Is it an eagle?")
    assert (wrong.observation, wrong.done, env.wrong_guesses) == ("No, it is not an eagle.", False, {"eagle"})
    assert env.state_key() == ((("big", False), ("water", True)), ("eagle",))
    right = env.step("Is it a duck?")
    assert (right.reward, right.done) == (1.0, True)


def test_twenty_questions_expert_halves_the_candidates():
    env = TwentyQuestionsEnv()
    env.reset({"secret": "car", "candidates": ["apple", "car", "cat", "dog"]})
    assert env.expert_action() == "Is it alive?"  # 2 alive, 2 not: the even split
    env.step("Is it alive?")
    assert env.expert_action() == "Is it a plant?"  # apple vs car: the first question that splits them
    env.step("Is it a plant?")
    assert env.expert_action() == "Is it a car?"


# --------------------------------------------------------------------------- text navigation

HOUSE = {
    "doors": [["garden", "hall"], ["hall", "kitchen"], ["hall", "study"]],
    "items": [["cup", "garden"], ["key", "study"]],
    "start": "kitchen",
    "goal_item": "key",
    "goal_room": "garden",
}


def test_navigation_rules():
    env = NavigationEnv()
    first = env.reset(HOUSE)
    assert first == ("Bring the key to the garden. In the kitchen. Exits: hall. Here: nothing. Carrying: nothing.")
    assert env.step("go study").info == {"invalid_action": 1}  # no door from the kitchen
    assert env.step("take key").info == {"invalid_action": 1}  # not here
    env.step("go to the hall")
    env.step("go study")
    assert env.step("take the key").observation.endswith("Here: nothing. Carrying: key.")
    env.step("go hall")
    assert env.step("drop key").reward == 0.0  # the wrong room: lies in the hall now
    env.step("take key")
    env.step("go garden")
    done = env.step("drop key")
    assert (done.reward, done.done) == (1.0, True)


def test_navigation_expert_explores_before_it_knows_where_the_object_is():
    env = NavigationEnv()
    env.reset(HOUSE)
    actions = []
    for _ in range(10):
        actions.append(env.expert_action())
        if env.step(actions[-1]).done:
            break
    # from the hall it explores the garden first (alphabetical), then the study where the key is
    assert actions == ["go hall", "go garden", "go hall", "go study", "take key", "go hall", "go garden", "drop key"]


# --------------------------------------------------------------------------- tool arithmetic


def test_tool_arith_calls_tools_then_answers():
    env = ToolArithmeticEnv()
    assert env.reset({"question": "(12+30)*11", "answer": "462"}) == "(12+30)*11"
    called = env.step('<tool_call>{"name": "calculator", "arguments": {"expression": "(12+30)*11"}}</tool_call>')
    assert called.observation == "<tool_response>\n462\n</tool_response>"
    assert (called.done, called.info) == (False, {"tool_calls": 1, "tool_errors": 0})
    assert env.state_key() == ("<tool_response>\n462\n</tool_response>",)
    answered = env.step("So the answer is\n#### 462")
    assert (answered.reward, answered.done) == (1.0, True)
    env.reset({"question": "(12+30)*11", "answer": "462"})
    assert env.step("#### 460").reward == 0.0


def test_tool_arith_without_tools_refuses_calls_and_the_expert_answers_directly():
    env = ToolArithmeticEnv({"tools": ""})
    env.reset({"question": "2*3", "answer": "6"})
    refused = env.step('<tool_call>{"name": "calculator", "arguments": {"expression": "2*3"}}</tool_call>')
    assert refused.info == {"tool_calls": 1, "tool_errors": 1} and "unknown tool 'calculator'" in refused.observation
    assert env.expert_action() == "#### 6"
    assert "Tools" not in env.system_prompt


def test_tool_arith_expert_follows_gsm8k_calculator_annotations():
    row = {
        "question": "Natalia sold 48 clips in April and half as many in May. How many in all?",
        "answer": "72",
        "solution": "48/2 = <<48/2=24>>24 in May.\n48+24 = <<48+24=72>>72 in all.\n#### 72",
    }
    env = ToolArithmeticEnv()
    env.reset(row)
    replies = []
    while True:
        replies.append(env.expert_action())
        if env.step(replies[-1]).done:
            break
    assert replies == [
        '<tool_call>{"name": "calculator", "arguments": {"expression": "48/2"}}</tool_call>',
        '<tool_call>{"name": "calculator", "arguments": {"expression": "48+24"}}</tool_call>',
        "#### 72",
    ]


def test_tool_arith_expert_answers_directly_when_a_solution_has_no_annotations():
    env = ToolArithmeticEnv()
    env.reset({"question": "How many legs have 2 cats?", "answer": "8", "solution": "2 cats have 8 legs.\n#### 8"})
    assert env.expert_action() == "#### 8"


def test_tool_arith_on_gsm8k_rows(gsm8k_dir):
    env = ToolArithmeticEnv({"gsm8k_path": str(gsm8k_dir)})
    rows = env.rows("test", 100)
    assert len(rows) == 100 and all(row["answer"] and row["solution"] for row in rows)
    errors = 0
    for row in rows:
        env.reset(row)
        while not (result := env.step(env.expert_action())).done:
            errors += result.info["tool_errors"]
        assert result.reward == 1.0
    assert errors == 0  # the calculator reads every annotation of these rows


def test_tool_arith_rows_keep_left_to_right_meaning():
    env = ToolArithmeticEnv({"test_size": 50, "operators": "+*"})
    for row in env.rows("test", 50):
        assert row["answer"] == str(eval(row["question"]))  # Python's precedence: the brackets keep the meaning
    with pytest.raises(ConfigError, match="unknown tool 'abacus'"):
        ToolArithmeticEnv({"tools": "calculator, abacus"})
