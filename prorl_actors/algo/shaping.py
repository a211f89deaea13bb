"""Reward shaping before baselines and the dynamic-sampling filter (pure torch): ProRL v2's
stop-properly penalty and a scheduled cosine length penalty.

Algorithmic choices:
- stop-properly (NeMo-RL's ProRL v2, from DLER): the reward of a response that never stopped
  (cut by max_new_tokens) is multiplied by ``coef``; 0 = no reward for it however right its
  answer looks, 1 = no penalty. Unlike DAPO's overlong handling (algo/overlong.py), which acts
  after the filter, shaping comes first: a group of right answers one of which never stopped
  has different rewards and is trained on.
- cosine length penalty: a reward is multiplied by a factor falling along half a cosine from 1
  at ``free_tokens`` (and below) to ``min_scale`` at ``max_len`` tokens:
      f(l) = min_scale + (1 - min_scale) * (1 + cos(pi * clamp((l - free) / (max_len - free), 0, 1))) / 2
  flat near both ends, steepest midway (the cosine shape of Yeo et al. 2025). Multiplicative:
  a wrong answer (reward 0) is never rewarded for being short, so giving up early pays nothing;
  among right answers the shorter earns more, and a group of right answers of different
  lengths is informative.
- the schedule (ProRL v2's "scheduled" length penalty; its exact schedule is not published):
  a cycle of ``period`` steps whose last ``on_steps`` steps apply the penalty, the others not,
  so responses may grow while the model explores and are compressed again at the end of each
  cycle. Its strength s in {0, 1} scales the penalty: f_s(l) = 1 - s * (1 - f(l)). No period:
  always on.
"""
from __future__ import annotations

import math

import torch


def stop_properly(rewards: torch.Tensor, truncated: torch.Tensor, coef: float) -> torch.Tensor:
    """rewards: (B,), truncated: (B,) bool -> (B,) with each truncated row's reward times coef."""
    if not 0.0 <= coef <= 1.0:
        raise ValueError(f"stop-properly coef must be in [0, 1]; got {coef}")
    scale = torch.where(truncated.bool(), torch.full_like(rewards, coef), torch.ones_like(rewards))  # (B,)
    return rewards * scale                                                                            # (B,)


def cosine_length_factor(lengths: torch.Tensor, max_len: int, min_scale: float, free_tokens: int = 0) -> torch.Tensor:
    """lengths: (B,) response tokens -> (B,) factors in [min_scale, 1] (see the module docstring)."""
    if not 0 <= free_tokens < max_len:
        raise ValueError(f"free_tokens must be in 0..max_len-1 ({max_len - 1}); got {free_tokens}")
    if not 0.0 <= min_scale <= 1.0:
        raise ValueError(f"min_scale must be in [0, 1]; got {min_scale}")
    x = ((lengths.to(torch.float32) - free_tokens) / (max_len - free_tokens)).clamp(0.0, 1.0)    # (B,) in [0, 1]
    return min_scale + (1.0 - min_scale) * 0.5 * (1.0 + torch.cos(math.pi * x))                     # (B,)


def length_penalty_on(step: int, period: int | None, on_steps: int) -> float:
    """The schedule's strength at training step `step` (1-based): 1.0 in the last `on_steps`
    steps of each cycle of `period` steps, else 0.0; 1.0 always without a period."""
    if period is None:
        return 1.0
    if not 1 <= on_steps <= period:
        raise ValueError(f"on_steps must be in 1..period ({period}); got {on_steps}")
    return 1.0 if (step - 1) % period >= period - on_steps else 0.0


def length_penalized(rewards: torch.Tensor, lengths: torch.Tensor, strength: float, max_len: int,
                     min_scale: float, free_tokens: int = 0) -> torch.Tensor:
    """rewards, lengths: (B,) -> (B,) rewards times 1 - strength * (1 - f(length))."""
    f = cosine_length_factor(lengths, max_len, min_scale, free_tokens)    # (B,)
    return rewards * (1.0 - strength * (1.0 - f))                        # (B,)
