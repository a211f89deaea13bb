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
- How many prompts a round asks for comes from the measured keep rate q (``KeepRate``: kept
  groups / generated groups, older rounds decayed): the smallest n for which
  Binomial(n, q) >= missing with the asked confidence (``round_size``), so that a step fills
  in one round as often as that confidence says, instead of "missing x a fixed oversample"
  (too few when half the groups are dropped, too many late in a run when nearly all are kept).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from statistics import NormalDist

import torch

from prorl_actors.algo.advantages import _grouped


def informative_groups(rewards: torch.Tensor, group_size: int, valid: torch.Tensor | None = None) -> torch.Tensor:
    """rewards: (B,) with groups of ``group_size`` consecutive entries; valid: (B,) bool or None
    (all valid): the rows whose verification gave a reward (a failure is not a wrong answer).

    Returns a bool tensor (B // group_size,): True where the group's valid rewards differ (so it
    has at least two valid rows). Expand to samples with ``keep.repeat_interleave(group_size)``.
    """
    r = _grouped(rewards, group_size)  # (N, G)
    if group_size == 1:
        return torch.zeros(r.shape[0], dtype=torch.bool, device=r.device)  # (N,)
    if valid is None:
        return r.amax(dim=-1) != r.amin(dim=-1)  # (N,)
    v = _grouped(valid.bool(), group_size)                                                   # (N, G)
    hi = torch.where(v, r, torch.full_like(r, -math.inf)).amax(dim=-1)                      # (N,)
    lo = torch.where(v, r, torch.full_like(r, math.inf)).amin(dim=-1)                       # (N,)
    return (v.sum(-1) >= 2) & (hi != lo)                                                     # (N,)


def round_size(missing: int, keep_rate: float, confidence: float, max_oversample: float) -> int:
    """Prompts to ask for so that at least ``missing`` groups are kept with probability
    ``confidence``, each kept with probability ``keep_rate`` independently.

    The smallest n with n q - z sqrt(n q (1 - q)) >= missing - 1/2 (the normal approximation
    of the binomial, with continuity correction; z the ``confidence`` quantile), solved as a
    quadratic in sqrt(n); at least ``missing``, at most ``max_oversample * missing``. With q = 1
    it is ``missing``; with z = 0 it is the n whose binomial median reaches ``missing``.
    """
    if missing <= 0:
        return 0
    q = min(max(keep_rate, 1e-9), 1.0)
    z = NormalDist().inv_cdf(confidence)
    s = math.sqrt(q * (1.0 - q))
    x = (z * s + math.sqrt((z * s) ** 2 + 4.0 * q * (missing - 0.5))) / (2.0 * q)        # sqrt(n)
    n = math.ceil(x * x - 1e-9)
    return int(min(max(n, missing), math.floor(max_oversample * missing)))


@dataclass
class KeepRate:
    """The running share of generated groups that dynamic sampling keeps: kept / generated,
    each round's counts added to the older ones multiplied by ``decay`` (1.0 before any round)."""
    decay: float
    kept: float = 0.0
    generated: float = 0.0

    @property
    def rate(self) -> float:
        return self.kept / self.generated if self.generated > 0 else 1.0

    def observe(self, kept: int, generated: int) -> None:
        """One round: `generated` groups of which `kept` were informative."""
        self.kept = self.decay * self.kept + kept
        self.generated = self.decay * self.generated + generated

    def state_dict(self) -> dict:
        return {"kept": self.kept, "generated": self.generated}

    def load_state_dict(self, st: dict) -> None:
        self.kept, self.generated = st["kept"], st["generated"]
