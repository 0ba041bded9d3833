"""`crashbench bench failover`: crash-to-service per phase, one scheme beside another.

Each crash runs on a freshly deployed machine whose active kernel holds CACHE_MIB of file
cache, half of it dirty (written, never fsynced) and half clean (written and fsynced), as
the Orthros paper's experiment does. The fault is a panic, so detection is by dying
message. The cache-migration rate is of the bytes adopted over the time spent checking
them: the cache-migration phase plus the check, after first service, of the clean pages
no request had used (a scheme may check those lazily and say so in a note;
``migration_rate_outage`` leaves that time out); only a scheme that declares
``migrates_cache`` has these figures. It is set beside a memcpy of the same number of bytes measured in the same run
(numpy copy between two buffers), because the machine is shared.
Device time of the `ssd` model is modeled and waited for.
"""

from __future__ import annotations

import os
import re
import statistics
import time
from pathlib import Path

import numpy as np

from harness.testbed import Testbed
from systems.base import check_report, registry

CHUNK = 1 << 20
DEFAULT_SCHEMES = ("orthros", "reboot")  # what `crashbench bench failover` compares


def fill_cache(mnt: Path, mib: int) -> None:
    buf = os.urandom(CHUNK)
    half = mib // 2
    with open(mnt / "clean.bin", "wb") as f:
        for _ in range(half):
            f.write(buf)
        f.flush()
        os.fsync(f.fileno())
    with open(mnt / "dirty.bin", "wb") as f:
        for _ in range(mib - half):
            f.write(buf)


def memcpy_rate(nbytes: int) -> float:
    src = np.frombuffer(os.urandom(1 << 20) * max(1, nbytes >> 20), np.uint8)
    dst = np.zeros_like(src)
    dst[:] = 1  # touch every page first: the copy is timed, not the page faults
    t = time.perf_counter()
    np.copyto(dst, src)
    return nbytes / (time.perf_counter() - t)


def late_check_s(notes: list[str]) -> float:
    """The time spent checking adopted clean pages after first service (the scheme's note),
    which the cache-migration rate counts: the rate is of pages adopted *and* checked."""
    for n in notes:
        m = re.search(r"in the background in ([0-9.]+) ms", n)
        if m:
            return float(m.group(1)) / 1e3
    return 0.0


def one_crash(scheme_name: str, mib: int) -> dict:
    cls = registry()[scheme_name]
    scheme = cls()
    with Testbed(kind="bench") as bed:
        bed.deploy(scheme)
        host = bed.host
        fill_cache(Path(host.kernels[0].mount), mib)
        reply = scheme.inject("panic")
        r = check_report(scheme.on_crash(reply, timeout=120))
        out = r.to_dict()
        if cls.capabilities.migrates_cache:
            mig = next(p["seconds"] for p in out["phases"] if p["name"] == "cache migration")
            late = late_check_s(r.notes)
            out["migration_rate"] = r.cache.pages_recovered * 4096 / (mig + late)
            out["migration_rate_outage"] = r.cache.pages_recovered * 4096 / mig
            out["late_check_s"] = late
            out["memcpy_rate"] = memcpy_rate(r.cache.pages_recovered * 4096)
        return out


def run(crashes: int, mib: int, schemes=DEFAULT_SCHEMES, progress=None) -> dict[str, list[dict]]:
    results: dict[str, list[dict]] = {s: [] for s in schemes}
    for i in range(crashes):  # interleaved, so drift on the machine hits both alike
        for s in schemes:
            results[s].append(one_crash(s, mib))
            if progress:
                progress(s, i + 1, crashes)
    return results


def summarize(results: dict[str, list[dict]]) -> dict:
    out = {}
    for s, runs in results.items():
        phases: dict[str, list[float]] = {}
        for r in runs:
            for p in r["phases"]:
                phases.setdefault(p["name"] + (" (modeled)" if p["modeled"] else ""), []).append(
                    p["seconds"]
                )
        outage = [r["outage_s"] for r in runs]
        entry = {
            "crashes": len(runs),
            "crash_to_service_median_s": statistics.median(outage),
            "crash_to_service_range_s": [min(outage), max(outage)],
            "phases_median_s": {k: statistics.median(v) for k, v in phases.items()},
            "dirty_pages_before": statistics.median(r["cache"]["dirty_pages_before"] for r in runs),
            "dirty_pages_lost": statistics.median(r["cache"]["dirty_pages_lost"] for r in runs),
            "pages_recovered": statistics.median(r["cache"]["pages_recovered"] for r in runs),
        }
        if all("migration_rate" in r for r in runs):
            entry["migration_rate_median"] = statistics.median(r["migration_rate"] for r in runs)
            entry["migration_rate_outage_median"] = statistics.median(
                r["migration_rate_outage"] for r in runs
            )
            entry["late_check_median_s"] = statistics.median(r["late_check_s"] for r in runs)
            entry["memcpy_rate_median"] = statistics.median(r["memcpy_rate"] for r in runs)
        out[s] = entry
    if len(out) == 2:
        a, b = out
        out[ratio_key(a, b)] = (
            out[a]["crash_to_service_median_s"] / out[b]["crash_to_service_median_s"]
        )
    return out


def ratio_key(a: str, b: str) -> str:
    """The summary's key of the first scheme's crash-to-service over the second's."""
    return f"{a}_over_{b}"
