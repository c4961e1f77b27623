"""Settings of registered components: each component (an advantage estimator, a policy loss, a
value source, a loop, a rollout backend, ...) declares a small dataclass of the settings it
reads and checks them itself.

A component's settings become a Hydra config group option (``algo/advantage=rloo``), so the
composed config holds, under each role, exactly the settings of the component chosen for it:
a setting of another component is refused while composing, a wrong type too. What typing
cannot say (ranges, names from other registries) each dataclass says in :meth:`Settings.check`,
which :func:`check_settings` runs over the whole config before any model is built.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from typing import Any

from omegaconf import MISSING


class ConfigError(ValueError):
    """A config value that cannot work; the message names the key."""


class SettingError(ValueError):
    """Raised by :meth:`Settings.check` for one of its own settings (``key`` relative to it)."""

    def __init__(self, key: str, message: str):
        super().__init__(message)
        self.key = key


class Checked:
    """A settings dataclass that checks its own values (:meth:`check`); helpers name the key."""

    def check(self) -> None:
        """Raise :class:`SettingError` for a value that cannot work (called once, before training)."""

    def require(self, condition: bool, key: str, message: str) -> None:
        if not condition:
            raise SettingError(key, message)

    def require_positive(self, *keys: str) -> None:
        for key in keys:
            self.require(_value(self, key) > 0, key, "must be positive")

    def require_at_least_one(self, *keys: str) -> None:
        for key in keys:
            self.require(_value(self, key) >= 1, key, "must be at least 1")

    def require_non_negative(self, *keys: str) -> None:
        for key in keys:
            self.require(_value(self, key) >= 0, key, "must not be negative")

    def require_choice(self, key: str, choices: Iterable) -> None:
        choices = list(choices)
        self.require(_value(self, key) in choices, key, f"must be one of: {', '.join(map(str, choices))}")


@dataclasses.dataclass
class Settings(Checked):
    """Base of every component's settings. ``name`` is the registered name of the component."""

    name: str = MISSING


def _value(settings: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        settings = getattr(settings, part)
    return settings


def check_settings(settings: Any, path: str = "") -> None:
    """Run :meth:`Checked.check` on ``settings`` (a dataclass instance made from the config node at
    ``path``) and on every settings object nested in it, parents first; a failure becomes a
    :class:`ConfigError` naming the full key and its value (a component by its name)."""
    if isinstance(settings, Checked):
        try:
            settings.check()
        except SettingError as error:
            value = _value(settings, error.key)
            shown = value.name if isinstance(value, Settings) else repr(value)
            raise ConfigError(f"{_join(path, error.key)}={shown}: {error}") from None
    if dataclasses.is_dataclass(settings):
        for field in dataclasses.fields(settings):
            check_settings(getattr(settings, field.name), _join(path, field.name))


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key
