"""Low-rank adapters (LoRA, Hu et al. 2021) through peft, injected in place.

The adapters go into the model itself (``peft.inject_adapter_in_model``), so the policy stays a
``LlamaForCausalLM`` (or whatever it was): rlkit's decoding fast path, value head and DeepSpeed engine
see the model they know, and only the adapter's parameters require gradients, so only they reach the
optimizer. (transformers' own ``model.add_adapter`` would do the same, but transformers 5.25 demands a
peft newer than any released.) :func:`save_adapter` writes the adapter in peft's format
(``adapter_config.json`` + ``adapter_model.safetensors``, what ``PeftModel.from_pretrained`` loads).
The reference policy is the same model with its adapters
switched off (:func:`adapters_disabled`): no second copy of the weights, as in "Efficient RLHF: Reducing
the Memory Usage of PPO" (Santacroce et al. 2023).
"""

from __future__ import annotations

import importlib.util
import json
import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch

from rlkit.settings import ConfigError

ADAPTER_NAME = "default"
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
# Every linear layer of a Llama-family block (Llama, Qwen2, Mistral, SmolLM2): adapting all of them
# rather than only the attention projections is what QLoRA (Dettmers et al. 2023) found to match full
# fine-tuning. The output head is left out: it is tied to the embedding in small models.
DEFAULT_TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def unwrapped(model):
    """The model inside a DeepSpeed engine (or the model itself)."""
    return getattr(model, "module", model)


def linear_module_names(model) -> list[str]:
    """The distinct last name components of the model's linear layers (what ``target_modules`` matches)."""
    return sorted(
        {name.rsplit(".", 1)[-1] for name, module in model.named_modules() if isinstance(module, torch.nn.Linear)}
    )


def require_peft(key: str) -> None:
    """One-line error unless peft (the smollm2 extra) is installed."""
    if importlib.util.find_spec("peft") is None:
        raise ConfigError(f"{key}: LoRA needs peft: pip install -e '.[smollm2]'")


def apply_lora(
    model,
    rank: int,
    alpha: float,
    dropout: float = 0.0,
    target_modules: Sequence[str] | None = None,
    key: str = "model.lora",
):
    """Inject a trainable LoRA adapter of ``rank`` into ``model`` (in place, returned) and freeze
    everything else. Each adapted layer computes W x + (alpha / rank) B A x with B = 0 at the start, so
    the adapted model starts equal to ``model``. ``dropout`` acts on the adapter's input in training
    mode; keep it 0 for RL, where the rollout's log-probs are recomputed in training mode and would
    otherwise differ from the sampler's by noise alone."""
    require_peft(f"{key}.rank")
    from peft import LoraConfig, inject_adapter_in_model

    if rank < 1:
        raise ConfigError(f"{key}.rank={rank}: an adapter needs a positive rank (0 means no LoRA)")
    targets = list(target_modules or DEFAULT_TARGET_MODULES)
    available = linear_module_names(model)
    unknown = [name for name in targets if name not in available]
    if unknown:
        raise ConfigError(
            f"{key}.target_modules: {', '.join(unknown)} not in this model; its linear layers: {', '.join(available)}"
        )
    config = LoraConfig(
        r=rank,
        lora_alpha=alpha,
        lora_dropout=dropout,
        target_modules=targets,
        bias="none",
        task_type="CAUSAL_LM",
        base_model_name_or_path=getattr(model, "name_or_path", None) or None,
    )
    return inject_adapter_in_model(config, model, ADAPTER_NAME)


def adapter_layers(model) -> list:
    """The model's layers that carry an adapter (none without LoRA)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    return [module for module in unwrapped(model).modules() if isinstance(module, BaseTunerLayer)]


def has_lora(model) -> bool:
    return ADAPTER_NAME in getattr(unwrapped(model), "peft_config", {})


@contextmanager
def adapters_disabled(model) -> Iterator[None]:
    """Within the block, ``model`` (or the model inside a DeepSpeed engine) computes as its base model:
    the frozen reference policy of a LoRA run, without a second copy of the weights."""
    layers = adapter_layers(model)
    for layer in layers:
        layer.enable_adapters(False)
    try:
        yield
    finally:
        for layer in layers:
            layer.enable_adapters(True)


class BaseModelView:
    """A LoRA policy (a model or a DeepSpeed engine around one) seen as its base model: calling it
    runs the policy with its adapters switched off and without gradients. It is the frozen
    reference policy of a LoRA run wherever rlkit scores a reference (``module`` and ``parameters``
    are the policy's, as ``is_sharded`` and the KV-cache helpers read them)."""

    def __init__(self, model):
        self.model, self.module = model, unwrapped(model)

    def __call__(self, *args, **kwargs):
        with torch.no_grad(), adapters_disabled(self.model):
            return self.model(*args, **kwargs)

    def parameters(self):
        return self.module.parameters()


def save_adapter(model, directory: str, state_dict: dict[str, torch.Tensor] | None = None) -> None:
    """The adapter in peft's format (``PeftModel.from_pretrained(base, directory)`` loads it). Under
    ZeRO-3 pass the gathered ``state_dict`` (rank 0's full one); otherwise the model's own is used."""
    from peft import get_peft_model_state_dict
    from safetensors.torch import save_file

    inner = unwrapped(model)
    weights = get_peft_model_state_dict(inner, state_dict=state_dict, adapter_name=ADAPTER_NAME)
    os.makedirs(directory, exist_ok=True)
    # peft's files name each weight from the PeftModel, which holds the adapted model as base_model.model
    save_file(
        {f"base_model.model.{key}": value.detach().contiguous() for key, value in weights.items()},
        os.path.join(directory, ADAPTER_WEIGHTS),
    )
    inner.peft_config[ADAPTER_NAME].save_pretrained(directory)


def holds_adapter(directory: str) -> bool:
    """Whether ``directory`` (e.g. a checkpoint) holds a peft adapter rather than a whole model."""
    return os.path.isfile(os.path.join(directory, ADAPTER_CONFIG))


def check_resumable(checkpoint_dir: str, rank: int, key: str = "model.lora.rank") -> None:
    """One-line error where a checkpoint's adapter and the run's ``rank`` disagree (a LoRA checkpoint
    resumed without LoRA or with another rank, or a full model resumed with LoRA)."""
    saved = holds_adapter(checkpoint_dir)
    if saved and rank == 0:
        raise ConfigError(
            f"{key}=0 but the checkpoint {checkpoint_dir} holds a LoRA adapter: resume with its LoRA settings"
        )
    if not saved and rank > 0:
        raise ConfigError(f"{key}={rank} but the checkpoint {checkpoint_dir} holds a full model, not a LoRA adapter")
    if saved:
        with open(os.path.join(checkpoint_dir, ADAPTER_CONFIG)) as f:
            saved_rank = json.load(f).get("r")
        if saved_rank != rank:
            raise ConfigError(f"{key}={rank} but the adapter in the checkpoint {checkpoint_dir} has rank {saved_rank}")


def load_merged(directory: str, base_model: str | None = None, **kwargs):
    """The causal LM in ``directory``: a plain model, or a peft adapter merged into its base
    (W + (alpha / rank) B A, so the result has no peft layers). ``base_model`` overrides the base the
    adapter names (e.g. after moving the cache); ``kwargs`` go to ``from_pretrained`` (e.g. ``dtype``)."""
    from transformers import AutoModelForCausalLM

    if not os.path.isdir(directory):
        raise ConfigError(f"checkpoint='{directory}' is not a directory")
    if not holds_adapter(directory):
        if not os.path.isfile(os.path.join(directory, "config.json")):
            raise ConfigError(f"checkpoint='{directory}' holds neither a model nor a peft adapter")
        return AutoModelForCausalLM.from_pretrained(directory, **kwargs)
    from peft import PeftConfig, PeftModel

    base = base_model or PeftConfig.from_pretrained(directory).base_model_name_or_path
    if not base or (base.startswith((".", "/")) and not os.path.isdir(base)):
        raise ConfigError(f"the base model '{base}' of the adapter in {directory} is missing")
    adapted = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base, **kwargs), directory)
    return adapted.merge_and_unload()


def export_merged(checkpoint_dir: str, output_dir: str, base_model: str | None = None) -> str:
    """Write the model of an rlkit checkpoint (see :func:`load_merged`) with its tokenizer to
    ``output_dir``, which plain ``AutoModelForCausalLM.from_pretrained`` then loads without peft."""
    from transformers import AutoTokenizer

    load_merged(checkpoint_dir, base_model).save_pretrained(output_dir)
    AutoTokenizer.from_pretrained(checkpoint_dir).save_pretrained(output_dir)
    return output_dir
