"""A finished trial as the record run.json keeps (docs/RESULTS.md lists every field).

Promises to harness/results.py and the report: figures come from the checkers applied to
the trial's history and from the scheme's RecoveryReport, never from the driver's own
clock; a trial that could not be carried out is recorded too, with its error and every
figure null, so a run's trials are never silently fewer than asked for.
"""

from __future__ import annotations

from harness import checkers
from harness.checkers import CACHE_KEYS


def record(trial, events: list[dict]) -> dict:
    spec, report = trial.spec, trial.report
    rd = report.to_dict() if report is not None else None
    figs = checkers.check(events, rd, bin_s=spec.timing["bin_s"])
    down, writes, tput, cache = figs["downtime"], figs["writes"], figs["throughput"], figs["cache"]
    verified = report is not None and report.recovered
    rec = base(spec)
    rec.update(
        recovered=bool(verified and down["recovered"]),
        downtime_s=down["median_s"],
        downtime_max_s=down["max_s"],
        downtime_per_client_s=down["per_client"],
        outage_s=rd["outage_s"] if rd else None,
        detected_by=rd["detected_by"] if rd else None,
        phases=cache["phases"],
        modeled_phases=cache["modeled_phases"],
        acked_writes=writes["acked_writes"],
        lost_writes=writes["lost_writes"] if verified else None,
        corrupted_writes=writes["corrupted_writes"] if verified else None,
        lost_bytes=writes["lost_bytes"] if verified else None,
        unverified_keys=writes["unverified_keys"],
        cache={k: v for k, v in cache.items() if k not in ("phases", "modeled_phases")},
        throughput={
            "bin_s": spec.timing["bin_s"],
            "bins": tput["bins"],
            "pre_crash_mean": tput["pre_crash_mean"],
        },
        **recovery_fields(figs["recovery"]),
        cache_hits=figs["cache_hits"],
        driver_phases=_relative(trial.phases, trial.crash_at),
        machine_tag=trial.host.tag,  # names the trial's namespaces and process sets
        report=rd,
    )
    if trial.cache_fill is not None:
        rec["cache_fill"] = trial.cache_fill
    if trial.evidence:
        rec["evidence"] = trial.evidence
    _workload_figures(trial, events, rec)
    return rec


def recovery_fields(r: dict) -> dict:
    """The recovery figures (harness/checkers/recovery.py) as run.json keeps them."""
    return {
        "time_to_90pct_s": r["time_to_90pct_s"],
        "time_to_99pct_s": r["time_to_99pct_s"],
        "lost_ops": r["lost_ops"],
        "lost_service_s": r["lost_service_s"],
        "lost_censored": r["lost_censored"],
        "client_gap_s": r["client_gap_s"],
        "latency": r["latency"],
        "recovery": {
            k: r[k] for k in ("bin_s", "bins", "pre_crash_mean", "recovered_at", "first_ok_after_s")
        },
    }


def _workload_figures(trial, events: list[dict], rec: dict) -> None:
    """A workload's own phases (added to ``phases``) and checks (``checks``, only when it
    has some) (harness/workloads/__init__.py: ``extra_phases``, ``checks``)."""
    wl, svc = trial.workload, trial.svc
    if svc is None:
        return
    rec["phases"].update(wl.extra_phases(svc, events))
    checks = wl.checks(svc, events)
    if checks is not None:
        rec["checks"] = checks


def failed(spec, phases: list[dict], crash_at: float | None, error: str) -> dict:
    rec = base(spec)
    rec.update(
        recovered=False,
        downtime_s=None,
        downtime_max_s=None,
        downtime_per_client_s={},
        outage_s=None,
        detected_by=None,
        phases={},
        modeled_phases=[],
        acked_writes=None,
        lost_writes=None,
        corrupted_writes=None,
        lost_bytes=None,
        unverified_keys=None,
        cache={k: 0 for k in CACHE_KEYS},
        throughput={"bin_s": spec.timing["bin_s"], "bins": [], "pre_crash_mean": None},
        **recovery_fields(checkers.recovery([])),
        cache_hits=checkers.hit_ratio([]),
        driver_phases=_relative(phases, crash_at),
        report=None,
        error=error,
    )
    return rec


def base(spec) -> dict:
    return {
        "id": spec.id,
        "scheme": spec.scheme,
        "workload": spec.workload,
        "fault": spec.fault,
        "trial": spec.trial,
        "seed": spec.seed,
        "history": f"history-{spec.id}.jsonl",
    }


def _relative(phases: list[dict], crash_at: float | None) -> list[dict]:
    """Driver phases with times relative to the crash (or to the first phase)."""
    t0 = crash_at if crash_at is not None else (phases[0]["start"] if phases else 0.0)
    return [
        {**p, "start": p["start"] - t0, "end": p["end"] - t0, "seconds": p["end"] - p["start"]}
        for p in phases
    ]
