"""Client-observed downtime: how long each client went without a successful operation
across the crash.

Promises to harness/trial.py and the report (definitions: docs/METRICS.md, "Downtime"):
a client's downtime runs from its last ``ok`` completion at or before the crash to the
first ``ok`` completion of an operation it invoked at or after the crash, so it is never
negative and a reply sent by the dying server to an older request does not end it; a
client with no such ``ok`` is not recovered (downtime None); only clients with an ``ok`` before the crash
count (a client that never worked has no downtime to measure). Verify-phase reads are not
load and are ignored.
"""

from __future__ import annotations

import math

import numpy as np

from harness.checkers.common import crash_times, load_oks


def downtime(events: list[dict]) -> dict:
    """{"crash_at", "injected_at", "delivered_at", "activated_at", "clients",
    "recovered_clients", "per_client": {str(pid): seconds or None}, "windows": {str(pid):
    [last ok before, first ok after or None] relative to the crash}, "median_s", "max_s",
    "recovered"}."""
    times = crash_times(events)
    crash = times["crash_at"]
    per_client: dict[str, float | None] = {}
    windows: dict[str, list[float | None]] = {}
    if crash is not None:
        for pid, oks in sorted(load_oks(events).items()):
            window = ok_window(oks, crash)
            if window is None:
                continue
            before, after = window
            per_client[str(pid)] = None if after is None else after - before
            windows[str(pid)] = [before - crash, None if after is None else after - crash]
    values = list(per_client.values())
    median, worst = aggregate(values)
    return {
        **times,
        "clients": len(values),
        "recovered_clients": sum(v is not None for v in values),
        "per_client": per_client,
        "windows": windows,
        "median_s": median,
        "max_s": worst,
        "recovered": bool(values) and all(v is not None for v in values),
    }


def ok_window(oks: list[tuple[float, float]], crash: float) -> tuple[float, float | None] | None:
    """(last ok completion at or before the crash, first ok completion of an operation
    invoked at or after it, or None); None when the client had no ok before the crash.
    ``oks``: (invoke, completion) spans.

    Why the invoke time bounds the end: a server that is dying can still send the reply to
    a request it had already read (the bytes were in its buffers when the kernel stopped);
    that reply says nothing about service being back."""
    before = [done for _, done in oks if done <= crash]
    if not before:
        return None
    after = [done for invoked, done in oks if invoked >= crash]
    return max(before), (min(after) if after else None)


def aggregate(values: list[float | None]) -> tuple[float | None, float | None]:
    """(median, max) over all clients, an unrecovered client counting as an infinite
    downtime: a median or max that is infinite is reported as None (unbounded), so half the
    clients recovering is not enough for a median, and the max needs every client back."""
    if not values:
        return None, None
    a = np.array([math.inf if v is None else v for v in values], dtype=float)
    median, worst = float(np.median(a)), float(a.max())
    return (median if math.isfinite(median) else None), (worst if math.isfinite(worst) else None)
