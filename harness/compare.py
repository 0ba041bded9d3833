"""Regression compare of two runs: did a metric get significantly worse?

Promises to the CLI and to CI jobs that gate on it: for every (scheme, workload, fault) of
both runs and every metric in ``METRICS`` (all lower-is-better), the medians (through
harness.stats), their ratio new/old and a one-sided Mann-Whitney U test; the verdict is
"worse" only when the new values are significantly larger (p < alpha) AND the ratio is
above 1 + threshold, "better" in the mirror case (p < alpha the other way and ratio below
1 − threshold), "same" otherwise, and "n/a" when a side has no values. ``exit_code`` is 1
when any verdict is "worse". A test needs enough trials to be able to reach alpha at all:
``min_p`` says the smallest p-value the sample sizes allow (1/C(n+m, n)); with 3 trials a
side that is 0.05, so nothing can be "worse" at alpha 0.05 — such rows carry a note. A
side that is an incomplete run (stopped before its last trial) gets a note too; it does not
change the exit code by itself (its fewer trials already weigh less in the test).
docs/RESULTS.md, "Compare", is the reference.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field

from harness import results, stats
from harness.report import groups

METRICS = ("downtime_s", "time_to_90pct_s", "lost_bytes")
# Up to this many arrangements of the pooled values the p-value is exact (every
# arrangement enumerated, ties handled); beyond it (≥ 9 trials a side) the normal
# approximation with tie correction is accurate and far cheaper.
EXACT_LIMIT = 20_000


@dataclass
class Row:
    scheme: str
    workload: str
    fault: str
    metric: str
    n_old: int
    n_new: int
    median_old: float | None
    median_new: float | None
    ratio: float | None          # median_new / median_old (1.0 when equal, inf from 0)
    p_worse: float | None        # one-sided: new values stochastically larger
    p_better: float | None
    min_p: float | None
    verdict: str                 # worse | better | same | n/a
    note: str = ""


@dataclass
class Comparison:
    threshold: float
    alpha: float
    rows: list[Row] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def worse(self) -> list[Row]:
        return [r for r in self.rows if r.verdict == "worse"]

    @property
    def exit_code(self) -> int:
        return 1 if self.worse else 0


def metric_values(trials: list[dict], metric: str) -> list[float]:
    """The values a metric is compared on. Failed trials (``error``) are left out: they
    are the harness's failures, not the scheme's. A trial that did not recover has an
    infinite downtime, and one that never got back to 90 % of a positive pre-crash
    throughput an infinite time to 90 % — a scheme that stops recovering must not look
    faster. Unverified lost bytes (null) are left out: nothing was read back."""
    out = []
    for t in trials:
        if t.get("error"):
            continue
        v = t[metric]
        if v is None and metric == "downtime_s" and not t["recovered"]:
            v = math.inf
        elif v is None and metric == "time_to_90pct_s" and (t["throughput"]["pre_crash_mean"] or 0) > 0:
            v = math.inf
        if v is not None:
            out.append(float(v))
    return out


def compare(old_run: dict, new_run: dict, threshold: float = 0.10,
            alpha: float = 0.05) -> Comparison:
    if not threshold > 0:
        raise ValueError(f"threshold must be positive, not {threshold!r}")
    if not 0 < alpha < 1:
        raise ValueError(f"alpha must be between 0 and 1, not {alpha!r}")
    old, new = groups(old_run), groups(new_run)
    result = Comparison(threshold, alpha)
    for side, run in (("old", old_run), ("new", new_run)):
        if results.incomplete_line(run):
            result.notes.append(f"{side} side: {results.incomplete_line(run)}")
    for key in old.keys() | new.keys():
        if key not in new or key not in old:
            side = "old" if key in old else "new"
            result.notes.append(f"{'/'.join(key)}: only in the {side} run, not compared")
    for key in [k for k in old if k in new]:
        for metric in METRICS:
            result.rows.append(compare_metric(key, metric, metric_values(old[key], metric),
                                              metric_values(new[key], metric), threshold, alpha))
    return result


def compare_metric(key: tuple[str, str, str], metric: str, old: list[float], new: list[float],
                   threshold: float, alpha: float) -> Row:
    row = Row(*key, metric, len(old), len(new), _median(old), _median(new), None, None, None,
              None, "n/a")
    if not old or not new:
        row.note = f"no values in the {'old' if not old else 'new'} run"
        return row
    row.ratio = _ratio(row.median_old, row.median_new)
    row.p_worse, row.p_better = _p(new, old, "greater"), _p(new, old, "less")
    row.min_p = 1 / math.comb(len(old) + len(new), len(old))
    if row.p_worse < alpha and row.ratio > 1 + threshold:
        row.verdict = "worse"
    elif row.p_better < alpha and row.ratio < 1 - threshold:
        row.verdict = "better"
    else:
        row.verdict = "same"
    if row.min_p >= alpha:
        row.note = (f"too few trials for a test at alpha {alpha:g}: the smallest possible "
                    f"p is {row.min_p:.3g}")
    return row


def _median(values: list[float]) -> float | None:
    finite = [v for v in values if math.isfinite(v)]
    if len(finite) == len(values):
        return stats.median_ci(values)[0]
    # stats wants finite values; with infinities (not recovered) the median is taken
    # directly, and is infinite when they are the larger half.
    s = sorted(values)
    n = len(s)
    return s[n // 2] if n % 2 else (s[n // 2 - 1] + s[n // 2]) / 2


def _ratio(old: float, new: float) -> float:
    if old == new:
        return 1.0
    if old == 0 or math.isinf(new):
        return math.inf
    return new / old


def _p(new: list[float], old: list[float], alternative: str) -> float:
    """One-sided Mann-Whitney U p-value of ``new`` against ``old``."""
    from scipy.stats import PermutationMethod, mannwhitneyu
    if len(set(new) | set(old)) == 1:
        return 1.0                      # all values equal: no evidence either way
    if math.comb(len(new) + len(old), len(new)) <= EXACT_LIMIT:
        method = PermutationMethod(n_resamples=EXACT_LIMIT)
    else:
        method = "asymptotic"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)   # infinities among the ranks are fine
        p = mannwhitneyu(new, old, alternative=alternative, method=method).pvalue
    return float(min(max(p, 0.0), 1.0))
