"""Malformed data files and task options: every loader turns them into one line naming the file,
the line and the field (a ConfigError, which ``rlkit`` prints as ``rlkit: error: ...``)."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from rlkit.config import ConfigError
from rlkit.tasks import build_task
from rlkit.tasks.base import parse_options

DB = "CREATE TABLE t(x INTEGER); INSERT INTO t VALUES (1);"
HUMAN, ASSISTANT = "\n\nHuman: hi", "\n\nAssistant: "

# task -> (a good raw row, the text field the wrong-type case corrupts, task.options)
TASKS = {
    "gsm8k": ({"question": "1+1?", "answer": "1+1=2\n#### 2"}, "question", {}),
    "math": ({"problem": "1+1?", "solution": "\\boxed{2}"}, "problem", {"test_size": 2}),
    "code": ({"prompt": "def f():\n", "tests": "assert f() is None\n"}, "tests", {"test_size": 2}),
    "humaneval": (
        {"prompt": "def f():\n", "test": "def check(c):\n    pass\n", "entry_point": "f", "canonical_solution": ""},
        "entry_point",
        {"test_size": 2, "hub_split": None},
    ),
    "sql": ({"question": "how many", "db": DB, "query": "SELECT COUNT(*) FROM t"}, "db", {"test_size": 2}),
    "summarize": ({"document": "a long document", "summary": "short"}, "summary", {"test_size": 2}),
    "sentiment": (
        {"text": "a long review with far more words than the prompt shows"},
        "text",
        {"test_size": 2, "prompt_words": 4},
    ),
    "preference": ({"prompt": "q", "chosen": "good", "rejected": "bad"}, "chosen", {"test_fraction": 0.3}),
    "hh": (
        {"chosen": HUMAN + ASSISTANT + "good", "rejected": HUMAN + ASSISTANT + "bad"},
        "rejected",
        {"test_fraction": 0.3},
    ),
    "ranking": ({"prompt": "q", "responses": ["a", "b"], "scores": [1, 0]}, "prompt", {"test_fraction": 0.3}),
}


def task_cfg(name: str, path: Path, options: dict):
    return OmegaConf.create(
        {
            "name": name,
            "path": str(path),
            "prompt_template": "{question}",
            "system_prompt": None,
            "use_chat_template": False,
            "verifier": "math_answer",
            "max_new_tokens": 8,
            "max_train_rows": None,
            "options": options,
        }
    )


def write(path: Path, lines: list[bytes]) -> None:
    data = b"".join(line + b"\n" for line in lines)
    path.write_bytes(gzip.compress(data) if path.name.endswith(".gz") else data)


def load_both_splits(name: str, lines: list[bytes], tmp_path: Path, suffix: str = ".jsonl") -> None:
    """Write the rows where the task reads them (GSM8K: the test file of a directory) and load both splits."""
    _, _, options = TASKS[name]
    if name == "gsm8k":
        good = json.dumps(TASKS[name][0]).encode()
        write(tmp_path / "train.jsonl", [good] * 6)
        write(tmp_path / "test.jsonl", lines)
        path = tmp_path
    else:
        path = tmp_path / f"rows{suffix}"
        write(path, lines)
    task = build_task(task_cfg(name, path, options))
    task.split("train"), task.split("test")


def rows_with_line_3(name: str, line: bytes) -> list[bytes]:
    good = json.dumps(TASKS[name][0]).encode()
    return [good, good, line, good, good, good, good]


def one_line_error(name: str, lines: list[bytes], tmp_path: Path, suffix: str = ".jsonl") -> str:
    with pytest.raises(ConfigError) as error:
        load_both_splits(name, lines, tmp_path, suffix)
    message = str(error.value)
    assert "\n" not in message and message.startswith("task.path"), message
    return message


@pytest.mark.parametrize("name", TASKS)
def test_good_rows_load(name: str, tmp_path: Path):
    load_both_splits(name, rows_with_line_3(name, json.dumps(TASKS[name][0]).encode()), tmp_path)


@pytest.mark.parametrize("name", TASKS)
def test_a_field_of_the_wrong_type(name: str, tmp_path: Path):
    row, field, _ = TASKS[name]
    bad = json.dumps({**row, field: [row[field]]}).encode()  # a list where text belongs
    message = one_line_error(name, rows_with_line_3(name, bad), tmp_path)
    assert f"line 3: field '{field}' is a list" in message and ".jsonl'" in message, message


@pytest.mark.parametrize("name", TASKS)
def test_bytes_that_are_not_utf8(name: str, tmp_path: Path):
    bad = json.dumps(TASKS[name][0]).encode().replace(b'"', b'"\xff\xfe', 1)
    assert "line 3: not UTF-8 text" in one_line_error(name, rows_with_line_3(name, bad), tmp_path)


@pytest.mark.parametrize("name", TASKS)
def test_a_line_that_is_not_json_or_not_an_object(name: str, tmp_path: Path):
    assert "line 3: not valid JSON" in one_line_error(name, rows_with_line_3(name, b'{"cut short'), tmp_path)
    assert "line 3: a row must be a JSON object, not a list" in one_line_error(
        name, rows_with_line_3(name, b"[1, 2]"), tmp_path
    )


@pytest.mark.parametrize("name", TASKS)
def test_an_empty_file(name: str, tmp_path: Path):
    assert "has no rows (the file is empty)" in one_line_error(name, [], tmp_path)
    assert "has no rows (the file is empty)" in one_line_error(name, [b"", b"  "], tmp_path)


@pytest.mark.parametrize("name", [n for n in TASKS if n != "gsm8k"])  # GSM8K reads plain train/test.jsonl
def test_a_cut_short_gzip_file(name: str, tmp_path: Path):
    path = tmp_path / "rows.jsonl.gz"
    write(path, rows_with_line_3(name, json.dumps(TASKS[name][0]).encode()) * 50)
    path.write_bytes(path.read_bytes()[: len(path.read_bytes()) * 2 // 3])
    with pytest.raises(ConfigError) as error:
        build_task(task_cfg(name, path, TASKS[name][2])).split("train")
    message = str(error.value)
    assert "rows.jsonl.gz' is not a complete gzip file" in message and "\n" not in message, message


def test_a_column_whose_type_changes_between_rows_names_both_lines(tmp_path: Path):
    row = TASKS["math"][0]
    lines = [json.dumps({**row, "meta": {"a": 1}}).encode()] * 3 + [json.dumps({**row, "meta": "text"}).encode()] * 3
    message = one_line_error("math", lines, tmp_path)
    assert "line 4: field 'meta' is text, but an object on line 1" in message, message


def test_a_code_row_without_tests_names_its_line(tmp_path: Path):
    good = json.dumps(TASKS["code"][0]).encode()
    message = one_line_error("code", [good, json.dumps({"prompt": "def g():\n"}).encode(), good, good], tmp_path)
    assert "line 2: rows need prompt, test and entry_point" in message, message


def test_sentiment_text_files_that_are_empty_or_not_utf8(tmp_path: Path):
    reviews = tmp_path / "reviews.txt"
    reviews.write_bytes(b"")
    with pytest.raises(ConfigError, match="reviews.txt' has no text"):
        build_task(task_cfg("sentiment", reviews, {"test_size": 1})).split("train")
    reviews.write_bytes(b"a fine review\nbad \xff byte here\n")
    with pytest.raises(ConfigError, match=r"reviews.txt' line 2: not UTF-8 text \(byte 0xff at column 5\)"):
        build_task(task_cfg("sentiment", reviews, {"test_size": 1})).split("train")


@pytest.mark.parametrize(
    "options, message",
    [
        ({"min_digits": "two"}, "task.options.min_digits='two' must be an integer"),
        ({"operators": 5}, "task.options.operators=5 must be text"),
        ({"train_size": 1.5}, "task.options.train_size=1.5 must be an integer"),
        ({"seed": True}, "task.options.seed=True must be an integer"),
    ],
)
def test_task_options_of_the_wrong_type(options: dict, message: str):
    from rlkit.tasks.arith import ArithTask

    with pytest.raises(ConfigError) as error:
        parse_options(ArithTask.Options, options)
    assert str(error.value) == message


def test_option_types_accept_ints_for_floats_and_null_where_optional():
    from rlkit.tasks.code import CodeTask
    from rlkit.tasks.preference import PreferenceTask

    assert parse_options(PreferenceTask.Options, {"test_fraction": 0}).test_fraction == 0
    assert parse_options(CodeTask.Options, {"hub_split": None}).hub_split is None
    with pytest.raises(ConfigError, match="must be a number"):
        parse_options(PreferenceTask.Options, {"test_fraction": "0.1"})


@pytest.mark.parametrize(
    "template, message",
    [
        ("{problem}=", "task.prompt_template refers to 'problem'"),
        ("{question", "is not a valid template"),
        ("{0}", "is not a valid template"),
    ],
)
def test_a_bad_prompt_template_fails_when_the_data_loads(template: str, message: str):
    cfg = task_cfg("arith", Path("unused"), {"train_size": 20, "test_size": 5})
    cfg.path, cfg.prompt_template = None, template
    with pytest.raises(ConfigError, match=message):
        build_task(cfg).split("test")


@pytest.mark.parametrize("name", TASKS)
def test_a_hub_id_the_hub_does_not_give_is_one_line(name: str, monkeypatch):
    """Offline (or an id that does not exist): datasets raises ConnectionError / DatasetNotFoundError."""
    import datasets

    def unreachable(path, *args, **kwargs):
        raise ConnectionError(f"Couldn't reach '{path}' on the Hub (LocalEntryNotFoundError)")

    monkeypatch.setattr(datasets, "load_dataset", unreachable)
    task = build_task(task_cfg(name, "someone/data", TASKS[name][2]))
    with pytest.raises(
        ConfigError, match=r"^task.path='someone/data': not a local file or directory, and the Hugging Face Hub did"
    ):
        task.split("train")
