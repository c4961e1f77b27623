"""vLLM as a rollout engine (rlkit/rollout/vllm_engine.py): sampling layout and EOS handling,
behaviour log-probs against rlkit's recomputation, weight sync (full and LoRA), and a stalled sync.

Needs vLLM (scripts/install_vllm_cpu.sh on a CPU machine); every test but the missing-engine one
is marked ``vllm`` and skips without it. The model is a 2-layer Llama with head dimension 32,
the smallest head vLLM's CPU attention supports.
"""

from __future__ import annotations

import importlib.util
import threading
import time
from types import SimpleNamespace

import pytest
import torch

from rlkit.config import ConfigError
from rlkit.models.tiny import build_tiny_model
from rlkit.rollout.generate import left_pad, sample
from rlkit.rollout.logprobs import token_log_probs
from rlkit.rollout.vllm_engine import VllmEngine, VllmEngineSettings, WeightSyncError, import_vllm, write_engine_dir

HAS_VLLM = importlib.util.find_spec("vllm") is not None
HAS_PEFT = importlib.util.find_spec("peft") is not None


def needs_vllm(test):
    """Marked ``vllm`` (select with ``-m vllm``), skipped where vLLM is not installed."""
    return pytest.mark.vllm(pytest.mark.skipif(not HAS_VLLM, reason="vLLM is not installed")(test))


# Measured (fp32, CPU): the engine's log-probs match rlkit's recomputation to 2e-6 (exp. 1e-6 typical);
# a weight update of 0.05 * N(0, 1) per parameter moves them by about 1.
LOGPROB_TOLERANCE = 1e-4
SETTINGS = VllmEngineSettings(max_model_len=128, kv_cache_gib=1 / 16)
PROMPTS = [[5, 6, 7], [8, 9, 10, 11, 12], [13, 14]]


def tiny_model(seed: int = 0):
    corpus = [f"{a}+{b}={a + b}" for a in range(100) for b in range(0, 100, 7)]
    arch = SimpleNamespace(
        hidden_size=64, num_layers=2, num_heads=2, intermediate_size=128, vocab_size=512, max_position_embeddings=256
    )
    return build_tiny_model(arch, corpus, seed)


@pytest.fixture(scope="module")
def policy(tmp_path_factory):
    """(model, tokenizer, engine started from the model's saved directory)."""
    model, tokenizer = tiny_model()
    directory = str(tmp_path_factory.mktemp("policy"))
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    engine = VllmEngine(directory, SETTINGS, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    yield model, tokenizer, engine
    engine.close()


def trainer_log_probs(model, prompts, samples, num_samples, temperature):
    """rlkit's recomputation of the sampled tokens' log-probs (0 on padding)."""
    ids, mask = left_pad([p for p in prompts for _ in range(num_samples)], pad_token_id=2)
    with torch.no_grad():
        log_probs, _ = token_log_probs(
            model,
            torch.cat([ids, samples.response_ids], 1),
            torch.cat([mask, samples.response_mask], 1),
            samples.response_ids.shape[1],
            temperature=temperature,
        )
    return log_probs * samples.response_mask


def engine_sequence_log_probs(engine, sequence: list[int]) -> torch.Tensor:
    """The engine's log-probs (temperature 1, its LoRA adapter if any) of each token of a fixed
    sequence after the first."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    params = SamplingParams(max_tokens=1, prompt_logprobs=0, detokenize=False)
    (output,) = engine.llm.generate(
        [TokensPrompt(prompt_token_ids=sequence)], params, use_tqdm=False, lora_request=engine.lora_request
    )
    return torch.tensor([position[token].logprob for position, token in zip(output.prompt_logprobs[1:], sequence[1:])])


def trainer_sequence_log_probs(model, sequence: list[int]) -> torch.Tensor:
    ids = torch.tensor([sequence])
    with torch.no_grad():
        return token_log_probs(model, ids, torch.ones_like(ids), len(sequence) - 1)[0][0]


def perturb(model, scale: float = 0.05, seed: int = 0) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(torch.randn(parameter.shape, generator=generator) * scale)


def test_missing_vllm_is_a_one_line_config_error(monkeypatch):
    monkeypatch.setitem(__import__("sys").modules, "vllm", None)
    with pytest.raises(ConfigError, match=r"pip install -e '\.\[vllm\]'.*install_vllm_cpu\.sh"):
        import_vllm()


@needs_vllm
def test_sampled_layout_and_behaviour_log_probs(policy):
    """num_samples adjacent rows per prompt, right-padded, EOS closing the mask, and each token's
    log-prob equal to rlkit's recomputation at the sampling temperature once EOS is allowed."""
    model, tokenizer, engine = policy
    torch.manual_seed(0)
    samples = engine.sample(PROMPTS, num_samples=4, max_new_tokens=[9, 12, 7], min_new_tokens=2, temperature=0.7)
    assert samples.response_ids.shape[0] == 12 and samples.response_ids.shape[1] <= 12
    caps = torch.tensor([9, 12, 7]).repeat_interleave(4)
    lengths = samples.response_mask.sum(1)
    eos = samples.response_ids == tokenizer.eos_token_id
    ended = eos.any(1)
    assert torch.equal(samples.truncated, ~ended)
    assert torch.equal(lengths[samples.truncated], caps[samples.truncated])  # no EOS: ran to the cap
    last = samples.response_ids[torch.arange(12), lengths - 1]
    assert torch.all(last[ended] == tokenizer.eos_token_id) and torch.all(eos.sum(1) <= 1)  # EOS only at the end
    assert torch.all(lengths >= 3)  # min_new_tokens=2 masks EOS for the first two tokens
    padding = samples.response_mask == 0
    assert torch.all(samples.response_ids[padding] == tokenizer.pad_token_id) and torch.all(
        samples.log_probs[padding] == 0
    )
    gap = samples.log_probs - trainer_log_probs(model, PROMPTS, samples, 4, temperature=0.7)
    assert gap[:, 2:].abs().max() < LOGPROB_TOLERANCE
    # while EOS is masked the behaviour distribution is renormalised over the other tokens, so its
    # log-probs exceed the unmasked recomputation by -log(1 - p(EOS))
    assert gap[:, :2].min() > 0 and gap[:, :2].max() < 0.1


@needs_vllm
def test_top_p_log_probs_are_renormalised_over_the_nucleus(policy):
    """With top_p < 1 the behaviour log-prob is the nucleus-renormalised one: at least the full
    distribution's (rlkit's recomputation), by log(1 / nucleus mass) <= log(1 / top_p)."""
    model, _, engine = policy
    torch.manual_seed(0)
    samples = engine.sample(PROMPTS, num_samples=4, max_new_tokens=8, temperature=1.0, top_p=0.8)
    gap = (samples.log_probs - trainer_log_probs(model, PROMPTS, samples, 4, temperature=1.0))[
        samples.response_mask.bool()
    ]
    assert gap.min() > -LOGPROB_TOLERANCE and gap.max() < -torch.log(torch.tensor(0.8)) + LOGPROB_TOLERANCE


@needs_vllm
def test_greedy_matches_rlkit_sampler_including_eos(policy):
    """Greedy responses equal rlkit's own sampler's, token for token, mask and truncation
    included; EOS is a token the greedy path of the first prompt emits, so one row ends early."""
    model, tokenizer, engine = policy
    ids, mask = left_pad(PROMPTS, tokenizer.pad_token_id)
    free = sample(model, ids, mask, eos_token_id=-1, pad_token_id=tokenizer.pad_token_id, num_samples=1,
                  max_new_tokens=8, greedy=True)  # fmt: skip
    eos = int(free.response_ids[0, 3])
    engine.eos_token_id = eos
    try:
        mine = sample(model, ids, mask, eos_token_id=eos, pad_token_id=tokenizer.pad_token_id, num_samples=2,
                      max_new_tokens=8, greedy=True)  # fmt: skip
        theirs = engine.sample(PROMPTS, num_samples=2, max_new_tokens=8, greedy=True)
    finally:
        engine.eos_token_id = tokenizer.eos_token_id
    width = mine.response_ids.shape[1]
    assert theirs.response_ids.shape[1] == width
    assert torch.equal(theirs.response_ids, mine.response_ids)
    assert torch.equal(theirs.response_mask, mine.response_mask)
    assert torch.equal(theirs.truncated, mine.truncated) and not theirs.truncated[0] and theirs.truncated.any()


@needs_vllm
def test_weight_sync_brings_the_trainers_log_probs(policy):
    """After an update and a sync, the engine scores a fixed sequence as the trainer does, and
    no longer as before; its sampled tokens' log-probs match the updated trainer's too."""
    model, _, engine = policy
    sequence = [5, 6, 7, 8, 9, 10, 11, 12, 40, 41, 42, 43]
    before = engine_sequence_log_probs(engine, sequence)
    assert (before - trainer_sequence_log_probs(model, sequence)).abs().max() < LOGPROB_TOLERANCE
    perturb(model)
    engine.load_weights(model)
    after = engine_sequence_log_probs(engine, sequence)
    assert (after - trainer_sequence_log_probs(model, sequence)).abs().max() < LOGPROB_TOLERANCE
    assert (after - before).abs().max() > 0.1
    torch.manual_seed(1)
    samples = engine.sample(PROMPTS, num_samples=2, max_new_tokens=8, temperature=0.9)
    assert (samples.log_probs - trainer_log_probs(model, PROMPTS, samples, 2, temperature=0.9)).abs().max() < 1e-4


@needs_vllm
def test_stalled_sync_ends_with_a_clear_error_within_the_timeout(policy, monkeypatch):
    model, _, engine = policy
    release = threading.Event()
    monkeypatch.setattr(engine.llm, "collective_rpc", lambda *args, **kwargs: release.wait(60))
    monkeypatch.setattr(engine.settings, "sync_timeout_s", 1.0)
    start = time.perf_counter()
    try:
        with pytest.raises(WeightSyncError, match=r"did not finish within 1 s"):
            engine.load_weights(model)
        assert time.perf_counter() - start < 5
        with pytest.raises(WeightSyncError, match="unusable"):  # a stuck engine is not sampled from
            engine.sample(PROMPTS, num_samples=1, max_new_tokens=2)
    finally:
        release.set()
        engine.stuck = None


@needs_vllm
def test_unsupported_head_dimension_is_refused_up_front(tmp_path):
    model, tokenizer = build_tiny_model(
        SimpleNamespace(hidden_size=32, num_layers=1, num_heads=4, intermediate_size=64, vocab_size=300,
                        max_position_embeddings=64),
        ["1+1=2"],
        0,
    )  # fmt: skip
    write_engine_dir(model, tokenizer, str(tmp_path))
    with pytest.raises(ConfigError, match="head dimension 8"):
        VllmEngine(str(tmp_path), SETTINGS, eos_token_id=1, pad_token_id=2, dummy_weights=True)


@needs_vllm
@pytest.mark.skipif(not HAS_PEFT, reason="peft is not installed")
@pytest.mark.parametrize("max_lora_rank", [8, 0], ids=["adapter", "merged"])
def test_lora_policy_reaches_the_engine(tmp_path, max_lora_rank):
    """A peft LoRA policy, served as a vLLM adapter or synced as merged weights: after each
    sync the engine scores like the adapted trainer, and a changed adapter is picked up."""
    from peft import LoraConfig, get_peft_model

    model, tokenizer = tiny_model(seed=1)
    policy = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]))
    engine = VllmEngine(
        write_engine_dir(policy, tokenizer, str(tmp_path)),
        VllmEngineSettings(max_model_len=128, kv_cache_gib=1 / 16, max_lora_rank=max_lora_rank),
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        dummy_weights=True,
    )
    sequence = [5, 6, 7, 8, 9, 10, 11, 12, 40, 41, 42, 43]
    try:
        scores = []
        for seed in (0, 1):
            with torch.no_grad():
                for name, parameter in policy.named_parameters():
                    if "lora_B" in name:  # peft starts B at zero: the adapter would change nothing
                        parameter.copy_(torch.randn(parameter.shape, generator=torch.Generator().manual_seed(seed)))
            base_before = [p.clone() for p in model.parameters()]
            engine.load_weights(policy)
            assert all(torch.equal(a, b) for a, b in zip(base_before, model.parameters()))  # trainer untouched
            scores.append(engine_sequence_log_probs(engine, sequence))
            assert (scores[-1] - trainer_sequence_log_probs(policy, sequence)).abs().max() < LOGPROB_TOLERANCE
            with policy.disable_adapter():
                assert (scores[-1] - trainer_sequence_log_probs(policy, sequence)).abs().max() > 0.1
        assert (scores[0] - scores[1]).abs().max() > 0.1
    finally:
        engine.close()


@needs_vllm
def test_close_keeps_the_process_group_and_other_engines_working(policy, tmp_path):
    """vLLM's shutdown tears down torch.distributed's default group and vLLM's own groups; closing
    one engine must leave the trainer's collectives and another engine in the process working."""
    _, _, running = policy
    model, tokenizer = tiny_model()
    engine = VllmEngine(
        write_engine_dir(model, tokenizer, str(tmp_path)),
        SETTINGS,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        dummy_weights=True,
    )
    engine.close()
    assert engine.llm is None and torch.distributed.is_initialized()
    total = torch.ones(1)
    torch.distributed.all_reduce(total)
    assert total.item() == torch.distributed.get_world_size()
    assert running.sample(PROMPTS, num_samples=2, max_new_tokens=4).response_ids.shape[0] == 6


@needs_vllm
def test_weights_the_engine_did_not_take_are_an_error(policy):
    """vLLM keeps a layer's old weights when a sync leaves it out, with only a log warning."""
    model, _, engine = policy
    weights = [(name, tensor) for name, tensor in model.state_dict().items() if "layers.1.mlp" not in name]
    try:
        with pytest.raises(WeightSyncError, match=r"kept its old weights for .*layers\.1\.mlp\.down_proj"):
            engine.reload(weights)
    finally:
        engine.stuck = None
        engine.load_weights(model)


@needs_vllm
def test_sampling_follows_torchs_global_rng(policy):
    """In-process on CPU, vLLM draws its sampling seeds from torch's global RNG: restoring that
    state (as a resumed run does) repeats the samples."""
    _, _, engine = policy
    runs = []
    for seed in (0, 0, 1):
        torch.manual_seed(seed)
        runs.append(engine.sample(PROMPTS, num_samples=4, max_new_tokens=16).response_ids)
    assert torch.equal(runs[0], runs[1]) and not torch.equal(runs[0], runs[2])
