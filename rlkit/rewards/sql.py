"""Text-to-SQL by execution: run the predicted and the gold query on the row's
SQLite database and compare their results (execution accuracy, as in Spider/BIRD)."""

from __future__ import annotations

import re
import sqlite3
import time
from collections import Counter

from rlkit.rewards.registry import REWARDS

_FENCED = re.compile(r"```[ \t]*(?:sql|sqlite)?[ \t]*\n(.*?)(?:```|$)", re.DOTALL | re.IGNORECASE)
# What a predicted query may do: read tables and call functions. Writes, ATTACH (which
# creates files on the host), PRAGMA and everything else are refused by SQLite itself.
_ALLOWED = {sqlite3.SQLITE_SELECT, sqlite3.SQLITE_READ, sqlite3.SQLITE_FUNCTION, sqlite3.SQLITE_RECURSIVE}


def extract_sql(completion: str) -> str:
    """The query of a completion: a fenced block if there is one, up to its first ``;``."""
    match = _FENCED.search(completion)
    text = match.group(1) if match else completion
    return text.split(";", 1)[0].strip()


def execute(db: str, query: str, timeout: float = 2.0) -> list[tuple]:
    """Rows of ``query`` on a fresh in-memory database built by the ``db`` script.
    The query may only read; it is interrupted after ``timeout`` seconds (raises sqlite3.Error)."""
    connection = sqlite3.connect(":memory:")
    try:
        connection.executescript(db)
        deadline = time.monotonic() + timeout
        connection.set_progress_handler(lambda: int(time.monotonic() > deadline), 10_000)
        connection.set_authorizer(lambda action, *_: sqlite3.SQLITE_OK if action in _ALLOWED else sqlite3.SQLITE_DENY)
        return connection.execute(query).fetchall()
    finally:
        connection.close()


def overlap_f1(predicted: Counter, gold: Counter) -> float:
    """F1 of two multisets."""
    common = sum((predicted & gold).values())
    if not common:
        return 0.0
    precision, recall = common / sum(predicted.values()), common / sum(gold.values())
    return 2 * precision * recall / (precision + recall)


def result_score(predicted: list[tuple], gold: list[tuple], partial: bool) -> float:
    """1.0 for the same rows (as a multiset: row order is not compared); with ``partial``,
    otherwise the mean of row-overlap F1 and column-overlap F1 (columns compared by their
    multiset of values, so names and order do not matter)."""
    if Counter(predicted) == Counter(gold):
        return 1.0
    if not partial:
        return 0.0
    columns = lambda rows: Counter(tuple(sorted(map(repr, column))) for column in zip(*rows))  # noqa: E731
    return (overlap_f1(Counter(predicted), Counter(gold)) + overlap_f1(columns(predicted), columns(gold))) / 2


@REWARDS.register("sql_execution")
def sql_execution_reward(
    prompts: list[str],
    completions: list[str],
    db: list[str],
    query: list[str],
    *,
    partial: bool = False,
    timeout: float = 2.0,
) -> list[float]:
    """1.0 where the completion's query returns the gold ``query``'s rows on the row's
    database ``db`` (a SQL script building it), else 0.0 (a query that fails or writes
    scores 0); ``partial=true`` gives partial credit for overlapping rows and columns."""
    scores = []
    for completion, script, gold_query in zip(completions, db, query):
        gold = execute(script, gold_query, timeout)
        try:
            predicted = execute(script, extract_sql(completion), timeout)
        except (sqlite3.Error, sqlite3.Warning, ValueError, OverflowError):
            scores.append(0.0)
            continue
        scores.append(result_score(predicted, gold, partial))
    return scores
