"""Policy and reference models through transformers."""

from rlkit.models.loading import configure_for_training, load_pretrained, load_tokenizer
from rlkit.models.tiny import build_tiny_model

__all__ = ["build_tiny_model", "configure_for_training", "load_pretrained", "load_tokenizer"]
