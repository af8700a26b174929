"""Statistics the project reports numbers with: the Wilson score interval of a proportion, the
exact McNemar test and a paired bootstrap of the difference between two arms.

    from exit_loop.stats import wilson
    lo, hi = wilson(k=140, n=200)   # 95% interval of 70% measured on 200 questions
"""

from __future__ import annotations

import math
from collections.abc import Sequence

Z95 = 1.959963984540054  # the standard normal's 97.5% quantile


def wilson(k: int, n: int, z: float = Z95) -> tuple[float, float]:
    """The Wilson score interval (95% by default) of k successes in n trials; (0, 1) when n is 0."""
    if n <= 0:
        return (0.0, 1.0)
    if not 0 <= k <= n:
        raise ValueError(f"wilson: need 0 <= k <= n, got k={k}, n={n}")
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return (max(0.0, centre - half), min(1.0, centre + half))


def mcnemar_exact(b: int, c: int) -> float:
    """The exact two-sided McNemar p-value of paired binary outcomes: b pairs where A is right and
    B wrong, c the reverse; the binomial test of min(b, c) in b + c trials at 1/2 (1.0 when b + c is 0).

        p = mcnemar_exact(b=1, c=6)   # 2 * (C(7,0) + C(7,1)) / 2^7 = 0.125
    """
    n = b + c
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, i) for i in range(min(b, c) + 1)) / 2 ** n
    return min(1.0, 2 * tail)


def paired_difference(a: Sequence[bool], b: Sequence[bool], n_resamples: int = 9999, seed: int = 0) -> dict:
    """Accuracy of A minus accuracy of B on the same questions (same order): the difference, its
    95% paired percentile bootstrap interval over questions, and the exact McNemar p-value.

        d = paired_difference([True, True, False], [True, False, False])   # d["diff"] == 1/3
    """
    import numpy as np

    if len(a) != len(b) or not len(a):
        raise ValueError(f"paired_difference: needs the same non-zero number of questions, got {len(a)} and {len(b)}")
    x = np.asarray(a, dtype=float) - np.asarray(b, dtype=float)
    n = len(x)
    diff = float(x.mean())
    rng = np.random.default_rng(seed)
    means = np.empty(n_resamples)
    for start in range(0, n_resamples, 1000):  # 1000 resamples at a time: bounded memory
        stop = min(start + 1000, n_resamples)
        means[start:stop] = x[rng.integers(0, n, size=(stop - start, n))].mean(axis=1)
    lo, hi = (float(v) for v in np.quantile(means, [0.025, 0.975]))
    better_a = int(np.sum(x > 0))
    better_b = int(np.sum(x < 0))
    return {"diff": diff, "ci95": [lo, hi], "p_mcnemar": mcnemar_exact(better_a, better_b), "n": n}
