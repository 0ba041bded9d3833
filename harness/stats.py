"""Confidence intervals: the one place they are computed, so tables, plots and compare agree.

Promises to the report and compare code: ``median_ci`` gives the sample median and a
distribution-free interval for the population median (order statistics, exact binomial
coverage ≥ the level); ``mean_ci`` gives the mean and a seeded percentile-bootstrap
interval, the same numbers on every call. Below ``min_n(level)`` values no interval can
honestly claim the level: the bounds are None (never the sample range dressed up as a
95 % interval). ``wilson_ci`` gives a proportion (k of n) and its Wilson score interval,
which stays inside [0, 1] and is honest at 0 or n successes (a campaign's coverage). Values must be finite numbers; the caller decides what an unrecovered
trial means before it gets here. Definitions: docs/METRICS.md, "Confidence intervals".
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from fractions import Fraction
from statistics import NormalDist

import numpy as np

BOOTSTRAP_RESAMPLES = 10_000
BOOTSTRAP_SEED = 0


def median_ci(
    values: Iterable[float], level: float = 0.95
) -> tuple[float | None, float | None, float | None]:
    """(median, lo, hi): lo = x(j), hi = x(n+1-j) of the sorted values, j the largest rank
    whose interval still covers the population median with probability ≥ level
    (Binomial(n, ½)). (None, None, None) for no values; lo, hi None below min_n(level)."""
    x = _checked(values, level)
    if x.size == 0:
        return None, None, None
    median = float(np.median(x))
    ranks = median_ranks(x.size, level)
    if ranks is None:
        return median, None, None
    j, k, _ = ranks
    return median, float(x[j - 1]), float(x[k - 1])


def median_ranks(n: int, level: float = 0.95) -> tuple[int, int, float] | None:
    """(j, k, coverage): the 1-based ranks of the narrowest symmetric order-statistic
    interval [x(j), x(k)], k = n+1-j, whose exact coverage 1 − 2·P(B ≤ j−1), B ~
    Binomial(n, ½), is ≥ level; None when even [x(1), x(n)] falls short."""
    _check_level(level)
    # Exact arithmetic: 2·P(B ≤ j−1) ≤ 1 − level  ⇔  2·Σ C(n,i) ≤ (1 − level)·2ⁿ.
    budget = (1 - Fraction(level)) * 2**n
    tail, c, j = 0, 1, 0  # tail = Σ_{i<j} C(n, i); c = C(n, j)
    while j < (n + 1) // 2 and 2 * (tail + c) <= budget:
        tail += c
        j += 1
        c = c * (n - j + 1) // j
    if j == 0:
        return None
    coverage = 1 - float(Fraction(2 * tail, 2**n))
    return j, n + 1 - j, coverage


def min_n(level: float = 0.95) -> int:
    """The fewest values for which an interval at this level exists (6 at 95 %)."""
    _check_level(level)
    n = 1
    while median_ranks(n, level) is None:
        n += 1
    return n


def mean_ci(
    values: Iterable[float],
    level: float = 0.95,
    resamples: int = BOOTSTRAP_RESAMPLES,
    seed: int = BOOTSTRAP_SEED,
) -> tuple[float | None, float | None, float | None]:
    """(mean, lo, hi): the percentile bootstrap — the (1−level)/2 and (1+level)/2
    quantiles of the means of ``resamples`` resamples drawn with a fixed seed.
    (None, None, None) for no values; lo, hi None below min_n(level), where resampling a
    handful of values understates the spread."""
    x = _checked(values, level)
    if x.size == 0:
        return None, None, None
    mean = float(x.mean())
    if x.size < min_n(level):
        return mean, None, None
    rng = np.random.default_rng(seed)
    means = x[rng.integers(0, x.size, size=(resamples, x.size))].mean(axis=1)
    lo, hi = np.quantile(means, [(1 - level) / 2, (1 + level) / 2])
    return mean, float(lo), float(hi)


def wilson_ci(
    k: int, n: int, level: float = 0.95
) -> tuple[float | None, float | None, float | None]:
    """(k/n, lo, hi): the Wilson score interval, (p̂ + z²/2n ± z·√(p̂(1−p̂)/n + z²/4n²)) /
    (1 + z²/n), z the normal quantile of (1+level)/2. (None, None, None) for n = 0."""
    _check_level(level)
    for name, v in (("k", k), ("n", n)):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 0:
            raise ValueError(f"{name} is {v!r}: a proportion needs counts (integers ≥ 0)")
    if k > n:
        raise ValueError(f"k = {k} exceeds n = {n}")
    if n == 0:
        return None, None, None
    z = NormalDist().inv_cdf((1 + level) / 2)
    p, z2 = k / n, z * z
    centre = (p + z2 / (2 * n)) / (1 + z2 / n)
    half = z * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / (1 + z2 / n)
    # at k = 0 (k = n) the bound is exactly 0 (1); keep rounding from pushing it past
    return p, max(0.0, centre - half) if k else 0.0, min(1.0, centre + half) if k < n else 1.0


def _checked(values: Iterable[float], level: float) -> np.ndarray:
    _check_level(level)
    vals = list(values)
    for i, v in enumerate(vals):
        if (
            isinstance(v, bool)
            or not isinstance(v, (int, float, np.integer, np.floating))
            or not math.isfinite(v)
        ):
            raise ValueError(f"value {i} is {v!r}: confidence intervals need finite numbers")
    return np.sort(np.asarray(vals, dtype=float))


def _check_level(level: float) -> None:
    if not (isinstance(level, (int, float)) and 0 < level < 1):
        raise ValueError(f"level must be between 0 and 1 (exclusive), not {level!r}")
