"""Training loops, chosen by ``algo.loop``. A loop turns one step number into
metrics; :mod:`rlkit.trainer` drives it and handles logging, evaluation and
checkpoints."""

from rlkit.loops import (  # noqa: F401  (register the loops)
    nlpo,  # noqa: F401,E402  (registers nlpo: PPO in the mask policy's top-p action space)
    policy_gradient,
    preference,
    reward_model,
    sft,
    tppo,  # noqa: F401,E402  (registers truncated_ppo, T-PPO)
)
from rlkit.loops.registry import LOOPS

__all__ = ["LOOPS"]
