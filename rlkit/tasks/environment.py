"""Environment tasks: the rows are instances of a multi-turn environment (:mod:`rlkit.envs`), the
``env`` node chooses which, and rewards come from the environment as it steps (``reward=env``).
``task=maze``, ``navigation``, ``wordle``, ``twenty_questions`` and ``tool_arith`` are its presets,
``task=env env.fn=package.module:Class`` plays a user's own environment."""

from __future__ import annotations

from collections.abc import Iterator

import datasets
import jinja2
import torch

from rlkit.envs import Environment, make_environment
from rlkit.envs.base import expert_messages
from rlkit.envs.chat import TINY_CHAT_TEMPLATE
from rlkit.envs.episodes import EpisodeSettings, episodes_to_tensors, run_expert_episodes
from rlkit.models.tiny import SPECIAL_TOKENS
from rlkit.settings import ConfigError
from rlkit.tasks.base import TASKS, Task


@TASKS.register("environment")
class EnvironmentTask(Task):
    """Held-out instances are ``env.test_size`` instances no training row repeats (``env.seed``);
    ``env.train_size`` training rows. Each reply is at most ``task.max_new_tokens`` long; the
    tiny model's tokenizer learns the experts' conversations in :data:`TINY_CHAT_TEMPLATE`."""

    evaluation = "episodes"
    samples = "episodes"
    chat_template = TINY_CHAT_TEMPLATE

    def __init__(self, task_cfg, env_settings):
        super().__init__(task_cfg)
        self.env_settings = env_settings
        self.prototype = self.make_env()
        name = env_settings.name
        self.summary = {"env": env_settings.fn if name == "custom" else name}

    def make_env(self) -> Environment:
        """A fresh environment (one per episode: environments hold the state of the instance they play)."""
        return make_environment(self.env_settings)

    def check_tokenizer(self, tokenizer) -> None:
        """Episodes are laid out by the tokenizer's chat template: it must have one."""
        if not getattr(tokenizer, "chat_template", None):
            raise ConfigError(
                f"model.name_or_path={tokenizer.name_or_path}: its tokenizer has no chat template, "
                "by which an environment task's episodes are laid out"
            )

    def episode_settings(self) -> EpisodeSettings:
        options = self.prototype.options
        return EpisodeSettings(
            max_turns=options.max_turns,
            max_total_tokens=options.max_total_tokens,
            max_reply_tokens=self.cfg.max_new_tokens,
            step_workers=options.step_workers,
        )

    def load_split(self, split: str) -> datasets.Dataset:
        options = self.prototype.options
        size = options.test_size if split == "test" else options.train_size
        return datasets.Dataset.from_list(self.prototype.rows(split, size))

    def check_row(self, row: dict) -> None:
        """Nothing to check: the prompts are the environment's observations, not ``task.prompt_template``."""

    def corpus(self, rows) -> Iterator[str]:
        """The experts' conversations on ``rows``, rendered with :data:`TINY_CHAT_TEMPLATE`."""
        template = jinja2.Template(TINY_CHAT_TEMPLATE)
        for row in rows:
            yield template.render(messages=expert_messages(self.make_env(), row), eos_token=SPECIAL_TOKENS["eos_token"])

    def supervised_batch(self, run, rows: list[dict], device) -> dict[str, torch.Tensor]:
        """The experts' episodes on ``rows`` in the token layout of sampled ones, the loss on their replies."""
        episodes = run_expert_episodes(run.tokenizer, [self.make_env() for _ in rows], rows, self.episode_settings())
        tensors = episodes_to_tensors(episodes, run.tokenizer.pad_token_id)
        return {key: tensors[key].to(device) for key in ("input_ids", "attention_mask", "loss_mask")}
