"""Checks on the composed config that Hydra's typing cannot express, run before
any model or dataset is loaded. Each failure is one line naming the key."""

from __future__ import annotations

import math
import os

from omegaconf import OmegaConf

from rlkit.algos import ADVANTAGE_ESTIMATORS, KL_ESTIMATORS, LOSS_AGGREGATIONS, POLICY_LOSSES, VALUE_LOSSES
from rlkit.algos.policy_losses import optional_inputs
from rlkit.algos.preference_losses import PREFERENCE_LOSSES
from rlkit.algos.selection import RESPONSE_SELECTIONS
from rlkit.config import ConfigError
from rlkit.loops import LOOPS
from rlkit.models.loading import DTYPES
from rlkit.rewards import resolve_reward_fn
from rlkit.tasks import TASKS
from rlkit.tasks.base import parse_options

CHOICES = {
    "algo.loop": LOOPS,
    "algo.advantage": ADVANTAGE_ESTIMATORS,
    "algo.policy_loss": POLICY_LOSSES,
    "algo.loss_agg": LOSS_AGGREGATIONS,
    "algo.kl.estimator": KL_ESTIMATORS,
    "algo.kl.placement": ("loss", "reward"),
    "algo.lr_schedule": ("constant", "linear", "cosine"),
    "algo.baseline_rollout": ("none", "greedy"),
    "algo.critic.type": ("none", "separate", "shared_head"),
    "algo.critic.loss": VALUE_LOSSES,
    "algo.reward_norm": ("none", "batch", "running"),
    "hardware.dtype": tuple(
        DTYPES
    ),  # before model.dtype, which follows it by default: the error names the key the user set
    "model.dtype": tuple(DTYPES),
    "hardware.device": ("cpu", "cuda"),
    "hardware.cpu_matmul": ("onednn", "torch"),
    "hardware.zero_stage": (0, 1, 2, 3),
    "logger.mode": ("online", "offline", "disabled"),
    "task.name": TASKS,
    "algo.preference_loss": PREFERENCE_LOSSES,
    "algo.reference": ("model", "precomputed"),
    "algo.selection": RESPONSE_SELECTIONS,
    "algo.p3o_clip": ("joint", "separate"),
}

POSITIVE = (
    "algo.group_size",
    "algo.max_sampling_rounds",
    "algo.update_epochs",
    "algo.minibatches",
    "algo.sampling.max_new_tokens",
    "trainer.prompts_per_step_global",
    "trainer.micro_batch_per_device",
    "trainer.max_skipped_steps",
    "eval.batch_size_per_device",
    "model.warmstart.batch_size_global",
    "hardware.num_procs",
    "algo.nlpo.mask_update_every",
    "algo.nlpo.min_tokens_to_keep",
)
PREEMPT_SIGNALS = (
    "SIGUSR1",
    "SIGUSR2",
    "SIGTERM",
    "SIGINT",
    "SIGHUP",
)  # what SLURM (--signal, preemption) or a user may send
NON_NEGATIVE = (
    "trainer.max_steps",
    "trainer.eval_every",
    "trainer.save_every",
    "trainer.keep_checkpoints",
    "eval.pass_k",
    "model.warmstart.steps",
    "algo.kl.coef",
    "algo.clip_low",
    "algo.clip_high",
    "algo.warmup_steps",
    "algo.max_grad_norm",
    "algo.weight_decay",
    "algo.positive_weight",
    "algo.gppo_beta1",
    "algo.gppo_beta2",
    "algo.critic.clip",
    "algo.critic.coef",
    "algo.critic.pretrain_steps",
    "algo.reward_clip",
    "algo.vine.k",
    "algo.vine.step_tokens",
    "algo.sampling.min_new_tokens",
)


def lookup(cfg, dotted: str):
    node = cfg
    for part in dotted.split("."):
        node = node[part]
    return node


def validate(cfg, world_size: int = 1) -> None:
    """Raise :class:`ConfigError` for the first problem found."""
    missing = sorted(OmegaConf.missing_keys(cfg))
    if missing:
        raise ConfigError(f"{missing[0]} is required (it is ??? in its config group)")
    for key, choices in CHOICES.items():
        value = lookup(cfg, key)
        if value not in choices:
            raise ConfigError(f"{key}={value!r} is not one of: {', '.join(map(str, choices))}")
    for key in POSITIVE:
        if lookup(cfg, key) < 1:
            raise ConfigError(f"{key}={lookup(cfg, key)} must be at least 1")
    for key in NON_NEGATIVE:
        if lookup(cfg, key) < 0:
            raise ConfigError(f"{key}={lookup(cfg, key)} must not be negative")
    parse_options(
        TASKS.get(cfg.task.name).Options, cfg.task.options
    )  # unknown task.options keys, before any data loads
    algo = cfg.algo
    if algo.sampling.min_new_tokens > algo.sampling.max_new_tokens:
        raise ConfigError(
            f"algo.sampling.min_new_tokens={algo.sampling.min_new_tokens} exceeds algo.sampling.max_new_tokens={algo.sampling.max_new_tokens}"
        )
    if not 0 < algo.sampling.top_p <= 1:
        raise ConfigError(f"algo.sampling.top_p={algo.sampling.top_p} must be in (0, 1]")
    if algo.sampling.temperature <= 0:
        raise ConfigError(f"algo.sampling.temperature={algo.sampling.temperature} must be positive")
    if not 0 < algo.nlpo.top_p <= 1:
        raise ConfigError(f"algo.nlpo.top_p={algo.nlpo.top_p} must be in (0, 1]")
    if algo.loop == "nlpo" and algo.sampling.top_p < 1:
        raise ConfigError(
            f"algo.sampling.top_p={algo.sampling.top_p} with algo.loop=nlpo: NLPO's log-probs are those of the mask policy's "
            "top-p set alone; truncate with algo.nlpo.top_p and leave algo.sampling.top_p at 1"
        )
    if algo.lr <= 0:
        raise ConfigError(f"algo.lr={algo.lr} must be positive")
    if algo.norm_adv_by_std and algo.adv_eps <= 0:
        raise ConfigError(
            f"algo.adv_eps={algo.adv_eps} must be positive when algo.norm_adv_by_std is true (a group of equal rewards has std 0)"
        )
    if algo.clip_low >= 1:
        raise ConfigError(f"algo.clip_low={algo.clip_low} must be below 1")
    if not 0 <= algo.gamma <= 1:
        raise ConfigError(f"algo.gamma={algo.gamma} must be in [0, 1]")
    if not 0 <= algo.lam <= 1:
        raise ConfigError(f"algo.lam={algo.lam} must be in [0, 1]")
    if (algo.advantage == "gae") != (algo.critic.type != "none"):
        raise ConfigError(
            f"algo.advantage={algo.advantage} with algo.critic.type={algo.critic.type}: the gae estimator needs a critic "
            "(separate or shared_head) and only gae reads one"
        )
    if (algo.advantage == "vine") != (algo.vine.k > 0):
        raise ConfigError(
            f"algo.advantage={algo.advantage} with algo.vine.k={algo.vine.k}: the vine estimator needs Monte-Carlo values "
            "(algo.vine.k >= 1 continuations per state) and only vine reads them"
        )
    if algo.vine.max_states is not None and algo.vine.max_states < 1:
        raise ConfigError(
            f"algo.vine.max_states={algo.vine.max_states} must be at least 1 (the prompt state), or null for every state"
        )
    if algo.vine.k and (algo.reward_norm != "none" or algo.reward_clip):
        raise ConfigError(
            f"algo.vine.k={algo.vine.k}: Monte-Carlo values are in raw reward units, so the scores must be too: "
            "set algo.reward_norm=none and algo.reward_clip=0"
        )
    if algo.critic.pretrain_steps and algo.critic.type == "none":
        raise ConfigError(
            f"algo.critic.pretrain_steps={algo.critic.pretrain_steps} needs a critic (algo.critic.type=separate or shared_head)"
        )
    if algo.critic.type == "separate" and algo.critic.lr <= 0:
        raise ConfigError(f"algo.critic.lr={algo.critic.lr} must be positive")
    check_truncation(algo)
    if algo.kl.target is not None and (algo.kl.target <= 0 or algo.kl.coef <= 0 or algo.kl.horizon < 1):
        raise ConfigError(
            f"algo.kl.target={algo.kl.target}: the adaptive KL controller needs kl.target > 0, an initial kl.coef > 0 and kl.horizon >= 1"
        )
    if algo.beta <= 0:
        raise ConfigError(f"algo.beta={algo.beta} must be positive")
    if not 0 <= algo.label_smoothing < 0.5:
        raise ConfigError(f"algo.label_smoothing={algo.label_smoothing} must be in [0, 0.5)")
    if algo.reference == "precomputed" and algo.loop != "preference":
        raise ConfigError(
            f"algo.reference=precomputed needs fixed responses (algo.loop=preference), not algo.loop={algo.loop}"
        )
    if algo.loop in ("preference", "reward_model") and TASKS.get(cfg.task.name).evaluation != "pairs":
        raise ConfigError(
            f"algo.loop={algo.loop} needs a preference task (task=hh, preference or ranking), not task={cfg.task.name}"
        )
    if "group_index" in optional_inputs(POLICY_LOSSES.get(algo.policy_loss)):
        if algo.group_size != 2:
            raise ConfigError(
                f"algo.policy_loss={algo.policy_loss} compares the two responses of a prompt: set algo.group_size=2"
            )
        if (cfg.trainer.prompts_per_step_global // world_size) % algo.minibatches:
            raise ConfigError(
                f"algo.minibatches={algo.minibatches} must divide the prompts per process per step (pairs stay in one minibatch)"
            )
    for key in ("apa_lambda", "rebel_eta"):
        if algo[key] <= 0:
            raise ConfigError(f"algo.{key}={algo[key]} must be positive")
    if algo.p3o_weight_cap < 1:
        raise ConfigError(
            f"algo.p3o_weight_cap={algo.p3o_weight_cap} must be at least 1 (the weight is clipped into [1/c, c])"
        )
    if not 0 <= algo.pspo_alpha < 1:
        raise ConfigError(f"algo.pspo_alpha={algo.pspo_alpha} must be in [0, 1) (1 would freeze the policy at pi_old)")
    if algo.bnpo_score_max <= algo.bnpo_score_min:
        raise ConfigError(
            f"algo.bnpo_score_max={algo.bnpo_score_max} must be above algo.bnpo_score_min={algo.bnpo_score_min}"
        )
    if algo.advantage == "remax" and algo.baseline_rollout != "greedy":
        raise ConfigError("algo.advantage=remax needs the greedy baseline: set algo.baseline_rollout=greedy")
    prompts = cfg.trainer.prompts_per_step_global
    if prompts % world_size:
        raise ConfigError(f"trainer.prompts_per_step_global={prompts} must divide evenly over {world_size} processes")
    if (prompts // world_size * algo.group_size) % algo.minibatches:
        raise ConfigError(
            f"algo.minibatches={algo.minibatches} must divide the {prompts // world_size * algo.group_size} samples per process per step"
        )
    if cfg.model.warmstart.batch_size_global % world_size:
        raise ConfigError(f"model.warmstart.batch_size_global must divide evenly over {world_size} processes")
    for key in ("trainer.preempt_signals", "trainer.stop_signals"):
        for name in lookup(cfg, key):
            if name not in PREEMPT_SIGNALS:
                raise ConfigError(f"{key}: {name!r} is not one of: {', '.join(PREEMPT_SIGNALS)}")
    if cfg.hardware.offload_optimizer and cfg.hardware.zero_stage == 0:
        raise ConfigError("hardware.offload_optimizer needs hardware.zero_stage >= 1")
    if cfg.hardware.device == "cpu" and cfg.hardware.dtype == "float16":
        raise ConfigError("hardware.dtype=float16 is not supported on CPU; use float32 or bfloat16")
    if cfg.resume not in ("auto", "force", "never") and not os.path.isdir(cfg.resume):
        raise ConfigError(f"resume={cfg.resume!r}: use auto, force, never, or the path of a checkpoint directory")
    for name, term in cfg.reward.terms.items():
        check_reward_term(f"reward.terms.{name}", term)
    reward_specs = (
        {"reward.fn": cfg.reward.fn}
        if cfg.reward.fn
        else {f"reward.terms.{k}.fn": t["fn"] for k, t in cfg.reward.terms.items()}
    )
    if not reward_specs:
        raise ConfigError("reward has no terms: set reward.terms or reward.fn")
    for key, spec in {**reward_specs, "task.verifier": cfg.task.verifier}.items():
        try:
            resolve_reward_fn(spec)
        except (KeyError, ValueError) as error:
            raise ConfigError(f"{key}: {error}") from None


REWARD_TERM_KEYS = ("fn", "weight", "args", "workers", "timeout", "failure_value")


def check_reward_term(key: str, term) -> None:
    if not hasattr(term, "keys"):
        raise ConfigError(f"{key} must be a mapping like {{fn: math_answer, weight: 1.0}}")
    unknown = sorted(set(term.keys()) - set(REWARD_TERM_KEYS))
    if unknown:
        raise ConfigError(f"{key}.{unknown[0]}: unknown key; valid: {', '.join(REWARD_TERM_KEYS)}")
    if not isinstance(term.get("fn"), str):
        raise ConfigError(f"{key}.fn is required: a registered reward name or 'package.module:function'")
    if not isinstance(term.get("weight", 1.0), (int, float)) or not math.isfinite(term.get("weight", 1.0)):
        raise ConfigError(f"{key}.weight={term.get('weight')!r} must be a finite number")
    if not hasattr(term.get("args", {}), "keys"):
        raise ConfigError(f"{key}.args must be a mapping of keyword arguments")
    if not isinstance(term.get("workers", 0), int) or term.get("workers", 0) < 0:
        raise ConfigError(
            f"{key}.workers={term.get('workers')!r} must be a non-negative integer (0 = score the batch in one call)"
        )
    timeout = term.get("timeout")
    if timeout is not None and (not isinstance(timeout, (int, float)) or timeout <= 0 or not term.get("workers")):
        raise ConfigError(
            f"{key}.timeout={timeout!r} must be a positive number of seconds, and needs {key}.workers >= 1"
        )
    failure_value = term.get("failure_value", 0.0)
    if not isinstance(failure_value, (int, float)) or not math.isfinite(failure_value):
        raise ConfigError(f"{key}.failure_value={failure_value!r} must be a finite number")


def check_truncation(algo) -> None:
    """T-PPO's knobs (``algo.truncation``, read only by ``loop: truncated_ppo``)."""
    window = algo.truncation.window
    if algo.loop != "truncated_ppo":
        if window:
            raise ConfigError(
                f"algo.truncation.window={window} is read only by algo.loop=truncated_ppo (T-PPO), not algo.loop={algo.loop}"
            )
        return
    if window < 1:
        raise ConfigError(
            f"algo.truncation.window={window} must be at least 1 (tokens generated per response per step)"
        )
    if not 0 <= algo.truncation.value_lam <= 1:
        raise ConfigError(f"algo.truncation.value_lam={algo.truncation.value_lam} must be in [0, 1]")
    if algo.advantage != "gae" or algo.critic.type != "separate":
        raise ConfigError(
            f"algo.loop=truncated_ppo trains a value model apart from the policy (Extended GAE): set algo.advantage=gae "
            f"and algo.critic.type=separate, not {algo.advantage} / {algo.critic.type}"
        )
    if algo.dynamic_sampling or algo.baseline_rollout != "none":
        raise ConfigError(
            "algo.loop=truncated_ppo samples a window per step: algo.dynamic_sampling and algo.baseline_rollout are not supported"
        )
    if "group_index" in optional_inputs(POLICY_LOSSES.get(algo.policy_loss)):
        raise ConfigError(
            f"algo.policy_loss={algo.policy_loss} compares the responses of a prompt, but algo.loop=truncated_ppo "
            "trains on responses of different prompts at different lengths"
        )
