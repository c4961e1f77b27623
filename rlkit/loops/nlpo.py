"""NLPO, Natural Language Policy Optimization (Ramamurthy et al. 2023, "Is Reinforcement Learning
(Not) for Natural Language Processing: Benchmarks, Baselines, and Building Blocks for Natural
Language Policy Optimization", ICLR 2023, arXiv:2210.01241, Algorithm 1): PPO whose policy acts in
a masked action space.

A *mask policy* pi_psi, a frozen copy of the policy, defines at every state the top-p token set
M_psi(s) (``algo.mask.top_p``). The policy samples only from that set (its other logits are -inf,
what is left renormalised), and PPO's log-probs, ratios and entropies are those of the same masked
distribution pi_theta^M (rlkit.algos.token_masks). Every ``algo.mask.update_every`` steps
(mu) the mask policy is copied from the policy again, after that step's update (Algorithm 1's last
line: pi_psi <- pi_theta_{m+1} every mu iterations). The critic, GAE and everything else are PPO's,
unchanged (this loop only overrides how log-probs are computed, adds a rollout processor and
refreshes the mask policy).

KL penalty: the reference pi_0 is *not* masked. beta * KL(pi || pi_0) anchors the policy to the
original LM (the paper's KL-penalised reward), and the policy that generates text is the masked
one, so the per-token estimate log pi_theta^M(y) - log pi_0(y) (k1, y ~ pi_theta^M) is an unbiased
estimate of KL(pi_theta^M || pi_0). RL4LMs' implementation instead penalises the unmasked
log pi_theta(y) - log pi_0(y); the two differ by -log pi_theta(M_psi) per token (small while theta
stays near psi: about -log p at a refresh).

Scoring: the sets are recomputed by running the mask model over the same rows as each log-prob
pass (old and update passes alike; it is unchanged between rollout and update), rather than stored
from the rollout as (B, T, V) masks; the sampled token is added to its set against float noise at
the top-p boundary (``nlpo/target_outside_mask_frac`` counts it). Where ``sampling.min_new_tokens``
bans EOS, the set is the mask policy's top-p set among the other tokens. Cost: one frozen model
copy in memory (also under LoRA: a copy of the base model with a copy of the adapter), and one extra
no-grad forward per log-prob pass and per decoding step.

The mask model is saved in every checkpoint (``training_state_mask_model/``) and restored on
resume: between refreshes it is the policy of an earlier step, which no checkpoint holds otherwise.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass, field

import torch

from rlkit.algos.token_masks import masked_log_probs, top_p_mask
from rlkit.engine import is_main_process, mean_over_ranks
from rlkit.loops.policy_gradient import PolicyGradientLoop, PolicyGradientSettings
from rlkit.loops.registry import LOOPS
from rlkit.models.kv_cache import cache_argument, output_cache
from rlkit.models.lora import has_lora
from rlkit.rollout.logprobs import position_ids_from_mask, response_logits
from rlkit.run import load_frozen, with_lora
from rlkit.settings import Checked

MASK_POSITIONS_PER_CHUNK = 1 << 26  # (rows x positions x vocab) elements sorted at once when computing masks


@dataclass
class MaskPolicySettings(Checked):
    """NLPO's mask policy (``algo.mask``): a copy of the policy, refreshed every ``update_every``
    steps, whose top-p token set is the only set the policy may sample from."""

    top_p: float = 0.9  # p of the mask policy's top-p set (paper / RL4LMs' NLPO configs: 0.9); 1 = no mask (plain PPO)
    update_every: int = (
        5  # mu: steps between copies of the policy into the mask policy (RL4LMs: 5 on IMDB, 20 on CommonGen)
    )
    min_tokens_to_keep: int = (
        1  # the set keeps at least this many tokens (1 = plain top-p; RL4LMs' implementation: 100)
    )
    keep_eos: bool = True  # EOS is always allowed (RL4LMs un-masks the special tokens; the paper does not say)

    def check(self) -> None:
        self.require(0 < self.top_p <= 1, "top_p", "must be in (0, 1]")
        self.require_at_least_one("update_every", "min_tokens_to_keep")


@dataclass
class NLPOSettings(PolicyGradientSettings):
    mask: MaskPolicySettings = field(default_factory=MaskPolicySettings)

    def check(self) -> None:
        super().check()
        self.require(
            self.sampling.top_p == 1,
            "sampling.top_p",
            "NLPO's log-probs are those of the mask policy's top-p set "
            "alone: truncate with algo.mask.top_p and leave algo.sampling.top_p at 1",
        )


def mask_policy_set(
    mask_logits: torch.Tensor,
    nlpo,
    temperature: float,
    eos_token_id: int | None,
    eos_banned: torch.Tensor | bool = False,
) -> torch.Tensor:
    """(..., V) bool: the tokens the policy may emit, M_psi(s), from the mask policy's logits:
    its top-p set at the sampling temperature, plus EOS when ``nlpo.keep_eos``. Where
    ``eos_banned`` (broadcast over ``...``; the first ``sampling.min_new_tokens`` positions, where
    sampling masks EOS) the set is the mask policy's top-p set among the other tokens, and EOS is
    never in it (so the policy always has a token left to sample)."""
    if eos_token_id is None:
        return top_p_mask(mask_logits, nlpo.top_p, temperature, nlpo.min_tokens_to_keep)
    banned = torch.as_tensor(eos_banned, device=mask_logits.device).expand(mask_logits.shape[:-1])
    if banned.any():
        mask_logits = mask_logits.clone()
        mask_logits[..., eos_token_id] = mask_logits[..., eos_token_id].masked_fill(banned, float("-inf"))
    allowed = top_p_mask(mask_logits, nlpo.top_p, temperature, nlpo.min_tokens_to_keep)
    allowed[..., eos_token_id] = (allowed[..., eos_token_id] | nlpo.keep_eos) & ~banned
    return allowed


def left_padding_mask(ids: torch.Tensor, pad_token_id: int) -> torch.Tensor:
    """Attention mask of left-padded rows: 0 on the leading run of pad tokens, 1 from the first
    other token on (a row whose first real token is the pad token would lose it)."""
    return ((ids != pad_token_id).long().cumsum(-1) > 0).long()


@torch.no_grad()
def copy_weights(source: torch.nn.Module, target: torch.nn.Module) -> None:
    """target's parameters and buffers <- source's, by name (names target lacks, e.g. a value
    head, are skipped). Under ZeRO-3 each partitioned parameter is gathered in turn
    (collective: every rank must call this)."""
    destination = dict(target.named_parameters())
    destination.update(target.named_buffers())
    for name, value in [*source.named_parameters(), *source.named_buffers()]:
        if name not in destination:
            continue
        gathered = contextlib.nullcontext()
        if hasattr(value, "ds_id"):
            import deepspeed

            gathered = deepspeed.zero.GatheredParameters([value], modifier_rank=None)
        with gathered:
            destination[name].copy_(value.data)


class FrozenModelCheckpoint:
    """What :mod:`rlkit.checkpoint` reads of an extra engine, for a frozen model that
    has no optimizer: its weights go to ``<dir>/<tag>/model.safetensors``."""

    FILE = "model.safetensors"

    def __init__(self, model: torch.nn.Module):
        self.model = model

    @property
    def module(self) -> torch.nn.Module:
        """The frozen model, named as on a DeepSpeed engine (the checkpoint's finiteness check reads it)."""
        return self.model

    def save_checkpoint(self, save_dir: str, tag: str, save_latest: bool = False, **_) -> None:
        """All its weights, a LoRA model's frozen base included (``exclude_frozen_parameters`` is
        ignored: every weight of this model is frozen, and its adapter is an earlier policy's)."""
        if is_main_process():  # every rank holds the same full copy
            from safetensors.torch import save_model

            os.makedirs(os.path.join(save_dir, tag), exist_ok=True)
            save_model(self.model, os.path.join(save_dir, tag, self.FILE))

    def load_checkpoint(self, load_dir: str, tag: str, **_) -> None:
        from safetensors.torch import load_model

        load_model(self.model, os.path.join(load_dir, tag, self.FILE), device=str(next(self.model.parameters()).device))


class MaskPolicyProcessor:
    """``logits_processor(ids_so_far, scores) -> scores`` for :func:`rlkit.rollout.generate.sample`:
    sets the policy's logits outside the mask policy's set M_psi(s) to -inf at every decoding step.
    The mask model runs on its own KV cache, one new token per step after a prefill of the prompts
    (their attention mask is read off the left padding). One processor serves one ``generate`` call;
    it also sums the mask sizes and the policy's mass inside the mask over unfinished rows."""

    def __init__(
        self, mask_model, nlpo, temperature: float, eos_token_id: int | None, pad_token_id: int, min_new_tokens: int = 0
    ):
        self.model, self.nlpo, self.temperature = mask_model, nlpo, temperature
        self.eos_token_id, self.pad_token_id, self.min_new_tokens = eos_token_id, pad_token_id, min_new_tokens
        self.cache, self.attention, self.width, self.prompt_width = None, None, -1, None
        self.rows = self.mask_size = self.policy_mass = 0.0

    @torch.no_grad()
    def __call__(self, ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if self.cache is not None and ids.shape[1] == self.width + 1 and ids.shape[0] == self.attention.shape[0]:
            self.attention = torch.cat([self.attention, self.attention.new_ones(len(ids), 1)], dim=1)
            output = self.model(
                input_ids=ids[:, -1:],
                attention_mask=self.attention,
                position_ids=self.attention.sum(-1, keepdim=True) - 1,
                use_cache=True,
                **cache_argument(self.model, self.cache),
            )
        else:  # first step: ids are the left-padded prompts
            self.prompt_width = ids.shape[1] if self.prompt_width is None else self.prompt_width
            self.attention = left_padding_mask(ids, self.pad_token_id)
            output = self.model(
                input_ids=ids,
                attention_mask=self.attention,
                position_ids=position_ids_from_mask(self.attention),
                use_cache=True,
                logits_to_keep=1,
            )
        self.cache, self.width = output_cache(output), ids.shape[1]
        eos_banned = ids.shape[1] - self.prompt_width < self.min_new_tokens
        allowed = mask_policy_set(
            output.logits[:, -1].float(), self.nlpo, self.temperature, self.eos_token_id, eos_banned
        )
        self.record(ids, scores, allowed)
        return scores.masked_fill(~allowed, float("-inf"))

    def record(self, ids: torch.Tensor, scores: torch.Tensor, allowed: torch.Tensor) -> None:
        generated = ids[:, self.prompt_width :]
        active = (
            ~(generated == self.eos_token_id).any(-1)
            if self.eos_token_id is not None
            else torch.ones(len(ids), dtype=torch.bool, device=ids.device)
        )
        probs = torch.softmax(scores.float() / self.temperature, dim=-1)
        self.rows += float(active.sum())
        self.mask_size += float((allowed.sum(-1) * active).sum())
        self.policy_mass += float(((probs * allowed).sum(-1) * active).sum())


@LOOPS.register("nlpo", NLPOSettings)
class NLPOLoop(PolicyGradientLoop):
    reshapes_sampling = True  # the mask policy's processor (rollout=hf only)

    def __init__(self, run, model, reference_source: str):
        super().__init__(run, model, reference_source)
        self.nlpo = self.settings.mask
        self.mask_model = load_frozen(run, reference_source, self.engine.device)  # the architecture; weights next
        if has_lora(self.engine):  # an adapter like the policy's, on a copy of the base: pi_psi is an earlier policy
            self.mask_model = with_lora(self.mask_model, run.cfg.model.lora).requires_grad_(False).eval()
        # pi_psi_0 = pi_theta_0 (a resumed run then loads its checkpointed copy)
        copy_weights(self.engine.module, self.mask_model)
        self.mask_refreshed_at = 0  # the step after whose update pi_psi was last copied from the policy (0: the start)
        self.processors: list[MaskPolicyProcessor] = []
        self.targets_outside = [0.0, 0.0]  # response tokens whose recomputed mask lacked them, response tokens scored

    def after_update(self, step: int, timer) -> dict[str, float]:
        """Algorithm 1's last line: pi_psi <- pi_theta every ``mask.update_every`` steps."""
        metrics = self.mask_metrics()
        # updates the policy made since pi_psi was copied (0: pi_psi = pi_theta_old)
        metrics["nlpo/mask_age"] = float(step - 1 - self.mask_refreshed_at)
        refresh = step % self.nlpo.update_every == 0
        if refresh:
            with timer.phase("mask_refresh"):
                copy_weights(self.engine.module, self.mask_model)
            self.mask_refreshed_at = step
        metrics["nlpo/mask_refreshed"] = float(refresh)
        return metrics

    def rollout_logits_processor(self) -> MaskPolicyProcessor:
        tokenizer = self.run.tokenizer
        sampling = self.settings.sampling
        processor = MaskPolicyProcessor(
            self.mask_model,
            self.nlpo,
            sampling.temperature,
            tokenizer.eos_token_id,
            tokenizer.pad_token_id,
            sampling.min_new_tokens,
        )
        self.processors.append(processor)
        return processor

    def log_probs(self, model, rollout, index, with_entropy: bool = False, entropy_grad: bool = False):
        """log pi^M(y_t | ...) under the mask policy's sets; the reference stays unmasked (module docstring)."""
        if model is self.reference:
            return super().log_probs(model, rollout, index, with_entropy=with_entropy, entropy_grad=entropy_grad)
        sequences, attention, width = (
            rollout.sequences[index],
            rollout.attention_mask[index],
            rollout.response_ids.shape[1],
        )
        targets = sequences[:, -width:]
        allowed = self.allowed_tokens(sequences, attention, targets, rollout.response_mask[index])
        logits = response_logits(model, sequences, attention, width)
        return masked_log_probs(
            logits,
            targets,
            allowed,
            self.settings.sampling.temperature,
            with_entropy=with_entropy,
            entropy_grad=entropy_grad,
        )

    @torch.no_grad()
    def allowed_tokens(self, sequences, attention, targets, response_mask) -> torch.Tensor:
        """(B, T, V) M_psi(s_t) at every response position, recomputed from the mask model (which
        has not changed since the rollout: it is refreshed only after the update). Each sampled
        token is added to its set: the rollout drew it from inside, so this changes the set only
        where float noise between cached decoding and this forward moved a token across the top-p
        boundary (counted in ``nlpo/target_outside_mask_frac``); without it the log-prob is -inf."""
        mask_logits = response_logits(self.mask_model, sequences, attention, targets.shape[1])
        chunk = max(1, MASK_POSITIONS_PER_CHUNK // (mask_logits.shape[0] * mask_logits.shape[-1]))
        eos, sampling = self.run.tokenizer.eos_token_id, self.settings.sampling
        eos_banned = torch.arange(targets.shape[1], device=targets.device) < sampling.min_new_tokens
        allowed = torch.cat(
            [
                mask_policy_set(part, self.nlpo, sampling.temperature, eos, eos_banned[start : start + chunk])
                for start, part in zip(range(0, targets.shape[1], chunk), mask_logits.split(chunk, dim=1))
            ],
            dim=1,
        )
        inside = allowed.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
        self.targets_outside[0] += float((~inside & response_mask.bool()).sum())
        self.targets_outside[1] += float(response_mask.sum())
        return allowed.scatter_(-1, targets.unsqueeze(-1), True)

    def mask_metrics(self) -> dict[str, float]:
        rows = sum(p.rows for p in self.processors)
        local = {
            "nlpo/mask_size_mean": sum(p.mask_size for p in self.processors)
            / max(rows, 1.0),  # tokens in M_psi(s) per decoding step
            "nlpo/policy_mass_in_mask": sum(p.policy_mass for p in self.processors)
            / max(rows, 1.0),  # pi_theta(M_psi(s) | s)
            "nlpo/target_outside_mask_frac": self.targets_outside[0] / max(self.targets_outside[1], 1.0),
        }
        self.processors, self.targets_outside = [], [0.0, 0.0]
        return mean_over_ranks(local)

    def extra_engines(self) -> dict:
        return {**super().extra_engines(), "mask_model": FrozenModelCheckpoint(self.mask_model)}

    def state_dict(self) -> dict:
        return {**super().state_dict(), "mask_refreshed_at": self.mask_refreshed_at}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.mask_refreshed_at = state.get("mask_refreshed_at", 0)
