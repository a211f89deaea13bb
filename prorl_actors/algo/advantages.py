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
) -> torch.Tensor:
    """Group-normalised advantages.

    rewards: (B,), each run of ``group_size`` consecutive entries is one group.
    normalize_std: True = GRPO (divide by unbiased group std + eps), False = Dr.GRPO.
    Returns (B,) float advantages; 0 for groups of size 1 and all-equal groups.
    """
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


_ADV_ESTIMATORS: dict[str, Callable[..., torch.Tensor]] = {
    "grpo": partial(group_advantages, normalize_std=True),
    "dr_grpo": partial(group_advantages, normalize_std=False),
}
ADV_ESTIMATORS: tuple[str, ...] = tuple(_ADV_ESTIMATORS)


def get_adv_estimator(name: str) -> Callable[..., torch.Tensor]:
    """Registry getter: ``fn(rewards (B,), group_size) -> adv (B,)``; unknown names raise
    ValueError listing the valid ones."""
    try:
        return _ADV_ESTIMATORS[name]
    except KeyError:
        raise ValueError(f"unknown advantage estimator {name!r}; valid: {list(ADV_ESTIMATORS)}") from None
