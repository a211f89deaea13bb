"""Overlong responses (DAPO): mask truncated responses out of the loss, or punish length softly.

Algorithmic choices:
- mask ("overlong filtering"): a response cut off by the token limit has no reliable
  reward (its answer may simply not have been written yet), so its tokens get no gradient.
- soft punishment: with L = max_new_tokens and a buffer C, a response of length l gets
      0                 if l <= L - C
      (L - C - l) / C   if L - C < l <= L      (linear from 0 down to -1)
  added to its reward before advantages, so the policy learns to finish within the limit.
"""
from __future__ import annotations

import torch


def overlong_penalty(lengths: torch.Tensor, max_len: int, buffer: int) -> torch.Tensor:
    """lengths: (B,) response lengths in tokens -> (B,) penalties in [-1, 0]."""
    if not 0 < buffer <= max_len:
        raise ValueError(f"buffer must be in 1..max_len ({max_len}); got {buffer}")
    over = lengths.to(torch.float32) - (max_len - buffer)          # (B,) tokens into the buffer
    return -(over.clamp(min=0.0) / buffer).clamp(max=1.0)           # (B,)


def mask_truncated(mask: torch.Tensor, truncated: torch.Tensor) -> torch.Tensor:
    """mask: (B, T) response-token mask; truncated: (B,) bool -> (B, T) with truncated rows zeroed."""
    return mask * (~truncated.bool()).to(mask.dtype).unsqueeze(1)   # (B, T)
