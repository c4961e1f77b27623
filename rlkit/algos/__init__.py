"""The algorithm layer: small pure tensor functions in registries.

An ``algo=`` preset names one entry from each registry below; the training
loop only ever looks them up by name.
"""

from rlkit.algos import (
    gae,  # noqa: F401,E402  (registers the "gae" estimator)
    multi_turn,  # noqa: F401,E402  (registers "gigpo" and "turn_gae", which read an episode's turns)
    vine,  # noqa: F401,E402  (registers the "vine" estimator, VinePPO)
)
from rlkit.algos.advantages import ADVANTAGE_ESTIMATORS, AdvantageInputs
from rlkit.algos.aggregation import LOSS_AGGREGATIONS, aggregate_loss
from rlkit.algos.kl import KL_ESTIMATORS
from rlkit.algos.policy_losses import POLICY_LOSSES
from rlkit.algos.value_losses import VALUE_LOSSES

__all__ = [
    "ADVANTAGE_ESTIMATORS",
    "AdvantageInputs",
    "KL_ESTIMATORS",
    "LOSS_AGGREGATIONS",
    "POLICY_LOSSES",
    "VALUE_LOSSES",
    "aggregate_loss",
]
