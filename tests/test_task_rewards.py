"""Tasks beyond arithmetic and their rewards: math-verify, SQL execution, ROUGE/BLEU,
sentiment, rule rewards, the reward worker pool with its failure accounting, maj@k."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from rlkit.config import ConfigError
from rlkit.metrics import majority_correct
from rlkit.rewards import CompositeReward, build_reward
from rlkit.rewards.math import answer_key
from rlkit.rewards.math_equivalence import last_boxed, math_verify_reward
from rlkit.rewards.registry import RewardTermFn
from rlkit.rewards.rules import answer_tags_reward, repeated_ngram_fraction, repetition_penalty_reward
from rlkit.rewards.sentiment import vader_positive_reward, vader_sentiment_reward
from rlkit.rewards.sql import execute, extract_sql, result_score, sql_execution_reward
from rlkit.rewards.text import bleu_reward, reference_metrics, rouge_reward
from rlkit.tasks import build_task
from rlkit.tasks.sql import synthetic_problem
from rlkit.validate import check_reward_term

DATA = Path(__file__).resolve().parent / "data"
HUMANEVAL = Path(__file__).resolve().parents[2] / "shared/data/humaneval/HumanEval.jsonl.gz"


def task_cfg(name: str, path=None, **options):
    return OmegaConf.create(
        {
            "name": name,
            "path": None if path is None else str(path),
            "prompt_template": "{question}",
            "system_prompt": None,
            "use_chat_template": False,
            "verifier": "math_answer",
            "max_new_tokens": 32,
            "max_train_rows": None,
            "options": options,
        }
    )


# --------------------------------------------------------------------------- math (math-verify)


@pytest.mark.parametrize(
    "completion, answer, expected",
    [
        ("so the answer is \\boxed{\\frac{3}{4}}", "\\frac{3}{4}", 1.0),
        ("\\boxed{0.75}", "\\frac{3}{4}", 1.0),  # equal values, different strings: string rules would miss it
        ("\\boxed{x^2+2x}", "x(x+2)", 1.0),  # symbolic equivalence
        ("\\boxed{2\\sqrt{2}}", "\\sqrt{8}", 1.0),
        ("the interval \\boxed{(-1,1)}", "(-1,1)", 1.0),
        ("\\boxed{[-1,1]}", "(-1,1)", 0.0),  # closed is not open
        ("\\boxed{22}", "21", 0.0),
        ("no answer at all", "21", 0.0),
    ],
)
def test_math_verify_reward_checks_equivalence(completion, answer, expected):
    assert math_verify_reward([""], [completion], [answer]) == [expected]


def test_last_boxed_balances_braces():
    assert last_boxed("\\boxed{1} then \\boxed{\\frac{1}{\\sqrt{2}}}.") == "\\frac{1}{\\sqrt{2}}"
    assert last_boxed("\\boxed{unclosed") is None and last_boxed("none") is None


def test_math_task_reads_a_jsonl_file_and_holds_rows_out():
    task = build_task(task_cfg("math", DATA / "math_sample.jsonl", test_size=2, seed=0))
    train, test = task.split("train"), task.split("test")
    assert len(train) == 4 and len(test) == 2
    assert not {r["question"] for r in train} & {r["question"] for r in test}
    answers = {r["question"]: r["answer"] for r in list(train) + list(test)}
    assert answers["Factor $x^2 + 2x$."] == "x(x+2)"  # the solution's last \boxed{}
    assert answers["For which $x$ is $x^2 < 1$?"] == "(-1,1)"  # an explicit answer field wins
    assert task.answer_key("so \\boxed{ 3 / 4 }") == "3/4" and task.answer_key("no box") is None


def test_maj_at_k_votes_on_final_answers():
    assert majority_correct(["4", "5", "4"], [True, False, True])
    assert not majority_correct(["5", "4", "5"], [False, True, False])
    assert majority_correct([None, None, "4"], [False, False, True])  # unanswered samples do not vote
    assert not majority_correct([None, None], [False, False])
    assert not majority_correct(["5", "4"], [False, True])  # a tie goes to the answer sampled first
    assert answer_key("#### 0.5") == answer_key("so 1/2")  # numeric answers vote together


# --------------------------------------------------------------------------- code task (HumanEval)


@pytest.mark.skipif(not HUMANEVAL.is_file(), reason=f"HumanEval not found at {HUMANEVAL}")
def test_humaneval_task_carves_a_seeded_held_out_split():
    splits = {seed: build_task(task_cfg("humaneval", HUMANEVAL, test_size=40, seed=seed)) for seed in (0, 1)}
    train, test = splits[0].split("train"), splits[0].split("test")
    assert len(train) == 124 and len(test) == 40
    assert not {r["question"] for r in train} & {r["question"] for r in test}
    assert [r["question"] for r in test] == [r["question"] for r in splits[0].split("test")]  # deterministic
    assert [r["question"] for r in test] != [r["question"] for r in splits[1].split("test")]  # the data seed picks them
    row = test[0]
    assert row["tests"].rstrip().endswith(f"check({row['entry_point']})") and row["solution"]


def test_code_task_needs_its_columns(tmp_path: Path):
    path = tmp_path / "rows.jsonl"
    path.write_text(
        json.dumps({"prompt": "def f():\n", "answer": 1})
        + "\n"
        + json.dumps({"prompt": "def g():\n", "answer": 2})
        + "\n"
    )
    with pytest.raises(ConfigError, match="rows need prompt, test and entry_point"):
        build_task(task_cfg("code", path, test_size=1)).split("train")
    with pytest.raises(ConfigError, match="task.path is required"):
        build_task(task_cfg("code")).split("train")


# --------------------------------------------------------------------------- SQL

DB = (
    "CREATE TABLE people(name TEXT, age INTEGER, city TEXT);\n"
    "INSERT INTO people VALUES ('ann', 31, 'oslo'), ('bob', 25, 'rome'), ('cy', 40, 'oslo');"
)
GOLD = "SELECT name FROM people WHERE age > 30"


def sql_scores(completions, **args):
    return sql_execution_reward(
        [""] * len(completions), completions, [DB] * len(completions), [GOLD] * len(completions), **args
    )


def test_sql_execution_match_ignores_row_order_and_spelling():
    assert sql_scores(
        [
            "SELECT name FROM people WHERE age >= 31 ORDER BY name DESC;",
            "```sql\nselect name from people where city='oslo'\n```",
        ]
    ) == [1.0, 1.0]
    assert sql_scores(["SELECT name FROM people", "SELECT nme FROM people", "not sql"]) == [0.0, 0.0, 0.0]


def test_sql_partial_credit_for_overlapping_rows_and_columns():
    whole, extra_column = sql_scores(
        ["SELECT name FROM people", "SELECT name, age FROM people WHERE age > 30"], partial=True
    )
    assert whole == pytest.approx((0.8 + 0.0) / 2)  # rows: P=2/3, R=1 -> F1 0.8; the one column differs (bob added)
    assert extra_column == pytest.approx((0.0 + 2 / 3) / 2)  # rows differ as tuples; columns: P=1/2, R=1
    assert result_score([("a",)], [("a",)], partial=True) == 1.0


def test_sql_queries_may_only_read_and_are_interrupted(tmp_path: Path):
    attached = tmp_path / "evil.db"
    assert (
        sql_scores(
            [
                "DROP TABLE people",
                f"ATTACH DATABASE '{attached}' AS evil",
                "PRAGMA writable_schema = 1",
                "INSERT INTO people VALUES ('x', 1, 'y')",
            ]
        )
        == [0.0] * 4
    )
    assert not attached.exists()
    started = time.perf_counter()
    endless = "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c) SELECT count(*) FROM c"
    assert sql_scores([endless], timeout=0.5) == [0.0]
    assert time.perf_counter() - started < 3
    assert extract_sql("SELECT 1; DROP TABLE people") == "SELECT 1"


def test_sql_task_generates_problems_whose_gold_query_runs():
    import random

    rng = random.Random(0)
    for _ in range(50):
        row = synthetic_problem(rng, 6)
        assert execute(row["db"], row["query"]) is not None
        assert sql_execution_reward([""], [row["query"]], [row["db"]], [row["query"]]) == [1.0]
    task = build_task(task_cfg("sql", train_size=30, test_size=10, num_people=4, seed=3))
    train, test = task.split("train"), task.split("test")
    assert len(train) == 30 and len(test) == 10
    assert test[0]["schema"].startswith("CREATE TABLE people") and test[0]["answer"] == test[0]["query"]
    assert [r["db"] for r in test] == [
        r["db"] for r in build_task(task_cfg("sql", train_size=30, test_size=10, num_people=4, seed=3)).split("test")
    ]
    with pytest.raises(ConfigError, match="num_people"):
        build_task(task_cfg("sql", num_people=99))


# --------------------------------------------------------------------------- text, sentiment, rules


def test_rouge_and_bleu_rewards():
    assert rouge_reward([""], ["the cat sat on the mat"], ["the cat sat on the mat"]) == [pytest.approx(1.0)]
    assert rouge_reward([""], ["dogs bark"], ["the cat sat"]) == [0.0]
    assert rouge_reward([""], ["the cat sat"], ["the cat sat on the mat"], rouge_type="rouge1")[0] == pytest.approx(
        2 * 1 * 0.5 / 1.5
    )
    assert bleu_reward([""], ["the cat sat on the mat"], ["the cat sat on the mat"])[0] == pytest.approx(1.0)
    assert bleu_reward([""], ["dogs bark loudly"], ["the cat sat on the mat"])[0] < 0.1
    metrics = reference_metrics(["the cat sat on the mat", "dogs"], ["the cat sat on the mat", "a cat"])
    assert set(metrics) == {"rouge1", "rouge2", "rougeL", "bleu"} and metrics["rouge1"] == pytest.approx(0.5)


def test_summarize_task_reports_rouge_and_bleu():
    task = build_task(task_cfg("summarize", DATA / "summarize_sample.jsonl", test_size=2))
    test = list(task.split("test"))
    assert len(test) == 2 and len(task.split("train")) == 3
    perfect = task.metrics([r["reference"] for r in test], test)
    assert perfect["rougeL"] == pytest.approx(1.0) and perfect["bleu"] == pytest.approx(100.0)
    assert task.metrics(["unrelated words"] * 2, test)["rougeL"] < 0.2


def test_vader_sentiment_rewards():
    scores = vader_sentiment_reward(
        [""] * 3, ["a wonderful, moving film. loved it!", "boring and awful", "the film is 90 minutes long"]
    )
    assert scores[0] > 0.5 and scores[1] < -0.3 and scores[2] == 0.0
    assert vader_sentiment_reward([""], ["boring and awful"], target="negative")[0] > 0.3
    assert vader_positive_reward([""] * 2, ["great", "terrible"]) == [1.0, 0.0]


def test_sentiment_task_reads_reviews_from_text(tmp_path: Path):
    reviews = [
        f"review {i} starts here and goes on about the film<br />for a while with many more words" for i in range(6)
    ]
    (tmp_path / "reviews.txt").write_text("\n".join(reviews) + "\n\n")
    task = build_task(
        task_cfg("sentiment", tmp_path / "reviews.txt", prompt_words=4, continuation_words=3, test_size=2)
    )
    test = task.split("test")
    assert len(test) == 2 and len(task.split("train")) == 4
    assert test[0]["question"].endswith("starts here") and len(test[0]["solution"].split()) == 3
    (tmp_path / "aclImdb" / "pos").mkdir(parents=True)
    for i, text in enumerate(reviews):
        (tmp_path / "aclImdb" / "pos" / f"{i}_9.txt").write_text(text)
    assert "<br" not in " ".join(
        build_task(task_cfg("sentiment", tmp_path / "aclImdb", prompt_words=12, test_size=2)).split("train")["question"]
    )


def test_answer_tags_and_repetition_rewards():
    assert answer_tags_reward(
        [""] * 4,
        ["<answer>4</answer>", "think first <answer>4</answer>\n", "<answer></answer>", "<answer>4</answer> more"],
    ) == [1.0, 1.0, 0.0, 0.0]
    assert answer_tags_reward(
        [""] * 2, ["<think>2+2</think> <answer>4</answer>", "<answer>4</answer>"], think=True
    ) == [1.0, 0.0]
    assert repeated_ngram_fraction(["a", "b", "c", "d"], 2) == 0.0
    assert repeated_ngram_fraction(["go", "go", "go", "go", "go"], 2) == pytest.approx(0.75)
    assert repetition_penalty_reward(
        [""] * 2, ["a fine and varied sentence", "great great great great great great"]
    ) == [0.0, pytest.approx(-0.75)]


# --------------------------------------------------------------------------- worker pool and failures


def flaky(prompts, completions, **_):
    """Raises on 'boom', hangs on 'hang', returns None on 'none', else scores 1."""
    scores = []
    for completion in completions:
        if completion == "boom":
            raise RuntimeError("reward bug")
        if completion == "hang":
            time.sleep(30)
        scores.append(None if completion == "none" else 1.0)
    return scores


def test_pool_isolates_failures_per_sample_and_counts_them(caplog):
    reward = CompositeReward(
        [
            RewardTermFn("flaky", flaky, 1.0, workers=4, timeout=1.0, failure_value=-0.5),
            RewardTermFn("steady", lambda p, c, **_: [1.0] * len(c), 0.1),
        ]
    )
    started = time.perf_counter()
    with caplog.at_level(logging.WARNING):
        totals, per_term = reward(["p"] * 5, ["ok", "boom", "hang", "none", "ok"])
    assert time.perf_counter() - started < 5  # the hanging sample does not stall the batch
    assert per_term["flaky"] == [1.0, -0.5, -0.5, -0.5, 1.0]
    assert totals == pytest.approx([1.1, -0.4, -0.4, -0.4, 1.1])
    assert reward.pop_failures() == {"flaky": 3, "steady": 0}
    assert reward.pop_failures() == {"flaky": 0, "steady": 0}  # counted since the last pop
    assert "reward 'flaky' failed on 3 of 5 samples" in caplog.text


def test_a_raising_reward_without_workers_fails_its_batch_not_the_run():
    reward = CompositeReward([RewardTermFn("flaky", flaky, 1.0)])
    assert reward(["p", "p"], ["ok", "boom"]) == ([0.0, 0.0], {"flaky": [0.0, 0.0]})
    assert reward.pop_failures() == {"flaky": 2}


def test_reward_config_takes_pool_settings_and_validates_them():
    node = OmegaConf.create(
        {
            "name": "t",
            "fn": None,
            "terms": {"sql": {"fn": "sql_execution", "workers": 2, "timeout": 5, "failure_value": -1}},
        }
    )
    term = build_reward(node).terms[0]
    assert (term.workers, term.timeout, term.failure_value) == (2, 5, -1.0)
    with pytest.raises(ConfigError, match="reward.terms.x.timeout=5 .*needs reward.terms.x.workers >= 1"):
        check_reward_term("reward.terms.x", OmegaConf.create({"fn": "rouge", "timeout": 5}))
    with pytest.raises(ConfigError, match="reward.terms.x.workers=-1"):
        check_reward_term("reward.terms.x", OmegaConf.create({"fn": "rouge", "workers": -1}))
    with pytest.raises(ConfigError, match="unknown key; valid: fn, weight, args, workers, timeout, failure_value"):
        check_reward_term("reward.terms.x", OmegaConf.create({"fn": "rouge", "retries": 1}))


def test_classifier_sentiment_scores_with_a_local_sequence_classifier(tmp_path):
    """Any sequence-classification model given by path: a tiny two-label Llama with a local tokenizer."""
    from transformers import LlamaConfig, LlamaForSequenceClassification

    from rlkit.models.tiny import train_tokenizer
    from rlkit.rewards.sentiment import classifier_sentiment_reward

    tokenizer = train_tokenizer(["a great film", "a terrible film"] * 20, vocab_size=300)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        num_labels=2,
        id2label={0: "NEGATIVE", 1: "POSITIVE"},
        label2id={"NEGATIVE": 0, "POSITIVE": 1},
        pad_token_id=tokenizer.pad_token_id,
    )
    LlamaForSequenceClassification(config).save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    scores = classifier_sentiment_reward(["p", "p"], ["a great film", "a terrible film"], model=str(tmp_path))
    assert len(scores) == 2 and all(0.0 < s < 1.0 for s in scores)
    with pytest.raises(ValueError, match="no label 'HAPPY'"):
        classifier_sentiment_reward(["p"], ["a great film"], model=str(tmp_path), label="HAPPY")
