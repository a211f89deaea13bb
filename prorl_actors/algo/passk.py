"""Unbiased pass@k estimator (Chen et al. 2021, "Evaluating Large Language Models
Trained on Code").

Algorithmic choices:
- With n samples of which c are correct, ``pass@k = 1 - C(n - c, k) / C(n, k)``, the
  probability that a uniformly random k-subset contains at least one correct sample.
- Computed as ``1 - prod_{i = n-c+1}^{n} (1 - k / i)`` in python floats, which never
  forms the (huge) binomials; when ``n - c < k`` every k-subset has a correct sample: 1.0.
- Over a set of prompts: the mean of the per-prompt estimates, with its standard error over
  prompts (the spread of prompt difficulty, which dominates the sampling noise of each
  estimate once n is well above k).
"""

from __future__ import annotations

import math
import operator
from collections.abc import Sequence


def pass_at_k(n: int, c: int, k: int) -> float:
    """n: samples drawn, c: correct among them, k: budget. Returns a python float.

    Accepts python, numpy and (single-element integer) torch ints. Raises ValueError
    unless 0 <= c <= n and 1 <= k <= n.
    """
    n, c, k = operator.index(n), operator.index(c), operator.index(k)
    if not 0 <= c <= n:
        raise ValueError(f"need 0 <= c <= n; got n={n}, c={c}")
    if not 1 <= k <= n:
        raise ValueError(f"need 1 <= k <= n; got n={n}, k={k}")
    if n - c < k:
        return 1.0
    prob_all_wrong = 1.0
    for i in range(n - c + 1, n + 1):
        prob_all_wrong *= 1.0 - k / i
    return 1.0 - prob_all_wrong


def _mean_se(values: list[float]) -> tuple[float, float]:
    """(P,) -> (mean, standard error: sample std / sqrt(P), 0 for one value). P >= 1."""
    P = len(values)
    if P == 0:
        raise ValueError("need at least one prompt")
    mean = sum(values) / P
    if P == 1:
        return mean, 0.0
    return mean, math.sqrt(sum((x - mean) ** 2 for x in values) / (P - 1) / P)


def pass_at_k_mean(counts: Sequence[int], n: int, k: int) -> tuple[float, float]:
    """counts: (P,) correct samples of n for each of P prompts -> (mean pass@k over the
    prompts, its standard error)."""
    return _mean_se([pass_at_k(n, c, k) for c in counts])


def pass_at_k_diff(counts: Sequence[int], base_counts: Sequence[int], n: int, k: int) -> tuple[float, float]:
    """(P,) correct counts of two models on the same P prompts -> (mean pass@k difference,
    its paired standard error: the spread of the per-prompt differences, which cancels the
    prompts' shared difficulty)."""
    if len(counts) != len(base_counts):
        raise ValueError(f"need counts for the same prompts; got {len(counts)} and {len(base_counts)}")
    return _mean_se([pass_at_k(n, a, k) - pass_at_k(n, b, k) for a, b in zip(counts, base_counts)])


VERDICTS = {   # the reasoning boundary of a task, after training, as the paper reads pass@k curves
    "expands": "higher pass@k at the largest k: solves prompts the base rarely or never does",
    "shrinks": "lower pass@k at the largest k: the base, sampled enough, solves prompts the model no longer does",
    "sharpens": "higher pass@1, the same pass@k at the largest k: the same boundary, reached more often",
    "dulls": "lower pass@1, the same pass@k at the largest k",
    "unchanged": "no difference at k = 1 or at the largest k",
    "too few prompts": "fewer than 2 prompts answered by both models: no standard error to judge by",
}


def boundary_verdict(delta_at_1: tuple[float, float], delta_at_max_k: tuple[float, float], margin: float,
                     z: float, num_prompts: int) -> str:
    """delta_*: (model minus base pass@k, its paired standard error over `num_prompts`
    prompts) at k = 1 and at the largest k -> a key of VERDICTS. A difference counts when it
    is larger than `margin` and than `z` standard errors."""
    if num_prompts < 2:
        return "too few prompts"
    def sign(d: tuple[float, float]) -> int:
        return 0 if abs(d[0]) <= max(margin, z * d[1]) else (1 if d[0] > 0 else -1)
    if sign(delta_at_max_k):
        return "expands" if sign(delta_at_max_k) > 0 else "shrinks"
    return {1: "sharpens", -1: "dulls", 0: "unchanged"}[sign(delta_at_1)]
