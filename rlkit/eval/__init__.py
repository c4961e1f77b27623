"""Evaluation and reporting: held-out evaluation of a run's policy (:func:`evaluate`, the kind
chosen by the task's ``evaluation``), the run report, checkpoint evaluation and comparison
across runs."""

from __future__ import annotations

from rlkit.eval.generation import evaluate_generation
from rlkit.eval.pairs import evaluate_pairs

EVALUATIONS = {"generation": evaluate_generation, "pairs": evaluate_pairs}


def evaluate(run, loop) -> dict:
    """Evaluate the loop's current policy on the task's held-out rows, as the task says."""
    return EVALUATIONS[run.task.evaluation](run, loop)
