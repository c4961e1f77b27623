"""Checks on the composed config that Hydra's typing cannot express, run before any model or
dataset is loaded. Each node checks its own values (its settings dataclass's ``check``); what
is left here are the checks across nodes: the batch arithmetic, a loop against its task, the
reward functions. Each failure is one line naming the key."""

from __future__ import annotations

import os

from omegaconf import DictConfig, OmegaConf

from rlkit.algos import ADVANTAGE_ESTIMATORS
from rlkit.algos.advantages import EPISODE_INPUTS
from rlkit.algos.policy_losses import POLICY_LOSSES, optional_inputs
from rlkit.config import TaskConfig
from rlkit.envs import make_environment
from rlkit.loops import LOOPS
from rlkit.loops.policy_gradient import PolicyGradientLoop
from rlkit.models.gguf import require_gguf_support, resolve_gguf
from rlkit.models.lora import require_peft
from rlkit.registry import GROUPS
from rlkit.rewards import resolve_reward_fn
from rlkit.rewards.registry import check_reward_term
from rlkit.rollout.backends import ROLLOUTS
from rlkit.settings import ConfigError, check_settings
from rlkit.tasks import TASKS
from rlkit.tasks.base import parse_options


def validate(cfg, world_size: int = 1) -> None:
    """Raise :class:`ConfigError` for the first problem found."""
    missing = sorted(OmegaConf.missing_keys(cfg))
    if missing:
        raise ConfigError(missing_message(missing[0]))
    check_components(cfg)
    check_settings(OmegaConf.to_object(cfg))
    if cfg.task.name not in TASKS:
        raise ConfigError(f"task.name={cfg.task.name!r} is not one of: {', '.join(TASKS)}")
    parse_options(TASKS.get(cfg.task.name).Options, cfg.task.options)  # unknown task.options keys, before data loads
    check_batches(cfg, world_size)
    check_loop_and_task(cfg)
    check_rollout(cfg)
    check_model(cfg)
    if TASKS.get(cfg.task.name).samples == "episodes":
        check_environment_task(cfg)
    else:
        check_no_environment(cfg)
        check_rewards(cfg)
    if cfg.model.warmstart.batch_size_global % world_size:
        raise ConfigError(f"model.warmstart.batch_size_global must divide evenly over {world_size} processes")
    if cfg.resume not in ("auto", "force", "never") and not os.path.isdir(cfg.resume):
        raise ConfigError(f"resume={cfg.resume!r}: use auto, force, never, or the path of a checkpoint directory")


def missing_message(key: str) -> str:
    """``key`` has no value: name the config group that chooses it, when it is a component."""
    registry = next((r for r in GROUPS.values() if r.key == key), None)
    if registry is None:
        return f"{key} is required (it is ??? in its config group)"
    valid = ", ".join(registry.names())
    return f"{key} is required: choose a {registry.kind} with +{registry.group}=<name> (valid: {valid})"


def check_components(cfg) -> None:
    """Every component node is one of its group's options, chosen as a group (``algo/advantage=rloo``),
    not replaced by a string (``algo.advantage=rloo``) or renamed (``algo.advantage.name=rloo``)."""
    for group, registry in GROUPS.items():
        node = OmegaConf.select(cfg, registry.key, default=None)
        if node is None:
            continue
        name = node[registry.name_field] if isinstance(node, DictConfig) else node
        if isinstance(node, DictConfig) and name in registry and OmegaConf.get_type(node) is registry.settings(name):
            continue
        if registry.key == "algo":
            raise ConfigError(
                f"algo.loop={name}: the loop comes with the algorithm preset; choose one with algo=<preset>"
            )
        key = registry.key if isinstance(node, str) else f"{registry.key}.{registry.name_field}"
        valid = ", ".join(registry.names())
        raise ConfigError(
            f"{key}={name}: choose the {registry.kind} as a config group, {group}={name} (valid: {valid})"
        )


def check_batches(cfg, world_size: int) -> None:
    """Prompts and samples divide over processes and minibatches (pairs of a pairwise loss stay together)."""
    prompts, algo = cfg.trainer.prompts_per_step_global, cfg.algo
    if prompts % world_size:
        raise ConfigError(f"trainer.prompts_per_step_global={prompts} must divide evenly over {world_size} processes")
    if "minibatches" not in algo:
        return
    samples = prompts // world_size * algo.group_size
    if samples % algo.minibatches:
        raise ConfigError(f"algo.minibatches={algo.minibatches} must divide the {samples} samples per process per step")
    pairwise = "group_index" in optional_inputs(POLICY_LOSSES.get(algo.policy_loss.name))
    if pairwise and (prompts // world_size) % algo.minibatches:
        raise ConfigError(
            f"algo.minibatches={algo.minibatches} must divide the prompts per process per step (pairs stay in "
            "one minibatch)"
        )


def check_loop_and_task(cfg) -> None:
    """Loops that learn from preference pairs need a task that has them (and is evaluated on them)."""
    loop = cfg.algo.loop
    if loop in ("preference", "reward_model") and TASKS.get(cfg.task.name).evaluation != "pairs":
        raise ConfigError(
            f"algo.loop={loop} needs a preference task (task=hh, preference or ranking), not task={cfg.task.name}"
        )


def check_rollout(cfg) -> None:
    """The rollout backend can serve the loop (a loop that reshapes the sampling distribution needs a
    backend that applies logits processors) and the run (the backend's own checks: vLLM installed,
    model shape)."""
    backend = ROLLOUTS.get(cfg.rollout.name)
    if getattr(LOOPS.get(cfg.algo.loop), "reshapes_sampling", False) and not backend.supports_logits_processor:
        raise ConfigError(
            f"rollout={cfg.rollout.name}: algo={cfg.algo.name} samples from a reshaped distribution (a logits "
            "processor), which only rollout=hf applies"
        )
    backend.check_config(cfg)


def check_model(cfg) -> None:
    """The packages a GGUF model or LoRA needs are installed (the GGUF file exists), and LoRA suits the loop."""
    model = cfg.model
    if model.gguf_file:
        resolve_gguf(model.gguf_file)
        require_gguf_support("model.gguf_file")
    if not model.lora.rank:
        return
    require_peft("model.lora.rank")
    if cfg.algo.loop == "reward_model":
        raise ConfigError("model.lora.rank: algo=rm saves a whole reward model; train it without LoRA (rank 0)")
    if model.lora.dropout and issubclass(LOOPS.get(cfg.algo.loop), PolicyGradientLoop):
        raise ConfigError(
            f"model.lora.dropout={model.lora.dropout}: must be 0 for algo.loop={cfg.algo.loop}, whose update "
            "recomputes the rollout's log-probs in training mode (dropout would change them)"
        )


def check_rewards(cfg) -> None:
    """Every reward term is well formed and its function, and the task's verifier, can be found."""
    for name, term in cfg.reward.terms.items():
        check_reward_term(f"reward.terms.{name}", term)
    if cfg.reward.fn:
        specs = {"reward.fn": cfg.reward.fn}
    else:
        specs = {f"reward.terms.{k}.fn": t["fn"] for k, t in cfg.reward.terms.items()}
    if not specs:
        raise ConfigError("reward has no terms: set reward.terms or reward.fn")
    for key, spec in {**specs, "task.verifier": cfg.task.verifier}.items():
        try:
            resolve_reward_fn(spec)
        except (KeyError, ValueError) as error:
            raise ConfigError(f"{key}: {error}") from None


ENVIRONMENT_TASKS = (
    "task=maze, navigation, wordle, twenty_questions or tool_arith (task=env env.fn=module:Class for your own)"
)
NOT_READ_BY_ENVIRONMENT_TASKS = ("path", "prompt_template", "system_prompt", "verifier", "use_chat_template")


def check_no_environment(cfg) -> None:
    """A task that is not an environment has no ``env`` node, no environment reward and no
    advantage estimator that reads episodes."""
    if cfg.env is not None:
        raise ConfigError(
            f"env={cfg.env.name}: task {cfg.task.name} is not an environment task; use {ENVIRONMENT_TASKS}"
        )
    if cfg.reward.name == "env":
        raise ConfigError(
            f"reward=env: task {cfg.task.name} is not an environment task, so no environment rewards it (e.g. "
            "reward=math)"
        )
    estimator = cfg.algo.get("advantage")
    if estimator is not None and set(getattr(ADVANTAGE_ESTIMATORS.get(estimator.name), "inputs", ())) & set(
        EPISODE_INPUTS
    ):
        raise ConfigError(
            f"algo.advantage={estimator.name}: it reads the turns of multi-turn episodes; use {ENVIRONMENT_TASKS}"
        )


def check_environment_task(cfg) -> None:
    """An environment task has an ``env`` node, is rewarded by it (``reward=env``), trains with a
    loop and value source that work on episodes, and sets no task setting it does not read."""
    if cfg.env is None:
        raise ConfigError(f"task.name={cfg.task.name} needs an environment: {ENVIRONMENT_TASKS}")
    if cfg.reward.name != "env" or cfg.reward.terms or cfg.reward.fn:
        raise ConfigError(
            f"reward={cfg.reward.name}: an environment task is rewarded by its environment, turn by turn; use "
            "reward=env"
        )
    if cfg.algo.loop not in ("policy_gradient", "sft"):
        raise ConfigError(
            f"algo={cfg.algo.name}: its loop ({cfg.algo.loop}) learns from single responses; environment tasks train "
            "with the policy-gradient loop (e.g. algo=grpo, rloo, ppo, gigpo) or algo=sft"
        )
    source = cfg.algo.get("value_source")
    if source is not None and source.name in ("monte_carlo", "greedy"):
        raise ConfigError(
            f"algo/value_source={source.name}: it re-samples single responses; environment tasks use none, "
            "critic or value_head"
        )
    defaults = TaskConfig(name=cfg.task.name)
    for key in NOT_READ_BY_ENVIRONMENT_TASKS:
        if cfg.task[key] != getattr(defaults, key):
            raise ConfigError(
                f"task.{key}={cfg.task[key]!r}: an environment task does not read it (its environment gives the "
                "prompts, rewards and success; episodes follow the tokenizer's chat template)"
            )
    options = make_environment(OmegaConf.to_object(cfg.env)).options  # env=custom: env.fn imports, its options check
    positions = cfg.model.tiny.max_position_embeddings
    if cfg.model.name_or_path is None and options.max_total_tokens > positions:
        raise ConfigError(
            f"env.max_total_tokens={options.max_total_tokens}: the tiny model has {positions} positions "
            "(model.tiny.max_position_embeddings)"
        )
