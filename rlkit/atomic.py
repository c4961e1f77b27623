"""Crash-safe writes: every file and directory rlkit creates or rewrites goes through here.

A file is written under a temporary name in its own directory, flushed and fsync'ed, renamed over
its destination (a rename within a directory is atomic on POSIX file systems) and the directory
fsync'ed: a kill or a power cut leaves the old file or the new one, never a mix or an empty file.
A directory (a saved model) is written whole under a temporary name, fsync'ed and renamed.

Test hook: ``RLKIT_TEST_KILL_AT=<name>[@<n>]`` SIGKILLs the process just before the n-th (default:
first) rename onto a destination named ``<name>`` (or at :func:`kill_point` ``<name>``), so that a
test can kill a run inside any write it performs, deterministically.
"""

from __future__ import annotations

import collections
import contextlib
import json
import os
import shutil
import signal
from collections.abc import Callable, Iterator
from typing import IO, Any

KILL_ENV = "RLKIT_TEST_KILL_AT"
_kill_points_seen: collections.Counter[str] = collections.Counter()


def kill_point(name: str) -> None:
    """SIGKILL this process here if ``RLKIT_TEST_KILL_AT`` names this point (tests only)."""
    wanted = os.environ.get(KILL_ENV)
    if not wanted:
        return
    target, _, nth = wanted.partition("@")
    if target != name:
        return
    _kill_points_seen[name] += 1
    if _kill_points_seen[name] == int(nth or 1):
        os.kill(os.getpid(), signal.SIGKILL)


def fsync_directory(path: str) -> None:
    """Make a rename or a new entry in ``path`` durable."""
    descriptor = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def fsync_tree(path: str) -> None:
    """fsync every file and directory under ``path`` (files written by other libraries)."""
    for directory, _, files in os.walk(path, topdown=False):
        for name in files:
            descriptor = os.open(os.path.join(directory, name), os.O_RDONLY)
            try:
                os.fsync(descriptor)
            finally:
                os.close(descriptor)
        fsync_directory(directory)


def temporary_path(path: str) -> str:
    """Where :func:`atomic_open` writes ``path`` before the rename (left behind by a kill)."""
    directory, name = os.path.split(os.path.abspath(path))
    return os.path.join(directory, f".{name}.tmp")


@contextlib.contextmanager
def atomic_open(path: str, mode: str = "w", **kwargs: Any) -> Iterator[IO]:
    """``open(path, mode)`` whose content replaces ``path`` only once the block completes."""
    directory, name = os.path.split(os.path.abspath(path))
    tmp = temporary_path(path)
    try:
        with open(tmp, mode, **kwargs) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        kill_point(name)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        raise
    fsync_directory(directory)


def write_text(path: str, text: str) -> None:
    with atomic_open(path, "w", encoding="utf-8") as f:
        f.write(text)


def write_json(path: str, value: Any) -> None:
    write_text(path, json.dumps(value, indent=2) + "\n")


def publish_directory(tmp: str, directory: str) -> None:
    """Make the complete directory ``tmp`` durable and rename it to ``directory``, replacing any old one."""
    directory = directory.rstrip("/")
    old = directory + ".old"
    fsync_tree(tmp)
    kill_point(os.path.basename(directory))
    shutil.rmtree(old, ignore_errors=True)
    if os.path.exists(directory):
        os.replace(directory, old)
    os.replace(tmp, directory)
    fsync_directory(os.path.dirname(os.path.abspath(directory)))
    shutil.rmtree(old, ignore_errors=True)


def replace_directory(directory: str, write: Callable[[str], Any]) -> None:
    """``write(tmp)`` fills a temporary directory, which then replaces ``directory`` whole."""
    tmp = directory.rstrip("/") + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    write(tmp)
    publish_directory(tmp, directory)
