"""A scalar value head on a causal LM's last hidden state: V(s_t) for every response token."""

from __future__ import annotations

import torch

from rlkit.rollout.logprobs import position_ids_from_mask

VALUE_HEAD = "value_head"


def attach_value_head(model) -> None:
    """Add ``model.value_head`` (hidden -> 1, zero-initialised, so every first value is 0).

    It becomes part of the model's parameters: the engine's optimizer trains it and the
    engine's checkpoint holds it; ``from_pretrained`` of the saved model ignores it."""
    head = torch.nn.Linear(model.config.hidden_size, 1, dtype=model.dtype, device=model.device)
    torch.nn.init.zeros_(head.weight)
    torch.nn.init.zeros_(head.bias)
    model.add_module(VALUE_HEAD, head)


def token_values(
    model, sequences: torch.Tensor, attention_mask: torch.Tensor, num_response_tokens: int
) -> torch.Tensor:
    """V(x, y_<t) for the last ``num_response_tokens`` positions, (B, T) float32: the value
    of the state in which response token t is chosen (aligned with ``token_log_probs``).
    ``model`` is a model with a value head or a DeepSpeed engine around one."""
    output = model(
        input_ids=sequences,
        attention_mask=attention_mask,
        position_ids=position_ids_from_mask(attention_mask),
        output_hidden_states=True,
        logits_to_keep=1,
        use_cache=False,
    )
    hidden = output.hidden_states[-1][:, -num_response_tokens - 1 : -1]
    head = getattr(getattr(model, "module", model), VALUE_HEAD)
    return head(hidden).squeeze(-1).float()
