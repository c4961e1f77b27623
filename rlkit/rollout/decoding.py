"""One-token decoding steps on a KV cache reserved for the whole response.

A step maps (tokens (R,), positions (R, 1)) to next-token logits (R, V). On CPU,
Llama-family models (Llama, Qwen2, Mistral without a sliding window) decode through a
hand-written step that calls the model's own layers; any other model or device decodes
through the ``transformers`` forward. Both give the same logits to float tolerance.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import NamedTuple

import torch
from transformers import LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM
from transformers.cache_utils import DynamicLayer

from rlkit.engine import is_partitioned
from rlkit.models.kv_cache import cache_argument
from rlkit.models.onednn_linear import fused_projection, packed_weights

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
            buffer[:, :, self.length :].zero_()  # finite where not yet written: masked attention multiplies them by 0

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs
    ) -> tuple[torch.Tensor, torch.Tensor]:
        end = self.length + key_states.shape[-2]
        self.key_buffer[:, :, self.length : end] = key_states
        self.value_buffer[:, :, self.length : end] = value_states
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


@contextmanager
def decoding_step(model, cache, prompt_mask: torch.Tensor, hand_written: bool = True) -> Iterator[DecodingStep]:
    """The step that continues ``cache`` (prefilled with the left-padded prompts of ``prompt_mask``),
    for the duration of the block: hand-written for a Llama-family model on CPU whose every cache
    layer is reserved full attention, unless ``hand_written`` is False; otherwise the model's
    forward, with its oneDNN layers' weights reordered once for all steps. (GPU decoding keeps
    the forward: the hand-written step is measured on CPU only.)"""
    if (
        hand_written
        and prompt_mask.device.type == "cpu"
        and type(model) in HAND_WRITTEN_ARCHITECTURES
        and not is_partitioned(model)  # the hand-written step reads weights outside the forward
        and all(type(layer) is ReservedLayer for layer in cache.layers)
    ):
        yield llama_step(model, cache, prompt_mask)
    else:
        with packed_weights(model, prompt_mask.shape[0]):
            yield transformers_step(model, cache, prompt_mask)


def transformers_step(model, cache, prompt_mask: torch.Tensor) -> DecodingStep:
    mask = prompt_mask

    def step(tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        nonlocal mask
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
        return model(
            input_ids=tokens[:, None],
            attention_mask=mask,
            position_ids=positions,
            use_cache=True,
            **cache_argument(model, cache),
        ).logits[:, -1]

    return step


class DecoderLayerProducts(NamedTuple):
    """One decoder layer's products for decoding: queries, keys and values as one product,
    the MLP's gate and up projections as another (see :func:`fused_projection`)."""

    qkv: Callable[[torch.Tensor], torch.Tensor]
    out: Callable[[torch.Tensor], torch.Tensor]
    gate_up: Callable[[torch.Tensor], torch.Tensor]
    down: Callable[[torch.Tensor], torch.Tensor]

    @classmethod
    def of(cls, layer, rows: int) -> DecoderLayerProducts:
        attention, mlp = layer.self_attn, layer.mlp
        return cls(
            fused_projection([attention.q_proj, attention.k_proj, attention.v_proj], rows),
            fused_projection([attention.o_proj], rows),
            fused_projection([mlp.gate_proj, mlp.up_proj], rows),
            fused_projection([mlp.down_proj], rows),
        )


def llama_step(model, cache, prompt_mask: torch.Tensor) -> DecodingStep:
    """A decoding step of a Llama-family model with none of its forward's per-call
    bookkeeping (masks, cache dispatch, output objects): the model's own embedding, norms,
    rotary embedding (see :func:`rotary_lookup`) and weights, the projections
    that share an input computed as one product, and attention of the one query token
    computed as two batched matmuls over the whole reserved cache, with the positions not
    yet written masked. On CPU that attention takes about 60% of the fused SDPA kernel's
    time in fp32 and 15% in bf16; attending to the written positions only would make the
    cache a strided view, which bf16 matmuls first copy."""
    base, layers = model.model, cache.layers
    rows, kv_heads, capacity, head_dim = layers[0].key_buffer.shape
    dtype, device = layers[0].key_buffer.dtype, prompt_mask.device
    # additive attention mask over every cache position: the prompts' left padding is never
    # attended, each response position from the step that writes it
    bias = torch.full((rows, capacity), float("-inf"), dtype=dtype, device=device)
    bias[:, : prompt_mask.shape[1]].masked_fill_(prompt_mask == 1, 0.0)
    bias = bias.repeat_interleave(kv_heads, 0)[:, None]  # (rows * kv heads, 1, capacity)
    rotary = rotary_lookup(base.rotary_emb, head_dim, capacity, dtype, device)
    products = [DecoderLayerProducts.of(layer, rows) for layer in base.layers]
    head = fused_projection([model.lm_head], rows)

    def step(tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        hidden = base.embed_tokens(tokens)
        cos, signed_sin = rotary(positions)
        bias[..., layers[0].length] = 0.0
        for layer, layer_products, kv in zip(base.layers, products, layers):
            hidden = hidden + attend(
                layer.self_attn, layer_products, layer.input_layernorm(hidden), kv, cos, signed_sin, bias
            )
            gate, up = layer_products.gate_up(layer.post_attention_layernorm(hidden)).chunk(2, -1)
            hidden = hidden + layer_products.down(layer.mlp.act_fn(gate) * up)
        return head(base.norm(hidden))

    return step


def rotary_lookup(
    rotary_emb, head_dim: int, capacity: int, dtype: torch.dtype, device
) -> Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    """positions (R, 1) -> (cos, sin * sign), each (R, 1, head_dim): rotate_half(x) * sin is then
    roll(x, half) * sin * sign, the rotary embedding without a concatenation. Fixed frequencies are
    tabulated once for every cache position; "dynamic" and "longrope" ones change with the longest
    position seen, so they are computed at each step, as the model's forward does."""
    sign = torch.ones(head_dim, dtype=dtype, device=device)
    sign[: head_dim // 2] = -1
    like = torch.zeros(1, dtype=dtype, device=device)  # the embedding takes only its dtype and device from this
    if "dynamic" in rotary_emb.rope_type or rotary_emb.rope_type == "longrope":

        def per_step(positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            cos, sin = rotary_emb(like, positions)
            return cos, sin * sign

        return per_step
    cos, sin = rotary_emb(like, torch.arange(capacity + 1, device=device)[None])
    cos, signed_sin = cos[0], sin[0] * sign
    return lambda positions: (cos[positions], signed_sin[positions])


def attend(
    attention,
    products: DecoderLayerProducts,
    hidden: torch.Tensor,
    kv: ReservedLayer,
    cos: torch.Tensor,
    signed_sin: torch.Tensor,
    bias: torch.Tensor,
) -> torch.Tensor:
    """Self-attention of one new token per row (hidden: (R, d)); appends its keys and values to ``kv``."""
    rows, kv_heads, capacity, head_dim = kv.key_buffer.shape
    qkv = products.qkv(hidden).view(rows, -1, head_dim)  # query heads, then key heads, then value heads
    query_heads = qkv.shape[1] - 2 * kv_heads
    # queries and keys at once
    rotated = torch.addcmul(qkv[:, :-kv_heads] * cos, qkv[:, :-kv_heads].roll(head_dim // 2, -1), signed_sin)
    kv.update(rotated[:, query_heads:, None], qkv[:, -kv_heads:, None])
    keys, values = (buffer.view(rows * kv_heads, capacity, head_dim) for buffer in (kv.key_buffer, kv.value_buffer))
    # the query heads that share a key head (grouped-query attention) form one batch entry
    queries = rotated[:, :query_heads].reshape(rows * kv_heads, -1, head_dim)
    scores = torch.baddbmm(bias, queries, keys.transpose(1, 2), alpha=attention.scaling)
    weights = scores.softmax(-1, dtype=torch.float32).to(values.dtype)
    return products.out(torch.bmm(weights, values).view(rows, -1))
