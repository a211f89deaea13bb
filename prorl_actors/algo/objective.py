"""The learner's whole objective per token (pure torch): the pieces of losses.py and kl.py
put together once, as the learner uses them on flat (n,) tokens."""
from __future__ import annotations

import torch

from prorl_actors.algo.kl import kl_penalty
from prorl_actors.algo.losses import clipped_surrogate


def token_objective(logp: torch.Tensor, old_logp: torch.Tensor, adv: torch.Tensor, weight: torch.Tensor,
                    ref_logp: torch.Tensor | None = None, entropy: torch.Tensor | None = None,
                    is_weight: torch.Tensor | None = None, *,
                    eps_low: float = 0.2, eps_high: float = 0.4, dual_clip_c: float | None = None,
                    kl_coef: float = 0.0, kl_estimator: str = "k3", k3_cap: float | None = None,
                    entropy_coef: float = 0.0) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The whole per-token objective of the learner, on flat tokens:

        loss = sum_t weight_t * ( is_weight_t * clipped_surrogate_t  # DAPO decoupled clipping,
                                                                     # off-policy corrected
                                + kl_coef * KL_t(pi || ref)          # k3 by default, capped
                                - entropy_coef * entropy_t )         # a bonus, 0 in the paper

    logp, old_logp, adv, weight: (n,); ref_logp, entropy: (n,) or None (no KL term / no bonus;
    the KL is still measured when ref_logp is given and kl_coef is 0); is_weight: (n,) detached
    off-policy weights (offpolicy.token_weights: the proximal policy over the sampler's; None = 1).
    The ratio inside the surrogate is pi / pi_old, old_logp the learner's weights before the
    update (the proximal policy): decoupled PPO. `weight` is the token's
    row weight from ``loss_row_scale`` (times the data-parallel world size), so that a sum over
    any split of a mini-batch is its aggregate. Returns (loss, per-token terms: "pg", "ratio",
    "log_ratio", "clip_low", "clip_high", "dual_clip", and "kl" when ref_logp is given).
    """
    pg, ratio, log_ratio, low, high, dual = clipped_surrogate(logp, old_logp, adv, eps_low, eps_high, dual_clip_c)
    terms = {"pg": pg, "ratio": ratio, "log_ratio": log_ratio, "clip_low": low, "clip_high": high, "dual_clip": dual}
    if is_weight is not None:
        pg = is_weight * pg                                                             # (n,)
        terms["pg"] = pg
    loss = (weight * pg).sum()
    if ref_logp is not None:
        terms["kl"] = kl_penalty(logp, ref_logp, kl_estimator, k3_cap)                  # (n,)
        if kl_coef:
            loss = loss + kl_coef * (weight * terms["kl"]).sum()
    if entropy_coef and entropy is not None:
        loss = loss - entropy_coef * (weight * entropy).sum()
    return loss, terms
