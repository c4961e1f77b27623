"""The benchmark scripts' own arithmetic: the reward both systems score with and the FLOP counts."""

import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "scripts"))
from bench_trl import digit_reward, non_embedding_params, update_flops  # noqa: E402

SMOLLM2 = dict(hidden_size=576, num_layers=30, num_heads=9, num_kv_heads=3, intermediate_size=1536, vocab_size=49152)


def test_digit_reward_reads_plain_and_chat_completions():
    plain = digit_reward(None, ["85", "8x6", "12"], answer=["85", "85", "85"])
    chat = digit_reward(None, [[{"role": "assistant", "content": "85."}]], answer=["85"])
    assert plain == [1.0, 0.5, 0.0] and chat == [1.0]


def test_non_embedding_params_count_grouped_query_attention():
    # SmolLM2-135M: 30 x (2 x 576^2 + 2 x 576 x 192 + 3 x 576 x 1536); with the tied embedding
    # (49152 x 576) and 61 RMSNorm weights of 576 that is the model's 134,515,008 parameters
    assert non_embedding_params(SMOLLM2) == 106_168_320
    assert non_embedding_params(SMOLLM2) + 49152 * 576 + 61 * 576 == 134_515_008


def test_update_flops_lora_skips_the_frozen_weights_gradients():
    full, lora = update_flops(SMOLLM2, prompt_len=46), update_flops(SMOLLM2, prompt_len=46, lora=True)
    assert lora["matmul"] == pytest.approx(full["matmul"] * 4 / 6) and lora["attention"] == full["attention"]
    # 8 prompt passes of 46 tokens + 64 rows x 31 completion inputs
    assert full["tokens_in"] == 8 * 46 + 64 * 31
