"""Token entropy of the policy (pure torch).

Algorithmic choices:
- ``H = -sum_v p_v log p_v`` with ``log p = log_softmax(logits)`` (logsumexp inside), so
  large logits do not overflow.
- Vocabulary entries with ``-inf`` logits (masked tokens) have p = 0 and contribute 0:
  their ``log p = -inf`` is replaced by 0 before the product, so neither the value nor
  the gradient becomes NaN. Each row needs at least one finite logit.
- Math runs in at least float32 (bf16 logits are upcast); this materialises a (B, T, V)
  float32 tensor, so chunk over T for large vocabularies if memory matters.
"""

from __future__ import annotations

import math

import torch


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of softmax(logits) over the last dim.

    logits: (B, T, V) (any leading shape works). Returns (B, T).
    """
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    logp = torch.log_softmax(logits, dim=-1)  # (B, T, V)
    finite = torch.isfinite(logp)  # (B, T, V) False where the logit is -inf
    logp = torch.where(finite, logp, torch.zeros((), dtype=logp.dtype, device=logp.device))  # (B, T, V)
    p = torch.exp(logp) * finite  # (B, T, V) exactly 0 on masked entries
    return -(p * logp).sum(dim=-1)  # (B, T)


def mixture_entropy(per_task: dict[str, float], weights: dict[str, float]) -> float:
    """The tasks' entropies weighted by their mixture weights, over the tasks measured (finite);
    unlike a batch's token mean it does not move with the batch's task mix. NaN if none."""
    pairs = [(weights[t], h) for t, h in per_task.items() if t in weights and math.isfinite(h)]
    total = sum(w for w, _ in pairs)
    return sum(w * h for w, h in pairs) / total if total > 0 else math.nan
