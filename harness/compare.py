"""Regression compare of two runs: did a metric get significantly worse?

Promises to the CLI and to CI jobs that gate on it: for every (scheme, workload, fault) of
both runs and every metric in ``METRICS`` (all lower-is-better), the medians (through
harness.stats), their ratio new/old and a one-sided Mann-Whitney U test; the verdict is
"worse" only when the new values are significantly larger (p < alpha) AND the ratio is
above 1 + threshold, "better" in the mirror case (p < alpha the other way and ratio below
1 − threshold), "same" otherwise, and "n/a" when a side has no values. A test needs enough
trials to be able to reach alpha at all: ``min_p`` says the smallest p-value the sample
sizes allow (1/C(n+m, n)); with 3 trials a side that is 0.05, so no timing can be judged
at alpha 0.05 — such rows say "too few", never "same". Categorical regressions need no
test and are judged at any trial count (``compare_counts``): a smaller share of trials
recovered, acknowledged writes lost or corrupted where the old run had none, a checker
finding where the old run had none. ``exit_code`` is 1 when any verdict, of either kind, is "worse". A
side that is an incomplete run (stopped before its last trial) gets a note; it does not
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
    ratio: float | None  # median_new / median_old (1.0 when equal, inf from 0)
    p_worse: float | None  # one-sided: new values stochastically larger
    p_better: float | None
    min_p: float | None
    verdict: str  # worse | better | same | too few | n/a
    note: str = ""


@dataclass
class Categorical:
    """A count that must not get worse at all: ``old``/``new`` are {"count", "of"}
    (trials recovered of trials run, writes lost over the verified trials, trials with a
    checker finding of the trials checked)."""

    scheme: str
    workload: str
    fault: str
    check: str  # recovered | lost_writes | corrupted_writes | checks.<name>
    old: dict
    new: dict
    verdict: str  # worse | better | same | n/a
    note: str = ""


@dataclass
class Comparison:
    threshold: float
    alpha: float
    rows: list[Row] = field(default_factory=list)
    categorical: list[Categorical] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def worse(self) -> list[Row]:
        return [r for r in self.rows if r.verdict == "worse"]

    @property
    def regressions(self) -> list[Categorical]:
        return [c for c in self.categorical if c.verdict == "worse"]

    @property
    def exit_code(self) -> int:
        return 1 if self.worse or self.regressions else 0


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
        elif (
            v is None
            and metric == "time_to_90pct_s"
            and (t["throughput"]["pre_crash_mean"] or 0) > 0
        ):
            v = math.inf
        if v is not None:
            out.append(float(v))
    return out


def compare(
    old_run: dict, new_run: dict, threshold: float = 0.10, alpha: float = 0.05
) -> Comparison:
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
            result.rows.append(
                compare_metric(
                    key,
                    metric,
                    metric_values(old[key], metric),
                    metric_values(new[key], metric),
                    threshold,
                    alpha,
                )
            )
        result.categorical += compare_counts(key, old[key], new[key])
    return result


def compare_metric(
    key: tuple[str, str, str],
    metric: str,
    old: list[float],
    new: list[float],
    threshold: float,
    alpha: float,
) -> Row:
    row = Row(
        *key, metric, len(old), len(new), _median(old), _median(new), None, None, None, None, "n/a"
    )
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
    if row.min_p >= alpha:  # not "same": the sample cannot tell
        n = f"{len(old)}" if len(old) == len(new) else f"{len(old)}/{len(new)}"
        what = "lost bytes" if metric == "lost_bytes" else "timing"
        row.verdict = "too few"
        row.note = (
            f"{n} trials: too few to judge {what} at p < {alpha:g} (the smallest "
            f"possible p is {row.min_p:.3g})"
        )
    return row


# --- categorical regressions: counts that must not get worse, whatever the trial count -------


def compare_counts(
    key: tuple[str, str, str], old: list[dict], new: list[dict]
) -> list[Categorical]:
    """The recovered share, the acknowledged writes lost and corrupted, and each workload
    checker's findings, old against new (trials with an ``error`` left out)."""
    old = [t for t in old if not t.get("error")]
    new = [t for t in new if not t.get("error")]
    rows = [_share(key, "recovered", _recovered(old), _recovered(new))]
    for f in ("lost_writes", "corrupted_writes"):
        rows.append(_none_to_some(key, f, _writes(old, f), _writes(new, f)))
    for name in sorted(_check_names(old) | _check_names(new)):
        rows.append(
            _none_to_some(key, f"checks.{name}", _findings(old, name), _findings(new, name))
        )
    return rows


def _recovered(trials: list[dict]) -> dict:
    return {"count": sum(1 for t in trials if t["recovered"]), "of": len(trials)}


def _writes(trials: list[dict], f: str) -> dict:
    """Acknowledged writes lost (or corrupted) over the trials that were verified."""
    verified = [t[f] for t in trials if t[f] is not None]
    return {"count": sum(verified), "of": len(verified)}


def _check_names(trials: list[dict]) -> set[str]:
    """The workload checkers with a verdict (``ok``) in these trials' ``checks``."""
    return {
        n
        for t in trials
        for n, c in (t.get("checks") or {}).items()
        if isinstance(c, dict) and "ok" in c
    }


def _findings(trials: list[dict], name: str) -> dict:
    """Trials whose checker ``name`` found a violation, of the trials it judged."""
    oks = [
        c["ok"]
        for t in trials
        if isinstance(c := (t.get("checks") or {}).get(name), dict) and c.get("ok") is not None
    ]
    return {"count": sum(1 for ok in oks if ok is False), "of": len(oks)}


def _share(key, check: str, old: dict, new: dict) -> Categorical:
    """Worse when a smaller share of the trials recovered."""
    row = Categorical(*key, check, old, new, "n/a")
    if not old["of"] or not new["of"]:
        row.note = f"no trials in the {'old' if not old['of'] else 'new'} run"
        return row
    a, b = old["count"] * new["of"], new["count"] * old["of"]  # the shares, cross-multiplied
    row.verdict = "worse" if b < a else "better" if b > a else "same"
    if row.verdict == "worse":
        row.note = (
            f"fewer trials {check}: {old['count']}/{old['of']} before, "
            f"{new['count']}/{new['of']} now"
        )
    return row


def _none_to_some(key, check: str, old: dict, new: dict) -> Categorical:
    """Worse when the old run had none (of at least one judged trial) and the new has some."""
    row = Categorical(*key, check, old, new, "n/a")
    if not old["of"] or not new["of"]:
        row.note = f"nothing judged in the {'old' if not old['of'] else 'new'} run"
        return row
    if old["count"] == 0 and new["count"] > 0:
        row.verdict = "worse"
        row.note = f"{check.replace('_', ' ')}: none before, {new['count']} now"
    elif old["count"] > 0 and new["count"] == 0:
        row.verdict = "better"
    else:
        row.verdict = "same"
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
        return 1.0  # all values equal: no evidence either way
    if math.comb(len(new) + len(old), len(new)) <= EXACT_LIMIT:
        method = PermutationMethod(n_resamples=EXACT_LIMIT)
    else:
        method = "asymptotic"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # infinities among the ranks are fine
        p = mannwhitneyu(new, old, alternative=alternative, method=method).pvalue
    return float(min(max(p, 0.0), 1.0))
