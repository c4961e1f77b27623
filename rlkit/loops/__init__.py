"""Training loops, chosen by the ``algo`` preset (``algo.loop``). A loop turns one step number into
metrics; :mod:`rlkit.trainer` drives it and handles logging, evaluation and checkpoints. The
policy-gradient loop's stages take components from their own registries: value sources
(``algo/values``) and group filters (``algo/group_filter``)."""

from rlkit.loops import (  # noqa: F401  (register the loops and the stages' components)
    critic,
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
