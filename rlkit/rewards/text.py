"""Overlap with reference texts (summarization and other generation tasks): ROUGE
(Lin 2004) via Google's ``rouge-score`` and BLEU (Papineni et al. 2002) via ``sacrebleu``."""

from __future__ import annotations

import functools

from rlkit.metrics import mean_std
from rlkit.rewards.registry import REWARDS

ROUGE_TYPES = ("rouge1", "rouge2", "rougeL")


@functools.cache
def rouge_scorer():
    from rouge_score import rouge_scorer as rs

    return rs.RougeScorer(list(ROUGE_TYPES), use_stemmer=True)


def rouge_f(prediction: str, reference: str) -> dict[str, float]:
    """ROUGE-1/2/L F-measures of one prediction against one reference."""
    return {name: score.fmeasure for name, score in rouge_scorer().score(reference, prediction).items()}


@REWARDS.register("rouge")
def rouge_reward(
    prompts: list[str], completions: list[str], reference: list[str], *, rouge_type: str = "rougeL"
) -> list[float]:
    """ROUGE F-measure (``rouge1``, ``rouge2`` or ``rougeL``) of each completion against the row's
    ``reference``, in [0, 1]."""
    if rouge_type not in ROUGE_TYPES:
        raise ValueError(f"rouge_type='{rouge_type}': use one of {', '.join(ROUGE_TYPES)}")
    return [rouge_f(c, r)[rouge_type] for c, r in zip(completions, reference)]


@REWARDS.register("bleu")
def bleu_reward(prompts: list[str], completions: list[str], reference: list[str]) -> list[float]:
    """Sentence BLEU (sacrebleu, exponential smoothing) of each completion against the row's
    ``reference``, in [0, 1]."""
    from sacrebleu.metrics import BLEU

    bleu = BLEU(effective_order=True)
    return [bleu.sentence_score(c, [r]).score / 100 for c, r in zip(completions, reference)]


def reference_metrics(completions: list[str], references: list[str]) -> dict[str, float]:
    """Mean ROUGE-1/2/L F-measures and corpus BLEU (0-100, sacrebleu's scale) of completions against references."""
    from sacrebleu.metrics import BLEU

    scores = [rouge_f(c, r) for c, r in zip(completions, references)]
    metrics = {name: mean_std([s[name] for s in scores])[0] for name in ROUGE_TYPES}
    metrics["bleu"] = BLEU().corpus_score(completions, [references]).score if completions else 0.0
    return metrics
