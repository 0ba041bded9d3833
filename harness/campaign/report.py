"""A campaign's report: report.md, a self-contained report.html and a coverage plot.

Promises to `crashbench campaign` and `crashbench campaign report`: the table is
summary.py's ``table_rows`` (the numbers of campaign.json), the plot shows coverage per
fault kind per scheme with its Wilson interval as error bars, and the files are written
atomically, rendered as the run report renders (harness/report.py).
"""

from __future__ import annotations

import json
from pathlib import Path

from harness import plots
from harness import report as run_report
from harness.campaign import store
from harness.campaign import summary as summ
from harness.results import write_atomic


def coverage_plot(s: dict) -> bytes:
    plt, sns = plots._plt(context="notebook", font_scale=1.0)
    schemes = list(s["schemes"])
    kinds = sorted({k for g in s["schemes"].values() for k in g["kinds"]})
    fig, ax = plt.subplots(figsize=(max(6.0, 1.2 * len(kinds) * max(1, len(schemes)) / 2), 4))
    pal = sns.color_palette("colorblind", max(len(schemes), 1))
    width = 0.8 / max(len(schemes), 1)
    for i, sc in enumerate(schemes):
        xs, ys, lo, hi = [], [], [], []
        for j, k in enumerate(kinds):
            iv = s["schemes"][sc]["kinds"].get(k, {}).get("coverage")
            if iv and iv["share"] is not None:
                xs.append(j + (i - (len(schemes) - 1) / 2) * width)
                ys.append(100 * iv["share"])
                lo.append(100 * (iv["share"] - iv["lo"]))
                hi.append(100 * (iv["hi"] - iv["share"]))
        ax.bar(xs, ys, width, yerr=[lo, hi], capsize=3, color=pal[i], label=sc)
    ax.set_xticks(range(len(kinds)), kinds, rotation=30, ha="right")
    ax.set_ylim(0, 105)
    ax.set_ylabel("coverage, % of faults (95 % Wilson CI)")
    ax.legend(loc="lower left")
    return plots.png_only(fig)


def blocks(doc: dict, png: bytes) -> list[tuple]:
    p, t = doc["parameters"], doc["time"]
    b: list[tuple] = [("h1", f"crashbench campaign {doc['campaign_id']}")]
    if doc["status"] != "complete":
        b.append(
            (
                "alert",
                f"campaign {doc['status']}: {len(doc['faults'])} of {len(doc['plan'])} faults done",
            )
        )
    per = "—" if t["per_fault_s"] is None else f"{t['per_fault_s']:.2f} s"
    b += [
        (
            "p",
            f"Created {doc['created']}. Workload {p['workload']}, faults {p['faults']}, "
            f"schemes {', '.join(p['schemes'])}, {p['per_scheme']} faults each, seed "
            f"{p['seed']}. {t['faults_run']} faults run in {t['wall_s']:.0f} s: {per} "
            f"a fault (wall clock, executor {p.get('executor')}, workers {p.get('workers')}).",
        )
    ]
    rows = summ.table_rows(doc["summary"])
    b += [
        ("h2", "Coverage"),
        ("table", list(rows[0]) if rows else [], [list(r.values()) for r in rows]),
        ("p", summ.NOTE),
    ]
    b += [
        ("h2", "Coverage per fault kind"),
        ("img", "coverage.png", png, "coverage"),
        ("p", "Bars: coverage per fault kind and scheme; whiskers: Wilson 95 % interval."),
    ]
    cells = [
        [sc, c, g["n"], *g["counts"].values(), summ.pct(g["coverage"])]
        for sc, sg in doc["summary"]["schemes"].items()
        for c, g in sg["cells"].items()
    ]
    b += [
        ("h2", "Per target and site"),
        (
            "table",
            [
                "scheme",
                "cell",
                "faults",
                *next(iter(doc["summary"]["schemes"].values()))["all"]["counts"],
                "coverage",
            ]
            if cells
            else [],
            cells,
        ),
    ]
    bad = [
        f"{r['id']} ({r['outcome']}, seed {r['seed']}): {r['why']}"
        for r in doc["faults"]
        if r["outcome"] in ("corrupted", "not-recovered", "harness-error")
    ]
    if bad:
        b += [("h2", "Faults not recovered intact or with loss"), ("pre", "\n".join(bad))]
    rej = [
        f"{r['id']}: {r['rejected']['pages']} pages, {r['rejected']['metadata_blocks']} "
        f"metadata blocks: " + "; ".join(r["rejected"]["reasons"][:3])
        for r in doc["faults"]
        if r["rejected"]["pages"] or r["rejected"]["metadata_blocks"]
    ]
    if rej:
        b += [("h2", "Rejected objects"), ("pre", "\n".join(rej))]
    if told := evidence_lines(doc["faults"]):
        b += [("h2", "What the machine held for each key read back corrupted"), ("pre", told)]
    checked = [f"{r['id']}: {_checks_line(r['checks'])}" for r in doc["faults"] if r.get("checks")]
    if checked:
        b += [("h2", "Workload checks"), ("pre", "\n".join(checked))]
    b += [
        ("h2", "Parameters"),
        ("pre", json.dumps(p, indent=2)),
        ("h2", "Environment"),
        ("pre", json.dumps(doc["environment"], indent=2)),
    ]
    return b


def evidence_lines(faults: list[dict]) -> str:
    """One line per key a fault read back corrupted: the workload's account of it, as
    kept (``evidence``: its shape is the workload's, so it is printed whole)."""
    return "\n".join(
        f"{r['id']} {key}: {json.dumps(e, separators=(',', ':'))}"
        for r in faults
        for key, e in (r.get("evidence") or {}).items()
    )


def _checks_line(checks: dict) -> str:
    """Each workload check of a fault in a few words: ok, FAILED, not run, or a count."""
    said = {True: "ok", False: "FAILED", None: "not run"}
    return ", ".join(
        f"{n} {said[c.get('ok')]}" if isinstance(c, dict) else f"{n} {_count(c)}"
        for n, c in checks.items()
    )


def _count(v) -> str:
    return str(len(v)) if isinstance(v, list) else str(v)


def write_report(d: Path, doc: dict | None = None) -> list[Path]:
    doc = doc if doc is not None else store.load(d)
    png = coverage_plot(doc["summary"])
    bl = blocks(doc, png)
    return [
        write_atomic(d / "report.md", run_report.render_md(bl)),
        write_atomic(d / "report.html", run_report.render_html(bl)),
        write_atomic(d / "coverage.png", png),
    ]
