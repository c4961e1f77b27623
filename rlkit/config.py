"""Typed config schema behind Hydra, and the checks run before any heavy work.

The dataclasses are registered as the schema of ``conf/config.yaml``: Hydra
rejects unknown keys and ill-typed values while composing; :func:`validate`
then checks names against the registries and the batch arithmetic. Batch sizes
say in their name whether they count over all processes (``_global``) or per
process (``_per_device``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING


class ConfigError(ValueError):
    """A config value that cannot work; the message names the key."""


@dataclass
class SamplingConfig:
    temperature: float = 1.0  # rollout sampling temperature
    top_p: float = 1.0  # nucleus sampling; 1.0 disables it
    max_new_tokens: int = 32  # response length cap; longer responses are truncated
    min_new_tokens: int = 0  # EOS is masked until a response has this many tokens (0 = off)


@dataclass
class KLConfig:
    coef: float = 0.0  # beta; 0 disables the reference model entirely
    estimator: str = "k3"  # k1 | k2 | k3 (Schulman 2020)
    placement: str = (
        "loss"  # "loss": beta * KL added to the loss (GRPO); "reward": subtracted per token from the reward (PPO)
    )
    target: float | None = (
        None  # adaptive controller (Ziegler et al. 2019, Eq. 2): the KL per response beta is steered to; null = fixed beta
    )
    horizon: int = (
        10000  # adaptive controller: samples over which beta may change by at most a factor 1 +- 0.2 (Ziegler: 10000)
    )


@dataclass
class CriticConfig:
    """The value model of PPO; ``type: none`` (critic-free algorithms) builds nothing."""

    type: str = "none"  # none | separate (own model and engine) | shared_head (a value head on the policy's trunk)
    lr: float = 1e-5  # separate critic's learning rate
    loss: str = "clipped"  # value loss registry name: clipped | mse
    clip: float = 0.2  # value clipping epsilon of loss=clipped (PPO2; Zheng et al. 2023 PPO-max: 0.2)
    coef: float = 0.5  # weight of the value loss added to the policy loss (shared_head only)
    pretrain_steps: int = 0  # first RL steps train only the critic (PPO-max "critic model pre-training"); 0 = off


@dataclass
class VineConfig:
    """VinePPO's Monte-Carlo values (Kazemnejad et al. 2024, arXiv:2410.01679): each response is
    cut into steps, and the value of the state before each step is the mean reward of ``k``
    continuations sampled from it with the current policy. ``k: 0`` (every other algorithm)
    samples nothing; ``algo.advantage=vine`` needs ``k >= 1``."""

    k: int = 0  # continuations per state, K of Eq. 5 (paper: 9; its ablation: 1 < 3 < 9); 0 = off
    step_delimiter: str = (
        "\n"  # a step ends after a token whose text contains this (paper: reasoning steps, cut at newlines; "" = off)
    )
    step_tokens: int = 0  # also end a step after this many tokens (0 = off; the paper cuts only at step boundaries)
    max_states: int | None = (
        None  # estimate at most this many states per response, the prompt included; later steps join the last one (null = all, as in the paper)
    )


@dataclass
class TruncationConfig:
    """T-PPO's successive truncated rollout (Fan et al. 2025, "Truncated Proximal Policy Optimization",
    arXiv:2506.15050; loop: truncated_ppo). Each step generates at most ``window`` more tokens of every
    in-flight response; the policy trains on those tokens (Extended GAE bootstraps the ones that go on),
    the value model on the responses that ended; ``sampling.max_new_tokens`` caps a whole response."""

    window: int = 0  # tokens per response per step, the paper's window length (paper: 8k, with 24k max response length as we read it); 0 = unused (other loops)
    value_lam: float = 1.0  # GAE lambda of the value model's targets on ended responses (1 = Monte-Carlo returns, the decoupled critic lambda of the same group's VC-PPO/VAPO); the policy's EGAE uses algo.lam


@dataclass
class NLPOConfig:
    """NLPO's mask policy (Ramamurthy et al. 2023, arXiv:2210.01241, Algorithm 1; loop: nlpo): a copy
    of the policy, refreshed every ``mask_update_every`` steps, whose top-p token set is the only
    set the policy may sample from (and whose masked distribution PPO's ratios use)."""

    top_p: float = (
        0.9  # p of the mask policy's top-p set (paper / RL4LMs' released NLPO configs: 0.9); 1 = no mask (plain PPO)
    )
    mask_update_every: int = 5  # mu: steps between copies of the policy into the mask policy (RL4LMs' configs: 5 on IMDB/GPT-2, 20 on CommonGen and CNN-DM/T5)
    min_tokens_to_keep: int = 1  # the set keeps at least this many tokens (1 = plain top-p as the paper describes it; RL4LMs' implementation default: 100)
    keep_eos: bool = True  # EOS is always allowed (RL4LMs un-masks the special tokens; the paper does not say)


@dataclass
class AlgoConfig:
    name: str = MISSING
    loop: str = "policy_gradient"  # which training loop runs: policy_gradient | sft
    advantage: str = "grpo"  # advantage estimator registry name
    policy_loss: str = "clipped"  # policy loss registry name
    loss_agg: str = "token-mean"  # loss aggregation registry name
    norm_adv_by_std: bool = True  # divide group-centred rewards by the group std (GRPO); false = Dr. GRPO
    adv_eps: float = 1e-6  # added to the std before dividing
    clip_low: float = 0.2  # PPO epsilon below 1
    clip_high: float = 0.2  # PPO epsilon above 1 (DAPO recommends 0.28)
    kl: KLConfig = field(default_factory=KLConfig)
    critic: CriticConfig = field(default_factory=CriticConfig)
    truncation: TruncationConfig = field(
        default_factory=TruncationConfig
    )  # T-PPO (loop: truncated_ppo): window length and the value model's lambda
    vine: VineConfig = field(
        default_factory=VineConfig
    )  # VinePPO: Monte-Carlo state values instead of a critic (advantage: vine)
    nlpo: NLPOConfig = field(
        default_factory=NLPOConfig
    )  # NLPO (loop: nlpo): the mask policy's top-p and refresh interval
    reward_norm: str = "none"  # none | batch (whiten scores over the batch) | running (by running mean/std, PPO-max)
    reward_clip: float = 0.0  # clip normalised scores into [-c, c] (PPO-max: 5 after normalisation); 0 = off
    entropy_coef: float = 0.0  # bonus on the policy entropy (0 = off)
    group_size: int = 8  # samples per prompt
    baseline_rollout: str = (
        "none"  # "greedy": also decode each prompt greedily and pass its score as baseline_scores (ReMax)
    )
    dynamic_sampling: bool = False  # drop groups whose rewards are all equal and sample more prompts to refill (DAPO)
    max_sampling_rounds: int = 3  # with dynamic_sampling: most rollout rounds per step before training on what was kept
    update_epochs: int = 1  # passes over each rollout batch
    minibatches: int = 1  # optimizer steps per epoch over one rollout batch
    lr: float = 1e-6
    lr_schedule: str = "constant"  # constant | linear | cosine (decay to 0 at trainer.max_steps)
    warmup_steps: int = 0
    weight_decay: float = 0.0
    adam_betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    max_grad_norm: float = 1.0  # gradient clipping; 0 disables
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    # --- knobs read by single estimators / losses of the algorithm zoo (each names its reader)
    gamma: float = 1.0  # reinforce_pp, gae: discount of the per-token return (REINFORCE++ and RLHF PPO use 1)
    lam: float = 0.95  # gae: GAE lambda (Schulman et al. 2016; 0.95 is PPO's and PPO-max's choice)
    correct_threshold: float = 0.5  # nsr, w_reinforce: a sample counts as correct when its score > this
    positive_weight: float = 0.1  # w_reinforce: lambda, weight of correct samples (Zhu et al. 2025 recommend 0.1)
    bnpo_score_min: float = 0.0  # bnpo: scores are mapped affinely from [min, max] onto [0, 1] (then clipped into it)
    bnpo_score_max: float = 1.0  # bnpo: see bnpo_score_min
    gppo_beta1: float = 0.75  # ce_gppo: gradient scale of tokens clipped below (ratio < 1 - clip_low, A < 0); paper: 0.75 (7B), 0.5 (1.5B)
    gppo_beta2: float = (
        1.0  # ce_gppo: gradient scale of tokens clipped above (ratio > 1 + clip_high, A > 0); paper: 1.0
    )
    pspo_alpha: float = 0.1  # pspo: smoothing of pi toward pi_old before the ratio, in [0, 1); 0 = unclipped ratio
    apa_lambda: float = 1.0  # apa: lambda, the advantage scale 1/lambda of the target log pi_init + A / lambda
    rebel_eta: float = 1.0  # rebel: eta, log-ratio differences are divided by it (the paper tunes it per task)
    p3o_clip: str = "joint"  # p3o: joint (P3O-V2) clips the pair's log-ratio difference, separate (P3O-V1) each response's log-ratio
    p3o_weight_cap: float = 10.0  # p3o: c, the pair's importance weight rho1 rho2 is clipped into [1/c, c] (authors' code: 10); 1 = no weighting
    # --- preference, ranking and rejection-sampling training (loops: preference, online_preference; see conf/algo/dpo.yaml)
    preference_loss: str = (
        "sigmoid"  # preference loss registry name: sigmoid (DPO) | ipo | hinge | cdpo | robust | rpo | rrhf | pro | sft
    )
    beta: float = 0.1  # DPO-family temperature on the log-ratio margin (DPO: 0.1); also RSO's rejection-sampling temperature and copg's beta in r - beta ln(pi/pi_ref)
    label_smoothing: float = 0.0  # cdpo, robust: assumed fraction of flipped preference labels, in [0, 0.5)
    rpo_alpha: float = 1.0  # rpo: weight of the chosen response's per-token NLL (Pang et al. 2024: 1)
    sft_weight: float = 1.0  # rrhf, pro: weight of the best response's NLL
    reference: str = "model"  # model: the frozen start model scores each batch | precomputed: its log-probs computed once over the data
    selection: str = "best_worst"  # online_preference: sampled responses -> training set: best_worst | rejection (RSO) | above_threshold (RFT)


@dataclass
class TinyArchitecture:
    hidden_size: int = 128
    num_layers: int = 2
    num_heads: int = 4
    intermediate_size: int = 512
    vocab_size: int = 512  # size of the byte-level BPE trained on the task's text
    max_position_embeddings: int = 512


@dataclass
class WarmStartConfig:
    """A short supervised phase on the task's reference solutions before RL.
    A random model never earns a sparse reward; pretrained models skip it (steps: 0)."""

    steps: int = 0
    lr: float = 1e-3
    batch_size_global: int = 64


@dataclass
class ModelConfig:
    name: str = MISSING
    name_or_path: str | None = None  # local dir or hub id; null builds the tiny model from `tiny`
    dtype: str = "float32"  # weights as loaded: float32 | bfloat16 | float16
    lr: float = 1e-6  # RL learning rate suited to this model's scale (algo presets use it unless algo.lr is set)
    sft_lr: float = 1e-5  # supervised learning rate suited to this model's scale (algo=sft)
    gradient_checkpointing: bool = False
    trust_remote_code: bool = False
    attn_implementation: str | None = (
        None  # e.g. sdpa, flash_attention_2; null = transformers' default (eager in bf16 on CPU)
    )
    tiny: TinyArchitecture = field(default_factory=TinyArchitecture)
    warmstart: WarmStartConfig = field(default_factory=WarmStartConfig)


@dataclass
class RewardConfig:
    name: str = MISSING
    # name -> {fn: registered name or "pkg.mod:function", weight: 1.0, args: {keyword arguments}}, summed with
    # their weights. Untyped so that `+reward.terms.mine={fn: ..., weight: ...}` works; rlkit.validate checks it.
    terms: dict[str, Any] = field(default_factory=dict)
    fn: str | None = None  # shorthand: one reward function ("pkg.mod:fn" or a name) replacing `terms`


@dataclass
class TaskConfig:
    name: str = MISSING
    path: str | None = None  # hub id or local directory/files; the task says which formats it reads
    prompt_template: str = "{question}"  # formats a row into the user message
    system_prompt: str | None = None  # used with chat templates only
    use_chat_template: bool = True  # apply the tokenizer's chat template when it has one
    verifier: str = "math_answer"  # reward whose value 1 means "correct" (accuracy, pass@k)
    max_new_tokens: int = 256  # response length this task needs (algo presets use it)
    max_train_rows: int | None = None  # cap on training rows (null = all)
    options: dict[str, Any] = field(default_factory=dict)  # task-specific knobs, checked by the task


@dataclass
class HardwareConfig:
    name: str = MISSING
    device: str = "cpu"  # cpu | cuda
    dtype: str = "float32"  # training precision: float32 | bfloat16 | float16
    cpu_matmul: str = (
        "onednn"  # CPU linear layers: onednn (faster GEMMs; weights reordered once per rollout) | torch (its BLAS)
    )
    zero_stage: int = 0  # DeepSpeed ZeRO stage 0-3
    offload_optimizer: bool = False  # ZeRO optimizer state on CPU (stage >= 1)
    fused_optimizer: bool = False  # PyTorch's fused AdamW kernel: ~6x faster optimizer step on CPU, but same-seed runs are then not bit-identical
    deepspeed: dict[str, Any] = field(default_factory=dict)  # any DeepSpeed config keys, merged last
    num_procs: int = 1  # data-parallel processes on this machine: >1 re-launches `rlkit train` under torch.distributed.run (unless a launcher already set WORLD_SIZE)


@dataclass
class LoggerConfig:
    name: str = MISSING
    mode: str = "offline"  # online | offline | disabled (W&B); offline never touches the network
    project: str = "rlkit"
    entity: str | None = None
    tags: list[str] = field(default_factory=list)
    progress_bar: bool = True


@dataclass
class TrainerConfig:
    max_steps: int = 100  # RL (or SFT) optimizer iterations, one rollout batch each
    prompts_per_step_global: int = (
        16  # prompts per step over all processes (RL: x algo.group_size samples; SFT: examples)
    )
    micro_batch_per_device: int = 64  # sequences per forward/backward pass on one process
    eval_every: int = 25  # steps between evaluations (0 = only before and after)
    save_every: int = 50  # steps between checkpoints (0 = only at the end)
    keep_checkpoints: int = 2  # newest checkpoints kept on disk
    sample_completions: int = 8  # completions logged as a table per logged step
    preempt_signals: list[str] = field(
        default_factory=lambda: ["SIGUSR1", "SIGUSR2"]
    )  # on one: checkpoint at the next step boundary, requeue the SLURM job, exit (sbatch --signal; submitit sends USR2)
    stop_signals: list[str] = field(
        default_factory=lambda: ["SIGTERM", "SIGINT"]
    )  # on one: checkpoint at the next step boundary and exit 128+signal (kill, Ctrl-C, Docker, Kubernetes); a second one exits at once
    max_skipped_steps: int = (
        10  # optimizer steps in a row skipped for a non-finite loss or gradient norm before the run stops
    )
    allow_nonempty_dir: bool = (
        False  # write into a non-empty run dir that is not an rlkit run (rlkit's files may overwrite same-named ones)
    )


@dataclass
class EvalConfig:
    num_examples: int | None = 200  # held-out rows evaluated (null = all)
    pass_k: int = 8  # samples per prompt for pass@k (0 = skip)
    temperature: float = 1.0  # sampling temperature for pass@k
    batch_size_per_device: int = 128  # prompts per generate call
    num_samples_in_report: int = 5


@dataclass
class RootConfig:
    algo: AlgoConfig = MISSING
    model: ModelConfig = MISSING
    reward: RewardConfig = MISSING
    task: TaskConfig = MISSING
    hardware: HardwareConfig = MISSING
    logger: LoggerConfig = MISSING
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    seed: int = 1
    resume: str = "auto"  # auto: continue from the run dir's newest intact checkpoint | force: the same, even if the config changed | never | a checkpoint path
    run_name: str = MISSING  # names the run dir under outputs/


def register_schema() -> None:
    ConfigStore.instance().store(name="rlkit_schema", node=RootConfig)
