"""Throughput over time: successful operations per bin, aligned at the crash, and how long
after the crash the load was back to 90 % of what it was before.

Promises to harness/trial.py and the report's timeline plot (definitions: docs/METRICS.md,
"Throughput"): every ``ok`` load operation is counted in exactly one bin, by its completion
time; bin k covers [crash + k·bin_s, crash + (k+1)·bin_s), so no bin straddles the crash;
rates are ops per second of a whole bin. Verify-phase reads are not load.
"""

from __future__ import annotations

import math

import numpy as np

from harness.checkers.common import crash_times, is_load
from harness.history import pairs

RECOVERY_FRACTION = 0.9


def throughput(events: list[dict], bin_s: float = 1.0, warmup_bins: int = 1) -> dict:
    """{"bin_s", "crash_at", "origin", "ok_ops", "bins": [{"t", "ops", "ops_per_s", "full"}],
    "pre_crash_mean", "pre_crash_bins", "threshold", "time_to_90pct_s"}.

    ``t`` is a bin's start relative to the crash (to the load's first invoke when the
    history has no crash); ``full`` says the load ran through the whole bin. The pre-crash
    mean is over the full bins before the crash, after dropping the first ``warmup_bins``
    of them (clients connecting, caches filling)."""
    if not (bin_s > 0 and math.isfinite(bin_s)):
        raise ValueError(f"bin_s must be a positive number of seconds, not {bin_s!r}")
    if warmup_bins < 0:
        raise ValueError(f"warmup_bins must be >= 0, not {warmup_bins!r}")
    crash = crash_times(events)["crash_at"]
    oks, start, end = load_span(events)
    origin = crash if crash is not None else start
    bins = binned(oks, start, end, origin, bin_s) if origin is not None else []
    before = [b for b in bins if b["t"] < 0 and b["full"]][warmup_bins:]
    mean = None
    if before and crash is not None:
        mean = float(np.mean([b["ops_per_s"] for b in before]))
    threshold = None if mean is None else RECOVERY_FRACTION * mean
    return {
        "bin_s": bin_s,
        "crash_at": crash,
        "origin": origin,
        "ok_ops": len(oks),
        "bins": bins,
        "pre_crash_mean": mean,
        "pre_crash_bins": len(before),
        "threshold": threshold,
        "time_to_90pct_s": back_to(bins, threshold, bin_s),
    }


def load_span(events: list[dict]) -> tuple[np.ndarray, float | None, float | None]:
    """(completion times of the ok load operations, first load invoke, last load event):
    the load ran from its first invoke to its last recorded event."""
    oks, start, end = [], None, None
    for inv, done in pairs(events):
        if not is_load(inv):
            continue
        t0 = float(inv["time"])
        t1 = t0 if done is None else float(done["time"])
        start = min(t0, t1) if start is None else min(start, t0, t1)
        end = max(t0, t1) if end is None else max(end, t0, t1)
        if done is not None and done["type"] == "ok":
            oks.append(t1)
    return np.asarray(oks, dtype=float), start, end


def binned(
    oks: np.ndarray, start: float | None, end: float | None, origin: float, bin_s: float
) -> list[dict]:
    """Bins from the one holding the load's start to the one holding its end (or the
    origin, whichever is further), each with its count of ok completions."""
    if start is None:
        return []
    first = math.floor((min(start, origin) - origin) / bin_s)
    last = math.floor((max(end, origin) - origin) / bin_s)
    counts = np.zeros(last - first + 1, dtype=np.int64)
    if oks.size:
        idx = np.floor((oks - origin) / bin_s).astype(np.int64) - first
        counts = np.bincount(idx, minlength=counts.size)
    out = []
    for i, n in enumerate(counts.tolist()):
        k = first + i
        lo, hi = origin + k * bin_s, origin + (k + 1) * bin_s
        out.append(
            {
                "t": k * bin_s,
                "ops": int(n),
                "ops_per_s": n / bin_s,
                "full": bool(start <= lo and hi <= end),
            }
        )
    return out


def back_to(bins: list[dict], threshold: float | None, bin_s: float) -> float | None:
    """Seconds from the crash to the end of the first bin at or after it whose rate
    reaches the threshold; None without a (positive) threshold or if no bin reaches it."""
    if threshold is None or threshold <= 0:
        return None
    for b in bins:
        if b["t"] >= 0 and b["ops_per_s"] >= threshold:
            return b["t"] + bin_s
    return None
