"""Tasks, prompt formatting, the prompt sampler and small helpers (pass@k, EOS masks,
LR schedule, run names), checked against hand-worked values."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

import rlkit.data
from rlkit.cli import run_name
from rlkit.config import ConfigError
from rlkit.data import PromptSampler
from rlkit.engine.deepspeed_engine import _deep_merge, lr_lambda
from rlkit.metrics import mean_std, pass_at_k
from rlkit.rewards.math import parse_number
from rlkit.rollout.generate import response_mask_from_eos
from rlkit.tasks import TASKS, build_task, format_prompt
from rlkit.tasks.arith import ArithTask
from rlkit.tasks.gsm8k import GSM8KTask

GSM8K_DIR = Path(__file__).resolve().parents[2] / "shared/data/gsm8k"
needs_gsm8k = pytest.mark.skipif(
    not (GSM8K_DIR / "train.jsonl").is_file(), reason=f"GSM8K data not found at {GSM8K_DIR}"
)


def task_cfg(
    name="arith",
    path=None,
    options=None,
    max_train_rows=None,
    prompt_template="{question}=",
    use_chat_template=True,
    system_prompt=None,
):
    """A ``task`` node with the fields of rlkit.config.TaskConfig."""
    return OmegaConf.create(
        {
            "name": name,
            "path": path,
            "prompt_template": prompt_template,
            "system_prompt": system_prompt,
            "use_chat_template": use_chat_template,
            "verifier": "math_answer",
            "max_new_tokens": 24,
            "max_train_rows": max_train_rows,
            "options": options or {},
        }
    )


SMALL = {"train_size": 300, "test_size": 60}


# --------------------------------------------------------------------------- ArithTask


def test_tasks_registered():
    assert TASKS.get("arith") is ArithTask
    assert TASKS.get("gsm8k") is GSM8KTask
    assert isinstance(build_task(task_cfg(options=SMALL)), ArithTask)


def test_arith_splits_sizes_distinct_test_and_no_leak():
    task = ArithTask(task_cfg(options={**SMALL, "max_digits": 2}))
    train, test = task.split("train"), task.split("test")
    assert len(train) == 300 and len(test) == 60
    assert set(train.column_names) >= {"question", "answer", "solution"}
    test_questions = list(test["question"])
    assert len(set(test_questions)) == len(test_questions)  # test questions are distinct
    assert not set(train["question"]) & set(test_questions)  # no training question is a test question


def test_arith_solution_format_hand_checked():
    task = ArithTask(task_cfg(options={**SMALL, "operands": 3, "operators": "+-"}))
    for row in task.split("test"):
        lines = row["solution"].split("\n")
        assert len(lines) == 3  # two steps for three operands, then the answer line
        assert lines[-1] == f"#### {row['answer']}"
        # each step "a<op>b=c" is right, and chains into the next
        previous = None
        for step in lines[:-1]:
            a, op, b, c = re.fullmatch(r"(-?\d+)([+\-*])(\d+)=(-?\d+)", step).groups()
            a, b, c = int(a), int(b), int(c)
            assert c == {"+": a + b, "-": a - b, "*": a * b}[op]
            assert previous is None or a == previous
            previous = c
        assert previous == int(row["answer"])


def _evaluate(question: str) -> int:
    """Independent evaluator with the usual precedence: * before + and -, brackets first."""
    assert re.fullmatch(r"[\d+\-*()]+", question), question
    return eval(question)  # noqa: S307 - only digits, + - * and brackets


@pytest.mark.parametrize("operators, operands", [("+", 2), ("-", 3), ("*", 2), ("+-*", 3), ("+-*", 5)])
def test_arith_answer_is_the_value_of_the_question(operators, operands):
    task = ArithTask(task_cfg(options={**SMALL, "operators": operators, "operands": operands}))
    for split in ("train", "test"):
        for row in task.split(split):
            assert int(row["answer"]) == _evaluate(row["question"]), row
            assert set(re.findall(r"[+\-*]", row["question"])) <= set(operators)
            assert len(re.findall(r"\d+", row["question"])) == operands


def test_arith_hand_example_of_brackets():
    # (45 - 57) * 2 = -12 * 2 = -24: without the brackets 45-57*2 would read -69
    assert _evaluate("(45-57)*2") == -24 and _evaluate("45-57*2") == -69
    task = ArithTask(task_cfg(options={**SMALL, "operators": "+-*", "operands": 3}))
    questions = list(task.split("test")["question"]) + list(task.split("train")["question"])
    assert any(q.startswith("(") for q in questions)  # mixed problems do get bracketed


def test_arith_digits_respected():
    task = ArithTask(task_cfg(options={**SMALL, "min_digits": 2, "max_digits": 2}))
    for question in list(task.split("test")["question"]):
        assert all(10 <= int(n) <= 99 for n in re.findall(r"\d+", question))


def test_arith_is_deterministic_for_a_data_seed():
    first = ArithTask(task_cfg(options={**SMALL, "seed": 3}))
    again = ArithTask(task_cfg(options={**SMALL, "seed": 3}))
    other = ArithTask(task_cfg(options={**SMALL, "seed": 4}))
    assert first.split("test").to_list() == again.split("test").to_list()
    assert first.split("train").to_list() == again.split("train").to_list()
    assert list(first.split("test")["question"]) != list(other.split("test")["question"])


def test_arith_max_train_rows_caps_train_only():
    task = ArithTask(task_cfg(options=SMALL, max_train_rows=25))
    assert len(task.split("train")) == 25
    assert len(task.split("test")) == 60
    # the capped rows are the first rows of the uncapped split
    assert (
        list(task.split("train")["question"])
        == list(ArithTask(task_cfg(options=SMALL)).split("train")["question"])[:25]
    )


def test_arith_unknown_option_key_raises_listing_valid_keys():
    with pytest.raises(ConfigError) as info:
        ArithTask(task_cfg(options={"digits": 3}))
    message = str(info.value)
    assert message.startswith("task.options.digits: unknown option; valid: ")
    assert "max_digits" in message and "operators" in message and "train_size" in message


@pytest.mark.parametrize(
    "options, match",
    [
        ({"min_digits": 3, "max_digits": 2}, "min_digits <= max_digits"),
        ({"min_digits": 0}, "min_digits <= max_digits"),
        ({"operands": 1}, "operands must be at least 2"),
        ({"operators": "/"}, "use characters from"),
        ({"operators": ""}, "use characters from"),
    ],
)
def test_arith_bad_option_values(options, match):
    with pytest.raises(ConfigError, match=match):
        ArithTask(task_cfg(options={**SMALL, **options}))


def test_arith_raises_when_test_split_takes_every_problem():
    # one-digit a+b has exactly 10 * 10 = 100 distinct problems; a test split of 100 leaves none to train on
    with pytest.raises(ConfigError, match="every possible problem is in the test split"):
        ArithTask(task_cfg(options={"min_digits": 1, "max_digits": 1, "test_size": 100, "train_size": 10}))


# --------------------------------------------------------------------------- GSM8K


@pytest.fixture(scope="module")
def gsm8k():
    task = GSM8KTask(task_cfg(name="gsm8k", path=str(GSM8K_DIR), options={}))
    return task.split("train"), task.split("test")


def _raw_rows(split):
    with open(GSM8K_DIR / f"{split}.jsonl") as file:
        return [json.loads(line) for line in file]


@needs_gsm8k
def test_gsm8k_sizes_and_columns(gsm8k):
    train, test = gsm8k
    assert (len(train), len(test)) == (7473, 1319)
    assert set(train.column_names) == {"question", "answer", "solution"}


@needs_gsm8k
def test_gsm8k_answer_is_the_final_number_and_solution_kept(gsm8k):
    train, test = gsm8k
    first = train[0]
    assert first["question"].startswith("Natalia sold clips to 48 of her friends")
    assert first["solution"].endswith("#### 72") and "48/2 = <<48/2=24>>24" in first["solution"]
    assert first["answer"] == "72"
    for split, rows in (("train", train), ("test", test)):
        raw = _raw_rows(split)
        assert list(rows["solution"]) == [r["answer"] for r in raw]
        expected = [r["answer"].split("####")[-1].strip().replace(",", "") for r in raw]
        assert list(rows["answer"]) == expected
        assert all(parse_number(a) is not None and "," not in a for a in rows["answer"])


def test_gsm8k_local_dir_missing_test_file(tmp_path):
    (tmp_path / "train.jsonl").write_text(
        json.dumps({"question": "1+1?", "answer": "1+1=2\n#### 2"})
        + "\n"
        + json.dumps({"question": "How many?", "answer": "10*100=1000\n#### 1,000"})
        + "\n"
    )
    task = GSM8KTask(task_cfg(name="gsm8k", path=str(tmp_path)))
    train = task.split("train")
    assert list(train["answer"]) == ["2", "1000"]  # thousands separator removed
    assert list(train["solution"]) == ["1+1=2\n#### 2", "10*100=1000\n#### 1,000"]
    with pytest.raises(ConfigError, match="no test.jsonl there"):
        task.split("test")


def test_gsm8k_rows_without_answer_column(tmp_path):
    (tmp_path / "train.jsonl").write_text(json.dumps({"question": "q", "solution": "s"}) + "\n")
    with pytest.raises(ConfigError, match=r"train.jsonl' line 1: field 'answer' is missing"):
        GSM8KTask(task_cfg(name="gsm8k", path=str(tmp_path))).split("train")


def test_gsm8k_path_that_is_a_file_or_missing_local_dir(tmp_path):
    file = tmp_path / "train.jsonl"
    file.write_text("")
    with pytest.raises(ConfigError, match="must be a directory"):
        GSM8KTask(task_cfg(name="gsm8k", path=str(file))).split("train")
    with pytest.raises(ConfigError, match="must be a directory"):
        GSM8KTask(task_cfg(name="gsm8k", path=str(tmp_path / "nope"))).split("train")


def test_malformed_jsonl_is_a_one_line_error_naming_the_file(tmp_path):
    (tmp_path / "train.jsonl").write_text(json.dumps({"question": "q", "answer": "#### 1"}) + "\nnot json\n")
    with pytest.raises(ConfigError, match=r"'.*train.jsonl' line 2: not valid JSON"):
        GSM8KTask(task_cfg(name="gsm8k", path=str(tmp_path))).split("train")
    with pytest.raises(ConfigError, match=r"'.*train.jsonl' line 2: not valid JSON"):
        build_task(task_cfg(name="math", path=str(tmp_path / "train.jsonl"))).split("train")


def test_unloadable_models_are_one_line_errors(tmp_path):
    from transformers import AutoTokenizer

    from rlkit.models.loading import from_pretrained

    with pytest.raises(ConfigError, match="model directory '/no/such/model' does not exist"):
        from_pretrained(AutoTokenizer, "/no/such/model")
    with pytest.raises(ConfigError, match="cannot load 'no-such-org/no-such-model'"):
        from_pretrained(AutoTokenizer, "no-such-org/no-such-model")  # the tests run offline
    with pytest.raises(ConfigError, match=f"cannot load '{tmp_path}'"):
        from_pretrained(AutoTokenizer, str(tmp_path))  # a directory without a tokenizer
    (tmp_path / "model.safetensors").write_bytes(b"weights")
    with pytest.raises(ConfigError, match="model path '.*model.safetensors' is a file; give the directory"):
        from_pretrained(AutoTokenizer, str(tmp_path / "model.safetensors"))


def test_gsm8k_unknown_option():
    with pytest.raises(ConfigError, match="task.options.seed: unknown option; valid: hub_config"):
        GSM8KTask(task_cfg(name="gsm8k", options={"seed": 1}))


# --------------------------------------------------------------------------- format_prompt

CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


@pytest.fixture(scope="module")
def tokenizer():
    from rlkit.models.tiny import train_tokenizer

    return train_tokenizer(["12+34=46\n#### 46", "What is 7*8?", "Be brief."], vocab_size=300)


def test_tiny_tokenizer_gives_ids_and_mask_only_after_a_reload(tokenizer, tmp_path):
    """A checkpoint's tokenizer output feeds ``model.generate(**inputs)`` as is: no token_type_ids,
    which transformers 4.x's generate rejects."""
    from transformers import AutoTokenizer

    tokenizer.save_pretrained(tmp_path)
    assert set(AutoTokenizer.from_pretrained(tmp_path)(["12+34="], return_tensors="pt")) == {
        "input_ids",
        "attention_mask",
    }


def test_format_prompt_without_chat_template(tokenizer):
    assert tokenizer.chat_template is None
    row = {"question": "12+34", "answer": "46", "solution": "12+34=46\n#### 46"}
    assert format_prompt(row, task_cfg(prompt_template="{question}="), tokenizer) == "12+34="
    # a template may use any column
    assert format_prompt(row, task_cfg(prompt_template="Q: {question} (hint {answer})"), None) == "Q: 12+34 (hint 46)"


def test_format_prompt_chat_template_branch(tokenizer, monkeypatch):
    monkeypatch.setattr(tokenizer, "chat_template", CHAT_TEMPLATE)
    row = {"question": "7*8"}
    plain = task_cfg(prompt_template="{question}=")
    assert format_prompt(row, plain, tokenizer) == "<|user|>7*8=\n<|assistant|>"
    with_system = task_cfg(prompt_template="{question}=", system_prompt="Be brief.")
    assert format_prompt(row, with_system, tokenizer) == "<|system|>Be brief.\n<|user|>7*8=\n<|assistant|>"
    # use_chat_template: false ignores the tokenizer's template
    assert (
        format_prompt(
            row, task_cfg(prompt_template="{question}=", use_chat_template=False, system_prompt="x"), tokenizer
        )
        == "7*8="
    )


def test_format_prompt_unknown_column_is_a_config_error():
    with pytest.raises(ConfigError, match=r"task.prompt_template refers to 'problem'.*columns: question, answer"):
        format_prompt({"question": "q", "answer": "a"}, task_cfg(prompt_template="{problem}"), None)


# --------------------------------------------------------------------------- PromptSampler


def test_sampler_covers_every_row_once_per_epoch():
    sampler = PromptSampler(num_rows=7, seed=1)
    epoch0 = sampler.next_global(3) + sampler.next_global(3) + sampler.next_global(1)
    assert sorted(epoch0) == list(range(7))
    assert sampler.state_dict() == {"epoch": 1, "position": 0}
    # a batch that crosses the epoch boundary: 5 rows, then 2 more of epoch 1 and 3 of epoch 2
    first = sampler.next_global(5)
    crossing = sampler.next_global(5)
    assert sorted(first + crossing[:2]) == list(range(7))
    assert len(set(crossing[2:])) == 3
    assert sampler.state_dict() == {"epoch": 2, "position": 3}


def test_sampler_batch_larger_than_dataset_spans_epochs():
    sampler = PromptSampler(num_rows=3, seed=0)
    indices = sampler.next_global(7)  # epochs 0, 1 in full, then one row of epoch 2
    assert len(indices) == 7
    assert sorted(indices[:3]) == sorted(indices[3:6]) == [0, 1, 2]
    assert sampler.state_dict() == {"epoch": 2, "position": 1}


def test_sampler_reshuffles_each_epoch_and_is_deterministic_per_seed():
    a, b, c = PromptSampler(50, seed=5), PromptSampler(50, seed=5), PromptSampler(50, seed=6)
    run_a = [a.next_global(10) for _ in range(10)]
    assert run_a == [b.next_global(10) for _ in range(10)]
    assert run_a != [c.next_global(10) for _ in range(10)]
    epoch0, epoch1 = sum(run_a[:5], []), sum(run_a[5:], [])
    assert sorted(epoch0) == sorted(epoch1) == list(range(50))
    assert epoch0 != epoch1  # a new order each epoch
    assert epoch0 != list(range(50))  # shuffled at all


def test_sampler_state_dict_resumes_the_exact_sequence():
    original = PromptSampler(11, seed=2)
    original.next_global(4)
    original.next_global(9)  # now mid-epoch 1
    state = original.state_dict()
    assert state == {"epoch": 1, "position": 2}
    expected = [original.next_global(6) for _ in range(5)]
    resumed = PromptSampler(11, seed=2)
    resumed.load_state_dict(dict(state))
    assert [resumed.next_global(6) for _ in range(5)] == expected


def test_sampler_next_local_is_this_ranks_contiguous_share(monkeypatch):
    reference = PromptSampler(12, seed=3).next_global(8)
    monkeypatch.setattr(rlkit.data, "world_size", lambda: 2)
    monkeypatch.setattr(rlkit.data, "rank", lambda: 1)
    assert PromptSampler(12, seed=3).next_local(8) == reference[4:8]
    monkeypatch.setattr(rlkit.data, "rank", lambda: 0)
    assert PromptSampler(12, seed=3).next_local(8) == reference[:4]


def test_sampler_rejects_an_empty_split():
    with pytest.raises(ValueError, match="empty"):
        PromptSampler(0, seed=0)


# --------------------------------------------------------------------------- pass@k, mean_std


def test_pass_at_k_hand_values():
    # n = 5 samples, c = 2 correct
    assert pass_at_k(5, 2, 1) == pytest.approx(0.4)  # 1 - C(3,1)/C(5,1) = 1 - 3/5
    assert pass_at_k(5, 2, 2) == pytest.approx(0.7)  # 1 - C(3,2)/C(5,2) = 1 - 3/10
    assert pass_at_k(5, 2, 3) == pytest.approx(0.9)  # 1 - C(3,3)/C(5,3) = 1 - 1/10
    assert pass_at_k(5, 2, 4) == 1.0  # only 3 wrong: any 4 include a correct one
    assert pass_at_k(5, 0, 3) == 0.0
    assert pass_at_k(5, 5, 1) == 1.0
    assert pass_at_k(8, 3, 1) == pytest.approx(3 / 8)  # pass@1 is the fraction correct


def test_pass_at_k_needs_k_samples():
    with pytest.raises(ValueError, match="pass@6 needs at least 6 samples, got 5"):
        pass_at_k(5, 2, 6)


def test_mean_std_population():
    # mean 2; population variance ((1-2)^2 + (3-2)^2) / 2 = 1
    assert mean_std([1.0, 3.0]) == (2.0, 1.0)
    assert mean_std([]) == (0.0, 0.0)
    assert mean_std([4.0]) == (4.0, 0.0)


# --------------------------------------------------------------------------- response_mask_from_eos


def test_response_mask_includes_first_eos_and_flags_truncation():
    eos = 2
    ids = torch.tensor(
        [
            [5, 2, 7, 2],  # EOS at 1: keep 5 and the EOS
            [5, 6, 7, 8],  # no EOS: all kept, truncated
            [2, 5, 5, 5],  # EOS first: only the EOS
            [5, 6, 7, 2],  # EOS last
        ]
    )
    mask, truncated = response_mask_from_eos(ids, eos)
    assert mask.tolist() == [[1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0], [1, 1, 1, 1]]
    assert truncated.tolist() == [False, True, False, False]
    assert mask.dtype == torch.long


# --------------------------------------------------------------------------- lr_lambda, _deep_merge


def test_lr_constant_with_warmup():
    f = lr_lambda("constant", warmup_steps=4, total_steps=10)
    # warm-up (s + 1) / 4 for s < 4, then 1
    assert [f(s) for s in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    assert f(100) == 1.0


def test_lr_linear_with_warmup():
    f = lr_lambda("linear", warmup_steps=2, total_steps=10)
    # warm-up 1/2, 2/2; then 1 - (s - 2) / 8: s=2 -> 1, s=4 -> 0.75, s=6 -> 0.5, s=10 -> 0, past the end -> 0
    assert [f(0), f(1)] == [0.5, 1.0]
    assert [f(2), f(4), f(6), f(10), f(12)] == pytest.approx([1.0, 0.75, 0.5, 0.0, 0.0])


def test_lr_cosine_with_warmup():
    f = lr_lambda("cosine", warmup_steps=2, total_steps=10)
    # progress p = (s - 2) / 8; multiplier 0.5 (1 + cos(pi p))
    # s=2: p=0 -> 1; s=4: p=1/4 -> 0.5 (1 + 0.70711) = 0.85355; s=6: p=1/2 -> 0.5; s=10: p=1 -> 0
    assert [f(0), f(1)] == [0.5, 1.0]
    assert [f(2), f(4), f(6), f(10), f(20)] == pytest.approx([1.0, 0.8535534, 0.5, 0.0, 0.0])


def test_lr_without_warmup_starts_at_full_rate():
    f = lr_lambda("linear", warmup_steps=0, total_steps=4)
    # 1 - s/4
    assert [f(s) for s in range(5)] == pytest.approx([1.0, 0.75, 0.5, 0.25, 0.0])


def test_deep_merge_overrides_nested_keys_without_mutating_inputs():
    base = {"zero_optimization": {"stage": 0, "offload": {"device": "none"}}, "bf16": {"enabled": False}, "steps": 1}
    override = {"zero_optimization": {"offload": {"device": "cpu"}}, "bf16": True, "new": 3}
    merged = _deep_merge(base, override)
    assert merged == {
        "zero_optimization": {"stage": 0, "offload": {"device": "cpu"}},
        "bf16": True,
        "steps": 1,
        "new": 3,
    }
    assert base["zero_optimization"]["offload"] == {"device": "none"}


# --------------------------------------------------------------------------- run_name


def test_run_name():
    assert run_name("") == "default"
    assert run_name("algo=grpo,seed=1") == "algo=grpo,seed=1"  # allowed characters kept
    assert run_name("task.path=/data/gsm8k") == "task.path=_data_gsm8k"
    assert run_name("a b:c") == "a_b_c"
    assert run_name("x" * 120) == "x" * 120  # up to 120 characters kept as is


def test_run_name_shortens_long_names_with_a_hash():
    long_a = "trainer.max_steps=1," + "a" * 150
    long_b = "trainer.max_steps=1," + "a" * 149 + "b"
    name_a, name_b = run_name(long_a), run_name(long_b)
    assert len(name_a) == 100 + 1 + 8
    assert name_a[:101] == long_a[:100] + "-"
    assert re.fullmatch(r"[0-9a-f]{8}", name_a[101:])
    assert name_a != name_b  # same first 100 characters, different hash
    assert run_name(long_a) == name_a  # deterministic


def test_generated_review_openings_are_seeded_distinct_and_held_out():
    from omegaconf import OmegaConf

    from rlkit.tasks import build_task

    def split(name: str, seed: int = 0) -> list[str]:
        cfg = OmegaConf.create(
            {
                "name": "sentiment",
                "path": None,
                "prompt_template": "{question}",
                "max_train_rows": None,
                "options": {"prompts": "generated", "train_size": 300, "test_size": 50, "seed": seed},
            }
        )
        return build_task(cfg).split(name)["question"]

    test, train = split("test"), split("train")
    assert len(test) == 50 and len(train) == 300 and not set(test) & set(train)
    assert len(set(train)) == 300 and split("test") == test and split("test", seed=1) != test
