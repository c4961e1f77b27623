"""Text-to-SQL over SQLite. Each row carries ``db`` (a SQL script that builds and fills
its database), ``schema`` (the ``CREATE TABLE`` statements the prompt shows),
``question`` and the gold ``query``; the reward runs both queries (rlkit.rewards.sql).

``task.path``: a JSONL file or directory (rows with question, db, query and optionally
schema) or a hub id; null generates seeded synthetic problems over small random tables,
small enough for the tiny model.
"""

from __future__ import annotations

import dataclasses
import random
import re

import datasets

from rlkit.settings import ConfigError
from rlkit.tasks.base import TASKS, Task
from rlkit.tasks.sources import OPTIONAL_TEXT, TEXT, SourceOptions, load_split

NAMES = ["ann", "bob", "cy", "dan", "eve", "fay", "gus", "hal", "ida", "jo", "kim", "lu"]
CITIES = ["oslo", "rome", "lima", "kyiv", "pune"]
SCHEMA = "CREATE TABLE people(name TEXT, age INTEGER, city TEXT);"

# (question, gold query); {age} and {city} are drawn per problem.
TEMPLATES = [
    ("names of people older than {age}", "SELECT name FROM people WHERE age > {age}"),
    ("names of people younger than {age}", "SELECT name FROM people WHERE age < {age}"),
    ("names of people in {city}", "SELECT name FROM people WHERE city = '{city}'"),
    ("how many people live in {city}", "SELECT COUNT(*) FROM people WHERE city = '{city}'"),
    ("how many people are older than {age}", "SELECT COUNT(*) FROM people WHERE age > {age}"),
    ("the oldest person", "SELECT name FROM people ORDER BY age DESC LIMIT 1"),
    ("the youngest person", "SELECT name FROM people ORDER BY age ASC LIMIT 1"),
    ("the age of the oldest person in {city}", "SELECT MAX(age) FROM people WHERE city = '{city}'"),
]


def synthetic_problem(rng: random.Random, num_people: int) -> dict[str, str]:
    """A random ``people`` table and a templated question about it."""
    people = [(name, rng.randint(18, 80), rng.choice(CITIES)) for name in rng.sample(NAMES, num_people)]
    db = SCHEMA + "\nINSERT INTO people VALUES " + ", ".join(f"('{n}', {a}, '{c}')" for n, a, c in people) + ";"
    question, query = rng.choice(TEMPLATES)
    values = {"age": rng.randint(20, 70), "city": rng.choice([c for _, _, c in people])}
    return {"question": question.format(**values), "schema": SCHEMA, "db": db, "query": query.format(**values)}


@TASKS.register("sql")
class SQLTask(Task):
    @dataclasses.dataclass
    class Options(SourceOptions):
        train_size: int = 5000  # synthetic problems (task.path null)
        test_size: int = 200  # synthetic test problems, or rows held out of a single-file source
        num_people: int = 6  # rows of each synthetic table
        seed: int = 0  # data seed (synthetic problems and the held-out split), independent of the training seed

    def __init__(self, task_cfg):
        super().__init__(task_cfg)
        if not 1 <= self.options.num_people <= len(NAMES):
            raise ConfigError(f"task.options.num_people={self.options.num_people} must be in 1..{len(NAMES)}")

    def load_split(self, split: str) -> datasets.Dataset:
        o = self.options
        if self.cfg.path is None:
            rng = random.Random(f"{o.seed}-{split}")
            rows = [
                synthetic_problem(rng, o.num_people) for _ in range(o.test_size if split == "test" else o.train_size)
            ]
            return datasets.Dataset.from_list([sql_row(r) for r in rows])
        rows = load_split(
            self.cfg.path, split, o, {"question": TEXT, "db": TEXT, "query": TEXT, "schema": OPTIONAL_TEXT}
        )
        missing = {"question", "db", "query"} - set(rows.column_names)
        if missing:
            raise ConfigError(
                f"task.path='{self.cfg.path}': rows lack {sorted(missing)}; SQL rows have question, db (a SQL "
                "script) and query"
            )
        return rows.map(sql_row, desc=f"sql {split}")


def sql_row(row: dict) -> dict:
    """Fill ``schema`` (the db script's CREATE TABLE statements) and the answer columns."""
    schema = row.get("schema") or "\n".join(re.findall(r"CREATE TABLE[^;]*;", row["db"], re.IGNORECASE))
    return {**row, "schema": schema, "answer": row["query"], "solution": row["query"] + ";"}
