"""Group-relative advantages (pure torch).

Algorithmic choices:
- GRPO: ``adv = (r - mean_G(r)) / (std_G(r) + eps)`` per group of G consecutive samples
  (all completions of one prompt), std UNBIASED (correction = 1), as in the GRPO paper
  and verl. One scalar per sequence, broadcast over its tokens by the loss.
- Dr.GRPO (``normalize_std=False``): ``adv = r - mean_G(r)``; dividing by the std
  up-weights prompts that are nearly always right or wrong (question-difficulty bias).
- Degenerate groups give exactly 0: a group of size 1 (unbiased std is NaN) and a group
  whose rewards are all equal (exact ``max == min`` test; mean rounding would otherwise
  leave ~1e-8 residues divided by a ~1e-8 std).
- Rewards must be finite (None/NaN rewards are the verifier's business, not ours).
- A response whose verification failed (raised, timed out) has no reward at all, not a 0: with
  ``valid`` given, such rows are left out of their group's mean and std and get advantage 0;
  a group with fewer than two valid rows has no baseline (all 0).
- REINFORCE++-baseline (ProRL v2; NeMo-RL's ``reinforce_plus_plus`` with ``minus_baseline``,
  OpenRLHF's ``reinforce_baseline``): ``a = r - mean_G(r)`` (local: no division by the group
  std), then normalised over the whole batch (global): ``(a - mean(a)) / sqrt(max(var(a), 1e-8))``
  with mean and (biased) variance over the batch's response TOKENS, i.e. each row weighted by
  its length, as both ship it. Rows without a reward or without a baseline stay 0 and are left
  out of the batch statistics; an all-equal group has a baseline (its a = 0 is shifted by the
  batch mean like every other row's).
"""

from __future__ import annotations

from functools import partial
from typing import Callable

import torch


def _grouped(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """(B,) -> (B // G, G) after validating shape and values."""
    if rewards.dim() != 1:
        raise ValueError(f"rewards must be 1-D (B,); got shape {tuple(rewards.shape)}")
    if group_size < 1 or rewards.shape[0] % group_size != 0:
        raise ValueError(f"batch size {rewards.shape[0]} is not a positive multiple of group_size {group_size}")
    if rewards.is_floating_point() and not torch.isfinite(rewards).all():
        raise ValueError("rewards contain NaN or inf")
    return rewards.reshape(-1, group_size)  # (B // G, G)


def group_advantages(
    rewards: torch.Tensor,
    group_size: int,
    normalize_std: bool = True,
    eps: float = 1e-6,
    valid: torch.Tensor | None = None,
    lengths: torch.Tensor | None = None,
) -> torch.Tensor:
    """Group-normalised advantages.

    rewards: (B,), each run of ``group_size`` consecutive entries is one group.
    normalize_std: True = GRPO (divide by unbiased group std + eps), False = Dr.GRPO.
    valid: (B,) bool or None (all valid): rows with a reward (see the module docstring).
    lengths: (B,) response lengths; not read (the estimators share one signature, and only the
    batch-normalised one weights rows by their tokens).
    Returns (B,) float advantages; 0 for groups of size 1, all-equal groups and invalid rows.
    """
    if valid is not None and not bool(valid.all()):
        return _valid_only(rewards, group_size, normalize_std, eps, valid)
    r = _grouped(rewards, group_size)  # (N, G)
    r = r.to(torch.promote_types(r.dtype, torch.float32)) if r.is_floating_point() else r.float()
    if group_size == 1:
        return torch.zeros_like(r).reshape(-1)  # (B,) a lone sample has no group baseline
    adv = r - r.mean(dim=-1, keepdim=True)  # (N, G)
    if normalize_std:
        adv = adv / (r.std(dim=-1, correction=1, keepdim=True) + eps)  # (N, G)
    constant = r.amax(dim=-1, keepdim=True) == r.amin(dim=-1, keepdim=True)  # (N, 1)
    adv = torch.where(constant, torch.zeros_like(adv), adv)  # (N, G)
    return adv.reshape(-1)  # (B,)


def _valid_only(rewards: torch.Tensor, group_size: int, normalize_std: bool, eps: float,
                valid: torch.Tensor) -> torch.Tensor:
    """group_advantages over the valid rows of each group; 0 elsewhere."""
    v = _grouped(valid.bool(), group_size)                                  # (N, G)
    r = torch.where(v, _grouped(rewards, group_size), torch.zeros(()))      # (N, G) invalid rewards never read
    r = r.to(torch.promote_types(r.dtype, torch.float32)) if r.is_floating_point() else r.float()
    n = v.sum(-1, keepdim=True)                                             # (N, 1) valid rows per group
    mean = r.sum(-1, keepdim=True) / n.clamp(min=1)                         # (N, 1)
    adv = r - mean                                                          # (N, G)
    if normalize_std:
        var = ((adv * v) ** 2).sum(-1, keepdim=True) / (n - 1).clamp(min=1)  # (N, 1) unbiased
        adv = adv / (var.sqrt() + eps)
    big, small = torch.finfo(r.dtype).max, torch.finfo(r.dtype).min
    hi = torch.where(v, r, torch.full_like(r, small)).amax(-1, keepdim=True)
    lo = torch.where(v, r, torch.full_like(r, big)).amin(-1, keepdim=True)
    zero = (n < 2) | (hi == lo) | ~v                                        # (N, G) no baseline / no signal
    return torch.where(zero, torch.zeros_like(adv), adv).reshape(-1)       # (B,)


def reinforce_pp_baseline(
    rewards: torch.Tensor,
    group_size: int,
    valid: torch.Tensor | None = None,
    lengths: torch.Tensor | None = None,
    var_floor: float = 1e-8,
) -> torch.Tensor:
    """REINFORCE++-baseline advantages (see the module docstring).

    rewards: (B,) in groups of ``group_size`` consecutive rows; valid: (B,) bool or None (all);
    lengths: (B,) response tokens per row, the weights of the batch statistics (None: 1 each).
    Returns (B,): the group mean subtracted, then the batch normalised to token-mean 0 and
    token-variance 1; 0 for rows without a reward and groups with fewer than two of them.
    """
    B = rewards.shape[0]
    v = torch.ones(B, dtype=torch.bool) if valid is None else valid.bool()                 # (B,)
    local = group_advantages(rewards, group_size, normalize_std=False, valid=v)             # (B,) r - mean_G(r)
    n_valid = _grouped(v, group_size).sum(-1, keepdim=True).expand(-1, group_size)          # (N, G)
    used = v & (n_valid.reshape(-1) >= 2)                                                   # (B,) rows with a baseline
    w = torch.ones(B) if lengths is None else lengths.to(torch.float32)                     # (B,) tokens per row
    w = torch.where(used, w, torch.zeros_like(w))                                           # (B,)
    if w.sum() <= 0:
        return torch.zeros_like(local)
    mean = (w * local).sum() / w.sum()                                                      # () token mean
    var = (w * (local - mean) ** 2).sum() / w.sum()                                         # () token variance
    adv = (local - mean) * var.clamp(min=var_floor).rsqrt()                                 # (B,)
    return torch.where(used, adv, torch.zeros_like(adv))                                    # (B,)


_ADV_ESTIMATORS: dict[str, Callable[..., torch.Tensor]] = {
    "grpo": partial(group_advantages, normalize_std=True),
    "dr_grpo": partial(group_advantages, normalize_std=False),
    "reinforce_pp_baseline": reinforce_pp_baseline,
}
ADV_ESTIMATORS: tuple[str, ...] = tuple(_ADV_ESTIMATORS)


def get_adv_estimator(name: str) -> Callable[..., torch.Tensor]:
    """Registry getter: ``fn(rewards (B,), group_size, valid=None, lengths=None) -> adv (B,)``; unknown names raise
    ValueError listing the valid ones."""
    try:
        return _ADV_ESTIMATORS[name]
    except KeyError:
        raise ValueError(f"unknown advantage estimator {name!r}; valid: {list(ADV_ESTIMATORS)}") from None
