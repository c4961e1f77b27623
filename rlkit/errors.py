"""Errors that end a run with one line instead of a traceback."""

from __future__ import annotations


class RunError(RuntimeError):
    """A run that cannot go on (no intact checkpoint, training stuck on non-finite numbers, ...);
    ``rlkit`` prints the message as one line and exits 1. Mistakes in the config are
    :class:`rlkit.config.ConfigError` (exit 2)."""
