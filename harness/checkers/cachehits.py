"""The page cache's hit ratio over time, from the kernel's own counters sampled during the run.

Promises to harness/trial.py and the report (definitions: docs/METRICS.md, "Cache hit
ratio"): the samples are the nemesis's ``info`` events of f SAMPLE (harness/kcounters.py
writes them), each the running kernel's cumulative ``hits`` and ``misses`` since it
mounted, with its ``pid``; only the difference between two samples of the same kernel
counts, so a new kernel's counters starting again at 0 never read as a negative change —
except that a kernel first sampled after the crash, when the scheme recorded its end of
outage, counts from 0 at that moment (a kernel looks no page up before it serves), so the
cold start right after a recovery is not lost;
each difference goes to the bin holding its later sample; a bin is ``full`` only when
samples of one kernel cover it whole, and a bin that is not full, or saw no lookup, has
no ratio.
"""

from __future__ import annotations

import math

from harness.checkers.common import crash_times, nemesis_time
from harness.history import NEMESIS

SAMPLE = "kernel-counters"
BIN_S = 0.5


def samples(events: list[dict]) -> list[dict]:
    """The counter samples, in time order: {"time", "pid", "hits", "misses"}."""
    out = []
    for e in events:
        v = e.get("value")
        if (
            e["process"] == NEMESIS
            and e["type"] == "info"
            and e["f"] == SAMPLE
            and isinstance(v, dict)
            and all(_count(v.get(k)) for k in ("pid", "hits", "misses"))
        ):
            out.append(
                {
                    "time": float(e["time"]),
                    "pid": v["pid"],
                    "hits": v["hits"],
                    "misses": v["misses"],
                }
            )
    return sorted(out, key=lambda s: s["time"])


def _count(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def hit_ratio(events: list[dict], bin_s: float = BIN_S) -> dict:
    """{"bin_s", "samples", "bins": [{"t", "hits", "misses", "ratio", "full"}], "before",
    "after"}: ``t`` a bin's start relative to the crash (to the first sample without one);
    ``before``/``after`` the ratio over every counted difference before / after the crash."""
    ss = samples(events)
    crash = crash_times(events)["crash_at"]
    origin = crash if crash is not None else (ss[0]["time"] if ss else None)
    back = nemesis_time(events, "info", "recovered")
    deltas, spans = _deltas(
        ss, back if crash is not None and back is not None and back > crash else None
    )
    if origin is None or not deltas:
        return {"bin_s": bin_s, "samples": len(ss), "bins": [], "before": None, "after": None}
    first = math.floor((min(s[0] for s in spans) - origin) / bin_s)
    last = math.floor((max(s[1] for s in spans) - origin) / bin_s)
    counts = {k: [0, 0] for k in range(first, last + 1)}
    for t, h, m in deltas:
        c = counts[math.floor((t - origin) / bin_s)]
        c[0] += h
        c[1] += m
    bins = []
    for k, (h, m) in sorted(counts.items()):
        lo, hi = origin + k * bin_s, origin + (k + 1) * bin_s
        full = any(a <= lo and hi <= b for a, b in spans)
        bins.append(
            {
                "t": k * bin_s,
                "hits": h,
                "misses": m,
                "full": full,
                "ratio": h / (h + m) if full and h + m else None,
            }
        )

    def side(pick):
        return _ratio([(h, m) for t, h, m in deltas if pick(t)])

    return {
        "bin_s": bin_s,
        "samples": len(ss),
        "bins": bins,
        "before": side(lambda t: crash is not None and t <= crash),
        "after": side(lambda t: crash is not None and t > crash),
    }


def _deltas(
    ss: list[dict], back: float | None
) -> tuple[list[tuple[float, int, int]], list[tuple[float, float]]]:
    """(time of the later sample, Δhits, Δmisses) of consecutive samples of one kernel, and
    each kernel's (first, last) sample time; a kernel first sampled after ``back`` (the
    scheme's end of outage after the crash) starts from zero counts at ``back``."""
    prev: dict[int, dict] = {}
    spans: dict[int, list[float]] = {}
    out = []
    for s in ss:
        p = prev.get(s["pid"])
        if p is None and back is not None and s["time"] >= back:
            p = {"hits": 0, "misses": 0}
            spans[s["pid"]] = [back, back]
        if p is not None and s["hits"] >= p["hits"] and s["misses"] >= p["misses"]:
            out.append((s["time"], s["hits"] - p["hits"], s["misses"] - p["misses"]))
        prev[s["pid"]] = s
        spans.setdefault(s["pid"], [s["time"], s["time"]])[1] = s["time"]
    return out, [tuple(v) for v in spans.values() if v[1] > v[0]]


def _ratio(pairs: list[tuple[int, int]]) -> float | None:
    h, m = sum(p[0] for p in pairs), sum(p[1] for p in pairs)
    return h / (h + m) if h + m else None
