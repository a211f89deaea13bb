"""Unbiased pass@k estimator (Chen et al. 2021, "Evaluating Large Language Models
Trained on Code").

Algorithmic choices:
- With n samples of which c are correct, ``pass@k = 1 - C(n - c, k) / C(n, k)``, the
  probability that a uniformly random k-subset contains at least one correct sample.
- Computed as ``1 - prod_{i = n-c+1}^{n} (1 - k / i)`` in python floats, which never
  forms the (huge) binomials; when ``n - c < k`` every k-subset has a correct sample: 1.0.
"""

from __future__ import annotations

import operator


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
