"""Checkers: functions from a trial's history to its figures (Jepsen's model).

Promises to harness/trial.py, the results and the report: clients record, checkers compute
— every figure of a trial comes from these functions applied to the merged history (and,
for the cache and phases, to the scheme's RecoveryReport), each defined exactly in
docs/METRICS.md. ``check`` returns them all; a figure that cannot be computed is None,
never a guess.
"""

from __future__ import annotations

from harness.checkers.cachehits import hit_ratio
from harness.checkers.common import crash_times
from harness.checkers.downtime import downtime
from harness.checkers.recovery import recovery
from harness.checkers.throughput import throughput
from harness.checkers.writes import writes

CACHE_KEYS = (
    "pages_before",
    "dirty_pages_before",
    "pages_recovered",
    "dirty_pages_recovered",
    "pages_rejected",
)

__all__ = [
    "check",
    "cache",
    "crash_times",
    "downtime",
    "hit_ratio",
    "recovery",
    "throughput",
    "writes",
    "CACHE_KEYS",
]


def check(
    events: list[dict], report: dict | None = None, bin_s: float = 1.0, warmup_bins: int = 1
) -> dict:
    """{"downtime": downtime(), "writes": writes(), "throughput": throughput(),
    "recovery": recovery(), "cache_hits": hit_ratio(), "cache": cache()} of one trial's
    history and its RecoveryReport dict (or None)."""
    return {
        "downtime": downtime(events),
        "writes": writes(events),
        "throughput": throughput(events, bin_s, warmup_bins),
        "recovery": recovery(events),
        "cache_hits": hit_ratio(events),
        "cache": cache(report),
    }


def cache(report: dict | None) -> dict:
    """The page-cache counts and the recovery phases of a RecoveryReport dict
    (systems/base.py ``RecoveryReport.to_dict()``): {the CACHE_KEYS…, "dirty_pages_lost",
    any further counts the scheme reports (warmcache's pages_preserved, …) under their own
    names, "phases": {name: seconds, summed over repeats}, "modeled_phases": [names]}.
    Without a report (the trial never got one) every count is None and there are no
    phases."""
    if report is None:
        return {
            **{k: None for k in CACHE_KEYS},
            "dirty_pages_lost": None,
            "phases": {},
            "modeled_phases": [],
        }
    c = report.get("cache")
    missing = [k for k in CACHE_KEYS if not isinstance((c or {}).get(k), int)]
    if missing:
        raise ValueError(f"recovery report: cache.{missing[0]} is missing or not a count")
    counts = {k: v for k, v in c.items() if isinstance(v, int) and not isinstance(v, bool)}
    counts["dirty_pages_lost"] = (
        counts["dirty_pages_before"]
        - counts["dirty_pages_recovered"]
        - counts.get("dirty_pages_superseded", 0)  # a report from before it was counted
    )
    phases: dict[str, float] = {}
    for p in report.get("phases", []):
        phases[p["name"]] = phases.get(p["name"], 0.0) + (p["end"] - p["start"])
    return {
        **counts,
        "phases": phases,
        "modeled_phases": sorted({p["name"] for p in report.get("phases", []) if p.get("modeled")}),
    }
