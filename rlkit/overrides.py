"""The command line's overrides checked before Hydra runs the job: the config is composed once
with them, as Hydra will compose it, and a composition error becomes one line that names the
key and what is valid there (Hydra's own messages span several lines and do not list a
component's settings)."""

from __future__ import annotations

import contextlib
import re

from omegaconf import OmegaConf
from omegaconf.errors import ConfigAttributeError, ConfigKeyError

from rlkit.registry import GROUPS
from rlkit.settings import ConfigError

ENVIRONMENT_TASK_PRESETS = "maze, navigation, wordle, twenty_questions, tool_arith; env for your own"


def config_overrides(args: list[str]) -> list[str]:
    """The ``key=value`` overrides among the command's arguments (not Hydra's flags or its own keys)."""
    return [a for a in args if "=" in a and not a.startswith(("-", "hydra.", "hydra/", "+hydra", "~hydra"))]


def check_overrides(overrides: list[str]) -> None:
    """Raise :class:`ConfigError` (one line) when the config cannot be composed with ``overrides``.
    A sweep (``algo=grpo,rloo``) is composed once for each of its values."""
    from hydra import initialize_config_module
    from hydra.core.global_hydra import GlobalHydra

    initialized = GlobalHydra.instance().is_initialized()  # e.g. by a test's compose context
    with (
        contextlib.nullcontext()
        if initialized
        else initialize_config_module(config_module="rlkit.conf", version_base="1.3")
    ):
        for variant in sweep_variants(overrides):
            try:
                compose(variant)
            except Exception as error:  # noqa: BLE001  (Hydra's and OmegaConf's errors, whatever their type)
                raise ConfigError(explain(error, variant)) from None


def compose(overrides: list[str]):
    from hydra import compose as hydra_compose

    return hydra_compose("config", overrides=["run_name=check", *overrides])


def sweep_variants(overrides: list[str]) -> list[list[str]]:
    """The overrides with each sweep replaced by one of its values, each value once."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parsed = OverridesParser.create().parse_overrides(overrides)
    choices = [
        [f"{o.get_key_element()}={v}" for v in o.sweep_string_iterator()] if o.is_sweep_override() else [o.input_line]
        for o in parsed
    ]
    first = [values[0] for values in choices]
    return [first] + [first[:i] + [value] + first[i + 1 :] for i, values in enumerate(choices) for value in values[1:]]


def explain(error: Exception, overrides: list[str]) -> str:
    """One line for a composition error: an unknown setting (with the node's settings), a value of
    the wrong type, an unknown group option (with the valid ones), or Hydra's first line."""
    cause, message = error.__cause__, str(error)
    full_key = getattr(cause, "full_key", None)
    if full_key and isinstance(cause, (ConfigAttributeError, ConfigKeyError)):
        return unknown_setting(full_key, overrides)
    if full_key and type(cause).__name__ == "ValidationError":
        value = next((o.split("=", 1)[1] for o in overrides if o.lstrip("+").split("=", 1)[0] == full_key), "?")
        return f"{full_key}={value}: {str(cause).splitlines()[0]}"
    missing = re.search(r"Could not find '([^']+)/([^'/]+)'", message)
    if missing:
        group, option = missing.groups()
        options = re.findall(r"^\t(\S+)$", message, re.MULTILINE)
        return f"{group}={option}: unknown option of group {group}; valid: {', '.join(options) or '(none)'}"
    no_default = re.search(r"Could not override '([^']+)'\. No match in the defaults list", message)
    if no_default:
        group = no_default.group(1)
        registry = GROUPS.get(group)
        if registry is None:
            return f"{group}: not a config group of this config (see `rlkit train --cfg job`)"
        valid = ", ".join(registry.names())
        if not group.startswith("algo/"):  # env: an environment task's preset chooses it
            tasks = ENVIRONMENT_TASK_PRESETS
            return f"{group}: only an environment task has an {group} node; choose one with task=<name> ({tasks})"
        return f"{group}: this algo preset chooses no {registry.kind}; add one with +{group}=<name> (valid: {valid})"
    return message.strip().splitlines()[0]


def without(overrides: list[str], key: str) -> list[str]:
    """The overrides that set neither ``key`` nor anything under it."""
    return [o for o in overrides if not o.lstrip("+").startswith((f"{key}=", f"{key}."))]


def unknown_setting(full_key: str, overrides: list[str]) -> str:
    """``algo.advantage.foo: advantage estimator 'grpo' has no setting 'foo'; its settings: norm_by_std, eps``."""
    parent, _, key = full_key.rpartition(".")
    try:
        cfg = compose(without(overrides, full_key))
    except Exception:  # noqa: BLE001  (another unknown setting of the same node: show the node as composed)
        cfg = compose(without(overrides, parent))
    node = OmegaConf.select(cfg, parent) if parent else cfg
    registry = next((r for r in GROUPS.values() if r.key == parent), None)
    names = [name for name in node if registry is None or name != registry.name_field]
    if registry is None:
        owner = parent or "the config"
    elif parent == "algo":
        owner = f"algo preset '{node.name}' (loop {node.loop})"
    else:
        owner = f"{registry.kind} '{node[registry.name_field]}'"
    return f"{full_key}: {owner} has no setting '{key}'; its settings: {', '.join(names) or '(none)'}"
