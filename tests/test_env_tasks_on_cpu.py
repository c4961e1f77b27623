"""Environment tasks in ``rlkit train`` (issue 20): the ``env`` config node and the task presets,
their one-line errors, and the experience batch the episode sample stage builds (the response is
everything after the opening prompt, the loss only on sampled tokens, rewards at the ends of turns,
the behaviour log-probs reproduced by the loop's own scoring)."""

from __future__ import annotations

import dataclasses

import jinja2
import pytest
import torch
from omegaconf import OmegaConf
from transformers import LlamaConfig, LlamaForCausalLM

from rlkit.config import typed_config
from rlkit.envs import Environment, StepResult, build_environment
from rlkit.envs.base import expert_messages
from rlkit.envs.chat import TINY_CHAT_TEMPLATE
from rlkit.envs.episodes import EpisodeSettings, run_episodes
from rlkit.envs.sampling import backend_sample_fn
from rlkit.loops.episodes import episode_experience, mean_of_dicts
from rlkit.loops.registry import SamplingSettings
from rlkit.models.tiny import train_tokenizer
from rlkit.rollout import token_log_probs
from rlkit.rollout.backends import ROLLOUTS
from rlkit.validate import validate

ENV_TASKS = ("maze", "navigation", "wordle", "twenty_questions", "tool_arith")


class Guess(Environment):
    """A user's own environment (``task=env env.fn=test_env_tasks_on_cpu:Guess``)."""

    @dataclasses.dataclass
    class Options(Environment.Options):
        high: int = 9
        max_turns: int = 5

        def check(self) -> None:
            super().check()
            self.require(self.high >= 2, "high", "must be at least 2")

    def generate_row(self, rng):
        return {"number": rng.randint(1, self.options.high)}

    def reset(self, row):
        self.number, self.tries = row["number"], 0
        return "Your guess?"

    def step(self, action):
        self.tries += 1
        if action.strip() == str(self.number):
            return StepResult("Right!", 1.0, True)
        return StepResult("No.", 0.0, False)

    def state_key(self):
        return self.tries

    def expert_action(self):
        return str(self.number)


# --------------------------------------------------------------------------- config


PRESETS = [(task, "gigpo") for task in ENV_TASKS] + [
    ("maze", a) for a in ("grpo", "rloo", "ppo", "turn_ppo", "dapo", "sft")
]


@pytest.mark.parametrize("task, algo", PRESETS)
def test_environment_tasks_compose_with_the_policy_gradient_presets(config_error, task, algo):
    assert config_error(f"task={task}", f"algo={algo}") is None


def test_the_env_node_holds_the_environments_settings(compose_config):
    cfg = compose_config("task=maze", "env.size=7", "algo=gigpo")
    assert (cfg.env.name, cfg.env.size, cfg.env.max_turns, cfg.reward.name, cfg.task.name) == (
        "maze",
        7,
        12,
        "env",
        "environment",
    )
    assert (cfg.algo.advantage.name, cfg.algo.advantage.gamma, cfg.algo.advantage.omega) == ("gigpo", 0.95, 1.0)
    assert compose_config("task=maze", "env=wordle").env.name == "wordle"  # another environment, same task kind
    reloaded = typed_config(OmegaConf.create(OmegaConf.to_yaml(cfg)))  # a checkpoint's config, typed again
    assert OmegaConf.get_type(reloaded.env) is OmegaConf.get_type(cfg.env)
    validate(reloaded)


BAD = [
    (("env=maze",), "env: only an environment task has an env node; choose one with task=<name> (maze,"),
    (("task=maze", "env.sise=3"), "env.sise: environment 'maze' has no setting 'sise'; its settings: max_turns,"),
    (("task=maze", "env.sise=3", "env.sice=4"), "env.si"),  # two unknown settings of one node: still one line
    (("task=maze", "env.size=1"), "env.size=1: must be at least 2"),
    (("task=maze", "env=mase"), "env=mase: unknown option of group env; valid: custom, maze,"),
    (("task=maze", "env.max_turns=0"), "env.max_turns=0: must be at least 1"),
    (("task=tool_arith", "env.tools=abacus"), "env.tools='abacus': unknown tool 'abacus'; valid: calculator, python"),
    (("task=maze", "reward=math"), "reward=math: an environment task is rewarded by its environment"),
    (("task=arith", "+env=maze"), "env=maze: task arith is not an environment task; use task=maze,"),
    (("task=arith", "reward=env"), "reward=env: task arith is not an environment task"),
    (("task=arith", "algo=gigpo"), "algo.advantage=gigpo: it reads the turns of multi-turn episodes"),
    (("task=arith", "algo=turn_ppo"), "algo.advantage=turn_gae: it reads the turns of multi-turn episodes"),
    (("task=maze", "algo=tppo"), "algo=tppo: its loop (truncated_ppo) learns from single responses"),
    (("task=maze", "algo=online_dpo"), "its loop (online_preference) learns from single responses"),
    (("task=maze", "algo=remax"), "algo/value_source=greedy: it re-samples single responses"),
    (("task=maze", "algo=vineppo"), "algo/value_source=monte_carlo: it re-samples single responses"),
    (("task=maze", "task.system_prompt=hi"), "task.system_prompt='hi': an environment task does not read it"),
    (("task=maze", "env.max_total_tokens=600"), "env.max_total_tokens=600: the tiny model has 512 positions"),
    (("task=maze", "algo=gigpo", "algo.advantage.gamma=2"), "algo.advantage.gamma=2.0: must be in [0, 1]"),
    (("task=maze", "algo=gigpo", "algo.advantage.lam=1"), "algo.advantage.lam: advantage estimator 'gigpo' has no"),
    (("task=env",), "env.fn is required"),
    (("task=env", "env.fn=no_such_module:Env"), "env.fn='no_such_module:Env': cannot import module 'no_such_module'"),
    (("task=env", "env.fn=rlkit.envs.maze:open_moves"), "is not a subclass of rlkit.envs.Environment"),
    (
        ("task=env", "env.fn=test_env_tasks_on_cpu:Guess", "+env.options.hihg=3"),
        "env.options.hihg: unknown option; valid: high,",
    ),
    (
        ("task=env", "env.fn=test_env_tasks_on_cpu:Guess", "+env.options.high=1"),
        "env.options.high=1: must be at least 2",
    ),
]


@pytest.mark.parametrize("overrides, expected", BAD, ids=[" ".join(case[0]) for case in BAD])
def test_bad_environment_settings_are_one_line_errors_naming_the_key(config_error, overrides, expected):
    error = config_error(*overrides)
    assert error is not None and expected in error and "\n" not in error, error


def test_a_users_environment_by_module_and_class(config_error, compose_config):
    overrides = ("task=env", "env.fn=test_env_tasks_on_cpu:Guess", "+env.options.high=5", "+env.options.test_size=2")
    assert config_error(*overrides) is None
    from rlkit.tasks.environment import EnvironmentTask

    cfg = compose_config(*overrides)
    task = EnvironmentTask(cfg.task, OmegaConf.to_object(cfg.env))
    assert type(task.make_env()) is Guess and task.prototype.options.high == 5
    assert task.summary == {"env": "test_env_tasks_on_cpu:Guess"}
    held_out = {row["number"] for row in task.split("test")}
    assert len(held_out) == 2 and not held_out & {row["number"] for row in task.split("train")}


# --------------------------------------------------------------------------- the experience batch of episodes


@pytest.fixture(scope="module")
def tokenizer():
    env = build_environment("maze", {"test_size": 5})
    template = jinja2.Template(TINY_CHAT_TEMPLATE)
    corpus = [template.render(messages=expert_messages(env, r), eos_token="</s>") for r in env.rows("train", 200)]
    tok = train_tokenizer(corpus, 300)
    tok.chat_template = TINY_CHAT_TEMPLATE
    return tok


def tiny_llama(tokenizer) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return LlamaForCausalLM(config)


def sampled_group(tokenizer, model, group_size: int = 3):
    """Two maze instances, ``group_size`` sampled episodes each (adjacent), and their experience batch."""
    rows = build_environment("maze", {"test_size": 2}).rows("test", 2)
    rows = [row for row in rows for _ in range(group_size)]
    backend = ROLLOUTS.get("hf")(
        ROLLOUTS.make_settings("hf"), model=model, tokenizer=tokenizer, sampling=SamplingSettings()
    )
    limits = EpisodeSettings(max_turns=4, max_total_tokens=300, max_reply_tokens=6)
    torch.manual_seed(1)
    episodes = run_episodes(
        backend_sample_fn(backend), tokenizer, [build_environment("maze") for _ in rows], rows, limits
    )
    return episodes, episode_experience(episodes, rows, group_size, tokenizer, torch.device("cpu"))


def test_an_episodes_response_is_everything_after_its_opening_prompt(tokenizer):
    episodes, batch = sampled_group(tokenizer, tiny_llama(tokenizer))
    rollout = batch.rollout
    for row, episode in enumerate(episodes):
        prompt = rollout.prompt_ids[row][rollout.prompt_mask[row].bool()].tolist()
        length = int(rollout.response_mask[row].sum())
        assert prompt + rollout.response_ids[row, :length].tolist() == episode.token_ids
        assert rollout.response_mask[row, :length].all() and not rollout.response_mask[row, length:].any()
        assert rollout.loss_mask[row, :length].tolist() == episode.loss_mask[episode.prompt_length :]
        assert rollout.log_probs[row, :length].tolist() == pytest.approx(episode.log_probs[episode.prompt_length :])
        assert batch.turn_index[row, :length].tolist() == episode.turn_index[episode.prompt_length :]
        assert bool(rollout.truncated[row]) == (episode.truncated is not None)
    assert torch.equal(batch.response_mask, rollout.loss_mask)  # what the loss, KL and advantages cover
    assert (batch.response_mask < rollout.response_mask).any()  # observations are response tokens without loss
    assert batch.scores == [e.total_reward for e in episodes] and batch.state_keys == [e.state_keys for e in episodes]


def test_the_loops_scoring_reproduces_the_behaviour_log_probs_of_an_episode_batch(tokenizer):
    """The log-probs the update recomputes (one forward over left-padded opening prompts shared by
    each group, then the whole rest of the episode) equal those the episodes were sampled with."""
    model = tiny_llama(tokenizer)
    _, batch = sampled_group(tokenizer, model)
    rollout = batch.rollout
    with torch.no_grad():
        rescored, _ = token_log_probs(model, rollout.sequences, rollout.attention_mask, rollout.response_ids.shape[1])
    mask = batch.response_mask.bool()
    assert mask.sum() > 10
    torch.testing.assert_close(rescored[mask], rollout.log_probs[mask], atol=2e-4, rtol=0)


def test_episode_rewards_sit_on_the_ends_of_their_turns_and_sum_to_the_score(tokenizer):
    episodes, batch = sampled_group(tokenizer, tiny_llama(tokenizer))
    for episode in episodes:  # a reward on an earlier turn too, to see it stay on its own turn
        episode.turns[0].reward = 0.25
    scores = torch.tensor([e.total_reward for e in episodes])
    rewards = batch.reward_tokens(scores)
    mask = batch.response_mask
    assert rewards.sum(-1).tolist() == pytest.approx(scores.tolist())
    assert rewards[~mask.bool()].abs().sum() == 0
    for row in range(len(episodes)):
        first_turn = (batch.turn_index[row] == 0) & mask[row].bool()
        assert rewards[row, first_turn].tolist()[-1] == pytest.approx(0.25)  # the last token of turn 0
    shifted = batch.reward_tokens(scores - 1.0)  # a normalised score: the difference lands on the last token
    last = mask.shape[1] - 1 - mask.flip(-1).argmax(-1)
    assert (shifted - rewards)[torch.arange(len(scores)), last].tolist() == pytest.approx([-1.0] * len(scores))
    assert (shifted - rewards).abs().sum().item() == pytest.approx(len(scores))


def test_a_selected_group_keeps_its_episodes(tokenizer):
    episodes, batch = sampled_group(tokenizer, tiny_llama(tokenizer))
    second = batch.select_groups([1])
    assert second.episodes == episodes[3:] and torch.equal(second.turn_index, batch.turn_index[3:])
    again = type(batch).concat([batch.select_groups([0]), second], tokenizer.pad_token_id)
    assert again.episodes == episodes and torch.equal(again.rollout.loss_mask, batch.rollout.loss_mask)


def test_metrics_of_processes_average_per_key():
    assert mean_of_dicts([{"a": 1.0, "b": 2.0}, {"a": 3.0}]) == {"a": 2.0, "b": 2.0}
