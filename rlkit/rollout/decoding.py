"""One-token decoding steps on a KV cache reserved for the whole response.

A step maps (tokens (R,), positions (R, 1)) to next-token logits (R, V). On CPU,
Llama-family models (Llama, Qwen2, Mistral without a sliding window) decode through a
hand-written step that calls the model's own layers; any other model or device decodes
through the ``transformers`` forward. Both give the same logits to float tolerance.
"""
from __future__ import annotations

from typing import Callable

import torch
from transformers import LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM
from transformers.cache_utils import DynamicLayer

from rlkit.engine import is_sharded

DecodingStep = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
HAND_WRITTEN_ARCHITECTURES = (LlamaForCausalLM, Qwen2ForCausalLM, MistralForCausalLM)


class ReservedLayer(DynamicLayer):
    """A KV-cache layer whose buffers are allocated once for the whole generation: each
    decoding step writes its keys and values in place, where a growing cache would copy
    all of them (``torch.cat``) at every step."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, repeats: int, capacity: int):
        super().__init__()
        self.dtype, self.device, self.is_initialized = keys.dtype, keys.device, True
        shape = (keys.shape[0] * repeats, keys.shape[1], capacity, keys.shape[3])
        self.key_buffer, self.value_buffer = keys.new_empty(shape), values.new_empty(shape)
        self.length = 0
        self.update(keys.repeat_interleave(repeats, 0), values.repeat_interleave(repeats, 0))
        for buffer in (self.key_buffer, self.value_buffer):
            buffer[:, :, self.length:].zero_()  # finite where not yet written: masked attention multiplies them by 0

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
        end = self.length + key_states.shape[-2]
        self.key_buffer[:, :, self.length:end] = key_states
        self.value_buffer[:, :, self.length:end] = value_states
        self.length = end
        self.keys, self.values = self.key_buffer[:, :, :end], self.value_buffer[:, :, :end]
        return self.keys, self.values


def reserve_cache(cache, repeats: int, capacity: int) -> None:
    """Turn a prefilled ``DynamicCache``'s full-attention layers into :class:`ReservedLayer`
    layers of ``capacity`` positions, each row repeated ``repeats`` times (the samples of one
    prompt). Other layer kinds (sliding-window, linear attention) keep their own cache."""
    for index, layer in enumerate(cache.layers):
        if type(layer) is DynamicLayer:
            cache.layers[index] = ReservedLayer(layer.keys, layer.values, repeats, capacity)
        elif repeats > 1:
            layer.batch_repeat_interleave(repeats)


def decoding_step(model, cache, prompt_mask: torch.Tensor, hand_written: bool = True) -> DecodingStep:
    """The step that continues ``cache`` (prefilled with the left-padded prompts of ``prompt_mask``):
    hand-written for a Llama-family model on CPU whose every cache layer is reserved full
    attention, unless ``hand_written`` is False; otherwise the model's forward. (GPU decoding
    keeps the forward: the hand-written step is measured on CPU only.)"""
    if hand_written and prompt_mask.device.type == "cpu" and type(model) in HAND_WRITTEN_ARCHITECTURES and not is_sharded(model) \
            and all(type(layer) is ReservedLayer for layer in cache.layers):
        return llama_step(model, cache, prompt_mask)
    return transformers_step(model, cache, prompt_mask)


def transformers_step(model, cache, prompt_mask: torch.Tensor) -> DecodingStep:
    mask = prompt_mask

    def step(tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        nonlocal mask
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
        return model(input_ids=tokens[:, None], attention_mask=mask, position_ids=positions, past_key_values=cache, use_cache=True).logits[:, -1]
    return step


def llama_step(model, cache, prompt_mask: torch.Tensor) -> DecodingStep:
    """A decoding step of a Llama-family model with none of its forward's per-call
    bookkeeping (masks, cache dispatch, output objects): the model's own embedding,
    norms, projections, rotary embedding, MLPs and head, with attention of the one
    query token computed as two batched matmuls over the whole reserved cache, with the
    positions not yet written masked. On CPU that attention takes about 60% of the fused
    SDPA kernel's time in fp32 and 15% in bf16; attending to the written positions only
    would make the cache a strided view, which bf16 matmuls first copy."""
    base, layers = model.model, cache.layers
    rows, kv_heads, capacity, head_dim = layers[0].key_buffer.shape
    dtype = layers[0].key_buffer.dtype
    # additive attention mask over every cache position: the prompts' left padding is never
    # attended, each response position from the step that writes it
    bias = torch.full((rows, capacity), float("-inf"), dtype=dtype, device=prompt_mask.device)
    bias[:, :prompt_mask.shape[1]].masked_fill_(prompt_mask == 1, 0.0)
    bias = bias.repeat_interleave(kv_heads, 0)[:, None]  # (rows * kv heads, 1, capacity)
    # rotate_half(x) = roll(x, half) * sign: the rotary embedding without a concatenation
    sign = torch.ones(head_dim, dtype=dtype, device=prompt_mask.device)
    sign[:head_dim // 2] = -1

    def step(tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        hidden = base.embed_tokens(tokens)
        cos, sin = base.rotary_emb(hidden, positions)  # (R, 1, head_dim)
        signed_sin = sin * sign
        bias[..., layers[0].length] = 0.0
        for layer, kv in zip(base.layers, layers):
            hidden = hidden + attend(layer.self_attn, layer.input_layernorm(hidden), kv, cos, signed_sin, bias)
            hidden = hidden + layer.mlp(layer.post_attention_layernorm(hidden))
        return model.lm_head(base.norm(hidden))
    return step


def attend(attention, hidden: torch.Tensor, kv: ReservedLayer, cos: torch.Tensor, signed_sin: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """Self-attention of one new token per row (hidden: (R, d)); appends its keys and values to ``kv``."""
    rows, kv_heads, capacity, head_dim = kv.key_buffer.shape
    rotate = lambda x: torch.addcmul(x * cos, x.roll(head_dim // 2, -1), signed_sin)  # noqa: E731
    queries = rotate(attention.q_proj(hidden).view(rows, -1, head_dim))
    keys = rotate(attention.k_proj(hidden).view(rows, kv_heads, head_dim))
    kv.update(keys[:, :, None], attention.v_proj(hidden).view(rows, kv_heads, 1, head_dim))
    keys, values = (buffer.view(rows * kv_heads, capacity, head_dim) for buffer in (kv.key_buffer, kv.value_buffer))
    # the query heads that share a key head (grouped-query attention) form one batch entry
    scores = torch.baddbmm(bias, queries.view(rows * kv_heads, -1, head_dim), keys.transpose(1, 2), alpha=attention.scaling)
    weights = scores.softmax(-1, dtype=torch.float32).to(values.dtype)
    return attention.o_proj(torch.bmm(weights, values).view(rows, -1))
