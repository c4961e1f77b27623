"""Training-inference mismatch (rlkit/algos/rollout_correction.py): the mismatch statistics and
the corrections (token-level truncated importance sampling, sequence-level masking) against
hand-computed values, their settings' checks, and, with an injected mismatch (behaviour
log-probs shifted away from the trainer's; no vLLM needed), the corrections acting on a real
update through the policy-gradient loop."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
import torch
from conftest import fast_overrides

from rlkit.algos.rollout_correction import (
    ROLLOUT_CORRECTIONS,
    mismatch_terms,
    sequence_mask,
    truncated_importance_sampling,
)
from rlkit.rollout.backends import HFRollout

SAMPLE = HFRollout.sample  # rlkit's own sampler, before any test wraps it

# Three responses of lengths 3, 2 and 1; padding carries junk that must be ignored.
MASK = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
TRAINER = torch.log(torch.tensor([[0.5, 0.2, 0.9], [0.6, 0.3, 0.7], [0.1, 0.5, 0.5]]))
# ratios pi_old / pi_b: [2, 0.5, 1], [3, 1, -], [0.25, -, -]
BEHAVIOUR = torch.log(torch.tensor([[0.25, 0.4, 0.9], [0.2, 0.3, 0.01], [0.4, 0.9, 0.9]]))


def close(actual, expected, atol=1e-6):
    torch.testing.assert_close(actual, torch.as_tensor(expected, dtype=actual.dtype), atol=atol, rtol=0)


def test_mismatch_terms_are_k3_and_the_ratio_on_response_tokens():
    terms = mismatch_terms(TRAINER, BEHAVIOUR, MASK)
    k3 = lambda r: r - 1 - math.log(r)  # noqa: E731
    close(terms["kl"], [[k3(2), k3(0.5), 0.0], [k3(3), 0.0, 0.0], [k3(0.25), 0.0, 0.0]])
    close(terms["ratio"], [[2.0, 0.5, 1.0], [3.0, 1.0, 1.0], [0.25, 1.0, 1.0]])


def test_truncated_importance_sampling_caps_the_token_ratio():
    correction = truncated_importance_sampling(
        TRAINER, BEHAVIOUR, MASK, ROLLOUT_CORRECTIONS.make_settings("tis", cap=1.5)
    )
    close(correction.token_weights, [[1.5, 0.5, 1.0], [1.5, 1.0, 0.0], [0.25, 0.0, 0.0]])
    assert correction.kept is None
    close(correction.stats["capped_frac"], [[1.0, 0.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 0.0]])


@pytest.mark.parametrize("weighted", [False, True])
def test_sequence_mask_drops_responses_whose_ratio_leaves_the_bounds(weighted):
    """Sequence ratios: 2 * 0.5 * 1 = 1 (kept), 3 * 1 = 3 (above 2), 0.25 (below 0.5)."""
    settings = ROLLOUT_CORRECTIONS.make_settings("mask", low=0.5, high=2.0, weighted=weighted)
    correction = sequence_mask(TRAINER, BEHAVIOUR, MASK, settings)
    assert correction.kept.tolist() == [True, False, False]
    close(correction.stats["rejected_frac"], [0.0, 1.0, 1.0])
    if weighted:  # Seq-MIS: kept responses weighted by their ratio (1 here), capped at `high`
        close(correction.token_weights, [[1.0, 1.0, 1.0], [2.0, 2.0, 0.0], [0.25, 0.0, 0.0]])
    else:
        assert correction.token_weights is None
    low_zero = ROLLOUT_CORRECTIONS.make_settings("mask", low=0.0, high=4.0)
    assert sequence_mask(TRAINER, BEHAVIOUR, MASK, low_zero).kept.tolist() == [True, True, True]


def test_no_correction_changes_nothing():
    correction = ROLLOUT_CORRECTIONS.get("none")(TRAINER, BEHAVIOUR, MASK, ROLLOUT_CORRECTIONS.make_settings("none"))
    assert correction.token_weights is None and correction.kept is None


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["algo/rollout_correction=tis", "algo.rollout_correction.cap=0.9"], "algo.rollout_correction.cap=0.9"),
        (["algo/rollout_correction=mask", "algo.rollout_correction.high=0.5"], "algo.rollout_correction.high=0.5"),
        (["algo/rollout_correction=mask", "algo.rollout_correction.low=2"], "algo.rollout_correction.low=2"),
        (["algo/rollout_correction=mask", "algo.sampling.top_p=0.9"], "top-p's renormalisation"),
        (["algo=nlpo", "rollout=vllm"], "only rollout=hf applies"),
        (["rollout=vllm", "rollout.sync_timeout_s=0"], "rollout.sync_timeout_s=0"),
        (
            ["rollout=vllm", "rollout.gpu_memory_utilization=0"],
            r"rollout.gpu_memory_utilization=0.0: must be in \(0, 1\]",
        ),
        (["rollout=vllm", "rollout.max_model_len=0"], "rollout.max_model_len=0"),
        (["rollout=vllm", "rollout.dtype=int8"], "rollout.dtype='int8'"),
    ],
)
def test_invalid_correction_and_engine_settings_are_one_line_errors(config_error, overrides, message):
    error = config_error(*overrides)
    assert error is not None and "\n" not in error
    assert re.search(message, error), error


def test_rollout_vllm_without_vllm_names_the_install_route(config_error, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "vllm" else real(name, *a))
    error = config_error("rollout=vllm")
    assert "pip install -e '.[vllm]'" in error and "scripts/install_vllm_cpu.sh" in error and "\n" not in error


def length_reward(prompts, completions, **_) -> list[float]:
    """Rewards that differ within every group, so that every response has an advantage."""
    return [float(len(c) % 3) for c in completions]


def injected_run(tmp_path: Path, compose_config, monkeypatch, name: str, shift, *overrides: str) -> list[dict]:
    """One GRPO step of the tiny model with rlkit's sampler, its behaviour log-probs lowered by
    ``shift(rollout)`` (B, T) as if another engine had sampled (ratio pi_old / pi_b = exp(shift))."""
    from rlkit.trainer import train

    def skewed(self, *args, **kwargs):
        rollout = SAMPLE(self, *args, **kwargs)
        if rollout.log_probs is not None:
            rollout.log_probs = rollout.log_probs - shift(rollout) * rollout.response_mask
        return rollout

    monkeypatch.setattr(HFRollout, "sample", skewed)
    monkeypatch.setattr(HFRollout, "own_weights", True)  # compare behaviour and trainer log-probs, as for vLLM
    cfg = compose_config(
        "algo=grpo",
        "algo.kl.coef=0",
        f"reward.fn={__name__}:length_reward",
        *overrides,
        *fast_overrides(
            "trainer.max_steps=1", "trainer.eval_every=0", "model.warmstart.steps=0", "eval.num_examples=4"
        ),
    )
    (tmp_path / name).mkdir()  # as Hydra makes it
    train(cfg, str(tmp_path / name))
    lines = (tmp_path / name / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if "reward/mean" in r]


@pytest.mark.slow
def test_an_injected_mismatch_is_measured_and_corrected(tmp_path, compose_config, monkeypatch):
    """Behaviour log-probs log(1.5) below the trainer's on every token: the mismatch is measured
    (k3 = 1.5 - 1 - log 1.5 per token, ratio 1.5); TIS weights every token's loss by 1.5, so the
    gradient is 1.5x the uncorrected one; a cap of 1.2 weights by 1.2. Masking leaves out exactly
    the responses with an extreme ratio: a quarter of them, or all (then nothing trains)."""
    uniform = lambda rollout: torch.full_like(rollout.log_probs, math.log(1.5))  # noqa: E731
    [plain] = injected_run(tmp_path, compose_config, monkeypatch, "none", uniform)
    assert plain["rollout/mismatch_kl"] == pytest.approx(1.5 - 1 - math.log(1.5), abs=1e-4)
    assert plain["rollout/mismatch_max_ratio"] == pytest.approx(1.5, abs=1e-3)
    assert plain["rollout/mismatch_min_ratio"] == pytest.approx(1.5, abs=1e-3)
    assert plain["actor/grad_norm"] > 0
    [tis] = injected_run(tmp_path, compose_config, monkeypatch, "tis", uniform, "algo/rollout_correction=tis")
    assert tis["rollout_correction/weight_mean"] == pytest.approx(1.5, abs=1e-3)
    assert tis["actor/grad_norm"] == pytest.approx(1.5 * plain["actor/grad_norm"], rel=1e-3)
    [capped] = injected_run(
        tmp_path,
        compose_config,
        monkeypatch,
        "cap",
        uniform,
        "algo/rollout_correction=tis",
        "algo.rollout_correction.cap=1.2",
    )
    assert capped["rollout_correction/capped_frac"] == 1.0
    assert capped["actor/grad_norm"] == pytest.approx(1.2 * plain["actor/grad_norm"], rel=1e-3)

    first_group = lambda rollout: (torch.arange(len(rollout)) < 4).float()[:, None] * 5.0  # noqa: E731  (ratio e^5 per token)
    [masked] = injected_run(tmp_path, compose_config, monkeypatch, "mask", first_group, "algo/rollout_correction=mask")
    assert masked["rollout_correction/rejected_frac"] == pytest.approx(0.25)  # 1 of the 4 groups
    assert masked["rollout/mismatch_max_ratio"] == pytest.approx(math.exp(5), rel=1e-3)
    assert masked["actor/grad_norm"] > 0
    every_row = lambda rollout: torch.full_like(rollout.log_probs, 5.0)  # noqa: E731
    [all_masked] = injected_run(tmp_path, compose_config, monkeypatch, "all", every_row, "algo/rollout_correction=mask")
    assert all_masked["rollout_correction/rejected_frac"] == 1.0
    assert all_masked["actor/grad_norm"] == 0.0 and all_masked["actor/pg_loss"] == 0.0
