"""Training loops, chosen by the ``algo`` preset (``algo.loop``). A loop turns one step number into
metrics; :mod:`rlkit.trainer` drives it and handles logging, evaluation and checkpoints. The
policy-gradient loop's stages take components from their own registries: value sources
(``algo/values``), group filters (``algo/group_filter``), and the sample stage the task chooses
(responses, or an environment task's episodes: rlkit/loops/sampling.py, episodes.py)."""

from rlkit.loops import (  # noqa: F401  (register the loops and the stages' components)
    critic,
    episodes,
    group_filters,
    mc_values,
    nlpo,
    policy_gradient,
    preference,
    reward_model,
    sft,
    tppo,
    values,
)
from rlkit.loops.registry import LOOPS

__all__ = ["LOOPS"]
