"""Name -> component registries, filled by decorators.

Every pluggable building block (advantage estimators, policy losses, value sources, loops,
rollout backends, rewards, tasks, ...) lives in a :class:`Registry`, so a new variant is one
decorated function or class plus one YAML. A registry with a config ``group`` also makes each
component's settings (a :class:`rlkit.settings.Settings` dataclass) an option of that Hydra
config group, so ``algo/advantage=rloo`` selects the component together with its settings.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

from rlkit.settings import Settings

F = TypeVar("F", bound=Callable)


class UnknownNameError(KeyError):
    """Raised for a name that is not registered; the message lists the valid ones."""

    def __str__(self) -> str:  # KeyError quotes its message; we want plain text
        return str(self.args[0])


GROUPS: dict[str, Registry] = {}  # config group (e.g. "algo/advantage") -> the registry whose settings are its options


class Registry(Generic[F]):
    def __init__(self, kind: str, group: str | None = None, *, key: str | None = None, name_field: str = "name"):
        self.kind = kind
        self.group = group  # the Hydra config group whose options are this registry's settings
        self.key = key or (group or "").replace("/", ".")  # where the chosen component's settings sit in the config
        self.name_field = name_field  # the settings field that holds the registered name
        if group:
            GROUPS[group] = self
        self._entries: dict[str, F] = {}
        self._settings: dict[str, type[Settings]] = {}

    def register(self, name: str, settings: type[Settings] | None = None) -> Callable[[F], F]:
        """Register a component under ``name``, reading ``settings`` (none: just ``name``)."""

        def add(fn: F) -> F:
            if name in self._entries:
                raise ValueError(f"{self.kind} '{name}' is already registered")
            self._entries[name] = fn
            self._settings[name] = settings or Settings
            if self.group:
                store_option(self.group, name, settings or Settings, self.kind, self.name_field)
            return fn

        return add

    def get(self, name: str) -> F:
        if name not in self._entries:
            raise UnknownNameError(f"unknown {self.kind} '{name}'; valid: {', '.join(self.names())}")
        return self._entries[name]

    def settings(self, name: str) -> type[Settings]:
        self.get(name)
        return self._settings[name]

    def make_settings(self, name: str, **values) -> Settings:
        """The settings of component ``name``: its defaults, with ``values`` (for use from Python)."""
        return self.settings(name)(**{self.name_field: name, **values})

    def names(self) -> list[str]:
        return sorted(self._entries)

    def __contains__(self, name: str) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())


def store_option(group: str, name: str, settings: type[Settings], kind: str, name_field: str = "name") -> None:
    """Make ``settings`` (with ``name`` in its ``name_field``) the option ``name`` of config group ``group``."""
    from hydra.core.config_store import ConfigStore
    from omegaconf import OmegaConf

    if not dataclasses.is_dataclass(settings) or not issubclass(settings, Settings):
        raise TypeError(f"{kind} '{name}': settings must be a Settings dataclass, not {settings!r}")
    node = OmegaConf.structured(settings)
    node[name_field] = name
    ConfigStore.instance().store(group=group, name=name, node=node)
