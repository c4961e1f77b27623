"""The reward registry and weighted composition of reward terms."""

from __future__ import annotations

import functools
import importlib
import inspect
import logging
import math
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from multiprocessing.pool import ThreadPool
from typing import Any

from rlkit.registry import Registry
from rlkit.settings import ConfigError

RewardFn = Callable[..., list[float]]
REWARDS: Registry[RewardFn] = Registry("reward")
log = logging.getLogger(__name__)


def resolve_reward_fn(spec: str) -> RewardFn:
    """A registered name, or ``package.module:function`` importable from the current environment."""
    if ":" not in spec:
        return REWARDS.get(spec)
    module_name, _, attr = spec.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        raise ValueError(f"cannot import reward module '{module_name}': {error}") from None
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise ValueError(f"'{spec}': module '{module_name}' has no function '{attr}'")
    return fn


def needs(check: Callable[[], None]):
    """Mark a reward function with what it needs of this machine: ``check`` raises (one line)
    when it is missing. A run calls it when it builds the reward, before any model."""

    def mark(fn: RewardFn) -> RewardFn:
        fn.preflight = check
        return fn

    return mark


@dataclass
class RewardTermFn:
    name: str
    fn: RewardFn
    weight: float
    workers: int = (
        0  # > 0: score each sample in its own call, this many at a time on threads (rewards that wait on subprocesses)
    )
    timeout: float | None = None  # with workers: seconds one sample may take; later ones count as failures
    failure_value: float = 0.0  # the score of a sample whose reward raised, timed out or returned None, NaN or +-inf

    def __post_init__(self):
        check = getattr(getattr(self.fn, "func", self.fn), "preflight", None)  # through functools.partial (args)
        if check is not None:
            try:
                check()
            except Exception as error:  # noqa: BLE001  (whatever the check raises: this machine cannot run it)
                raise ConfigError(f"reward '{self.name}' cannot run here: {error}") from None

    def __call__(self, prompts: list[str], completions: list[str], **fields: list[Any]) -> list[float | None]:
        """Call with the row fields the function accepts (all of them if it takes ``**kwargs``);
        None marks a sample the function could not score."""
        parameters = inspect.signature(self.fn).parameters.values()
        if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters):
            names = {p.name for p in parameters}
            fields = {k: v for k, v in fields.items() if k in names}
        return [None if s is None else float(s) for s in self.fn(prompts, completions, **fields)]

    def score(
        self, prompts: list[str], completions: list[str], **fields: list[Any]
    ) -> tuple[list[float | None], list[BaseException]]:
        """Like calling the term, but a raised exception or a time-out fails only the samples
        it concerns: (scores with None for each failed sample, the errors seen)."""
        if not self.workers:
            try:
                return list(self(prompts, completions, **fields)), []
            except Exception as error:  # noqa: BLE001  (any reward bug must not end the run)
                return [None] * len(completions), [error]
        calls = [
            self.pool.apply_async(self, ([p], [c]), {k: v[i : i + 1] for k, v in fields.items()})
            for i, (p, c) in enumerate(zip(prompts, completions))
        ]
        # Samples queue for a worker, so the wait is per round of `workers` samples.
        deadline = time.monotonic() + self.timeout * math.ceil(len(calls) / self.workers) if self.timeout else None
        scores, errors = [], []
        for call in calls:
            try:
                scores.append(call.get(None if deadline is None else max(0.0, deadline - time.monotonic()))[0])
            except Exception as error:  # noqa: BLE001
                scores.append(None)
                errors.append(error)
        return scores, errors

    @functools.cached_property
    def pool(self) -> ThreadPool:
        return ThreadPool(self.workers)  # daemon threads: a reward stuck past its timeout cannot block the run's exit


class CompositeReward:
    """Weighted sum of named reward terms; each term's scores are kept for logging."""

    def __init__(self, terms: Sequence[RewardTermFn]):
        if not terms:
            raise ValueError("reward has no terms: set reward.terms or reward.fn")
        self.terms = list(terms)
        self.failures: Counter[str] = Counter()

    def __call__(
        self, prompts: list[str], completions: list[str], **row_fields: list[Any]
    ) -> tuple[list[float], dict[str, list[float]]]:
        """Returns (total per sample, {term name: scores per sample}). A sample whose term
        failed (raised, timed out, gave None, NaN or +-inf) scores the term's ``failure_value``;
        failures are logged and counted in :attr:`failures`."""
        per_term = {}
        for term in self.terms:
            scores, errors = term.score(prompts, completions, **row_fields)
            if len(scores) != len(completions):
                raise ValueError(
                    f"reward '{term.name}' returned {len(scores)} scores for {len(completions)} completions"
                )
            failed = [s is None or not math.isfinite(s) for s in scores]
            if any(failed):
                self.failures[term.name] += sum(failed)
                log.warning(
                    "reward '%s' failed on %d of %d samples, scored %s (first: %s)",
                    term.name,
                    sum(failed),
                    len(scores),
                    term.failure_value,
                    first_failure(scores, errors),
                )
            per_term[term.name] = [term.failure_value if bad else float(s) for s, bad in zip(scores, failed)]
        totals = [sum(t.weight * per_term[t.name][i] for t in self.terms) for i in range(len(completions))]
        return totals, per_term

    def pop_failures(self) -> dict[str, int]:
        """Failed samples per term since the last call (every term, zeros included)."""
        counts = {term.name: self.failures[term.name] for term in self.terms}
        self.failures.clear()
        return counts


def first_failure(scores: list[float | None], errors: list[BaseException]) -> str:
    if errors:
        return f"{type(errors[0]).__name__}: {errors[0]}"
    return next(f"returned {s}" for s in scores if s is None or not math.isfinite(s))


class EnvironmentRewards:
    """``reward=env``: an environment task's environment rewards each turn as it steps (rlkit/envs);
    no reward function is called and none fails."""

    def __call__(self, *args, **kwargs):
        raise TypeError("reward=env: an environment task's rewards come from its environment, not from responses")

    def pop_failures(self) -> dict[str, int]:
        return {}


def build_reward(reward_cfg) -> CompositeReward:
    """From the ``reward`` config node: ``fn`` alone if given, else the weighted ``terms``."""
    if reward_cfg.fn:
        return CompositeReward([RewardTermFn(reward_cfg.fn.rpartition(":")[2], resolve_reward_fn(reward_cfg.fn), 1.0)])
    terms = []
    for name, term in reward_cfg.terms.items():
        fn = resolve_reward_fn(term["fn"])
        if term.get("args"):
            fn = functools.partial(fn, **dict(term["args"]))
        terms.append(
            RewardTermFn(
                name,
                fn,
                float(term.get("weight", 1.0)),
                int(term.get("workers", 0)),
                term.get("timeout"),
                float(term.get("failure_value", 0.0)),
            )
        )
    return CompositeReward(terms)


REWARD_TERM_KEYS = ("fn", "weight", "args", "workers", "timeout", "failure_value")


def check_reward_term(key: str, term) -> None:
    """A ``reward.terms.<name>`` node: known keys of the right types (one-line ConfigError otherwise)."""
    if not hasattr(term, "keys"):
        raise ConfigError(f"{key} must be a mapping like {{fn: math_answer, weight: 1.0}}")
    unknown = sorted(set(term.keys()) - set(REWARD_TERM_KEYS))
    if unknown:
        raise ConfigError(f"{key}.{unknown[0]}: unknown key; valid: {', '.join(REWARD_TERM_KEYS)}")
    if not isinstance(term.get("fn"), str):
        raise ConfigError(f"{key}.fn is required: a registered reward name or 'package.module:function'")
    if not isinstance(term.get("weight", 1.0), (int, float)) or not math.isfinite(term.get("weight", 1.0)):
        raise ConfigError(f"{key}.weight={term.get('weight')!r} must be a finite number")
    if not hasattr(term.get("args", {}), "keys"):
        raise ConfigError(f"{key}.args must be a mapping of keyword arguments")
    workers = term.get("workers", 0)
    if not isinstance(workers, int) or workers < 0:
        raise ConfigError(f"{key}.workers={workers!r} must be a non-negative integer (0 = score the batch in one call)")
    timeout = term.get("timeout")
    if timeout is not None and (not isinstance(timeout, (int, float)) or timeout <= 0 or not workers):
        raise ConfigError(
            f"{key}.timeout={timeout!r} must be a positive number of seconds, and needs {key}.workers >= 1"
        )
    failure_value = term.get("failure_value", 0.0)
    if not isinstance(failure_value, (int, float)) or not math.isfinite(failure_value):
        raise ConfigError(f"{key}.failure_value={failure_value!r} must be a finite number")
