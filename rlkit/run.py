"""Everything a training loop needs, built once from the validated config."""

from __future__ import annotations

import dataclasses
import os
import random
import uuid
from typing import Any

import numpy as np
import torch
from omegaconf import OmegaConf

from rlkit import atomic
from rlkit.checkpoint import newest_intact_checkpoint, verified_checkpoint
from rlkit.engine import barrier, build_engine, is_main_process, rank, world_size
from rlkit.models import build_tiny_model, configure_for_training, load_pretrained, load_tokenizer
from rlkit.models.gguf import gguf_model_dir
from rlkit.models.lora import BaseModelView, apply_lora, has_lora
from rlkit.rewards import build_reward, resolve_reward_fn
from rlkit.rewards.registry import EnvironmentRewards, RewardTermFn
from rlkit.tasks import build_task, format_prompt


@dataclasses.dataclass
class Run:
    """The pieces of one run: config, data, models and the run directory."""

    cfg: Any
    run_dir: str
    task: Any
    train_rows: Any
    test_rows: Any
    tokenizer: Any
    reward: Any
    verifier: Any
    algo: Any  # the algo node as its loop's typed settings (rlkit.loops.registry.LoopSettings)
    rollout_settings: Any  # the rollout backend's settings

    @property
    def max_new_tokens(self) -> int:
        """The response length cap of every rollout and evaluation (``task.max_new_tokens``)."""
        return self.cfg.task.max_new_tokens

    def prompts(self, rows: list[dict]) -> list[str]:
        return [format_prompt(row, self.cfg.task, self.tokenizer) for row in rows]

    def encode(self, prompts: list[str]) -> list[list[int]]:
        """Prompt token ids (no special tokens added: a chat template already has them)."""
        return [self.tokenizer(prompt, add_special_tokens=False)["input_ids"] for prompt in prompts]

    def score(self, rows: list[dict], prompts: list[str], completion_ids: list[list[int]]):
        """The one reward scoring of every loop: (completions, weighted totals, {term: scores}) of
        responses given as token ids, each with its row's fields (the reward contract's ``**row_fields``)."""
        completions = self.tokenizer.batch_decode(completion_ids, skip_special_tokens=True)
        totals, per_term = self.reward(prompts, completions, completion_ids=completion_ids, **self.columns(rows))
        return completions, totals, per_term

    @staticmethod
    def columns(rows: list[dict]) -> dict[str, list]:
        """Row dicts as columns, the ``**row_fields`` of the reward contract."""
        return {key: [row[key] for row in rows] for key in rows[0]} if rows else {}

    def path(self, *parts: str) -> str:
        return os.path.join(self.run_dir, *parts)


def seed_everything(seed: int) -> None:
    """Seed all generators; ranks differ so that their samples differ."""
    seed = seed + 1009 * rank()
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def resume_checkpoint(cfg, run_dir: str) -> str | None:
    """The verified checkpoint to resume from (collective): ``auto`` and ``force`` take the run dir's
    newest intact one, skipping damaged ones; a path must itself be intact."""
    if cfg.resume == "never":
        return None
    if cfg.resume in ("auto", "force"):
        return newest_intact_checkpoint(run_dir)
    return verified_checkpoint(cfg.resume)


def build_run(cfg, run_dir: str) -> Run:
    task = build_task(cfg.task, None if cfg.env is None else OmegaConf.to_object(cfg.env))
    train_rows, test_rows = task.split("train"), task.split("test")
    reward = EnvironmentRewards() if cfg.reward.name == "env" else build_reward(cfg.reward)
    # the verifier is called with the row fields it names
    verifier = RewardTermFn(cfg.task.verifier, resolve_reward_fn(cfg.task.verifier), 1.0)
    algo, rollout = OmegaConf.to_object(cfg.algo), OmegaConf.to_object(cfg.rollout)
    return Run(cfg, run_dir, task, train_rows, test_rows, None, reward, verifier, algo, rollout)


def base_model_dir(run: Run) -> str:
    """Where the model to start from lives: ``model.name_or_path``; for ``model.gguf_file`` its
    transformers conversion in ``model.cache_dir`` (made once, by the main process); for the
    tiny model its seeded random init saved once in the run dir (its tokenizer trained on the task's
    text, with the task's chat template when it needs one)."""
    model = run.cfg.model
    if model.name_or_path:
        return model.name_or_path
    if model.gguf_file:
        if is_main_process():
            gguf_model_dir(model.gguf_file, model.cache_dir)
        barrier()  # the others find the finished conversion
        return gguf_model_dir(model.gguf_file, model.cache_dir)
    directory = run.path("initial_model")
    if is_main_process() and not os.path.isfile(os.path.join(directory, "config.json")):
        corpus = run.task.corpus(run.train_rows.select(range(min(5000, len(run.train_rows)))))
        model, tokenizer = build_tiny_model(run.cfg.model.tiny, corpus, run.cfg.seed)
        tokenizer.chat_template = run.task.chat_template
        save_atomically(directory, lambda tmp: (model.save_pretrained(tmp), tokenizer.save_pretrained(tmp)))
    barrier()  # every rank, always: one that found the model already saved must not skip it
    return directory


def save_atomically(directory: str, write) -> None:
    """``write(tmp)`` fills a temporary directory that replaces ``directory`` once complete and fsync'ed."""
    atomic.replace_directory(directory, write)


def load_model(run: Run, source: str, lora: bool = True):
    """A trainable policy from ``source`` (a local dir or hub id) and its tokenizer; with
    ``model.lora.rank`` > 0 (and ``lora``) only a fresh LoRA adapter in it is trainable."""
    tokenizer = load_tokenizer(source, run.cfg.model.trust_remote_code)
    model = load_pretrained(source, run.cfg.model, run.cfg.hardware)
    if lora:
        model = with_lora(model, run.cfg.model.lora)
    return configure_for_training(model, run.cfg.model), tokenizer


def with_lora(model, settings):
    """``model`` with a fresh adapter as ``model.lora`` says (unchanged with rank 0)."""
    if not settings.rank:
        return model
    return apply_lora(model, settings.rank, settings.alpha, settings.dropout, settings.target_modules)


def load_frozen(run: Run, source: str, device: torch.device):
    """A frozen, evaluation-mode copy of the causal LM at ``source``."""
    model = load_pretrained(source, run.cfg.model, run.cfg.hardware).to(device).eval()
    model.requires_grad_(False)
    return model


def reference_policy(run: Run, source: str, engine):
    """The frozen reference policy: for a LoRA policy the policy itself with its adapters switched off
    (no second copy of the weights), otherwise a frozen copy of the model at ``source``."""
    if has_lora(engine):
        return BaseModelView(engine)
    return load_frozen(run, source, engine.device)


def make_engine(run: Run, model, *, optim, batch_size_global: int, total_steps: int):
    """A DeepSpeed engine whose gradient accumulation matches one minibatch; ``optim`` are
    the optimizer settings (``algo.optim`` with its learning rate resolved)."""
    per_device = batch_size_global // world_size()
    micro = min(run.cfg.trainer.micro_batch_per_device, per_device)
    accumulation = -(-per_device // micro)
    return build_engine(
        model,
        run.cfg.hardware,
        lr=optim.lr,
        betas=optim.betas,
        weight_decay=optim.weight_decay,
        max_grad_norm=optim.max_grad_norm,
        schedule=optim.schedule,
        warmup_steps=optim.warmup_steps,
        total_steps=total_steps,
        micro_batch_per_device=micro,
        grad_accum_steps=accumulation,
        world=world_size(),
    )


def new_run_id() -> str:
    return uuid.uuid4().hex[:12]


def resolved_config(cfg) -> dict[str, Any]:
    return OmegaConf.to_container(cfg, resolve=True)
