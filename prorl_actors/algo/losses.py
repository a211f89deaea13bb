"""Policy-gradient loss and loss aggregation (pure torch).

Algorithmic choices:
- PPO clipped surrogate ``loss = -min(ratio * adv, clip(ratio) * adv)`` per token.
- Decoupled clipping (DAPO "clip-higher"): the ratio is clipped to
  ``[1 - eps_low, 1 + eps_high]`` with ``eps_high > eps_low`` by default (0.2 / 0.4), so
  low-probability tokens with positive advantage can grow more before clipping stops them.
- Optional dual clip (Ye et al. 2020, as in verl): for ``adv < 0`` the per-token loss is
  also bounded above by ``-c * adv`` (c > 1), so a huge ratio on a bad token cannot blow
  up the loss.
- The log-ratio is clamped to ``[-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP]`` (= +-20) before
  ``exp``: ``exp(20) ~ 4.9e8`` is finite in float32, so +-50 log-ratios give finite
  losses; gradients are zero outside the clamp.
- Math runs in at least float32 (bf16/fp16 inputs are upcast).
- ``approx_kl`` in the stats is the k3 estimate of KL(pi_old || pi) from the old-policy
  samples: ``ratio - 1 - log(ratio)`` (>= 0), masked mean.
- Aggregation over tokens is a named mode (see ``aggregate_loss``); that choice is
  exactly where GRPO, DAPO and Dr.GRPO differ.
"""

from __future__ import annotations

from typing import Callable

import torch

LOG_RATIO_CLAMP = 20.0  # |log pi/pi_old| bound before exp: exp(20) ~ 4.85e8, finite


def k3_of_log_ratio(d: torch.Tensor) -> torch.Tensor:
    """exp(d) - 1 - d for d = log(q / p) on samples of p: the k3 estimate of KL(p || q), any shape.
    expm1 for accuracy near 0, and clamped at 0 (the value is >= 0; its rounding near d = 0 is not)."""
    return (torch.expm1(d) - d).clamp(min=0.0)


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    """float32 for half/bf16 inputs, float64 stays float64."""
    return torch.promote_types(x.dtype, torch.float32)


def _as_bool_mask(mask: torch.Tensor) -> torch.Tensor:
    return mask if mask.dtype == torch.bool else mask != 0


def masked_sum(x: torch.Tensor, mask: torch.Tensor, dim=None) -> torch.Tensor:
    """Sum of ``x`` where ``mask`` is set; masked-out entries (even inf/NaN) contribute 0."""
    x = torch.where(_as_bool_mask(mask), x, torch.zeros((), dtype=x.dtype, device=x.device))
    return x.sum() if dim is None else x.sum(dim)


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim=None) -> torch.Tensor:
    """Mean of ``x`` over entries where ``mask`` is set; 0 (not NaN) for an empty mask.

    x, mask: same shape (mask bool or 0/1). With ``dim`` given, reduces over that dim.
    """
    count = _as_bool_mask(mask).sum() if dim is None else _as_bool_mask(mask).sum(dim)
    return masked_sum(x, mask, dim) / count.clamp(min=1).to(x.dtype)


# ----------------------------------------------------------------------------------------
# Loss aggregation: (B, T) per-token losses -> scalar.
#
# Why the modes differ (length bias): averaging tokens *within* each sequence first
# ("seq-mean-token-mean", original GRPO) gives every sequence the same total weight, so a
# token in a long response weighs less than one in a short response; long wrong answers
# are penalised less per token and the model drifts to longer wrong answers. "token-mean"
# (DAPO) weighs every valid token in the batch equally. "seq-mean-token-sum-norm"
# (Dr.GRPO) sums tokens and divides by a constant (B * T), which removes the per-batch
# normaliser too; T is the padded length, so pad to a fixed max length (e.g.
# max_new_tokens) for the divisor to really be constant.
# Note: with gradient accumulation, "token-mean" per micro-batch is not the token mean of
# the whole mini-batch unless micro-batches hold equal token counts.
# ----------------------------------------------------------------------------------------


def _token_mean(loss_mat: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    # sum over all valid tokens / number of valid tokens in the batch (DAPO)
    return masked_mean(loss_mat, mask)


def _seq_mean_token_mean(loss_mat: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    # per-sequence token mean, then mean over sequences with >= 1 valid token (GRPO)
    seq_loss = masked_mean(loss_mat, mask, dim=-1)  # (B,)
    has_tokens = _as_bool_mask(mask).any(dim=-1)  # (B,)
    return masked_mean(seq_loss, has_tokens)


def _seq_mean_token_sum(loss_mat: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    # per-sequence token sum, then mean over sequences with >= 1 valid token
    seq_loss = masked_sum(loss_mat, mask, dim=-1)  # (B,)
    has_tokens = _as_bool_mask(mask).any(dim=-1)  # (B,)
    return masked_mean(seq_loss, has_tokens)


def _seq_mean_token_sum_norm(loss_mat: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    # sum over all valid tokens / (B * T): a constant normaliser (Dr.GRPO)
    B, T = loss_mat.shape
    return masked_sum(loss_mat, mask) / max(B * T, 1)


_AGGREGATORS: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "token-mean": _token_mean,
    "seq-mean-token-mean": _seq_mean_token_mean,
    "seq-mean-token-sum": _seq_mean_token_sum,
    "seq-mean-token-sum-norm": _seq_mean_token_sum_norm,
}
AGG_MODES: tuple[str, ...] = tuple(_AGGREGATORS)


def get_aggregator(mode: str) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """Registry getter; unknown names raise ValueError listing the valid ones."""
    try:
        return _AGGREGATORS[mode]
    except KeyError:
        raise ValueError(f"unknown loss aggregation mode {mode!r}; valid: {list(AGG_MODES)}") from None


def aggregate_loss(loss_mat: torch.Tensor, mask: torch.Tensor, mode: str) -> torch.Tensor:
    """Reduce per-token losses to a scalar.

    loss_mat: (B, T) per-token loss; mask: (B, T) bool or 0/1, 1 = valid response token.
    mode: "token-mean" | "seq-mean-token-mean" | "seq-mean-token-sum" |
          "seq-mean-token-sum-norm" (see the comment block above for why they differ).
    Sequences with no valid token are skipped by the "seq-mean-*" modes (except
    "-norm", whose divisor is the constant B * T); an all-zero mask gives a 0 that is
    still attached to the graph. Masked-out entries never leak in, even if inf/NaN.
    """
    if loss_mat.dim() != 2 or loss_mat.shape != mask.shape:
        raise ValueError(f"loss_mat and mask must both be (B, T); got {tuple(loss_mat.shape)} and {tuple(mask.shape)}")
    return get_aggregator(mode)(loss_mat, mask)


def loss_row_scale(lengths: torch.Tensor, mode: str, norm_len: int | None = None) -> torch.Tensor:
    """Per-row weights that make a token sum equal the aggregate of ``aggregate_loss``:
    ``sum_i scale_i * sum_t mask_it * x_it == aggregate_loss(x, mask, mode)``.

    lengths: (B,) valid tokens per row (the mask's row sums); norm_len: the constant T of
    "seq-mean-token-sum-norm" (max_new_tokens; None: the longest row). Returns (B,) float32.
    Computed once over a whole mini-batch, the weights make the loss of any split of its rows
    into micro-batches (or data-parallel ranks) sum to the mini-batch's loss exactly; rows with
    no valid token get weight 0.
      token-mean               1 / (tokens in the mini-batch)
      seq-mean-token-mean      1 / (length_i * rows with tokens)
      seq-mean-token-sum       1 / (rows with tokens)
      seq-mean-token-sum-norm  1 / (B * norm_len)
    """
    get_aggregator(mode)                                   # unknown modes fail here, listing the valid ones
    n = lengths.to(torch.float32)                                                   # (B,)
    has = n > 0                                                                     # (B,)
    if mode == "token-mean":
        scale = torch.full_like(n, 1.0 / max(float(n.sum()), 1.0))
    elif mode == "seq-mean-token-mean":
        scale = 1.0 / (n.clamp(min=1.0) * max(int(has.sum()), 1))
    elif mode == "seq-mean-token-sum":
        scale = torch.full_like(n, 1.0 / max(int(has.sum()), 1))
    else:                                                  # seq-mean-token-sum-norm (Dr.GRPO)
        T = int(n.max()) if norm_len is None and len(n) else (norm_len or 1)
        scale = torch.full_like(n, 1.0 / max(len(n) * T, 1))
    return scale * has                                                              # (B,)


# ----------------------------------------------------------------------------------------
# PPO / DAPO policy loss
# ----------------------------------------------------------------------------------------


def policy_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    adv: torch.Tensor,
    mask: torch.Tensor,
    eps_low: float = 0.2,
    eps_high: float = 0.4,
    dual_clip_c: float | None = None,
    agg: str = "token-mean",
) -> tuple[torch.Tensor, dict[str, float]]:
    """Clipped surrogate with decoupled clip range and optional dual clip.

    logp:     (B, T) log pi(a_t) under the policy being trained (requires grad)
    old_logp: (B, T) log pi_old(a_t) from the sampling policy
    adv:      (B,) per-sequence advantage (broadcast over T) or (B, T) per-token
    mask:     (B, T) 1 = valid response token
    Returns (loss, stats): loss is a scalar aggregated with ``aggregate_loss(.., agg)``;
    stats are python floats over valid tokens (0.0 when there are none):
      "pg_loss", "clip_frac_low" (adv < 0 and ratio < 1 - eps_low),
      "clip_frac_high" (adv > 0 and ratio > 1 + eps_high), "clip_frac" (either),
      "dual_clip_frac" (adv < 0 and ratio > c; 0.0 without dual clip),
      "ratio_mean", "approx_kl" (k3 estimate of KL(pi_old || pi): ratio - 1 - log ratio).
    """
    if not (logp.shape == old_logp.shape == mask.shape) or logp.dim() != 2:
        raise ValueError(
            f"logp, old_logp, mask must all be (B, T); got {tuple(logp.shape)}, "
            f"{tuple(old_logp.shape)}, {tuple(mask.shape)}"
        )
    if adv.shape not in (logp.shape[:1], logp.shape):
        raise ValueError(f"adv must be (B,) or (B, T) = {tuple(logp.shape)}; got {tuple(adv.shape)}")
    if not (0.0 <= eps_low < 1.0) or eps_high < 0.0:
        raise ValueError(f"need 0 <= eps_low < 1 and eps_high >= 0; got eps_low={eps_low}, eps_high={eps_high}")
    if dual_clip_c is not None and dual_clip_c <= 1.0:
        raise ValueError(f"dual_clip_c must be > 1 (or None); got {dual_clip_c}")

    mask = _as_bool_mask(mask)  # (B, T)
    if adv.dim() == 1:
        adv = adv.unsqueeze(-1)  # (B, 1)
    loss_mat, ratio, log_ratio, low, high, dual = clipped_surrogate(logp, old_logp, adv, eps_low, eps_high, dual_clip_c)
    dtype = loss_mat.dtype
    loss = aggregate_loss(loss_mat, mask, agg)

    with torch.no_grad():
        approx_kl = k3_of_log_ratio(log_ratio)  # (B, T) k3 of KL(pi_old || pi): ratio - 1 - log ratio

        def frac(x: torch.Tensor) -> float:
            return masked_mean(x.to(dtype), mask).item()

        stats = {
            "pg_loss": loss.detach().item(),
            "clip_frac_low": frac(low),
            "clip_frac_high": frac(high),
            "clip_frac": frac(low | high),
            "dual_clip_frac": frac(dual),
            "ratio_mean": frac(ratio),
            "approx_kl": frac(approx_kl),
        }
    return loss, stats


def clipped_surrogate(logp: torch.Tensor, old_logp: torch.Tensor, adv: torch.Tensor, eps_low: float = 0.2,
                      eps_high: float = 0.4, dual_clip_c: float | None = None):
    """The per-token clipped surrogate of ``policy_loss``, before aggregation.

    logp, old_logp: any shape S (e.g. (B, T), or (N,) flat tokens); adv: broadcastable to S
    (per row: (B, 1) for (B, T)). Returns (loss S, ratio S, log_ratio S (detached), clipped_low
    S bool, clipped_high S bool, dual S bool); the masks are detached.
    """
    dtype = _compute_dtype(logp)
    adv = adv.to(dtype)
    log_ratio = (logp.to(dtype) - old_logp.to(dtype)).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)  # S
    ratio = torch.exp(log_ratio)  # S
    pg_unclipped = -adv * ratio  # S
    pg_clipped = -adv * ratio.clamp(1.0 - eps_low, 1.0 + eps_high)  # S
    loss = torch.maximum(pg_unclipped, pg_clipped)  # S pessimistic bound
    if dual_clip_c is not None:
        loss = torch.where(adv < 0, torch.minimum(loss, -adv * dual_clip_c), loss)  # S: bounded for adv < 0
    with torch.no_grad():
        r = ratio.detach()
        low = (adv < 0) & (r < 1.0 - eps_low)  # S
        high = (adv > 0) & (r > 1.0 + eps_high)  # S
        dual = (adv < 0) & (r > dual_clip_c) if dual_clip_c is not None else torch.zeros_like(low)  # S
        low, high, dual = (x.expand_as(r) for x in (low, high, dual))
    return loss, ratio, log_ratio.detach(), low, high, dual

