"""Evaluation and reporting: held-out evaluation of a run's policy (:func:`evaluate`, the kind
chosen by the task's ``evaluation``), the run report, checkpoint evaluation and comparison
across runs."""

from __future__ import annotations

from rlkit.eval.episodes import evaluate_episodes, evaluate_episodes_model
from rlkit.eval.generation import evaluate_generation, evaluate_model
from rlkit.eval.pairs import evaluate_pairs

EVALUATIONS = {"generation": evaluate_generation, "pairs": evaluate_pairs, "episodes": evaluate_episodes}


def evaluate(run, loop) -> dict:
    """Evaluate the loop's current policy on the task's held-out rows, as the task says."""
    return EVALUATIONS[run.task.evaluation](run, loop)


def evaluate_policy(run, model) -> dict:
    """Evaluate ``model`` (a checkpoint's policy, ``rlkit eval``) on the task's held-out rows: an
    environment task's episodes, else generated responses."""
    if run.task.evaluation == "episodes":
        return evaluate_episodes_model(run, model)
    return evaluate_model(run, model, run.max_new_tokens)
