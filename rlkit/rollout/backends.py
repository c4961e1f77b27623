"""Rollout backends: what samples the policy's responses (the ``rollout`` config group).

A backend takes token-id prompts (with one length budget per prompt, or one for all) and the
loop's sampling settings and returns a
:class:`~rlkit.rollout.generate.Rollout`: token ids, masks and the behaviour log-probs it
sampled with. ``sync_weights()`` is called once after each update stage, so that a backend
holding its own copy of the weights (an inference engine: ``own_weights``) samples from the
current policy; the loop then also compares its behaviour log-probs with the trainer's
(``rollout/mismatch_*``). ``check_config(cfg)`` refuses, before any model is built, a run the
backend cannot serve; ``supports_logits_processor`` says whether it can reshape each step's
distribution (NLPO's masked sampling). ``close()`` frees what it holds at the end of the run.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from rlkit.registry import Registry
from rlkit.rollout.generate import Rollout, left_pad, sample
from rlkit.rollout.vllm_engine import INSTALL_HINT, VllmEngine, VllmEngineSettings, write_engine_dir
from rlkit.settings import ConfigError, Settings

log = logging.getLogger(__name__)

ROLLOUTS: Registry = Registry("rollout backend", group="rollout")


def response_floor(min_new_tokens: int | list[int] | None, greedy: bool, sampling) -> int | list[int]:
    """The fewest new tokens a backend must sample: as given, else the sampling settings' (0 when greedy)."""
    if min_new_tokens is not None:
        return min_new_tokens
    return 0 if greedy else sampling.min_new_tokens


@dataclass
class HFRolloutSettings(Settings):
    # on CPU, Llama-family models decode through rlkit's hand-written step (rlkit/rollout/decoding.py,
    # measured 1.5-2.4x faster than transformers' generate); false: the model's own forward every step
    hand_written_step: bool = True


@ROLLOUTS.register("hf", HFRolloutSettings)
class HFRollout:
    """rlkit's own batched sampler (:func:`rlkit.rollout.generate.sample`) on the training
    process's policy module: one prefill per prompt shared by its samples, a KV cache, and
    exactly softmax(logits / temperature) (nucleus-truncated when asked). It samples from the
    module being trained, so weights never need syncing."""

    own_weights = False
    supports_logits_processor = True

    @staticmethod
    def check_config(cfg) -> None:
        """Any config works."""

    def __init__(self, settings: HFRolloutSettings, *, model, tokenizer, sampling):
        self.settings, self.model, self.tokenizer, self.sampling = settings, model, tokenizer, sampling

    def sample(
        self,
        prompt_ids: list[list[int]],
        *,
        num_samples: int,
        max_new_tokens: int | list[int],
        min_new_tokens: int | list[int] | None = None,
        greedy: bool = False,
        logits_processor=None,
    ) -> Rollout:
        """``num_samples`` responses to each prompt, samples of one prompt adjacent. Length budgets
        are per prompt or shared; ``min_new_tokens`` None: the sampling settings' (0 when greedy)."""
        min_new_tokens = response_floor(min_new_tokens, greedy, self.sampling)
        device = next(self.model.parameters()).device
        ids, mask = left_pad(prompt_ids, self.tokenizer.pad_token_id, device)
        return sample(
            self.model,
            ids,
            mask,
            eos_token_id=self.tokenizer.eos_token_id,
            pad_token_id=self.tokenizer.pad_token_id,
            num_samples=num_samples,
            max_new_tokens=torch.as_tensor(max_new_tokens, device=device),
            min_new_tokens=torch.as_tensor(min_new_tokens, device=device),
            greedy=greedy,
            temperature=self.sampling.temperature,
            top_p=self.sampling.top_p,
            logits_processor=logits_processor,
            hand_written_step=self.settings.hand_written_step,
        )

    def sync_weights(self) -> None:
        """Nothing to do: the sampler runs the module the optimizer updates."""

    def close(self) -> None:
        """Nothing to free."""


@ROLLOUTS.register("vllm", VllmEngineSettings)
class VllmRollout:
    """A vLLM engine in each training process (:class:`~rlkit.rollout.vllm_engine.VllmEngine`,
    docs/rollout-engines.md), started once from the policy module (its config and tokenizer,
    dummy weights, then the trainer's weights) and sampling with the loop's sampling settings:
    ``n`` samples per prompt share its prefill; the behaviour log-probs are the engine's
    (after temperature, top-p renormalisation and the min-tokens EOS mask). The first sample
    loads the weights the module holds then (a resumed checkpoint's included); every
    :meth:`sync_weights` after an update again, bounded by ``sync_timeout_s``."""

    own_weights = True
    supports_logits_processor = False

    @staticmethod
    def check_config(cfg) -> None:
        """vLLM is importable, the policy's weights are whole on every process, and the model's
        shape fits the engine: one-line errors naming the key, before any model is built."""
        if importlib.util.find_spec("vllm") is None:
            raise ConfigError(INSTALL_HINT)
        if cfg.hardware.zero_stage == 3:
            raise ConfigError(
                "hardware.zero_stage=3: rollout=vllm syncs whole weights from every process; use ZeRO stage 0-2"
            )
        check_model_fits(cfg)

    def __init__(self, settings: VllmEngineSettings, *, model, tokenizer, sampling):
        self.model, self.tokenizer, self.sampling = model, tokenizer, sampling
        parameter = next(model.parameters())
        self.device = parameter.device
        self.directory = write_engine_dir(model, tokenizer, tempfile.mkdtemp(prefix="rlkit-vllm-model-"))
        settings = dataclasses.replace(settings, dtype=settings.dtype or str(parameter.dtype).removeprefix("torch."))
        self.engine = VllmEngine(
            self.directory,
            settings,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            dummy_weights=True,
            seed=torch.initial_seed() % 2**31,
        )
        self.loaded = False
        log.info("rollout=vllm: engine started in %.1f s", self.engine.start_seconds)

    def sample(
        self,
        prompt_ids: list[list[int]],
        *,
        num_samples: int,
        max_new_tokens: int | list[int],
        min_new_tokens: int | list[int] | None = None,
        greedy: bool = False,
        logits_processor=None,
    ) -> Rollout:
        """As :meth:`HFRollout.sample`; prompts come back left-padded, ``num_samples`` adjacent rows each."""
        if logits_processor is not None:
            raise ConfigError(
                "rollout=vllm cannot reshape the sampling distribution (a logits processor); use rollout=hf"
            )
        if not self.loaded:
            self.sync_weights()
        min_new_tokens = response_floor(min_new_tokens, greedy, self.sampling)
        samples = self.engine.sample(
            prompt_ids,
            num_samples=num_samples,
            max_new_tokens=max_new_tokens,
            min_new_tokens=min_new_tokens,
            greedy=greedy,
            temperature=self.sampling.temperature,
            top_p=self.sampling.top_p,
        )
        ids, mask = left_pad(
            [p for p in prompt_ids for _ in range(num_samples)], self.tokenizer.pad_token_id, self.device
        )
        return Rollout(
            prompt_ids=ids,
            prompt_mask=mask,
            response_ids=samples.response_ids.to(self.device),
            response_mask=samples.response_mask.to(self.device),
            truncated=samples.truncated.to(self.device),
            log_probs=None if greedy else samples.log_probs.to(self.device),
        )

    def sync_weights(self) -> None:
        """Load the policy's current weights into the engine (WeightSyncError on a stall past
        ``sync_timeout_s`` or on weights the engine did not take)."""
        self.engine.load_weights(self.model)
        self.loaded = True

    def close(self) -> None:
        """Shut the engine down and free its memory (a Hydra multirun builds one per job in one process)."""
        self.engine.close()
        shutil.rmtree(self.directory, ignore_errors=True)


def check_model_fits(cfg) -> None:
    """The policy's shape (:func:`model_shape`) fits the engine: ``rollout.max_model_len`` within the
    model's positions and above ``task.max_new_tokens``; on a CPU, a head size vLLM's attention has."""
    shape = model_shape(cfg)
    if shape is None:
        return
    head_dim, positions, key = shape
    length = cfg.rollout.max_model_len or positions
    if length > positions:
        raise ConfigError(f"rollout.max_model_len={length} is over the model's max_position_embeddings={positions}")
    if length <= cfg.task.max_new_tokens:
        raise ConfigError(
            f"rollout.max_model_len={length} leaves no room for a prompt before "
            f"task.max_new_tokens={cfg.task.max_new_tokens}"
        )
    if cfg.hardware.device == "cpu":
        from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend

        supported = CPUAttentionBackend.get_supported_head_sizes()
        if head_dim not in supported:
            raise ConfigError(
                f"{key}: head dimension {head_dim} (hidden_size / num_attention_heads) is not one vLLM's CPU "
                f"attention supports ({', '.join(map(str, supported))}); use rollout=hf or such a model"
            )


def model_shape(cfg) -> tuple[int, int, str] | None:
    """(head dimension, max_position_embeddings, the key that sets the head) of the policy, from
    the config alone: the tiny model's architecture or a local model directory's config.json
    (None for a hub id: the engine checks it when it starts)."""
    if not cfg.model.name_or_path:
        tiny = cfg.model.tiny
        return (
            tiny.hidden_size // tiny.num_heads,
            tiny.max_position_embeddings,
            f"model.tiny.num_heads={tiny.num_heads}",
        )
    path = os.path.join(cfg.model.name_or_path, "config.json")
    if not os.path.isfile(path):
        return None
    config = json.loads(Path(path).read_text())
    head_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    return head_dim, config.get("max_position_embeddings", 2**31), f"model.name_or_path={cfg.model.name_or_path}"
