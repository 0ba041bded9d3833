"""Coverage of a campaign per scheme, per fault kind and per cell, with Wilson intervals.

Promises to campaign.json, the report, the CLI and compare: ``summarize`` counts the
outcome classes of each group and gives two proportions with their Wilson score interval
(harness/stats.py ``wilson_ci``) over the faults that are not harness errors: coverage
(intact + loss) and corrupted. ``table_rows`` is the one table every output prints (the
CLI, report.md, report.html), one row per scheme and fault kind and a total per scheme,
as TxIPC's and Otherworld's fault-injection tables are laid out.
"""

from __future__ import annotations

from harness import stats
from harness.campaign.outcome import CLASSES, COVERED

LEVEL = 0.95


def interval(k: int, n: int, level: float = LEVEL) -> dict:
    share, lo, hi = stats.wilson_ci(k, n, level)
    return {"k": k, "n": n, "share": share, "lo": lo, "hi": hi}


def group(results: list[dict], level: float = LEVEL) -> dict:
    counts = {c: 0 for c in CLASSES}
    for r in results:
        counts[r["outcome"]] += 1
    n = len(results) - counts["harness-error"]
    return {
        "n": n,
        "harness_errors": counts["harness-error"],
        "counts": counts,
        "coverage": interval(sum(counts[c] for c in COVERED), n, level),
        "corrupted": interval(counts["corrupted"], n, level),
    }


def summarize(results: list[dict], schemes: list[str], level: float = LEVEL) -> dict:
    out = {}
    for s in schemes:
        mine = [r for r in results if r["scheme"] == s]
        kinds = sorted({r["kind"] for r in mine})
        cells = sorted({_cell(r) for r in mine})
        out[s] = {
            "all": group(mine, level),
            "kinds": {k: group([r for r in mine if r["kind"] == k], level) for k in kinds},
            "cells": {c: group([r for r in mine if _cell(r) == c], level) for c in cells},
        }
    return {"level": level, "schemes": out}


def _cell(r: dict) -> str:
    return f"{r['kind']}@{r['target'] or r['site']}"


def pct(iv: dict) -> str:
    if iv["share"] is None:
        return "—"
    return f"{100 * iv['share']:.1f} % [{100 * iv['lo']:.1f}, {100 * iv['hi']:.1f}]"


def table_rows(summary: dict) -> list[dict]:
    rows = []
    for s, g in summary["schemes"].items():
        for label, grp in [*g["kinds"].items(), ("all", g["all"])]:
            c = grp["counts"]
            rows.append(
                {
                    "scheme": s,
                    "fault": label,
                    "faults": grp["n"],
                    "intact": c["intact"],
                    "loss": c["loss"],
                    "corrupted": c["corrupted"],
                    "not recovered": c["not-recovered"],
                    "harness errors": c["harness-error"],
                    "coverage (95 % CI)": pct(grp["coverage"]),
                    "corrupted (95 % CI)": pct(grp["corrupted"]),
                }
            )
    return rows


NOTE = (
    "Coverage: faults recovered (intact or with loss of acknowledged writes) among the "
    "faults that are not harness errors; brackets: Wilson score 95 % interval. Harness "
    "errors are the bench's failures, kept apart and never counted as the scheme's."
)
