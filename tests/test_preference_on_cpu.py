"""Preference, ranking and reward-model pieces as pure functions: every loss against
hand-computed values, DPO's gradient direction, the response selections, and the
preference tasks' parsing (HH dialogues, malformed rows, the held-out split)."""

from __future__ import annotations

import dataclasses
import gzip
import json
import math
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from rlkit.algos.preference_losses import PREFERENCE_LOSSES, ResponseSet, bradley_terry_loss
from rlkit.algos.selection import RESPONSE_SELECTIONS
from rlkit.config import ConfigError
from rlkit.tasks import build_task
from rlkit.tasks.preference import Malformed, split_dialogue

HH_FILE = Path(__file__).resolve().parents[2] / "shared/data/hh-rlhf/harmless-base-test.jsonl.gz"
VALUES = dict(beta=0.5, label_smoothing=0.2, alpha=2.0, sft_weight=0.5)  # the hand-computed cases' settings


def loss_settings(name: str, **changes):
    """The settings of preference loss ``name``: those of ``VALUES`` (with ``changes``) that it has."""
    fields = {f.name for f in dataclasses.fields(PREFERENCE_LOSSES.settings(name))}
    return PREFERENCE_LOSSES.make_settings(name, **{k: v for k, v in {**VALUES, **changes}.items() if k in fields})


def pair(chosen: float, rejected: float, ref_chosen: float, ref_rejected: float, lengths=(2.0, 4.0)) -> ResponseSet:
    return ResponseSet(
        torch.tensor([[chosen, rejected]]),
        torch.tensor([[ref_chosen, ref_rejected]]),
        torch.tensor([list(lengths)]),
        torch.tensor([[1.0, 0.0]]),
        torch.ones(1, 2),
    )


def sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x))


# h = (-3 - -4) - (-5 - -4) = 2, beta h = 1
H, BETA_H = 2.0, 1.0
PAIR = dict(chosen=-3.0, rejected=-5.0, ref_chosen=-4.0, ref_rejected=-4.0)


@pytest.mark.parametrize(
    "name, expected",
    [
        ("sigmoid", -math.log(sigmoid(BETA_H))),
        ("ipo", (H - 1 / (2 * 0.5)) ** 2),
        ("hinge", max(0.0, 1 - BETA_H)),
        ("cdpo", -0.8 * math.log(sigmoid(BETA_H)) - 0.2 * math.log(sigmoid(-BETA_H))),
        ("robust", (-0.8 * math.log(sigmoid(BETA_H)) + 0.2 * math.log(sigmoid(-BETA_H))) / 0.6),
        ("rpo", -math.log(sigmoid(BETA_H)) + 2.0 * 3.0 / 2.0),  # chosen NLL -3 over 2 tokens, alpha 2
    ],
)
def test_pairwise_losses_match_hand_computed_values(name, expected):
    loss, metrics = PREFERENCE_LOSSES.get(name)(pair(**PAIR), loss_settings(name))
    assert loss.shape == (1,)
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    assert metrics["accuracy"].item() == 1.0 and metrics["margin"].item() == pytest.approx(BETA_H)


def test_ipo_length_normalized_divides_each_log_ratio_by_its_length():
    # TRL's form: chosen (-3 - -4) / 2 = 0.5, rejected (-5 - -4) / 4 = -0.25, h = 0.75; tau = beta = 0.5
    settings = loss_settings("ipo", length_normalized=True)
    loss, metrics = PREFERENCE_LOSSES.get("ipo")(pair(**PAIR, lengths=(2.0, 4.0)), settings)
    assert loss.item() == pytest.approx((0.75 - 1 / (2 * 0.5)) ** 2)
    assert metrics["margin"].item() == pytest.approx(0.5 * 0.75)
    assert loss_settings("ipo").length_normalized is False  # the paper's summed log-ratios by default


def test_hinge_is_positive_inside_the_margin():
    loss, _ = PREFERENCE_LOSSES.get("hinge")(pair(-3.0, -4.0, -4.0, -4.0), loss_settings("hinge"))  # beta h = 0.5
    assert loss.item() == pytest.approx(0.5)


def test_dpo_gradient_raises_chosen_and_lowers_rejected():
    log_probs = torch.tensor([[-3.0, -5.0]], requires_grad=True)
    responses = ResponseSet(
        log_probs, torch.tensor([[-4.0, -4.0]]), torch.ones(1, 2), torch.tensor([[1.0, 0.0]]), torch.ones(1, 2)
    )
    for name in ("sigmoid", "ipo", "cdpo", "robust", "rpo"):
        log_probs.grad = None
        loss, _ = PREFERENCE_LOSSES.get(name)(responses, loss_settings(name, beta=0.1))
        loss.sum().backward()
        assert log_probs.grad[0, 0] < 0 < log_probs.grad[0, 1], (
            name
        )  # descent raises log pi(chosen), lowers log pi(rejected)
    # DPO's gradient, Eq. 8: -beta sigmoid(-beta h) on the chosen log-prob
    log_probs.grad = None
    PREFERENCE_LOSSES.get("sigmoid")(responses, loss_settings("sigmoid", beta=0.1))[0].sum().backward()
    assert log_probs.grad[0, 0].item() == pytest.approx(-0.1 * sigmoid(-0.1 * 2.0))
    assert log_probs.grad[0, 1].item() == pytest.approx(0.1 * sigmoid(-0.1 * 2.0))


def ranked(log_probs, lengths, scores, mask=None) -> ResponseSet:
    log_probs = torch.tensor([log_probs])
    return ResponseSet(
        log_probs,
        None,
        torch.tensor([lengths]),
        torch.tensor([scores]),
        torch.ones_like(log_probs) if mask is None else torch.tensor([mask]),
    )


def test_rrhf_ranking_hinge_and_sft_term():
    # p = [-1, -0.5, -2] for scores [3, 2, 1]: only the pair (best, second) is mis-ordered, by 0.5
    responses = ranked([-2.0, -1.0, -4.0], [2.0, 2.0, 2.0], [3.0, 2.0, 1.0])
    loss, metrics = PREFERENCE_LOSSES.get("rrhf")(responses, loss_settings("rrhf"))
    assert metrics["rank_loss"].item() == pytest.approx(0.5)
    assert loss.item() == pytest.approx(0.5 + 0.5 * 2.0)  # + sft_weight * NLL of the best (token sum)


def test_pro_listwise_loss_and_padding():
    p = [-1.0, -2.0, -3.0]
    responses = ranked(p, [1.0, 1.0, 1.0], [3.0, 2.0, 1.0])
    first = -math.log(math.exp(p[0]) / sum(math.exp(x) for x in p))
    second = -math.log(math.exp(p[1]) / (math.exp(p[1]) + math.exp(p[2])))
    loss, metrics = PREFERENCE_LOSSES.get("pro")(responses, loss_settings("pro"))
    assert metrics["listwise_loss"].item() == pytest.approx(first + second, rel=1e-5)
    assert loss.item() == pytest.approx(first + second + 0.5 * 1.0, rel=1e-5)
    # a masked third slot makes it a pair: -log sigmoid(p1 - p2), and gradients stay finite
    log_probs = torch.tensor([[-1.0, -2.0, 0.0]], requires_grad=True)
    padded = ResponseSet(
        log_probs, None, torch.ones(1, 3), torch.tensor([[3.0, 2.0, 0.0]]), torch.tensor([[1.0, 1.0, 0.0]])
    )
    loss, metrics = PREFERENCE_LOSSES.get("pro")(padded, loss_settings("pro"))
    assert metrics["listwise_loss"].item() == pytest.approx(-math.log(sigmoid(1.0)), rel=1e-5)
    loss.sum().backward()
    assert torch.isfinite(log_probs.grad).all() and log_probs.grad[0, 2] == 0


def test_sft_loss_averages_kept_responses_and_ignores_empty_sets():
    responses = ResponseSet(
        torch.tensor([[-2.0, -6.0], [-1.0, -1.0]]),
        None,
        torch.tensor([[2.0, 3.0], [1.0, 1.0]]),
        torch.zeros(2, 2),
        torch.tensor([[1.0, 1.0], [0.0, 0.0]]),
    )
    loss, _ = PREFERENCE_LOSSES.get("sft")(responses, loss_settings("sft"))
    assert loss.tolist() == pytest.approx([(1.0 + 2.0) / 2, 0.0])


def test_bradley_terry_loss():
    loss = bradley_terry_loss(torch.tensor([2.0, 0.0]), torch.tensor([1.0, 0.0]))
    assert loss.tolist() == pytest.approx([-math.log(sigmoid(1.0)), math.log(2.0)])


def test_best_worst_selection_skips_ties():
    scores = torch.tensor([[0.1, 0.9, 0.5], [1.0, 1.0, 1.0]])
    index, mask = RESPONSE_SELECTIONS.get("best_worst")(scores, RESPONSE_SELECTIONS.make_settings("best_worst"))
    assert index[0].tolist() == [1, 0] and mask.tolist() == [[1, 1], [0, 0]]


def test_rejection_sampling_accepts_by_reward_and_orders_the_pair():
    torch.manual_seed(0)
    scores = torch.tensor([[0.0, 5.0, 4.9, -50.0]] * 400)
    index, mask = RESPONSE_SELECTIONS.get("rejection")(scores, RESPONSE_SELECTIONS.make_settings("rejection", beta=1.0))
    valid = mask[:, 0].bool()
    # the best always passes; 4.9 with probability exp(-0.1) = 0.90, 0.0 with exp(-5), -50 never
    assert 0.8 < valid.float().mean() < 0.98
    assert (index[valid, 0] == 1).all() and (index == 3).sum() == 0
    picked = scores.gather(1, index)[valid]
    assert (picked[:, 0] > picked[:, 1]).all()  # best first
    assert (index[valid, 1] == 0).float().mean() < 0.05


def test_above_threshold_keeps_correct_best_first():
    settings = RESPONSE_SELECTIONS.make_settings("above_threshold", correct_threshold=0.5)
    index, mask = RESPONSE_SELECTIONS.get("above_threshold")(torch.tensor([[0.0, 1.0, 1.0, 0.0]]), settings)
    assert index[0, :2].tolist() == [1, 2] and mask.tolist() == [[1, 1, 0, 0]]


def test_split_dialogue_keeps_the_last_assistant_turn():
    text = "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: bye\n\nAssistant: see you"
    assert split_dialogue(text) == ("\n\nHuman: hi\n\nAssistant: hello\n\nHuman: bye\n\nAssistant:", " see you")
    with pytest.raises(Malformed):
        split_dialogue("no turns here")


def task_cfg(name: str, path: Path, **options):
    return OmegaConf.create(
        {"name": name, "path": str(path), "prompt_template": "{question}", "max_train_rows": None, "options": options}
    )


def write_jsonl(path: Path, rows: list) -> Path:
    with gzip.open(path, "wt") as f:
        for row in rows:
            f.write((row if isinstance(row, str) else json.dumps(row)) + "\n")
    return path


def test_malformed_rows_are_counted_not_fatal(tmp_path):
    good = [{"prompt": f"q{i}", "chosen": f"good {i}", "rejected": f"bad {i}"} for i in range(10)]
    bad = [
        {"prompt": "q", "chosen": "same", "rejected": "same"},
        {"prompt": "q", "chosen": " ", "rejected": "x"},
        {"prompt": "q", "rejected": "x"},
        {"prompt": "q", "chosen": "a"},
        {"chosen": "a", "rejected": "b"},
    ]
    task = build_task(
        task_cfg("preference", write_jsonl(tmp_path / "pairs.jsonl.gz", good + bad), test_fraction=0.2, split_seed=3)
    )
    train, test = task.split("train"), task.split("test")
    assert (len(train), len(test)) == (8, 2)
    assert set(train["question"]) | set(test["question"]) == {f"q{i}" for i in range(10)}
    assert train[0]["solution"] == train[0]["chosen"] == train[0]["responses"][0]
    assert task.summary["malformed_rows_train"] == 5
    assert "chosen == rejected: 1" in task.summary["malformed_reasons_train"]
    assert "missing 'rejected': 1" in task.summary["malformed_reasons_train"]
    again = build_task(task_cfg("preference", tmp_path / "pairs.jsonl.gz", test_fraction=0.2, split_seed=3))
    assert again.split("test")["question"] == test["question"]  # the split is seeded


def test_ranking_rows_sorted_best_first(tmp_path):
    rows = [{"prompt": "p", "responses": ["b", "a", "c"], "scores": [2, 3, 1]}] * 2 + [
        {"prompt": "p", "responses": ["a"], "scores": [1, 2]}
    ]
    task = build_task(task_cfg("ranking", write_jsonl(tmp_path / "train.jsonl.gz", rows), test_fraction=0.5))
    row = task.split("train")[0]
    assert row["responses"] == ["a", "b", "c"] and row["scores"] == [3.0, 2.0, 1.0]
    assert (row["chosen"], row["rejected"]) == ("a", "c")
    assert task.summary["malformed_rows_train"] == 1


def test_single_file_needs_a_test_fraction(tmp_path):
    task = build_task(
        task_cfg("preference", write_jsonl(tmp_path / "p.jsonl.gz", [{"prompt": "q", "chosen": "a", "rejected": "b"}]))
    )
    with pytest.raises(ConfigError, match="test_fraction"):
        task.split("train")


def test_hh_sample_parses_with_few_malformed_rows():
    if not HH_FILE.is_file():
        pytest.skip(f"HH-RLHF sample not found at {HH_FILE}")
    task = build_task(task_cfg("hh", HH_FILE, test_fraction=0.1))
    train, test = task.split("train"), task.split("test")
    assert len(train) + len(test) + task.summary["malformed_rows_train"] == 2312
    assert task.summary["malformed_rows_train"] < 20
    row = train[0]
    assert row["question"].endswith("\n\nAssistant:") and row["chosen"] != row["rejected"]


@pytest.mark.parametrize(
    "overrides, message",
    [
        (("algo=dpo",), "algo.loop=preference needs a preference task"),
        (("algo=online_dpo", "task=hh", "reward=model"), "reward.terms.model.args.path is required"),
        (
            ("algo=cdpo", "task=hh", "algo.preference_loss.label_smoothing=0.5"),
            "algo.preference_loss.label_smoothing=0.5: must be in [0, 0.5)",
        ),
        (
            ("algo=dpo", "task=hh", "algo.preference_loss=nope"),
            "algo.preference_loss=nope: choose the preference loss as a config group, algo/preference_loss=nope "
            "(valid: cdpo, hinge, ipo, pro, robust, rpo, rrhf, sft, sigmoid)",
        ),
    ],
)
def test_preference_config_errors_name_the_key(overrides, message, compose_config):
    from rlkit.validate import validate

    with pytest.raises(ConfigError) as error:
        validate(compose_config(*overrides))
    assert message in str(error.value)


def test_online_loops_have_no_precomputed_reference(compose_config):
    # their responses are sampled anew every step, so the reference cannot score them once up front
    from rlkit.overrides import check_overrides

    with pytest.raises(ConfigError) as error:
        check_overrides(["algo=online_dpo", "task=hh", "algo.reference=precomputed"])
    assert str(error.value).startswith(
        "algo.reference: algo preset 'online_dpo' (loop online_preference) has no setting 'reference'"
    )


def test_every_preference_preset_validates(compose_config):
    from rlkit.validate import validate

    for algo in ("rm", "dpo", "ipo", "slic", "cdpo", "rdpo", "rpo", "rrhf", "pro", "online_dpo", "rso", "rft"):
        validate(compose_config(f"algo={algo}", "task=hh", "reward=model", "reward.terms.model.args.path=somewhere"))
