"""Pure-torch RL math for ProRL: advantages, policy loss, KL, entropy, dynamic sampling,
the off-policy correction, pass@k and the boundary verdict, n-gram novelty, the KL-coefficient
controller, overlong handling, reward shaping and the reference-reset policy.
No Ray, no I/O."""

from prorl_actors.algo.advantages import ADV_ESTIMATORS, get_adv_estimator, group_advantages, reinforce_pp_baseline
from prorl_actors.algo.control import KLController, kl_coef_for_entropy, kl_coef_for_kl, scale_for_entropy
from prorl_actors.algo.entropy import entropy_from_logits, mixture_entropy
from prorl_actors.algo.kl import KL_KINDS, get_kl_estimator, kl_penalty
from prorl_actors.algo.losses import (
    AGG_MODES,
    LOG_RATIO_CLAMP,
    aggregate_loss,
    clipped_surrogate,
    get_aggregator,
    k3_of_log_ratio,
    loss_row_scale,
    masked_mean,
    masked_sum,
    policy_loss,
)
from prorl_actors.algo.overlong import mask_truncated, overlong_penalty
from prorl_actors.algo.novelty import ngrams, novel_ngrams
from prorl_actors.algo.passk import VERDICTS, boundary_verdict, pass_at_k, pass_at_k_diff, pass_at_k_mean
from prorl_actors.algo.resets import ResetPolicy, kl_share, reset_due, validation_dropped, validation_stalled
from prorl_actors.algo.logprobs import token_logp_entropy
from prorl_actors.algo.objective import token_objective
from prorl_actors.algo.offpolicy import OFF_POLICY_MODES, off_policy_weights, token_weights
from prorl_actors.algo.sampling import KeepRate, informative_groups, round_size
from prorl_actors.algo.shaping import cosine_length_factor, length_penalized, length_penalty_on, stop_properly

__all__ = [
    "ADV_ESTIMATORS",
    "VERDICTS",
    "KLController",
    "ResetPolicy",
    "AGG_MODES",
    "KL_KINDS",
    "LOG_RATIO_CLAMP",
    "aggregate_loss",
    "clipped_surrogate",
    "loss_row_scale",
    "boundary_verdict",
    "entropy_from_logits",
    "get_adv_estimator",
    "get_aggregator",
    "get_kl_estimator",
    "group_advantages",
    "reinforce_pp_baseline",
    "cosine_length_factor",
    "length_penalized",
    "length_penalty_on",
    "stop_properly",
    "informative_groups",
    "KeepRate",
    "round_size",
    "token_logp_entropy",
    "token_objective",
    "token_weights",
    "off_policy_weights",
    "OFF_POLICY_MODES",
    "kl_coef_for_entropy",
    "kl_coef_for_kl",
    "kl_share",
    "mask_truncated",
    "overlong_penalty",
    "k3_of_log_ratio",
    "kl_penalty",
    "masked_mean",
    "masked_sum",
    "mixture_entropy",
    "ngrams",
    "novel_ngrams",
    "pass_at_k",
    "pass_at_k_diff",
    "pass_at_k_mean",
    "policy_loss",
    "reset_due",
    "scale_for_entropy",
    "validation_dropped",
    "validation_stalled",
]
