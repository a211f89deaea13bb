"""Pure-torch RL math for ProRL: advantages, policy loss, KL, entropy, dynamic sampling,
pass@k and the reference-reset policy. No Ray, no I/O."""

from prorl_actors.algo.advantages import ADV_ESTIMATORS, get_adv_estimator, group_advantages
from prorl_actors.algo.entropy import entropy_from_logits
from prorl_actors.algo.kl import KL_KINDS, get_kl_estimator, kl_penalty
from prorl_actors.algo.losses import (
    AGG_MODES,
    LOG_RATIO_CLAMP,
    aggregate_loss,
    get_aggregator,
    masked_mean,
    masked_sum,
    policy_loss,
)
from prorl_actors.algo.passk import pass_at_k
from prorl_actors.algo.resets import ScheduledResets, reset_due
from prorl_actors.algo.sampling import informative_groups

__all__ = [
    "ADV_ESTIMATORS",
    "AGG_MODES",
    "KL_KINDS",
    "LOG_RATIO_CLAMP",
    "ScheduledResets",
    "aggregate_loss",
    "entropy_from_logits",
    "get_adv_estimator",
    "get_aggregator",
    "get_kl_estimator",
    "group_advantages",
    "informative_groups",
    "kl_penalty",
    "masked_mean",
    "masked_sum",
    "pass_at_k",
    "policy_loss",
    "reset_due",
]
