"""The hand-written Llama-family decoding step gives the logits of the model's own forward."""

from __future__ import annotations

import inspect
from types import SimpleNamespace

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM

from rlkit.models.kv_cache import cache_argument, output_cache
from rlkit.rollout.decoding import decoding_step, llama_step, reserve_cache
from rlkit.rollout.generate import left_pad, sample

SHAPE = dict(
    vocab_size=97,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    max_position_embeddings=128,
    eos_token_id=1,
    pad_token_id=0,
)
MODELS = {
    "llama, grouped-query attention, scaled rotary": lambda: LlamaForCausalLM(
        LlamaConfig(
            **SHAPE,
            num_key_value_heads=2,
            rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0},
        )
    ),
    # decoding runs past the original 10 positions, so the frequencies change along the way
    "llama, dynamic rotary": lambda: LlamaForCausalLM(
        LlamaConfig(
            **{**SHAPE, "max_position_embeddings": 10},
            num_key_value_heads=2,
            rope_parameters={"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0},
        )
    ),
    "llama, multi-head, attention bias": lambda: LlamaForCausalLM(
        LlamaConfig(**SHAPE, num_key_value_heads=4, attention_bias=True)
    ),
    "qwen2 (projection biases), one key head": lambda: Qwen2ForCausalLM(Qwen2Config(**SHAPE, num_key_value_heads=1)),
    "mistral without sliding window": lambda: MistralForCausalLM(
        MistralConfig(**SHAPE, num_key_value_heads=2, sliding_window=None)
    ),
}
PROMPTS = [[5, 6, 7, 8, 9], [10, 11], [12, 13, 14], [15]]  # different lengths: left padding


def decoded_scores(model, hand_written: bool, seed: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """(sampled tokens, each step's scores) of one seeded rollout, 3 samples per prompt."""
    scores = []

    def record(ids, step_scores):
        scores.append(step_scores.clone())
        return step_scores

    ids, mask = left_pad(PROMPTS, pad_token_id=0)
    torch.manual_seed(seed)
    rollout = sample(
        model,
        ids,
        mask,
        eos_token_id=1,
        pad_token_id=0,
        num_samples=3,
        max_new_tokens=12,
        min_new_tokens=12,
        logits_processor=record,
        hand_written_step=hand_written,
    )
    return rollout.response_ids, scores


@pytest.mark.parametrize("build", MODELS.values(), ids=list(MODELS))
def test_hand_written_step_gives_the_models_logits(build):
    torch.manual_seed(0)
    model = build().eval()
    tokens, scores = decoded_scores(model, hand_written=True, seed=3)
    expected_tokens, expected_scores = decoded_scores(model, hand_written=False, seed=3)
    assert torch.equal(tokens, expected_tokens)
    assert len(scores) == 12
    for got, expected in zip(scores, expected_scores):
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_hand_written_step_in_bfloat16():
    torch.manual_seed(0)
    model = MODELS["llama, grouped-query attention, scaled rotary"]().to(torch.bfloat16).eval()
    _, scores = decoded_scores(model, hand_written=True, seed=3)
    # the same tokens are fed to both steps, so that only one step's rounding differs
    ids, mask = left_pad(PROMPTS, pad_token_id=0)
    prompt_ids, prompt_mask = ids.repeat_interleave(3, 0), mask.repeat_interleave(3, 0)
    positions = (prompt_mask.cumsum(-1) - 1).clamp(min=0)
    logits = {}
    for hand_written in (True, False):
        with torch.no_grad():
            cache = output_cache(
                model(input_ids=prompt_ids, attention_mask=prompt_mask, position_ids=positions, use_cache=True)
            )
            reserve_cache(cache, 1, prompt_ids.shape[1] + 4)
            with decoding_step(model, cache, prompt_mask, hand_written) as step:
                logits[hand_written] = [
                    step(torch.full((len(prompt_ids),), token), positions[:, -1:] + 1 + i).float()
                    for i, token in enumerate([20, 21, 22])
                ]
    for got, expected in zip(logits[True], logits[False]):
        torch.testing.assert_close(got, expected, atol=3e-2, rtol=3e-2)
    assert all(torch.isfinite(s[s > float("-inf")]).all() for s in scores)


def test_other_models_decode_through_their_forward():
    """A sliding-window cache or another architecture is left to ``transformers``."""
    ids, mask = left_pad(PROMPTS, pad_token_id=0)
    sliding = MistralForCausalLM(MistralConfig(**SHAPE, num_key_value_heads=2, sliding_window=4)).eval()
    llama = MODELS["llama, multi-head, attention bias"]().eval()
    for model, hand_written in ((sliding, False), (llama, True)):
        with torch.no_grad():
            cache = output_cache(model(input_ids=ids, attention_mask=mask, use_cache=True))
            reserve_cache(cache, 1, ids.shape[1] + 4)
            with decoding_step(model, cache, mask) as step:
                assert (step.__qualname__.split(".")[0] == llama_step.__name__) == hand_written


def test_reserved_cache_is_finite_where_not_yet_written():
    """The hand-written step attends (masked) to every reserved position, so unwritten ones must not be NaN."""
    ids, mask = left_pad(PROMPTS, pad_token_id=0)
    model = MODELS["llama, multi-head, attention bias"]().eval()
    with torch.no_grad():
        cache = output_cache(model(input_ids=ids, attention_mask=mask, use_cache=True))
    reserve_cache(cache, 3, ids.shape[1] + 6)
    for layer in cache.layers:
        assert layer.key_buffer.shape[0] == 3 * len(PROMPTS) and layer.length == ids.shape[1]
        assert not layer.key_buffer[:, :, layer.length :].any() and not layer.value_buffer[:, :, layer.length :].any()


def test_the_cache_goes_in_and_out_under_the_name_the_forward_declares():
    """transformers 5.24 renamed ``past_key_values`` to ``cache`` (the old name goes in 5.40)."""

    class OldForward:
        def forward(self, input_ids=None, past_key_values=None, use_cache=None): ...

    class NewForward:
        def forward(self, input_ids=None, cache=None, use_cache=None): ...

    assert cache_argument(OldForward(), "kv") == {"past_key_values": "kv"}
    assert cache_argument(NewForward(), "kv") == {"cache": "kv"}
    assert cache_argument(SimpleNamespace(module=NewForward()), "kv") == {"cache": "kv"}  # inside a DeepSpeed engine
    assert output_cache({"logits": 0, "cache": "kv"}) == output_cache({"logits": 0, "past_key_values": "kv"}) == "kv"
    model = MODELS["llama, multi-head, attention bias"]()
    assert set(cache_argument(model, None)) <= set(
        inspect.signature(type(model).forward).parameters
    )  # the installed transformers' name


def test_zero3_on_one_process_generates_what_the_whole_model_generates():
    """ZeRO-3 partitions the parameters even on one process: decoding must go through the model's
    forward (which gathers them), not the hand-written step that reads the weights directly."""
    from types import SimpleNamespace

    from omegaconf import OmegaConf

    from rlkit.engine import build_engine, init_distributed, is_partitioned, is_sharded
    from rlkit.models.tiny import build_tiny_model
    from rlkit.rollout.generate import generate

    init_distributed("cpu")
    arch = SimpleNamespace(
        hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4, vocab_size=256, max_position_embeddings=64
    )
    model, tokenizer = build_tiny_model(arch, [f"{a}+{b}={a + b}" for a in range(30) for b in range(30)], seed=0)
    prompts = ["12+34=", "1+2="]
    whole = generate(model, tokenizer, prompts, num_samples=1, max_new_tokens=6, greedy=True).response_ids
    hardware = OmegaConf.create(
        {
            "zero_stage": 3,
            "dtype": "float32",
            "offload_optimizer": False,
            "fused_optimizer": False,
            "deepspeed": {"zero_optimization": {"stage3_param_persistence_threshold": 0}},
        }
    )
    engine = build_engine(
        model,
        hardware,
        lr=1e-3,
        betas=(0.9, 0.99),
        weight_decay=0.0,
        max_grad_norm=1.0,
        schedule="constant",
        warmup_steps=0,
        total_steps=1,
        micro_batch_per_device=2,
        grad_accum_steps=1,
        world=1,
    )
    assert is_partitioned(engine.module) and not is_sharded(engine.module)
    partitioned = generate(engine.module, tokenizer, prompts, num_samples=1, max_new_tokens=6, greedy=True)
    assert torch.equal(partitioned.response_ids, whole)
