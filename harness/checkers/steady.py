"""Steady state: throughput and latency percentiles of the load while nothing fails.

Promises to harness/overhead.py (definitions: docs/METRICS.md, "Steady state"): the window
is [start, end) in CLOCK_MONOTONIC seconds — given, or read from the history's nemesis
records ``info steady-start`` / ``info steady-end``; an operation belongs to the window when
its completion does; throughput is the count of ``ok`` load operations in the window over
its length; latency is ``ok`` time minus ``invoke`` time of those operations, and its
percentiles interpolate linearly between order statistics (numpy's default, Hyndman & Fan
type 7). ``fail`` and ``info`` completions are counted, never timed. Nothing is None
except the latencies of a window without an ``ok`` operation.
"""

from __future__ import annotations

import math

import numpy as np

from harness.checkers.common import is_load
from harness.history import NEMESIS, pairs

PERCENTILES = (50, 95, 99)
START, END = "steady-start", "steady-end"


def window(events: list[dict]) -> tuple[float | None, float | None]:
    """(start, end) of the steady state as the nemesis recorded it, or Nones."""

    def first(f: str) -> float | None:
        return next(
            (
                float(e["time"])
                for e in events
                if e["process"] == NEMESIS and e["type"] == "info" and e["f"] == f
            ),
            None,
        )

    return first(START), first(END)


def steady(events: list[dict], start: float | None = None, end: float | None = None) -> dict:
    """{"start", "end", "duration_s", "ok_ops", "failed_ops", "info_ops", "throughput_ops_s",
    "latency_s": {"p50", "p95", "p99", "mean", "max"}, "latencies_s": [ascending]} of the
    load operations completed in [start, end)."""
    if start is None or end is None:
        ws, we = window(events)
        start = ws if start is None else start
        end = we if end is None else end
    if start is None or end is None:
        raise ValueError(
            "steady: no window given and the history records none "
            f"(nemesis info {START!r} / {END!r})"
        )
    if not (math.isfinite(start) and math.isfinite(end) and end > start):
        raise ValueError(f"steady: the window [{start!r}, {end!r}) is empty or not finite")
    lat, failed, info = [], 0, 0
    for inv, done in pairs(events):
        if not is_load(inv) or done is None:
            continue
        t1 = float(done["time"])
        if not start <= t1 < end:
            continue
        if done["type"] == "ok":
            lat.append(t1 - float(inv["time"]))
        elif done["type"] == "fail":
            failed += 1
        else:
            info += 1
    x = np.sort(np.asarray(lat, dtype=float))
    duration = end - start
    if x.size:
        pct = np.percentile(x, PERCENTILES)
        latency = {
            **{f"p{p}": float(v) for p, v in zip(PERCENTILES, pct)},
            "mean": float(x.mean()),
            "max": float(x[-1]),
        }
    else:
        latency = {**{f"p{p}": None for p in PERCENTILES}, "mean": None, "max": None}
    return {
        "start": start,
        "end": end,
        "duration_s": duration,
        "ok_ops": int(x.size),
        "failed_ops": failed,
        "info_ops": info,
        "throughput_ops_s": x.size / duration,
        "latency_s": latency,
        "latencies_s": x.tolist(),
    }
