"""Training loops, chosen by ``algo.loop``. A loop turns one step number into
metrics; :mod:`rlkit.trainer` drives it and handles logging, evaluation and
checkpoints."""
from rlkit.loops.registry import LOOPS
from rlkit.loops import policy_gradient, sft  # noqa: F401  (register the loops)
from rlkit.loops import preference, reward_model  # noqa: F401  (register preference, online_preference, reward_model)
from rlkit.loops import tppo  # noqa: F401,E402  (registers truncated_ppo, T-PPO)
from rlkit.loops import nlpo  # noqa: F401,E402  (registers nlpo: PPO in the mask policy's top-p action space)

__all__ = ["LOOPS"]
