"""NLPO (Ramamurthy et al. 2023, arXiv:2210.01241, Algorithm 1): the top-p mask and the masked
log-probs against hand-worked values, rollouts that stay inside the mask policy's top-p sets, the
loop's masked scoring (the reference unmasked), and the mask policy's refresh every mu steps
across a checkpoint and resume."""

from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import small_split_overrides

from rlkit.algos.token_masks import masked_log_probs, top_p_mask
from rlkit.loops.nlpo import (
    FrozenModelCheckpoint,
    MaskPolicyProcessor,
    MaskPolicySettings,
    NLPOLoop,
    copy_weights,
    mask_policy_set,
)
from rlkit.rollout.generate import generate
from rlkit.rollout.logprobs import response_logits, token_log_probs

PROBS = torch.tensor([0.5, 0.3, 0.15, 0.05])
LOGITS = PROBS.log()


def mask_of(*kept: int, size: int = 4) -> torch.Tensor:
    return torch.tensor([i in kept for i in range(size)])


# --------------------------------------------------------------------------- top_p_mask


@pytest.mark.parametrize("p, kept", [(0.5, (0,)), (0.8, (0, 1)), (0.81, (0, 1, 2)), (0.96, (0, 1, 2, 3))])
def test_top_p_mask_is_the_smallest_most_probable_set_reaching_p(p, kept):
    # masses before each token in order: 0, 0.5, 0.8, 0.95; a token is kept while that mass is below p
    assert torch.equal(top_p_mask(LOGITS, p), mask_of(*kept))


def test_top_p_mask_does_not_depend_on_the_token_order():
    order = torch.tensor([2, 0, 3, 1])
    assert torch.equal(top_p_mask(LOGITS[order], 0.8), mask_of(0, 1)[order])


def test_p_one_masks_nothing_even_impossible_tokens():
    logits = torch.tensor([0.0, -1e9, float("-inf")])
    assert top_p_mask(logits, 1.0).all()


def test_tokens_tied_at_the_threshold_are_all_kept():
    # 0.4 then one of the 0.3s reach 0.5; the other 0.3 ties the last kept token and is kept too
    assert top_p_mask(torch.tensor([0.3, 0.4, 0.3]).log(), 0.5).all()
    assert torch.equal(top_p_mask(torch.tensor([0.3, 0.4, 0.3, 0.0]).log(), 0.5), mask_of(0, 1, 2))
    assert top_p_mask(torch.zeros(4), 0.3).all()  # uniform: every token ties the first


def test_top_p_mask_at_a_temperature():
    # T = 2: probs proportional to sqrt(PROBS) = [.7071, .5477, .3873, .2236] / 1.8657 = [.379, .294, .208, .120];
    # masses before: 0, .379, .673 (< .7), .880 -> three tokens; at T = 1 masses 0, .5, .8 -> two
    assert torch.equal(top_p_mask(LOGITS, 0.7, temperature=1.0), mask_of(0, 1))
    assert torch.equal(top_p_mask(LOGITS, 0.7, temperature=2.0), mask_of(0, 1, 2))
    assert torch.equal(top_p_mask(LOGITS * 2, 0.7, temperature=2.0), top_p_mask(LOGITS, 0.7))


def test_min_tokens_to_keep_and_batched_shapes():
    assert torch.equal(top_p_mask(LOGITS, 0.1, min_tokens_to_keep=3), mask_of(0, 1, 2))
    batch = torch.stack([LOGITS, LOGITS.flip(0)]).expand(3, 2, 4)
    mask = top_p_mask(batch, 0.8)
    assert mask.shape == (3, 2, 4)
    assert torch.equal(mask[1, 0], mask_of(0, 1)) and torch.equal(mask[2, 1], mask_of(2, 3))


def test_mask_policy_set_keeps_eos_unless_min_new_tokens_bans_it():
    nlpo = MaskPolicySettings(top_p=0.5, keep_eos=True)
    logits = torch.tensor([0.05, 0.03, 0.02, 0.9]).log()  # token 3 is EOS
    assert torch.equal(mask_policy_set(logits, nlpo, 1.0, eos_token_id=3), mask_of(3))
    assert torch.equal(
        mask_policy_set(torch.tensor([0.9, 0.05, 0.03, 0.02]).log(), nlpo, 1.0, eos_token_id=3), mask_of(0, 3)
    )  # keep_eos
    # EOS banned: the top-p set of the other tokens, renormalised [.5, .3, .2]: mass before token 1 is .5, not below .5
    assert torch.equal(mask_policy_set(logits, nlpo, 1.0, eos_token_id=3, eos_banned=True), mask_of(0))
    assert torch.equal(
        mask_policy_set(logits, MaskPolicySettings(top_p=0.6), 1.0, eos_token_id=3, eos_banned=True), mask_of(0, 1)
    )
    per_position = mask_policy_set(
        logits.expand(2, 3, 4), nlpo, 1.0, eos_token_id=3, eos_banned=torch.tensor([True, False, False])
    )
    assert torch.equal(per_position[1, 0], mask_of(0)) and torch.equal(per_position[1, 2], mask_of(3))


# --------------------------------------------------------------------------- masked_log_probs


def test_masked_log_probs_renormalise_inside_the_mask():
    logits, mask = LOGITS.expand(1, 3, 4), mask_of(0, 1).expand(1, 3, 4)
    log_probs, entropy = masked_log_probs(logits, torch.tensor([[0, 1, 2]]), mask, with_entropy=True)
    # inside {0, 1}: 0.5 / 0.8 = 0.625 and 0.3 / 0.8 = 0.375; token 2 lies outside: -inf
    torch.testing.assert_close(log_probs[0, :2], torch.tensor([math.log(0.625), math.log(0.375)]))
    assert log_probs[0, 2] == float("-inf")
    expected_entropy = -(0.625 * math.log(0.625) + 0.375 * math.log(0.375))  # 0.6616
    torch.testing.assert_close(entropy, torch.full((1, 3), expected_entropy))


def test_masked_log_probs_at_a_temperature():
    log_probs, _ = masked_log_probs(
        LOGITS.expand(1, 1, 4), torch.tensor([[0]]), mask_of(0, 1).expand(1, 1, 4), temperature=2.0
    )
    # T = 2 inside {0, 1}: sqrt(.5) / (sqrt(.5) + sqrt(.3)) = .7071 / 1.2548 = .5635
    torch.testing.assert_close(
        log_probs, torch.tensor([[math.log(math.sqrt(0.5) / (math.sqrt(0.5) + math.sqrt(0.3)))]])
    )


def test_an_all_true_mask_is_the_plain_distribution():
    torch.manual_seed(0)
    logits, targets = torch.randn(2, 5, 11), torch.randint(0, 11, (2, 5))
    log_probs, entropy = masked_log_probs(
        logits, targets, torch.ones(2, 5, 11, dtype=torch.bool), temperature=0.7, with_entropy=True
    )
    plain = torch.log_softmax(logits / 0.7, -1)
    torch.testing.assert_close(log_probs, plain.gather(-1, targets[..., None]).squeeze(-1))
    torch.testing.assert_close(entropy, -(plain.exp() * plain).sum(-1))
    # and p = 1 through top_p_mask gives the same
    torch.testing.assert_close(masked_log_probs(logits, targets, top_p_mask(logits, 1.0), 0.7)[0], log_probs)


def test_masked_gradients_are_finite_and_zero_outside_the_mask():
    logits = LOGITS.clone().expand(1, 1, 4).contiguous().requires_grad_(True)
    log_probs, entropy = masked_log_probs(
        logits, torch.tensor([[1]]), mask_of(0, 1).expand(1, 1, 4), with_entropy=True, entropy_grad=True
    )
    (log_probs.sum() + entropy.sum()).backward()
    assert torch.isfinite(logits.grad).all()
    assert torch.equal(logits.grad[0, 0, 2:], torch.zeros(2))
    # d log pi^M(1) / d logit = onehot(1) - pi^M, inside the mask: [-.625, .625]; the entropy adds its own share
    assert logits.grad[0, 0, 0] < 0 < logits.grad[0, 0, 1]


# --------------------------------------------------------------------------- rollouts and scoring with a mask model

PROMPTS = ["12+34=", "1+2=", "40+41=", "7+7="]  # different lengths: left padding


@pytest.fixture(scope="module")
def models():
    """A policy and a differently initialised mask model sharing one tokenizer."""
    from rlkit.models.tiny import build_tiny_model

    arch = SimpleNamespace(
        hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4, vocab_size=128, max_position_embeddings=128
    )
    corpus = [f"{a}+{b}={a + b}" for a in range(40) for b in range(40)]
    policy, tokenizer = build_tiny_model(arch, corpus, seed=0)
    mask_model, _ = build_tiny_model(arch, corpus, seed=1)
    return policy.eval(), mask_model.eval(), tokenizer


def mask_sets(mask_model, rollout, nlpo, temperature, eos, min_new_tokens=0):
    """M_psi(s_t) at every response position from one full forward over the rows (no cache)."""
    width = rollout.response_ids.shape[1]
    with torch.no_grad():
        logits = response_logits(mask_model, rollout.sequences, rollout.attention_mask, width, share_prompt=False)
    return mask_policy_set(logits.float(), nlpo, temperature, eos, torch.arange(width) < min_new_tokens)


def inside(allowed, rollout) -> torch.Tensor:
    """Whether each response token (up to and including EOS) lies in its set; True elsewhere."""
    hit = allowed.gather(-1, rollout.response_ids.unsqueeze(-1)).squeeze(-1)
    return hit | (rollout.response_mask == 0)


@pytest.mark.parametrize("temperature, keep_eos, min_new_tokens", [(1.0, False, 0), (1.5, True, 0), (1.0, True, 5)])
def test_rollouts_only_contain_tokens_of_the_mask_policys_top_p_set(models, temperature, keep_eos, min_new_tokens):
    policy, mask_model, tokenizer = models
    nlpo = MaskPolicySettings(top_p=0.5, keep_eos=keep_eos)
    processor = MaskPolicyProcessor(
        mask_model, nlpo, temperature, tokenizer.eos_token_id, tokenizer.pad_token_id, min_new_tokens
    )
    torch.manual_seed(0)
    rollout = generate(
        policy,
        tokenizer,
        PROMPTS,
        num_samples=8,
        max_new_tokens=12,
        temperature=temperature,
        logits_processor=processor,
        min_new_tokens=min_new_tokens,
    )
    allowed = mask_sets(mask_model, rollout, nlpo, temperature, tokenizer.eos_token_id, min_new_tokens)
    assert inside(allowed, rollout).all()
    assert not (rollout.response_ids[:, :min_new_tokens] == tokenizer.eos_token_id).any()
    assert allowed.float().mean() < 0.9  # the sets leave tokens out, so the check has teeth ...
    torch.manual_seed(0)
    free = generate(policy, tokenizer, PROMPTS, num_samples=8, max_new_tokens=12, temperature=temperature)
    assert not inside(
        mask_sets(mask_model, free, nlpo, temperature, tokenizer.eos_token_id), free
    ).all()  # ... which unmasked sampling fails
    assert processor.rows > 0 and 0 < processor.policy_mass / processor.rows < 1


def test_mask_processor_with_the_policy_itself_keeps_at_least_p_of_its_mass(models):
    policy, _, tokenizer = models
    processor = MaskPolicyProcessor(
        policy, MaskPolicySettings(top_p=0.9, keep_eos=False), 1.0, tokenizer.eos_token_id, tokenizer.pad_token_id
    )
    torch.manual_seed(1)
    generate(policy, tokenizer, PROMPTS, num_samples=4, max_new_tokens=8, logits_processor=processor)
    assert processor.policy_mass / processor.rows >= 0.9 - 1e-5  # psi = theta: the top-p set holds >= p of pi_theta


def bare_loop(policy, mask_model, tokenizer, nlpo, temperature=1.0, reference=None) -> NLPOLoop:
    """An NLPOLoop with only what log_probs reads (no engines, no run directory)."""
    loop = NLPOLoop.__new__(NLPOLoop)
    loop.settings = SimpleNamespace(sampling=SimpleNamespace(temperature=temperature, min_new_tokens=0))
    loop.run = SimpleNamespace(tokenizer=tokenizer)
    loop.nlpo, loop.mask_model, loop.reference, loop.targets_outside = nlpo, mask_model, reference, [0.0, 0.0]
    return loop


def test_loop_scores_the_masked_policy_and_leaves_the_reference_unmasked(models):
    policy, mask_model, tokenizer = models
    nlpo, temperature = MaskPolicySettings(top_p=0.5, keep_eos=True), 0.8
    loop = bare_loop(policy, mask_model, tokenizer, nlpo, temperature, reference=mask_model)
    torch.manual_seed(2)
    rollout = generate(
        policy,
        tokenizer,
        PROMPTS,
        num_samples=3,
        max_new_tokens=10,
        temperature=temperature,
        logits_processor=MaskPolicyProcessor(
            mask_model, nlpo, temperature, tokenizer.eos_token_id, tokenizer.pad_token_id
        ),
    )
    index = torch.arange(len(rollout))
    width = rollout.response_ids.shape[1]
    with torch.no_grad():
        log_probs, entropy = loop.log_probs(policy, rollout, index, with_entropy=True)
        logits = response_logits(policy, rollout.sequences, rollout.attention_mask, width)
        expected, expected_entropy = masked_log_probs(
            logits,
            rollout.response_ids,
            mask_sets(mask_model, rollout, nlpo, temperature, tokenizer.eos_token_id),
            temperature,
            with_entropy=True,
        )
        plain, _ = token_log_probs(policy, rollout.sequences, rollout.attention_mask, width, temperature)
        reference, _ = loop.log_probs(mask_model, rollout, index)
        reference_plain, _ = token_log_probs(mask_model, rollout.sequences, rollout.attention_mask, width, temperature)
    response = rollout.response_mask.bool()
    torch.testing.assert_close(log_probs[response], expected[response], atol=1e-5, rtol=0)
    torch.testing.assert_close(entropy[response], expected_entropy[response], atol=1e-5, rtol=0)
    assert torch.isfinite(log_probs).all()  # padding positions too: their targets are added to the sets
    assert (log_probs[response] >= plain[response] - 1e-6).all() and (
        log_probs[response] > plain[response] + 1e-3
    ).any()  # renormalised
    torch.testing.assert_close(reference, reference_plain)  # the reference model is scored unmasked
    assert loop.targets_outside[0] == 0 and loop.targets_outside[1] == float(response.sum())


def test_loop_with_p_one_is_plain_ppo_scoring(models):
    policy, _, tokenizer = models
    loop = bare_loop(policy, policy, tokenizer, MaskPolicySettings(top_p=1.0))
    torch.manual_seed(3)
    rollout = generate(policy, tokenizer, PROMPTS, num_samples=2, max_new_tokens=6)
    with torch.no_grad():
        log_probs, _ = loop.log_probs(policy, rollout, torch.arange(len(rollout)))
        plain, _ = token_log_probs(policy, rollout.sequences, rollout.attention_mask, rollout.response_ids.shape[1])
    torch.testing.assert_close(log_probs, plain, atol=1e-6, rtol=0)


def test_copy_weights_and_the_frozen_model_checkpoint_round_trip(models, tmp_path):
    policy, mask_model, _ = models
    import copy

    target = copy.deepcopy(mask_model)
    copy_weights(policy, target)
    assert all(torch.equal(a, b) for a, b in zip(policy.state_dict().values(), target.state_dict().values()))
    FrozenModelCheckpoint(target).save_checkpoint(str(tmp_path), tag="state")
    restored = copy.deepcopy(mask_model)
    FrozenModelCheckpoint(restored).load_checkpoint(str(tmp_path), tag="state")
    assert all(torch.equal(a, b) for a, b in zip(policy.state_dict().values(), restored.state_dict().values()))
    assert restored.lm_head.weight.data_ptr() == restored.model.embed_tokens.weight.data_ptr()  # still tied


# --------------------------------------------------------------------------- refresh every mu steps, checkpoint and resume


def distinct_characters(prompts, completions, **_) -> list[float]:
    """A dense reward a random model already earns (as in test_algo_presets_e2e)."""
    return [len(set(c)) / (len(c) + 1) for c in completions]


@pytest.fixture(scope="module")
def train_nlpo(tmp_path_factory, compose_config):
    from rlkit.trainer import train
    from rlkit.validate import validate

    run_dir = tmp_path_factory.mktemp("nlpo")

    def _train(max_steps: int) -> Path:
        overrides = small_split_overrides(
            f"trainer.max_steps={max_steps}", "trainer.save_every=1", "trainer.keep_checkpoints=10", "algo.group_size=4"
        )
        cfg = compose_config(
            "algo=nlpo",
            f"reward.fn={__name__}:distinct_characters",
            "algo.optim.lr=1e-3",
            "algo.mask.update_every=3",
            *overrides,
        )
        validate(cfg)
        train(cfg, str(run_dir))
        return run_dir

    return _train


def weights(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path))


def same(a: dict, b: dict) -> bool:
    return all(torch.equal(a[k], b[k]) for k in b if k in a) and bool(set(a) & set(b))


@pytest.mark.slow
def test_mask_model_refreshes_every_mu_steps_and_survives_resume(train_nlpo):
    run_dir = train_nlpo(4)  # mu = 3: pi_psi = pi_theta_0 through step 2, copied after step 3's update
    run_dir = train_nlpo(5)  # resumes from checkpoint 4, where pi_psi (= pi_theta_3) is not the policy
    checkpoints = run_dir / "checkpoints"
    policy = {step: weights(checkpoints / str(step) / "model.safetensors") for step in range(1, 6)}
    mask = {
        step: weights(checkpoints / str(step) / "training_state_mask_model" / "state" / "model.safetensors")
        for step in range(1, 6)
    }
    initial = weights(run_dir / "initial_model" / "model.safetensors")
    assert same(mask[1], initial) and same(mask[2], initial) and not same(policy[2], initial)
    assert same(mask[3], policy[3]) and same(mask[4], policy[3]) and not same(mask[4], policy[4])
    assert same(mask[5], policy[3]) and not same(
        mask[5], policy[4]
    )  # restored from checkpoint 4, not re-copied on resume
    records = [
        json.loads(line)
        for line in (run_dir / "metrics.jsonl").read_text().splitlines()
        if '"nlpo/mask_refreshed"' in line
    ]
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5]
    assert [r["nlpo/mask_refreshed"] for r in records] == [0.0, 0.0, 1.0, 0.0, 0.0]
    assert [r["nlpo/mask_age"] for r in records] == [0.0, 1.0, 2.0, 0.0, 1.0]
    assert records[0]["nlpo/policy_mass_in_mask"] >= 0.9 - 1e-4  # psi = theta: the set holds >= p of the policy's mass
    assert all(r["nlpo/target_outside_mask_frac"] <= 0.01 for r in records)
    assert all(r["nlpo/mask_size_mean"] > 0 for r in records)
