"""The environment contract, its registry, and held-out instance splits.

An environment is a multi-turn task: :meth:`Environment.reset` takes a row (one
instance, a JSON-able dict) and gives the first observation; :meth:`Environment.step`
takes the model's reply as text and gives the next observation, a reward and whether
the episode is over. Everything is deterministic given the row. Each environment also
names its current state with a hashable :meth:`Environment.state_key` (GiGPO's anchor
states) and plays a scripted expert (:meth:`Environment.expert_action`) for warm-start
demonstrations.

Each environment's ``Options`` (a :class:`EnvSettings` dataclass) is an option of the ``env``
config group (``env=maze env.size=7``); ``env=custom env.fn=package.module:Class`` plays a
user's own subclass, its options under ``env.options``.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import random
from collections.abc import Hashable
from typing import Any

from omegaconf import MISSING

from rlkit.registry import Registry
from rlkit.settings import ConfigError, Settings, check_settings

ENVIRONMENTS: Registry[type[Environment]] = Registry("environment", group="env")


@dataclasses.dataclass
class EnvSettings(Settings):
    """What every environment accepts (the ``env`` node); each environment's ``Options`` extends it.
    The episode runner reads ``max_turns``, ``max_total_tokens`` and ``step_workers``; each reply
    is at most ``task.max_new_tokens`` long."""

    max_turns: int = 10  # an episode stops (truncated) after this many replies
    max_total_tokens: int = 512  # an episode's whole sequence, opening prompt included (tiny model: <= its positions)
    step_workers: int = 0  # > 0: step this many environments at a time on threads (tools that wait on subprocesses)
    test_size: int = 200  # held-out instances (the test split); training rows never repeat one
    train_size: int = 10000  # training instances drawn (an instance may repeat)
    seed: int = 0  # the data seed: instances, and which of them are held out

    def check(self) -> None:
        self.require_at_least_one("max_turns", "max_total_tokens", "test_size", "train_size")
        self.require_non_negative("step_workers")


def register_environment(name: str):
    """Class decorator: register an :class:`Environment` subclass as ``env=name``, its
    ``Options`` the settings of that config option."""

    def add(cls: type[Environment]) -> type[Environment]:
        return ENVIRONMENTS.register(name, cls.Options)(cls)

    return add


@dataclasses.dataclass
class StepResult:
    """What one :meth:`Environment.step` gives back. ``info`` may count
    ``invalid_action`` (1 when the reply was not a legal move), ``tool_calls`` and
    ``tool_errors`` (see :mod:`rlkit.envs.tools`); the episode runner sums them."""

    observation: str
    reward: float
    done: bool
    info: dict[str, Any] = dataclasses.field(default_factory=dict)


class Environment:
    """Base class. Subclasses extend ``Options`` (an :class:`EnvSettings` dataclass of the
    settings accepted under ``env``, checked by its ``check``), may set ``system_prompt``, and
    implement :meth:`generate_row`, :meth:`reset`, :meth:`step`, :meth:`state_key` and
    :meth:`expert_action`."""

    system_prompt: str | None = None  # the conversation's system message, if any

    Options = EnvSettings

    def __init__(self, options: Any = None):
        if not isinstance(options, self.Options):
            options = parse_options(self.Options, options or {})
        check_settings(options, "env")
        self.options = options

    def rows(self, split: str, size: int) -> list[dict[str, Any]]:
        """Instances of ``split`` ('train' or 'test'); see :func:`split_rows`."""
        return split_rows(self, split, size)

    def generate_row(self, rng: random.Random) -> dict[str, Any]:
        """One random instance (a JSON-able dict that :meth:`reset` accepts)."""
        raise NotImplementedError

    def reset(self, row: dict[str, Any]) -> str:
        """Start the instance ``row``; returns the first observation."""
        raise NotImplementedError

    def step(self, action: str) -> StepResult:
        """Apply the model's reply (its text, special tokens removed)."""
        raise NotImplementedError

    def state_key(self) -> Hashable:
        """The current environment state, equal for equal states within one instance."""
        raise NotImplementedError

    def expert_action(self) -> str:
        """The scripted expert's reply in the current state."""
        raise NotImplementedError

    def success(self, total_reward: float) -> bool:
        """Whether an episode with this total reward solved the instance (the held-out
        success rate); environments whose reward is 1 on success keep the default."""
        return total_reward > 0.5


def parse_options(options_cls: type, values: dict[str, Any], prefix: str = "env"):
    """An environment's options dataclass from a dict of them, rejecting unknown keys."""
    known = {f.name for f in dataclasses.fields(options_cls)} - {"name"}
    for key in values:
        if key not in known:
            raise ConfigError(f"{prefix}.{key}: unknown option; valid: {', '.join(sorted(known)) or '(none)'}")
    return options_cls(**dict(values))


@dataclasses.dataclass
class CustomEnvSettings(Settings):
    """``env=custom``: a user's own environment class and its options."""

    fn: str = MISSING  # package.module:Class, a subclass of rlkit.envs.Environment importable here
    options: dict[str, Any] = dataclasses.field(default_factory=dict)  # that class's Options (+env.options.key=value)


@ENVIRONMENTS.register("custom", CustomEnvSettings)
def custom_environment(settings: CustomEnvSettings) -> Environment:
    """The class ``env.fn`` with its options from ``env.options``."""
    cls = resolve_environment(settings.fn)
    options = parse_options(cls.Options, settings.options, "env.options")
    check_settings(options, "env.options")
    return cls(options)


def make_environment(settings) -> Environment:
    """The environment an ``env`` node (its settings dataclass) chooses."""
    return ENVIRONMENTS.get(settings.name)(settings)


def resolve_environment(spec: str) -> type[Environment]:
    """A registered name, or ``package.module:Class`` importable from the current environment."""
    if ":" not in spec:
        if spec not in ENVIRONMENTS or spec == "custom":
            valid = ", ".join(name for name in ENVIRONMENTS.names() if name != "custom")
            raise ConfigError(f"unknown environment '{spec}'; valid: {valid} (or package.module:Class)")
        return ENVIRONMENTS.get(spec)
    module_name, _, attr = spec.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        raise ConfigError(f"env.fn='{spec}': cannot import module '{module_name}': {error}") from None
    cls = getattr(module, attr, None)
    if not (isinstance(cls, type) and issubclass(cls, Environment)):
        raise ConfigError(f"env.fn='{spec}': '{attr}' in '{module_name}' is not a subclass of rlkit.envs.Environment")
    if not issubclass(cls.Options, EnvSettings):
        raise ConfigError(f"env.fn='{spec}': its Options must extend rlkit.envs.Environment.Options")
    return cls


def build_environment(spec: str, options: dict[str, Any] | None = None) -> Environment:
    """An environment by registered name or ``package.module:Class``, with options given as a dict."""
    return resolve_environment(spec)(options)


def split_rows(env: Environment, split: str, size: int) -> list[dict[str, Any]]:
    """``size`` rows of ``split`` ('train' or 'test'), reproducible from ``env.options.seed``.

    The test split is the first ``env.options.test_size`` distinct instances drawn;
    training rows are drawn after them and never repeat a test instance (as
    :mod:`rlkit.tasks.arith` does), so held-out success is measured on instances the
    policy never trained on. A test split asks for at most ``test_size`` rows.
    """
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', not '{split}'")
    rng = random.Random(env.options.seed)
    held_out = env.options.test_size
    test: dict[str, dict[str, Any]] = {}
    for _ in range(50 * held_out):
        if len(test) == held_out:
            break
        row = env.generate_row(rng)
        test.setdefault(instance_key(row), row)
    if split == "test":
        return list(test.values())[:size]
    train = []
    for _ in range(50 * size):
        if len(train) == size:
            break
        row = env.generate_row(rng)
        if instance_key(row) not in test:
            train.append(row)
    if size and not train:
        raise ConfigError("env.test_size: every instance is in the test split; make instances larger")
    return train


def instance_key(row: dict[str, Any]) -> str:
    return json.dumps(row, sort_keys=True)


def expert_messages(env: Environment, row: dict[str, Any]) -> list[dict[str, str]]:
    """The expert's episode on ``row`` as chat messages (system, then user/assistant
    turns): supervised warm-start data, or text to train a tiny model's tokenizer on
    once rendered with its chat template."""
    messages = [{"role": "system", "content": env.system_prompt}] if env.system_prompt else []
    observation = env.reset(row)
    for _ in range(env.options.max_turns):
        reply = env.expert_action()
        messages += [{"role": "user", "content": observation}, {"role": "assistant", "content": reply}]
        result = env.step(reply)
        if result.done:
            break
        observation = result.observation
    return messages
