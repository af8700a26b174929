"""Statistics the project reports numbers with: the Wilson score interval of a proportion, the
exact (Clopper–Pearson) interval where a count is small (a verifier's false positives), the
exact McNemar test, paired and pooled (several seeds) bootstrap intervals of the difference
between two arms, the t-interval over seeds, an interval for an accuracy over one or several
seeds, and the unbiased pass@k.

    from exit_loop.stats import wilson
    lo, hi = wilson(k=140, n=200)   # 95% interval of 70% measured on 200 questions

numpy and scipy are imported inside the functions that need them, so importing this module is cheap.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

Z95 = 1.959963984540054  # the standard normal's 97.5% quantile


def wilson(k: int, n: int, z: float = Z95) -> tuple[float, float]:
    """The Wilson score interval (95% by default) of k successes in n trials; (0, 1) when n is 0.

        lo, hi = wilson(k=5, n=10)   # (0.2366, 0.7634)
    """
    if n <= 0:
        return (0.0, 1.0)
    if not 0 <= k <= n:
        raise ValueError(f"wilson: need 0 <= k <= n, got k={k}, n={n}")
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return (max(0.0, centre - half), min(1.0, centre + half))


def clopper_pearson(k: int, n: int, level: float = 0.95) -> tuple[float, float]:
    """The exact (Clopper–Pearson) interval of k successes in n trials: never narrower than it
    should be, also at k = 0 or k = n; (0, 1) when n is 0.

        lo, hi = clopper_pearson(k=0, n=50)   # (0.0, 0.0711): 50 clean reads bound the rate by 7%
    """
    if n <= 0:
        return (0.0, 1.0)
    if not 0 <= k <= n:
        raise ValueError(f"clopper_pearson: need 0 <= k <= n, got k={k}, n={n}")
    from scipy.stats import beta

    a = (1 - level) / 2
    lo = 0.0 if k == 0 else float(beta.ppf(a, k, n - k + 1))
    hi = 1.0 if k == n else float(beta.ppf(1 - a, k + 1, n - k))
    return (lo, hi)


def mcnemar_exact(b: int, c: int) -> float:
    """The exact two-sided McNemar p-value of paired binary outcomes: b pairs where A is right and
    B wrong, c the reverse; the two-sided binomial test of min(b, c) in b + c trials at 1/2
    (scipy.stats.binomtest); 1.0 when b + c is 0.

        p = mcnemar_exact(b=1, c=6)   # 2 * (C(7,0) + C(7,1)) / 2^7 = 0.125
    """
    if b < 0 or c < 0:
        raise ValueError(f"mcnemar_exact: counts must be >= 0, got b={b}, c={c}")
    n = int(b) + int(c)
    if n == 0:
        return 1.0
    from scipy.stats import binomtest

    return float(min(1.0, binomtest(int(min(b, c)), n, 0.5, alternative="two-sided").pvalue))


def paired_difference(a: Sequence[bool], b: Sequence[bool], n_resamples: int = 9999, seed: int = 0) -> dict:
    """Accuracy of A minus accuracy of B on the same questions (same order), for one seed: the
    difference, its 95% paired percentile bootstrap interval over questions (question indices
    resampled with replacement, numpy.random.default_rng(seed)), the exact McNemar p-value and n.

        d = paired_difference([True, True, False], [True, False, False])   # d["diff"] == 1/3
    """
    import numpy as np

    if len(a) != len(b) or not len(a):
        raise ValueError(f"paired_difference: needs the same non-zero number of questions in both arms, "
                         f"got {len(a)} and {len(b)}")
    if n_resamples < 1:
        raise ValueError(f"paired_difference: n_resamples must be >= 1, got {n_resamples}")
    x = np.asarray(a, dtype=float) - np.asarray(b, dtype=float)
    n = len(x)
    diff = float(x.mean())
    better_a, better_b = int(np.sum(x > 0)), int(np.sum(x < 0))
    p = mcnemar_exact(better_a, better_b)
    if np.all(x == x[0]):  # every resample gives the same mean
        return {"diff": diff, "ci95": [diff, diff], "p_mcnemar": p, "n": n}
    rng = np.random.default_rng(seed)
    means = np.empty(n_resamples)
    rows = max(1, 2_000_000 // n)  # resamples per block: bounded memory
    for start in range(0, n_resamples, rows):
        stop = min(start + rows, n_resamples)
        means[start:stop] = x[rng.integers(0, n, size=(stop - start, n))].mean(axis=1)
    lo, hi = (float(v) for v in np.quantile(means, [0.025, 0.975]))
    return {"diff": diff, "ci95": [lo, hi], "p_mcnemar": p, "n": n}


def pooled_difference(pairs: list[tuple[Sequence[bool], Sequence[bool]]], n_resamples: int = 9999,
                      seed: int = 0) -> dict:
    """Accuracy of A minus accuracy of B pooled over several seeds, one (a, b) pair per seed, each
    pair on the same questions in the same order: the mean over seeds of the per-seed difference
    and its 95% percentile interval from a two-level bootstrap (seeds drawn with replacement, then
    questions with replacement within each drawn seed); p_mcnemar is None.

        d = pooled_difference([([True, False], [False, False]), ([True, True], [True, False])])   # diff 0.5
    """
    import numpy as np

    if not pairs:
        raise ValueError("pooled_difference: needs at least one (a, b) pair, got none")
    if n_resamples < 1:
        raise ValueError(f"pooled_difference: n_resamples must be >= 1, got {n_resamples}")
    xs = []
    for i, (a, b) in enumerate(pairs):
        if len(a) != len(b) or not len(a):
            raise ValueError(f"pooled_difference: seed {i} needs the same non-zero number of questions in "
                             f"both arms, got {len(a)} and {len(b)}")
        xs.append(np.asarray(a, dtype=float) - np.asarray(b, dtype=float))
    s = len(xs)
    diff = float(np.mean([x.mean() for x in xs]))
    out = {"diff": diff, "ci95": [diff, diff], "p_mcnemar": None, "n": int(sum(len(x) for x in xs)), "seeds": s}
    if all(np.all(x == xs[0][0]) for x in xs):  # every resample gives the same mean
        return out
    rng = np.random.default_rng(seed)
    # Level 1: s seeds drawn per resample; times[r, j] = how often seed j was drawn in resample r.
    drawn = rng.integers(0, s, size=(n_resamples, s))
    times = np.stack([(drawn == j).sum(axis=1) for j in range(s)], axis=1)
    # Level 2: every draw of seed j gets its own question resample; the per-draw means are summed
    # into the resample that drew it. Same distribution as looping over resamples, vectorised.
    totals = np.zeros(n_resamples)
    for j, x in enumerate(xs):
        n = len(x)
        owner = np.repeat(np.arange(n_resamples), times[:, j])
        means = np.empty(len(owner))
        rows = max(1, 2_000_000 // n)
        for start in range(0, len(owner), rows):
            stop = min(start + rows, len(owner))
            means[start:stop] = x[rng.integers(0, n, size=(stop - start, n))].mean(axis=1)
        totals += np.bincount(owner, weights=means, minlength=n_resamples)
    lo, hi = (float(v) for v in np.quantile(totals / s, [0.025, 0.975]))
    out["ci95"] = [lo, hi]
    return out


def accuracy_interval(per_seed: list[Sequence[bool]], n_resamples: int = 9999, seed: int = 0) -> list[float]:
    """The 95% interval [lo, hi] of an accuracy: the Wilson interval for one seed; for several
    seeds, a two-level bootstrap (seeds, then questions within each seed) of the mean over seeds.

        lo, hi = accuracy_interval([[True, False, True], [True, True, False]])
    """
    if not per_seed or any(not len(x) for x in per_seed):
        raise ValueError(f"accuracy_interval: needs at least one seed, each with questions, got "
                         f"{[len(x) for x in per_seed]}")
    if len(per_seed) == 1:
        x = per_seed[0]
        return list(wilson(sum(bool(v) for v in x), len(x)))
    pairs = [(x, [False] * len(x)) for x in per_seed]  # accuracy = difference against an arm always wrong
    return pooled_difference(pairs, n_resamples=n_resamples, seed=seed)["ci95"]


def t_interval(values: Sequence[float], level: float = 0.95) -> list[float] | None:
    """The `level` t-interval [lo, hi] of the mean of `values` (one per seed: the seeds are the
    unit, and their spread is the variance a claim about a method has to beat); None for fewer
    than two values.

        lo, hi = t_interval([0.05, 0.08, 0.02, 0.06, 0.04])   # mean 0.05 +- 2.776 * sd / sqrt(5)
    """
    n = len(values)
    if n < 2:
        return None
    from scipy.stats import t

    mean = sum(values) / n
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    half = float(t.ppf(0.5 + level / 2, n - 1)) * sd / math.sqrt(n)
    return [mean - half, mean + half]


def pass_at_k(n: int, c: int, k: int) -> float:
    """The unbiased pass@k from n samples of which c are correct: 1 - C(n-c, k) / C(n, k), computed
    as 1 - prod_{i=n-c+1}^{n} (1 - k/i) (Chen et al. 2021, the Codex paper).

        pass_at_k(n=5, c=2, k=2)   # 1 - C(3,2)/C(5,2) = 0.7
    """
    if not (0 <= c <= n and 1 <= k <= n):
        raise ValueError(f"pass_at_k: need 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    if n - c < k:  # every k-subset holds a correct sample
        return 1.0
    return float(1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1)))
