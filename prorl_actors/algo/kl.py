"""KL penalty to the reference policy (pure torch).

Algorithmic choices:
- Per-token estimators of KL(pi || ref) from samples of pi (Schulman, "Approximating KL
  divergence"), with ``d = ref_logp - logp``:
    "k1": ``-d = logp - ref_logp``          unbiased, high variance, can be negative
    "k2": ``0.5 * d ** 2``                  biased, low variance, >= 0
    "k3": ``exp(d) - d - 1``                unbiased, low variance, >= 0 (GRPO / ProRL)
- Used as a loss term (``loss = pg_loss + kl_coef * kl_term``), the expected gradients
  differ: k1's is zero, k2's equals grad KL(pi || ref), and k3's equals grad of the
  reverse KL(ref || pi). k3 is the usual choice in GRPO-style recipes.
- The log-ratio is clamped to ``[-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP]`` (+-20) before use,
  so extreme log-ratios (e.g. +-50) give finite values: |k1| <= 20, k2 <= 200,
  k3 <= exp(20) - 21 ~ 4.85e8. Gradients are zero outside the clamp. k3 is additionally
  clamped at 0 from below (exp(d) - d - 1 is >= 0; rounding near d = 0 is not).
- k3 can be capped per token (``cap``; verl caps it at 10): a token whose reference
  probability is e^10 times the policy's would otherwise weigh as much as thousands of others,
  and its gradient grows as fast as its value. The gradient is zero above the cap; the
  learner reports the share of capped tokens.
- Math runs in at least float32 (bf16/fp16 inputs are upcast; fp16 cannot hold exp(20)).
"""

from __future__ import annotations

from typing import Callable

import torch

from prorl_actors.algo.losses import LOG_RATIO_CLAMP, _compute_dtype, k3_of_log_ratio


def _log_ratio(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    dtype = _compute_dtype(logp)
    return (logp.to(dtype) - ref_logp.to(dtype)).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)  # (B, T)


def _k1(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    return _log_ratio(logp, ref_logp)  # (B, T)


def _k2(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    return 0.5 * _log_ratio(logp, ref_logp).square()  # (B, T)


def _k3(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    return k3_of_log_ratio(-_log_ratio(logp, ref_logp))  # (B, T), d = log(ref / pi)


_KL_ESTIMATORS: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "k1": _k1,
    "k2": _k2,
    "k3": _k3,
}
KL_KINDS: tuple[str, ...] = tuple(_KL_ESTIMATORS)


def get_kl_estimator(kind: str) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """Registry getter; unknown names raise ValueError listing the valid ones."""
    try:
        return _KL_ESTIMATORS[kind]
    except KeyError:
        raise ValueError(f"unknown KL estimator {kind!r}; valid: {list(KL_KINDS)}") from None


def kl_penalty(logp: torch.Tensor, ref_logp: torch.Tensor, kind: str, k3_cap: float | None = None) -> torch.Tensor:
    """Per-token estimate of KL(pi || ref) from tokens sampled from pi.

    logp, ref_logp: (B, T) (or any equal shapes) log-probs of the sampled tokens under pi and
    the reference. kind: "k1" | "k2" | "k3"; k3_cap: k3's values are cut to at most this (None:
    no cap). Returns the same shape (float32 or wider); masking is the caller's job.
    """
    if logp.shape != ref_logp.shape:
        raise ValueError(f"logp and ref_logp shapes differ: {tuple(logp.shape)} vs {tuple(ref_logp.shape)}")
    kl = get_kl_estimator(kind)(logp, ref_logp)
    if kind == "k3" and k3_cap is not None:
        kl = kl.clamp(max=k3_cap)
    return kl
