"""The recovery at a resolution that shows it: throughput in fine bins around the crash,
when the load is back to 90 % and 99 % of its pre-crash rate, the work the crash cost,
latency before and after, and the clients' gap after the scheme's outage.

Promises to harness/trial.py and the report (definitions: docs/METRICS.md, "Recovery"):
bins are FINE_BIN_S wide and aligned at the crash like harness/checkers/throughput.py's
(each ``ok`` load operation counted once, by its completion); a bin the load did not run
through whole (``full`` false) enters no figure; every figure that cannot be computed is
None, never a guess; the work lost by a load that never got back to 90 % is what it lost
until the observation ended, flagged ``lost_censored`` (a lower bound, never a value).
"""

from __future__ import annotations

import numpy as np

from harness.checkers.common import crash_times, load_oks, nemesis_time
from harness.checkers.throughput import binned, load_span

FINE_BIN_S = 0.1  # fine enough to see an outage of a few hundred ms
PRE_SKIP_S = 1.0  # the first second of full bins before the crash: clients warming up
SUSTAIN_S = 1.0  # a return must hold on average over this long, not be one burst
FRACTIONS = (0.9, 0.99)


def recovery(events: list[dict], bin_s: float = FINE_BIN_S) -> dict:
    """{"bin_s", "bins": [{"t", "ops", "ops_per_s", "full"}], "pre_crash_mean",
    "time_to_90pct_s", "time_to_99pct_s", "lost_ops", "lost_service_s", "lost_censored",
    "latency": {"before": {...}, "after": {...}}, "recovered_at", "first_ok_after_s",
    "client_gap_s"}; times relative to the crash."""
    crash = crash_times(events)["crash_at"]
    oks, start, end = load_span(events)
    bins = binned(oks, start, end, crash, bin_s) if crash is not None and start is not None else []
    pre_bins = _pre_window(bins, bin_s)
    pre = float(np.mean([b["ops_per_s"] for b in pre_bins])) if pre_bins else None
    back = {p: back_to(bins, pre, p, bin_s) for p in FRACTIONS}
    lost = lost_work(bins, pre, back[0.9], bin_s)
    censored = lost is None and back[0.9] is None and bool(pre)
    if censored:  # never back within the observation: what it cost until then, at least
        lost = lost_until_end(bins, pre, bin_s)
        censored = lost is not None
    out = {
        "bin_s": bin_s,
        "bins": bins,
        "pre_crash_mean": pre,
        "time_to_90pct_s": back[0.9],
        "time_to_99pct_s": back[0.99],
        "lost_ops": lost,
        "lost_service_s": None if lost is None else lost / pre,
        "lost_censored": censored,
        "latency": latency(events, crash, pre_bins, bin_s),
    }
    out.update(client_gap(events, crash))
    return out


def _pre_window(bins: list[dict], bin_s: float) -> list[dict]:
    """The full bins before the crash, less the first PRE_SKIP_S of them."""
    full = [b for b in bins if b["t"] < 0 and b["full"]]
    return full[int(round(PRE_SKIP_S / bin_s)) :]


def back_to(bins: list[dict], pre: float | None, fraction: float, bin_s: float) -> float | None:
    """Seconds from the crash to the end of the first full bin at or after it whose rate
    reaches ``fraction`` of the pre-crash mean and whose full bins over the next SUSTAIN_S
    (itself included) average at least that too; None without a positive pre-crash mean
    or if no bin does."""
    if not pre or pre <= 0:
        return None
    after = [b for b in bins if b["t"] >= 0]
    goal = fraction * pre
    for i, b in enumerate(after):
        if not b["full"] or b["ops_per_s"] < goal:
            continue
        window = [w["ops_per_s"] for w in after[i:] if w["full"] and w["t"] < b["t"] + SUSTAIN_S]
        if np.mean(window) >= goal:
            return b["t"] + bin_s
    return None


def lost_work(
    bins: list[dict], pre: float | None, back: float | None, bin_s: float
) -> float | None:
    """Operations the crash cost: Σ (pre-crash rate − observed rate) · bin_s over the bins
    from the crash to ``back`` (the return to 90 %). None when there is no such return."""
    if back is None or not pre:
        return None
    span = [b for b in bins if 0 <= b["t"] < back - bin_s / 2]
    if not all(b["full"] for b in span):
        return None
    return float(sum((pre - b["ops_per_s"]) * bin_s for b in span))


def lost_until_end(bins: list[dict], pre: float, bin_s: float) -> float | None:
    """For a load that never got back to 90 %: Σ (pre-crash rate − observed rate) · bin_s
    over the bins from the crash to the end of the observation — a lower bound of the work
    lost (``lost_censored``). The partial bins at the end, where the load stopped, are
    left out; None if a bin before them is partial or no full bin follows the crash."""
    span = [b for b in bins if b["t"] >= 0]
    while span and not span[-1]["full"]:
        span.pop()
    if not span or not all(b["full"] for b in span):
        return None
    return float(sum((pre - b["ops_per_s"]) * bin_s for b in span))


def latency(events: list[dict], crash: float | None, pre_bins: list[dict], bin_s: float) -> dict:
    """p50/p99 (and n) of the ``ok`` load operations' latencies (completion − invoke):
    ``before`` those completed inside the pre-crash window, ``after`` those invoked at or
    after the crash."""
    before, after = [], []
    if crash is not None:
        lo = crash + pre_bins[0]["t"] if pre_bins else crash
        for spans in load_oks(events).values():
            for inv, done in spans:
                if pre_bins and lo <= done < crash:
                    before.append(done - inv)
                elif inv >= crash:
                    after.append(done - inv)
    return {"before": _percentiles(before), "after": _percentiles(after)}


def _percentiles(values: list[float]) -> dict:
    if not values:
        return {"n": 0, "p50_s": None, "p99_s": None}
    p50, p99 = np.percentile(np.asarray(values, dtype=float), [50, 99])
    return {"n": len(values), "p50_s": float(p50), "p99_s": float(p99)}


def client_gap(events: list[dict], crash: float | None) -> dict:
    """When the scheme said service was back (nemesis ``info recovered``), when the first
    load operation invoked at or after the crash was acknowledged, and the gap between
    them (negative: a client was served before the scheme's own mark)."""
    back = nemesis_time(events, "info", "recovered")
    first = None
    if crash is not None:
        done = [d for spans in load_oks(events).values() for inv, d in spans if inv >= crash]
        first = min(done) if done else None

    def rel(t):
        return None if t is None or crash is None else t - crash

    return {
        "recovered_at": rel(back),
        "first_ok_after_s": rel(first),
        "client_gap_s": None if back is None or first is None else first - back,
    }
