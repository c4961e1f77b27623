"""Typed config schema behind Hydra.

The dataclasses here are the schema of ``conf/config.yaml``'s common nodes, each checking its
own values (:meth:`rlkit.settings.Checked.check`). The ``algo`` and ``rollout`` nodes are typed
by the components chosen for them: an ``algo/`` preset names its loop, whose settings dataclass
is the schema of the whole ``algo`` node, and each component inside it (advantage estimator,
policy loss, value source, ...) is a config group whose options are the registered components'
own settings (rlkit/settings.py). Hydra rejects unknown keys and ill-typed values while
composing; :func:`rlkit.validate.validate` then runs every node's own checks and the checks
across components. Batch sizes say in their name whether they count over all processes
(``_global``) or per process (``_per_device``).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING

from rlkit.settings import Checked, ConfigError  # noqa: F401  (ConfigError re-exported: the error every check raises)

# what SLURM (--signal, preemption) or a user may send
PREEMPT_SIGNALS = ("SIGUSR1", "SIGUSR2", "SIGTERM", "SIGINT", "SIGHUP")
DTYPES = ("float32", "bfloat16", "float16")


@dataclass
class TinyArchitecture(Checked):
    hidden_size: int = 128
    num_layers: int = 2
    num_heads: int = 4
    intermediate_size: int = 512
    vocab_size: int = 512  # size of the byte-level BPE trained on the task's text
    max_position_embeddings: int = 512

    def check(self) -> None:
        self.require_at_least_one(
            "hidden_size", "num_layers", "num_heads", "intermediate_size", "max_position_embeddings"
        )
        self.require(
            self.vocab_size >= 64, "vocab_size", "must be at least 64 (the tokenizer's bytes and special tokens)"
        )
        self.require(self.hidden_size % self.num_heads == 0, "num_heads", f"must divide hidden_size={self.hidden_size}")


@dataclass
class WarmStartConfig(Checked):
    """A short supervised phase on the task's reference solutions before RL.
    A random model never earns a sparse reward; pretrained models skip it (steps: 0)."""

    steps: int = 0
    lr: float = 1e-3
    batch_size_global: int = 64

    def check(self) -> None:
        self.require_non_negative("steps")
        self.require_positive("lr")
        self.require_at_least_one("batch_size_global")


@dataclass
class LoraConfig(Checked):
    """Low-rank adapters (Hu et al. 2021, "LoRA", arXiv:2106.09685) through peft: only the adapters
    train, and the reference policy is the same model with them switched off (no second copy)."""

    rank: int = 0  # r, the adapters' rank; 0 = no LoRA (full fine-tuning)
    alpha: float = 32.0  # the update is scaled by alpha / rank
    dropout: float = 0.0  # on the adapters' input in training mode (supervised loops only: RL recomputes log-probs)
    target_modules: list[str] | None = None  # names of the linear layers to adapt; null = every projection of a block

    def check(self) -> None:
        self.require_non_negative("rank")
        self.require(0 <= self.dropout < 1, "dropout", "must be in [0, 1)")
        self.require_positive("alpha")
        self.require(
            self.target_modules is None or len(self.target_modules) > 0, "target_modules", "must name a layer (or null)"
        )
        if self.rank == 0:
            given = [
                f.name for f in dataclasses.fields(self) if f.name != "rank" and getattr(self, f.name) != f.default
            ]
            self.require(
                not given,
                given[0] if given else "rank",
                "is a LoRA setting, but LoRA is off (model.lora.rank=0); set model.lora.rank (e.g. 16) or drop it",
            )


@dataclass
class ModelConfig(Checked):
    name: str = MISSING
    name_or_path: str | None = None  # local dir or hub id; null builds the tiny model from `tiny` (or loads gguf_file)
    gguf_file: str | None = (
        None  # a local GGUF file, or package:smollm2 (the smollm2 extra), converted once into cache_dir
    )
    cache_dir: str | None = None  # where GGUF conversions are kept; null: $RLKIT_CACHE_DIR, else ~/.cache/rlkit
    lr: float = 1e-6  # RL learning rate suited to this model's scale (used unless algo.optim.lr is set)
    sft_lr: float = 1e-5  # supervised learning rate suited to this model's scale (sft, rm, rrhf, pro, rft)
    gradient_checkpointing: bool = False
    trust_remote_code: bool = False
    attn_implementation: str | None = (
        None  # e.g. sdpa, flash_attention_2; null = transformers' default (eager in bf16 on CPU)
    )
    lora: LoraConfig = field(default_factory=LoraConfig)
    tiny: TinyArchitecture = field(default_factory=TinyArchitecture)
    warmstart: WarmStartConfig = field(default_factory=WarmStartConfig)

    def check(self) -> None:
        self.require_positive("lr", "sft_lr")
        self.require(
            not (self.gguf_file and self.name_or_path),
            "gguf_file",
            f"and model.name_or_path={self.name_or_path!r} both name the model; set one of them (the other null)",
        )


@dataclass
class RewardConfig:
    name: str = MISSING
    # name -> {fn: registered name or "pkg.mod:function", weight: 1.0, args: {keyword arguments}}, summed with
    # their weights. Untyped so that `+reward.terms.mine={fn: ..., weight: ...}` works; rlkit.validate checks it.
    terms: dict[str, Any] = field(default_factory=dict)
    fn: str | None = None  # shorthand: one reward function ("pkg.mod:fn" or a name) replacing `terms`


@dataclass
class TaskConfig(Checked):
    name: str = MISSING
    path: str | None = None  # hub id or local directory/files; the task says which formats it reads
    prompt_template: str = "{question}"  # formats a row into the user message
    system_prompt: str | None = None  # used with chat templates only
    use_chat_template: bool = True  # apply the tokenizer's chat template when it has one
    verifier: str = "math_answer"  # reward whose value 1 means "correct" (accuracy, pass@k)
    max_new_tokens: int = 256  # the response length cap of every rollout and evaluation
    max_train_rows: int | None = None  # cap on training rows (null = all)
    options: dict[str, Any] = field(default_factory=dict)  # task-specific knobs, checked by the task

    def check(self) -> None:
        self.require_at_least_one("max_new_tokens")
        self.require(
            self.max_train_rows is None or self.max_train_rows >= 1,
            "max_train_rows",
            "must be at least 1 (or null: all)",
        )


@dataclass
class HardwareConfig(Checked):
    name: str = MISSING
    device: str = "cpu"  # cpu | cuda
    dtype: str = (
        "float32"  # training precision, and the precision every model is loaded in: float32 | bfloat16 | float16
    )
    cpu_matmul: str = (
        "onednn"  # CPU linear layers: onednn (faster GEMMs; weights reordered once per rollout) | torch (its BLAS)
    )
    zero_stage: int = 0  # DeepSpeed ZeRO stage 0-3
    offload_optimizer: bool = False  # ZeRO optimizer state on CPU (stage >= 1)
    # PyTorch's fused AdamW kernel: ~6x faster optimizer step on CPU, but same-seed runs are then not bit-identical
    fused_optimizer: bool = False
    # same seed, same numbers whatever the machine's load (docs/reproducibility.md): PyTorch's deterministic
    # algorithms; null = on for cpu, off for cuda
    deterministic: bool | None = None
    deepspeed: dict[str, Any] = field(default_factory=dict)  # any DeepSpeed config keys, merged last
    # data-parallel processes on this machine: >1 re-launches `rlkit train` under torch.distributed.run (unless a
    # launcher already set WORLD_SIZE)
    num_procs: int = 1

    def check(self) -> None:
        self.require_choice("device", ("cpu", "cuda"))
        self.require_choice("dtype", DTYPES)
        self.require(
            self.device != "cpu" or self.dtype != "float16",
            "dtype",
            "float16 is not supported on CPU; use float32 or bfloat16",
        )
        self.require_choice("cpu_matmul", ("onednn", "torch"))
        self.require_choice("zero_stage", (0, 1, 2, 3))
        self.require(
            not self.offload_optimizer or self.zero_stage >= 1, "offload_optimizer", "needs hardware.zero_stage >= 1"
        )
        self.require_at_least_one("num_procs")


@dataclass
class LoggerConfig(Checked):
    name: str = MISSING
    mode: str = "offline"  # online | offline | disabled (W&B); offline never touches the network
    project: str = "rlkit"
    entity: str | None = None
    tags: list[str] = field(default_factory=list)
    progress_bar: bool = True

    def check(self) -> None:
        self.require_choice("mode", ("online", "offline", "disabled"))


@dataclass
class TrainerConfig(Checked):
    max_steps: int = 150  # RL (or SFT) optimizer iterations, one rollout batch each
    prompts_per_step_global: int = (
        32  # prompts per step over all processes (RL: x algo.group_size samples; SFT: examples)
    )
    micro_batch_per_device: int = 64  # sequences per forward/backward pass on one process
    eval_every: int = 50  # steps between evaluations (0 = only before and after)
    save_every: int = 50  # steps between checkpoints (0 = only at the end)
    keep_checkpoints: int = 2  # newest checkpoints kept on disk
    sample_completions: int = 8  # completions logged as a table per logged step
    # on one: checkpoint at the next step boundary, requeue the SLURM job, exit (sbatch --signal; submitit sends USR2)
    preempt_signals: list[str] = field(default_factory=lambda: ["SIGUSR1", "SIGUSR2"])
    # on one: checkpoint at the next step boundary and exit 128+signal (kill, Ctrl-C, Docker, Kubernetes); a second
    # one exits at once
    stop_signals: list[str] = field(default_factory=lambda: ["SIGTERM", "SIGINT"])
    max_skipped_steps: int = (
        10  # optimizer steps in a row skipped for a non-finite loss or gradient norm before the run stops
    )
    allow_nonempty_dir: bool = (
        False  # write into a non-empty dir that is not an rlkit run (same-named files may be overwritten)
    )

    def check(self) -> None:
        self.require_at_least_one("prompts_per_step_global", "micro_batch_per_device", "max_skipped_steps")
        self.require_non_negative("max_steps", "eval_every", "save_every", "keep_checkpoints", "sample_completions")
        for key in ("preempt_signals", "stop_signals"):
            unknown = [name for name in getattr(self, key) if name not in PREEMPT_SIGNALS]
            self.require(
                not unknown, key, f"{unknown[0] if unknown else ''!r} is not one of: {', '.join(PREEMPT_SIGNALS)}"
            )


@dataclass
class EvalConfig(Checked):
    num_examples: int | None = 200  # held-out rows evaluated (null = all)
    pass_k: int = 8  # samples per prompt for pass@k (0 = skip)
    temperature: float = 1.0  # sampling temperature for pass@k
    batch_size_per_device: int = 128  # prompts per generate call
    num_samples_in_report: int = 5

    def check(self) -> None:
        self.require(
            self.num_examples is None or self.num_examples >= 1, "num_examples", "must be at least 1 (or null: all)"
        )
        self.require_non_negative("pass_k", "num_samples_in_report")
        self.require_positive("temperature")
        self.require_at_least_one("batch_size_per_device")


@dataclass
class RootConfig:
    algo: Any = MISSING  # typed by the preset's loop (rlkit/loops/registry.py LoopSettings and its subclasses)
    rollout: Any = MISSING  # typed by the rollout backend (rlkit/rollout/backends.py)
    env: Any = None  # an environment task's environment (rlkit/envs), chosen by its task preset; typed by it
    model: ModelConfig = MISSING
    reward: RewardConfig = MISSING
    task: TaskConfig = MISSING
    hardware: HardwareConfig = MISSING
    logger: LoggerConfig = MISSING
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    seed: int = 1
    # auto: continue from the run dir's newest intact checkpoint | force: the same, even if the config changed | never
    # | a checkpoint path
    resume: str = "auto"
    run_name: str = MISSING  # names the run dir under outputs/


def register_schema() -> None:
    """Store the root schema and every component's settings (importing the registries fills
    their config groups) in Hydra's config store."""
    import rlkit.envs  # noqa: F401  (the env group)
    import rlkit.loops  # noqa: F401  (loops, value sources, group filters, and through them every algorithm registry)
    import rlkit.rollout.backends  # noqa: F401  (the rollout group)

    ConfigStore.instance().store(name="rlkit_schema", node=RootConfig)


def old_layout_key(saved) -> str | None:
    """The first component key that a saved config holds as a bare name (``algo.advantage: grpo``): a
    config written before components had config groups; None for the current layout."""
    from omegaconf import OmegaConf

    from rlkit.registry import GROUPS

    register_schema()
    names = (registry.key for registry in GROUPS.values() if registry.key != "algo")
    return next((key for key in names if isinstance(OmegaConf.select(saved, key, default=None), str)), None)


def typed_config(saved, overrides: list[str] = ()):
    """A config saved as plain YAML (a run's ``config.yaml``, a checkpoint's) typed again as when
    it was composed: the root schema, the loop's settings for ``algo`` and each component's own
    settings for its node; ``overrides`` (``key=value``) applied last. A config written before
    components had config groups (``algo.advantage: grpo``, a name) is a one-line error."""
    from omegaconf import OmegaConf

    from rlkit.registry import GROUPS

    register_schema()
    old = old_layout_key(saved)
    if old:
        raise ConfigError(
            f"{old}: {OmegaConf.select(saved, old)!r} is a name, not a node: this config predates rlkit's "
            "component config groups; compose it anew with `rlkit train` overrides"
        )
    registries = sorted(GROUPS.values(), key=lambda r: r.key.count("."))  # parents before their children
    cfg = OmegaConf.merge(OmegaConf.structured(RootConfig), saved)
    for registry in registries:
        node = OmegaConf.select(cfg, registry.key, default=None)
        if node is not None:
            parent, _, last = registry.key.rpartition(".")
            typed = OmegaConf.merge(OmegaConf.structured(registry.settings(node[registry.name_field])), node)
            (OmegaConf.select(cfg, parent) if parent else cfg)[last] = typed
    return OmegaConf.merge(cfg, OmegaConf.from_dotlist(list(overrides)))
