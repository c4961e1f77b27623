"""Loading any causal LM by ``name_or_path`` (local directory or hub id)."""

from __future__ import annotations

import os

import torch
from safetensors import SafetensorError
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from rlkit.models.lora import holds_adapter, load_merged
from rlkit.models.onednn_linear import onednn_dtypes, use_onednn_linears
from rlkit.settings import ConfigError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def from_pretrained(auto_class, name_or_path: str, **kwargs):
    """``auto_class.from_pretrained``, where a missing local directory, a file given for a directory,
    an unreachable hub id, a damaged weights file or a setting ``transformers`` rejects (e.g. an
    unknown attention implementation) is a one-line :class:`ConfigError` instead of a traceback."""
    if os.path.isfile(name_or_path):
        raise ConfigError(
            f"model path '{name_or_path}' is a file; give the directory that holds config.json and the weights"
        )
    if name_or_path.startswith((".", "/")) and not os.path.isdir(name_or_path):
        raise ConfigError(f"model directory '{name_or_path}' does not exist")
    try:
        return auto_class.from_pretrained(name_or_path, **kwargs)
    except (OSError, ValueError, RuntimeError, SafetensorError) as error:
        raise ConfigError(f"cannot load '{name_or_path}': {str(error).strip().splitlines()[0]}") from error


def load_tokenizer(name_or_path: str, trust_remote_code: bool = False):
    """Left padding for generation; the EOS token doubles as padding where none is set."""
    tokenizer = from_pretrained(AutoTokenizer, name_or_path, trust_remote_code=trust_remote_code)
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_pretrained(name_or_path: str, model_cfg, hardware) -> PreTrainedModel:
    """The causal LM (of a LoRA checkpoint: its base with the adapter merged in); on a CPU
    ``hardware`` (a HardwareConfig) its linear layers use
    oneDNN unless ``hardware.cpu_matmul=torch``, ZeRO-3 shards them, or the CPU cannot compute
    the training precision (``hardware.dtype``, to which DeepSpeed casts the model) through oneDNN."""
    kwargs = {"dtype": DTYPES[hardware.dtype], "trust_remote_code": model_cfg.trust_remote_code}
    attention = model_cfg.attn_implementation or default_attention(model_cfg, hardware)
    if attention:
        kwargs["attn_implementation"] = attention
    if holds_adapter(name_or_path):  # a LoRA checkpoint: its adapter merged into its base
        model = load_merged(name_or_path, **kwargs)
    else:
        model = from_pretrained(AutoModelForCausalLM, name_or_path, **kwargs)
    if (
        hardware.device == "cpu"
        and hardware.cpu_matmul == "onednn"
        and hardware.zero_stage < 3
        and DTYPES[hardware.dtype] in onednn_dtypes()
    ):
        use_onednn_linears(model)
    return model


def default_attention(model_cfg, hardware) -> str | None:
    """transformers' default (SDPA), except in bf16 on CPU: there its fused kernel's backward
    took 0.2-0.3 s of a 1.5 s update on the benchmark's 25M model, and plain matmul
    attention ("eager") a fifth of that. Eager attention holds each layer's
    (heads x length x length) scores, so long sequences should set ``model.attn_implementation=sdpa``."""
    return "eager" if hardware.device == "cpu" and hardware.dtype == "bfloat16" else None


def configure_for_training(model: PreTrainedModel, model_cfg) -> PreTrainedModel:
    if model_cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable()
        model.config.use_cache = False
    model.train()
    return model
