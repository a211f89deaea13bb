"""DAPO dynamic sampling filter (pure torch).

Algorithmic choices:
- A group (all G completions of one prompt) is informative iff its rewards are not all
  equal. All-equal groups get zero GRPO advantage and so contribute no policy gradient
  (only KL/entropy terms); DAPO drops them and keeps sampling until the batch is full.
- Equality is EXACT (``max == min`` per group): rewards are verifier outputs such as
  0/1 or small fractions, and any real difference is signal. A group of size 1 is never
  informative (a single sample carries no group-relative signal).
- This is one function the supervisor calls on each sampled batch; the
  keep-sampling-until-full loop lives there, not here.
"""

from __future__ import annotations

import torch

from prorl_actors.algo.advantages import _grouped


def informative_groups(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """rewards: (B,) with groups of ``group_size`` consecutive entries.

    Returns a bool tensor (B // group_size,): True where the group's rewards differ.
    Expand to samples with ``keep.repeat_interleave(group_size)`` -> (B,).
    """
    r = _grouped(rewards, group_size)  # (N, G)
    if group_size == 1:
        return torch.zeros(r.shape[0], dtype=torch.bool, device=r.device)  # (N,)
    return r.amax(dim=-1) != r.amin(dim=-1)  # (N,)
