"""Scalar reward models: a transformers sequence classifier with one label, scoring
the last non-padding token of prompt + response. What ``algo=rm`` trains and saves
(``AutoModelForSequenceClassification.from_pretrained`` loads it) and what
``reward=model`` scores with."""

from __future__ import annotations

import copy
import functools

import torch
from transformers import AutoModelForSequenceClassification, PreTrainedModel

from rlkit.models.loading import from_pretrained, load_tokenizer


def as_reward_model(causal_lm: PreTrainedModel, pad_token_id: int) -> PreTrainedModel:
    """A one-label sequence classifier sharing ``causal_lm``'s body weights; the score head
    is freshly initialised. ``pad_token_id`` tells the classifier where each text ends."""
    config = copy.deepcopy(causal_lm.config)
    config.num_labels, config.pad_token_id, config.architectures = 1, pad_token_id, None
    classifier = AutoModelForSequenceClassification.from_config(config, dtype=causal_lm.dtype)
    classifier.base_model.load_state_dict(causal_lm.base_model.state_dict())
    return classifier.train(causal_lm.training)


def encode_texts(tokenizer, texts: list[str], device) -> dict[str, torch.Tensor]:
    """Right-padded (positions count from 0 without position ids), with the tokenizer's special tokens."""
    return tokenizer(texts, padding=True, padding_side="right", return_tensors="pt").to(device)


def reward_scores(model, encoded: dict[str, torch.Tensor]) -> torch.Tensor:
    """(B,) scalar rewards."""
    return (
        model(input_ids=encoded["input_ids"], attention_mask=encoded["attention_mask"], use_cache=False)
        .logits[:, 0]
        .float()
    )


@functools.lru_cache(maxsize=2)
def load_reward_model(path: str):
    """(model, tokenizer) of a saved reward model (local dir or hub id), frozen, on the GPU when there is one."""
    tokenizer = load_tokenizer(path)
    model = from_pretrained(AutoModelForSequenceClassification, path)
    if model.config.num_labels != 1:
        raise ValueError(f"reward model '{path}' has {model.config.num_labels} labels; a scalar reward model has 1")
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    model.requires_grad_(False)
    return model.to("cuda" if torch.cuda.is_available() else "cpu").eval(), tokenizer
