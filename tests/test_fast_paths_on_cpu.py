"""The speed-ups change no result: shared-prompt prefill in sampling, shared-prompt
forward passes for log-probs and gradients, and skipping responses whose advantages
are all zero — each against the plain computation."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import fast_overrides
from transformers import GenerationConfig

from rlkit.models.tiny import build_tiny_model
from rlkit.rollout.generate import draw, generate, response_mask_from_eos, sample, sampling_probs
from rlkit.rollout.logprobs import token_log_probs

PROMPTS = ["12+34=", "1+2=", "40+41=", "7+7="]  # different lengths: left padding


@pytest.fixture(scope="module")
def tiny():
    arch = SimpleNamespace(
        hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4, vocab_size=256, max_position_embeddings=128
    )
    return build_tiny_model(arch, [f"{a}+{b}={a + b}" for a in range(40) for b in range(40)], seed=0)


def transformers_generate(model, tokenizer, seed: int, **settings) -> torch.Tensor:
    torch.manual_seed(seed)
    encoded = tokenizer(PROMPTS, return_tensors="pt", padding=True, add_special_tokens=False)
    config = GenerationConfig(pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, **settings)
    model.eval()
    output = model.generate(**encoded, generation_config=config)[:, encoded["input_ids"].shape[1] :]
    mask, _ = response_mask_from_eos(output, tokenizer.eos_token_id)
    return output.masked_fill(mask == 0, tokenizer.pad_token_id)


@pytest.mark.parametrize("share_prompt", [False, True])
@pytest.mark.parametrize("min_new_tokens", [0, 10])
def test_greedy_decoding_matches_transformers_generate(tiny, share_prompt, min_new_tokens):
    """Same tokens as ``model.generate`` (which prefills every row), EOS masking included."""
    model, tokenizer = tiny
    rollout = generate(
        model,
        tokenizer,
        PROMPTS,
        num_samples=1,
        max_new_tokens=10,
        greedy=True,
        min_new_tokens=min_new_tokens,
        share_prompt=share_prompt,
    )
    expected = transformers_generate(
        model, tokenizer, 0, max_new_tokens=10, do_sample=False, min_new_tokens=min_new_tokens
    )
    assert torch.equal(rollout.response_ids, expected[:, : rollout.response_ids.shape[1]])
    if min_new_tokens:
        assert rollout.response_mask.all()  # EOS masked: every response runs the full 10 tokens


@pytest.mark.parametrize("top_p", [1.0, 0.7])
def test_shared_prompt_sampling_draws_the_same_tokens_as_per_row_prefill(tiny, top_p):
    model, tokenizer = tiny
    rollouts = []
    for share in (False, True):
        torch.manual_seed(5)
        rollouts.append(
            generate(model, tokenizer, PROMPTS, num_samples=4, max_new_tokens=10, top_p=top_p, share_prompt=share)
        )
    assert torch.equal(rollouts[0].response_ids, rollouts[1].response_ids)
    assert len({tuple(row) for row in rollouts[0].response_ids.tolist()}) > len(PROMPTS)  # samples of a prompt differ


def test_per_prompt_length_limits(tiny):
    """One cap and one EOS floor per prompt: responses stop (truncated) at their own cap, and
    a floor as long as the cap leaves no room for EOS."""
    model, tokenizer = tiny
    encoded = tokenizer(PROMPTS[:2], return_tensors="pt", padding=True, add_special_tokens=False)
    torch.manual_seed(0)
    rollout = sample(
        model,
        encoded["input_ids"],
        encoded["attention_mask"],
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        num_samples=2,
        max_new_tokens=torch.tensor([3, 7]),
        min_new_tokens=torch.tensor([3, 7]),
    )
    assert rollout.response_lengths.tolist() == [3, 3, 7, 7] and rollout.truncated.all()
    assert rollout.response_ids.shape[1] == 7 and (rollout.response_ids[:2, 3:] == tokenizer.pad_token_id).all()


def test_draw_follows_the_distribution_and_never_picks_impossible_tokens():
    probs = torch.tensor([[0.5, 0.0, 0.3, 0.2, 0.0], [0.0, 0.0, 0.0, 0.0, 2.0]])  # unnormalised rows are fine
    torch.manual_seed(0)
    draws = torch.stack([draw(probs) for _ in range(20000)])
    frequencies = torch.stack([(draws[:, 0] == k).float().mean() for k in range(5)])
    torch.testing.assert_close(frequencies, probs[0], atol=0.015, rtol=0)
    assert (draws[:, 1] == 4).all()
    assert torch.equal(draw(torch.tensor([[0.0, 1.0, 0.0]])), torch.tensor([1]))


def test_draw_never_runs_past_the_last_possible_token(monkeypatch):
    """A uniform number at the top of its range (the threshold equals the total mass) still
    draws the last token of nonzero probability, not a zero-probability one after it."""
    monkeypatch.setattr(torch, "rand_like", torch.ones_like)
    assert torch.equal(draw(torch.tensor([[0.5, 0.5, 0.0, 0.0], [0.0, 0.3, 0.0, 0.7]])), torch.tensor([1, 3]))


def test_nucleus_keeps_the_smallest_set_reaching_top_p():
    probs = sampling_probs(torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]])), temperature=1.0, top_p=0.8)
    torch.testing.assert_close(
        probs, torch.tensor([[0.5, 0.3, 0.0, 0.0]])
    )  # 0.5 + 0.3 reaches 0.8: draw() takes unnormalised rows
    assert torch.equal(sampling_probs(torch.zeros(1, 3), 2.0, 1.0), torch.full((1, 3), 1 / 3))


def test_shared_prompt_log_probs_and_gradients_match_whole_rows(tiny):
    model, tokenizer = tiny
    torch.manual_seed(3)
    rollout = generate(model, tokenizer, PROMPTS, num_samples=3, max_new_tokens=8)
    order = torch.randperm(len(rollout))  # groups need not be adjacent
    sequences, attention = rollout.sequences[order], rollout.attention_mask[order]
    mask = rollout.response_mask[order].bool()
    results = []
    for share in (False, True):
        model.zero_grad()
        log_probs, entropy = token_log_probs(
            model,
            sequences,
            attention,
            rollout.response_ids.shape[1],
            temperature=0.7,
            with_entropy=True,
            share_prompt=share,
        )
        (log_probs * mask).sum().backward()
        results.append((log_probs.detach()[mask], entropy[mask], [p.grad.clone() for p in model.parameters()]))
    (plain_lp, plain_ent, plain_grads), (shared_lp, shared_ent, shared_grads) = results
    torch.testing.assert_close(shared_lp, plain_lp, atol=1e-5, rtol=0)
    torch.testing.assert_close(shared_ent, plain_ent, atol=1e-5, rtol=0)
    for plain, shared in zip(plain_grads, shared_grads):
        torch.testing.assert_close(shared, plain, atol=1e-4, rtol=1e-4)


def half_constant_reward(prompts, completions, **_) -> list[float]:
    """About half the prompts always score 0 (zero-variance groups, zero advantages);
    the others score by response length."""
    return [float(len(c) % 3) if sum(map(ord, p)) % 2 else 0.0 for p, c in zip(prompts, completions)]


@pytest.mark.slow
def test_skipping_zero_advantage_responses_leaves_the_update_unchanged(tmp_path, compose_config, monkeypatch):
    from safetensors.torch import load_file

    from rlkit.loops.update import PolicyUpdate
    from rlkit.trainer import train

    def run(name: str) -> tuple[Path, list[dict]]:
        import json

        cfg = compose_config(
            "algo=grpo",
            "algo.kl.coef=0",
            "algo.optim.lr=1e-3",
            f"reward.fn={__name__}:half_constant_reward",
            *fast_overrides(
                "trainer.max_steps=3",
                "trainer.eval_every=0",
                "trainer.save_every=3",
                "model.warmstart.steps=0",
                "trainer.micro_batch_per_device=4",
            ),
        )
        train(cfg, str(tmp_path / name))
        records = [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
        return tmp_path / name / "checkpoints" / "3", [r for r in records if "reward/mean" in r]

    skipping, skip_records = run("skip")
    monkeypatch.setattr(
        PolicyUpdate,
        "rows_with_gradient",
        lambda self, rows: list(rows.tensor_split(self.loop.engine.gradient_accumulation_steps())),
    )
    every_row, all_records = run("all")
    assert max(r["actor/skipped_zero_advantage_frac"] for r in skip_records) > 0
    assert [r["reward/mean"] for r in skip_records] == [r["reward/mean"] for r in all_records]
    skipped_weights, all_weights = (
        load_file(str(skipping / "model.safetensors")),
        load_file(str(every_row / "model.safetensors")),
    )
    for key, value in all_weights.items():
        torch.testing.assert_close(skipped_weights[key], value, atol=1e-5, rtol=1e-4)


def test_sliding_window_models_keep_their_own_cache_and_decode_like_generate(tiny):
    """Layers that are not plain full attention (here Mistral's sliding window, shorter than the
    sequences) are not replaced by the reserved cache: greedy decoding still matches ``generate``."""
    from transformers import MistralConfig, MistralForCausalLM

    _, tokenizer = tiny
    config = MistralConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        sliding_window=4,
        max_position_embeddings=128,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.bos_token_id,
    )
    torch.manual_seed(0)
    model = MistralForCausalLM(config).eval()
    rollout = generate(model, tokenizer, PROMPTS, num_samples=2, max_new_tokens=10, greedy=True)
    expected = transformers_generate(model, tokenizer, 0, max_new_tokens=10, do_sample=False).repeat_interleave(
        2, 0
    )  # greedy: both samples alike
    assert torch.equal(rollout.response_ids, expected[:, : rollout.response_ids.shape[1]])
    torch.manual_seed(1)
    sampled = generate(model, tokenizer, PROMPTS, num_samples=3, max_new_tokens=8)
    shared, _ = token_log_probs(model, sampled.sequences, sampled.attention_mask, 8, share_prompt=True)
    whole, _ = token_log_probs(model, sampled.sequences, sampled.attention_mask, 8, share_prompt=False)
    mask = sampled.response_mask.bool()
    torch.testing.assert_close(shared[mask], whole[mask], atol=1e-5, rtol=0)


FAULTS_PER_ROUND = """
import ctypes, resource, sys, torch
from rlkit.engine import cpu_heap
if sys.argv[1] == "keep":
    assert cpu_heap.keep_freed_memory()
else:  # glibc's initial 128 KiB thresholds, fixed (left alone, glibc adapts them to past frees, so it varies run to run)
    libc = ctypes.CDLL("libc.so.6")
    assert libc.mallopt(cpu_heap.M_MMAP_THRESHOLD, 128 * 1024) and libc.mallopt(cpu_heap.M_TRIM_THRESHOLD, 128 * 1024)
def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
rounds = []
for _ in range(6):  # like a training step: several 12 MiB activations alive at once, then all freed
    before = faults()
    inputs = [torch.ones(3 * 2**20) for _ in range(6)]
    outputs = [x * 2 for x in inputs]
    del inputs, outputs
    rounds.append(faults() - before)
print(int(sorted(rounds[1:])[2]))  # the median round after the first
"""


def test_kept_heap_memory_is_not_faulted_in_again_at_every_step():
    """``keep_freed_memory``: once warm, re-allocating the same buffers costs no page faults."""

    def faults_per_round(mode: str) -> int:
        return int(
            subprocess.run(
                [sys.executable, "-c", FAULTS_PER_ROUND, mode], capture_output=True, text=True, check=True
            ).stdout
        )

    pages = 12 * 3 * 2**20 * 4 // 4096
    assert faults_per_round("return") > pages // 2  # glibc hands the memory back and faults it in at every round
    assert faults_per_round("keep") < pages // 20
