"""End to end: every preference, ranking and rejection-sampling preset through the real
CLI on the HH-RLHF sample, in Hydra multiruns (one process each, jobs in order): the
reward model trained first is the ``reward=model`` of the online presets after it."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import read_json, read_metrics, rlkit

pytestmark = pytest.mark.slow

HH_FILE = Path(__file__).resolve().parents[2] / "shared/data/hh-rlhf/harmless-base-test.jsonl.gz"
OFFLINE = ("sft", "dpo", "ipo", "slic", "cdpo", "rdpo", "rpo", "rrhf", "pro")
ONLINE = ("online_dpo", "rso", "rft")
TINY = (
    "task=hh",
    f"task.path={HH_FILE}",
    "task.options.test_fraction=0.1",
    "task.options.max_prompt_chars=200",
    "task.options.max_response_chars=100",
    "task.max_train_rows=64",
    "task.max_new_tokens=8",
    "trainer.max_steps=2",
    "trainer.eval_every=0",
    "trainer.save_every=0",
    "model.warmstart.steps=2",
    "eval.num_examples=8",
    "trainer.prompts_per_step_global=4",
    "logger.mode=disabled",
    "logger.progress_bar=false",
    "model.tiny.hidden_size=32",
    "model.tiny.intermediate_size=64",
)
# each sweep's presets share its overrides: settings only the online presets (or only rft) have
SWEEPS = (
    (("rm", *OFFLINE), ()),
    (("online_dpo", "rso"), ("algo.group_size=4",)),
    # rft keeps every sample: an untrained reward model's scores carry no meaning
    (("rft",), ("algo.group_size=4", "algo.selection.correct_threshold=-1e9")),
)


@pytest.fixture(scope="module")
def sweep(tmp_path_factory) -> Path:
    if not HH_FILE.is_file():
        pytest.skip(f"HH-RLHF sample not found at {HH_FILE}")
    cwd = tmp_path_factory.mktemp("preference")
    root = cwd / "sweep"
    for presets, overrides in SWEEPS:
        args = [
            "train",
            "--multirun",
            f"algo={','.join(presets)}",
            *TINY,
            *overrides,
            "reward=model",
            f"reward.terms.model.args.path={root / 'rm' / 'checkpoints' / '2'}",
            f"hydra.sweep.dir={root}",
            "hydra.sweep.subdir=${algo.name}",
        ]
        rlkit(args, cwd, timeout=900).check()
    return root


def test_reward_model_saves_a_sequence_classifier_and_reports_pair_accuracy(sweep):
    from transformers import AutoModelForSequenceClassification

    from rlkit.rewards.reward_model import reward_model_reward

    report = read_json(sweep / "rm" / "report.json")
    assert report["malformed_rows_train"] > 0 and "empty response" in report["malformed_reasons_train"]
    final = report["evaluations"][-1]
    assert final["num_examples"] == 8 and 0.0 <= final["accuracy"] <= 1.0 and "reward_margin" in final
    assert any("rm/loss" in m and "rm/accuracy" in m for m in read_metrics(sweep / "rm"))
    model = AutoModelForSequenceClassification.from_pretrained(sweep / "rm" / "checkpoints" / "2")
    assert model.config.num_labels == 1 and model.config.pad_token_id is not None
    scores = reward_model_reward(
        ["\n\nHuman: hi\n\nAssistant:"] * 3,
        [" hello", " go away", " hello"],
        path=str(sweep / "rm" / "checkpoints" / "2"),
    )
    assert len(scores) == 3 and scores[0] == pytest.approx(scores[2], abs=1e-5) and scores[0] != scores[1]


@pytest.mark.parametrize("algo", OFFLINE + ONLINE)
def test_preset_trains_and_evaluates_on_held_out_pairs(sweep, algo):
    report = read_json(sweep / algo / "report.json")
    first, final = report["evaluations"][0], report["evaluations"][-1]
    assert final["step"] == 2 and final["num_examples"] == 8
    for key in ("accuracy", "reward_margin", "chosen_logp", "rejected_logp", "kl_to_reference"):
        assert key in final, key
    assert (
        first["accuracy"] == 0.5 and first["reward_margin"] == 0.0
    )  # the start model is its own reference: every pair ties
    assert final["chosen_logp"] != first["chosen_logp"]  # the policy moved
    steps = [m for m in read_metrics(sweep / algo) if "actor/grad_norm" in m]
    assert [m["step"] for m in steps] == [1, 2]
    if algo != "sft":
        assert all(
            k in steps[-1]
            for k in ("pref/loss", "pref/accuracy", "pref/margin", "pref/chosen_logp", "pref/rejected_logp")
        )
    if algo in ONLINE:
        assert "reward/mean" in steps[-1] and "selection/prompts_kept_frac" in steps[-1]
