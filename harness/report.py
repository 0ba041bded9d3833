"""The report of a result directory: report.md, a self-contained report.html and its figures.

Promises to the CLI and to readers: everything comes from run.json (validated by
harness.results) and nothing else; every median and interval is computed once, in
``summarize`` through harness.stats, and the tables and the plots draw those same numbers;
phases that are modeled hardware time are labelled "(modeled)" wherever they appear; an
incomplete run (stopped before its last trial) says so above everything else;
report.html embeds its images and loads nothing; the figures (harness/plots.py) are
written as PNG, SVG and PDF; the ranking orders schemes by the work the crash cost, then
by downtime. The files are rendered in memory first
and each is replaced atomically, so an invalid run writes nothing.
"""

from __future__ import annotations

import base64
import html
import json
import math
from pathlib import Path

from harness import plots, results, stats

METRICS_DOC = "docs/METRICS.md"
NO_CI = "no CI"


# --- the numbers -----------------------------------------------------------------------------


def groups(run: dict) -> dict[tuple[str, str, str], list[dict]]:
    """Trials by (scheme, workload, fault), schemes in the order the run named them."""
    order = {s: i for i, s in enumerate(run["parameters"].get("schemes", []))}
    out: dict[tuple[str, str, str], list[dict]] = {}
    for t in sorted(
        run["trials"], key=lambda t: (order.get(t["scheme"], len(order)), t["scheme"], t["trial"])
    ):
        out.setdefault((t["scheme"], t["workload"], t["fault"]), []).append(t)
    return out


def summarize(run: dict) -> list[dict]:
    """One dict of numbers per (scheme, workload, fault). Trials that failed (``error``)
    count in ``trials`` and ``failed`` only; downtime is over recovered trials, lost bytes
    over verified ones (null when unverified)."""
    gs = groups(run)
    one_kind = len({(w, f) for _, w, f in gs}) <= 1
    out = []
    for (scheme, workload, fault), ts in gs.items():
        ok = [t for t in ts if not t.get("error")]
        down = [t["downtime_s"] for t in ok if t["recovered"] and t["downtime_s"] is not None]
        t90 = [t["time_to_90pct_s"] for t in ok if t["time_to_90pct_s"] is not None]
        lost = [t["lost_bytes"] for t in ok if t["lost_bytes"] is not None]
        pages = [
            t["cache"]["pages_recovered"] for t in ok if t["cache"]["pages_recovered"] is not None
        ]
        out.append(
            {
                "key": (scheme, workload, fault),
                "label": scheme if one_kind else f"{scheme}/{workload}/{fault}",
                "trials": len(ts),
                "failed": len(ts) - len(ok),
                "recovered": sum(1 for t in ok if t["recovered"]),
                "downtime": _ci(down),
                "time_to_90pct": _ci(t90),
                "time_to_99pct": _ci(_known(ok, "time_to_99pct_s")),
                "lost_service": _ci(
                    _known(ok, "lost_service_s"),
                    censored=sum(1 for t in ok if t.get("lost_censored")),
                ),
                "client_gap": _ci(_known(ok, "client_gap_s")),
                "lost_bytes_total": sum(lost) if lost else None,
                "lost_bytes_median": stats.median_ci(lost)[0],
                "unverified": len(ok) - len(lost),
                "pages_recovered_median": stats.median_ci(pages)[0],
                "phases": _phase_medians(ok),
                "modeled": _modeled(ok),
            }
        )
    return out


def _known(trials: list[dict], key: str) -> list[float]:
    """A figure of the trials that have it (schema_version 1 trials have no recovery figures)."""
    return [t[key] for t in trials if t.get(key) is not None]


def _ci(values: list[float], censored: int = 0) -> dict:
    """Median and 95 % CI; ``censored``: how many values are only lower bounds, which makes
    the median and both ends lower bounds too (a larger true value can only raise them)."""
    median, lo, hi = stats.median_ci(values)
    return {"median": median, "lo": lo, "hi": hi, "n": len(values), "censored": censored}


def _phase_medians(trials: list[dict]) -> dict[str, float]:
    """Median seconds of each phase over the trials whose report has that phase."""
    names = phase_order(list(t["phases"]) for t in trials)
    return {
        n: stats.median_ci([t["phases"][n] for t in trials if n in t["phases"]])[0] for n in names
    }


def phase_order(sequences) -> list[str]:
    """The phase names of several reports in one order that keeps each report's own: a new
    name goes right after the name that precedes it in its report (reports list their
    phases in time order, and the schemes share some names)."""
    merged: list[str] = []
    for seq in sequences:
        prev = None
        for n in seq:
            if n not in merged:
                merged.insert(merged.index(prev) + 1 if prev is not None else 0, n)
            prev = n
    return merged


def _modeled(trials: list[dict]) -> set[str]:
    return {n for t in trials for n in t["modeled_phases"]}


# --- formatting ------------------------------------------------------------------------------


def fmt_ci(c: dict, digits: int = 3) -> str:
    if c["median"] is None:
        return "—"
    m = f"{_at_least(c)}{c['median']:.{digits}f}"
    if c["lo"] is None:
        return f"{m} ({NO_CI}: n={c['n']})"
    return f"{m} [{c['lo']:.{digits}f}, {c['hi']:.{digits}f}]"


def modeled_line(hw: dict) -> str:
    """The machine's modeled hardware time (run.json ``parameters.modeled_hardware``), in
    one line that says it is modeled."""
    parts = [
        f"{name}: {d['model']}, {d['latency_s'] * 1e6:g} µs per request + "
        + (
            f"{d['bandwidth_bytes_s'] / 1e6:g} MB/s"
            if d["bandwidth_bytes_s"]
            else "unlimited bandwidth"
        )
        + " (modeled)"
        for name, d in hw["disks"].items()
    ]
    r = hw.get("reboot")
    if r:
        parts.append(
            f"reboot: firmware/POST {r['firmware_s']:g} s + kernel boot "
            f"{r['kernel_boot_s']:g} s (modeled; {r['description']})"
        )
    return "Modeled hardware time — " + "; ".join(parts) + "."


def _num(v) -> str:
    return "—" if v is None else f"{v:g}"


MIB = 2**20


def mib(v) -> str:
    """A byte count in MiB for people (the column says "MiB"): three significant digits
    below 1 MiB, two decimals above, never in exponent notation. JSON keeps the bytes."""
    if v is None:
        return "—"
    m = v / MIB
    if m == 0 or abs(m) >= 1:
        return f"{m:.2f}" if m else "0"
    return f"{m:.{2 - math.floor(math.log10(abs(m)))}f}"


def summary_rows(run: dict) -> list[dict]:
    """The summary table as display strings, one row per (scheme, workload, fault); the
    CLI, report.md and report.html print exactly these."""
    rows = []
    for s in summarize(run):
        lost = (
            "— (unverified)"
            if s["lost_bytes_total"] is None
            else f"{mib(s['lost_bytes_total'])} ({mib(s['lost_bytes_median'])})"
        )
        if s["unverified"] and s["lost_bytes_total"] is not None:
            lost += f", {s['unverified']} unverified"
        rows.append(
            {
                "scheme": s["label"],
                "trials": f"{s['trials']}" + (f" ({s['failed']} failed)" if s["failed"] else ""),
                "recovered": f"{s['recovered']}/{s['trials']}",
                "downtime s: median [95% CI]": fmt_ci(s["downtime"]),
                "time to 90% s: median [95% CI]": fmt_ci(s["time_to_90pct"]),
                "time to 99% s: median [95% CI]": fmt_ci(s["time_to_99pct"]),
                "work lost s of service: median [95% CI]": fmt_ci(s["lost_service"]),
                "lost MiB: total (median)": lost,
                "pages recovered: median": _num(s["pages_recovered_median"]),
            }
        )
    return rows


SUMMARY_NOTE = (
    f"Medians over the recovered trials (downtime) or the trials that returned to "
    f"90 % (99 %) of the pre-crash throughput in 0.1 s bins (time to 90 %, 99 %, "
    f"work lost: the service the crash cost until the return to 90 %, in seconds "
    f"at the pre-crash rate). 95 % CIs are distribution-free "
    f'order-statistic intervals for the median (harness/stats.py); "{NO_CI}" means '
    f"fewer than {stats.min_n()} values, with which no such interval reaches 95 %. "
    f"Lost MiB (2^20 bytes; run.json and trials.csv keep the bytes): the sum over "
    f"the verified trials, the per-trial median in brackets. Definitions: "
    f"{METRICS_DOC}."
)


RANKED = (
    ("lost_service", "Work lost (seconds of service)", "downtime"),
    ("downtime", "Downtime", None),
)


def ranking(summary: list[dict]) -> list[str]:
    """One line per ranked metric: the schemes from the lowest median to the highest (lower
    is better), an equal median broken by the next metric's (work lost, then downtime),
    so only schemes equal in both share a rank; those without a median (nothing
    recovered, never back to 90 %) last; then which neighbours the 95 % CIs separate, so
    that an order the data cannot support is not read as one. Empty with fewer than two
    schemes."""
    if len(summary) < 2:
        return []
    lines = []
    for key, name, then in RANKED:

        def order_key(s, key=key, then=then):
            return (s[key]["median"], _or_inf(s[then]["median"]) if then else 0)

        known = sorted((s for s in summary if s[key]["median"] is not None), key=order_key)
        order = [
            f"{_rank(known, order_key, i)}. {s['label']} {_at_least(s[key])}{s[key]['median']:.3f} s"
            for i, s in enumerate(known)
        ]
        order += [f"{s['label']} (no median)" for s in summary if s[key]["median"] is None]
        tie = f" (equal medians: by {then})" if then else ""
        lines.append(
            f"{name}, median, lower is better{tie}: {', '.join(order)}. "
            f"{_separation(known, key)}".rstrip()
        )
    return lines


def _at_least(ci: dict) -> str:
    """ "≥ " before a median that some lower bounds entered (docs/METRICS.md, lost_censored)."""
    return "≥ " if ci.get("censored") else ""


def _or_inf(v):
    return float("inf") if v is None else v


def _rank(known: list[dict], order_key, i: int) -> int:
    """Competition ranking: schemes equal in every key share the better rank (1, 1, 3)."""
    k = order_key(known[i])
    return next(j for j, s in enumerate(known) if order_key(s) == k) + 1


def _separation(known: list[dict], key: str) -> str:
    pairs = list(zip(known, known[1:]))
    if not pairs:
        return ""
    apart = [
        f"{a['label']} < {b['label']}"
        for a, b in pairs
        if a[key]["hi"] is not None
        and b[key]["lo"] is not None
        and not a[key].get("censored")  # a lower bound of the better one proves no order
        and a[key]["hi"] < b[key]["lo"]
    ]
    if apart:
        return f"Separated by disjoint 95 % CIs: {'; '.join(apart)}."
    if all(a[key]["hi"] is None or b[key]["lo"] is None for a, b in pairs):
        return f"No neighbours are separated: a 95 % CI needs {stats.min_n()} values a scheme."
    return "No neighbours are separated by disjoint 95 % CIs."


# --- the document, as blocks both renderers share ---------------------------------------------

CAPTIONS = {
    "throughput": "Completed operations per second around the crash (t = 0), mean over the "
    "trials of each scheme, in the recovery bins (0.1 s); bins the load did not "
    "run through whole are not drawn.",
    "cache-hits": "The page cache's hit ratio over time, from the kernel's own counters "
    "sampled during the run (0.5 s bins, mean over trials); no line during "
    "the outage, when no kernel answers.",
    "downtime": "Client-observed downtime per scheme: each recovered trial (open markers), "
    "the median (filled) and its 95 % CI (bar; none below "
    f"{stats.min_n()} trials), the numbers of the summary table.",
    "phases": "Recovery phases: the median seconds of each phase over the trials, then the "
    "clients' gap (from the scheme's end of outage to the first acknowledged "
    "request, median); hatched // : modeled hardware time. A stack is a sum of "
    "medians, not the median of the totals.",
}


def _blocks(run: dict, summary: list[dict], images: dict[str, dict]) -> list[tuple]:
    p = run["parameters"]
    b: list[tuple] = [("h1", f"crashbench run {run['run_id']}")]
    if results.incomplete_line(run):
        b.append(("alert", results.incomplete_line(run)))
    b += [
        (
            "p",
            f"Created {run['created']}. Workload {p['workload']}, fault "
            f"{p['fault']}, schemes {', '.join(p['schemes'])}, {p['trials']} "
            f"trials each, seed {p['seed']}.",
        )
    ]
    if p.get("modeled_hardware"):
        b.append(("p", modeled_line(p["modeled_hardware"])))
    rows = summary_rows(run)
    b += [
        ("h2", "Summary"),
        ("table", list(rows[0]) if rows else [], [list(r.values()) for r in rows]),
        ("p", SUMMARY_NOTE),
    ]
    ranked = ranking(summary)
    if ranked:
        b += [("h2", "Ranking")] + [("p", line) for line in ranked]
    b.append(("h2", "Plots"))
    for name, formats in images.items():
        b += [
            ("img", f"{name}.png", formats["png"], name),
            ("p", f"{CAPTIONS[name]} Also as {name}.svg and {name}.pdf."),
        ]
    b += [("h2", "Recovery phases (median seconds)"), _phase_table(summary)]
    b += [("h2", "Trials"), _trial_table(run)]
    procs = _process_table(run)
    if procs[2]:  # only a scheme that keeps processes reports their fates
        b += [("h2", "Processes of the crashed kernel"), procs]
    figs = scheme_figures(run)
    if figs:  # only a scheme with counts of its own (txipc_sim: requests rolled back, ...)
        b += [("h2", "Scheme figures"), ("pre", "\n".join(figs))]
    errs = [f"{t['id']}: {t['error']}" for t in run["trials"] if t.get("error")]
    if errs:
        b += [("h2", "Failed trials"), ("pre", "\n".join(errs))]
    found = verify_findings(run)
    if found:
        b += [("h2", "Verify findings"), ("pre", "\n".join(found))]
    b += [
        ("h2", "Parameters"),
        ("pre", json.dumps(p, indent=2)),
        ("h2", "Environment"),
        ("pre", json.dumps(run["environment"], indent=2)),
    ]
    return b


def scheme_figures(run: dict) -> list[str]:
    """One line per trial whose recovery report carries a scheme's own counts (``figures``)."""
    out = []
    for t in run["trials"]:
        figs = (t.get("report") or {}).get("figures")
        if figs:
            out.append(f"{t['id']}: " + ", ".join(f"{k} {v}" for k, v in figs.items()))
    return out


def verify_findings(run: dict) -> list[str]:
    """One line per finding of a trial's own checkers that failed its verify (a
    ``checks.<name>`` whose ``ok`` is false, e.g. pg_amcheck's): each finding as the
    checker named it, or the checker's figures when it names none."""
    out = []
    for t in run["trials"]:
        for name, c in (t.get("checks") or {}).items():
            if not (isinstance(c, dict) and c.get("ok") is False):
                continue
            found = c.get("findings") or [json.dumps({k: v for k, v in c.items() if k != "ok"})]
            out += [f"{t['id']}: {name}: {f}" for f in found]
    return out


def _phase_table(summary: list[dict]) -> tuple:
    names = phase_order(s["phases"] for s in summary)
    modeled = set().union(*(s["modeled"] for s in summary)) if summary else set()
    head = ["phase"] + [s["label"] for s in summary]
    rows = [
        [n + (" (modeled)" if n in modeled else "")] + [_fmt_s(s["phases"].get(n)) for s in summary]
        for n in names
    ]
    rows.append(
        [f"{plots.GAP} (first ack − scheme's outage end)"]
        + [_fmt_s(s["client_gap"]["median"]) for s in summary]
    )
    return ("table", head, rows)


def _fmt_s(v) -> str:
    return "—" if v is None else f"{v:.3f}"


def _trial_table(run: dict) -> tuple:
    head = [
        "trial",
        "seed",
        "recovered",
        "downtime s",
        "max s",
        "scheme outage s",
        "clients' gap s",
        "acked writes",
        "lost writes",
        "corrupted",
        "lost MiB",
        "pages recovered",
        "pages reused",
        "time to 90% s",
        "time to 99% s",
        "work lost ops",
        "work lost s",
        "p50/p99 before s",
        "p50/p99 after s",
        "hit ratio before/after",
    ]
    rows = [
        [
            t["id"],
            t["seed"],
            "yes" if t["recovered"] else "no",
            _fmt_s(t["downtime_s"]),
            _fmt_s(t["downtime_max_s"]),
            _fmt_s(t["outage_s"]),
            _fmt_s(t.get("client_gap_s")),
            _num(t["acked_writes"]),
            _num(t["lost_writes"]),
            _num(t["corrupted_writes"]),
            mib(t["lost_bytes"]),
            _num(t["cache"]["pages_recovered"]),
            _num(t["cache"].get("pages_reused")),
            _fmt_s(t["time_to_90pct_s"]),
            _fmt_s(t.get("time_to_99pct_s")),
            _fmt_n(t.get("lost_ops")),
            _fmt_s(t.get("lost_service_s")),
            _latency(t, "before"),
            _latency(t, "after"),
            _hit_ratios(t),
        ]
        for ts in groups(run).values()
        for t in ts
    ]
    return ("table", head, [[str(c) for c in r] for r in rows])


def _process_table(run: dict) -> tuple:
    """What became of each process of the crashed kernel (preserved, restarted, lost),
    with the scheme's reason, one row per process per trial."""
    head = ["trial", "process", "pid", "fate", "new pid", "reason"]
    rows = [
        [t["id"], p["name"], _pid(p["pid"]), p["fate"], _pid(p.get("new_pid")), p["reason"]]
        for ts in groups(run).values()
        for t in ts
        for p in (t.get("report") or {}).get("processes") or ()
    ]
    return ("table", head, [[str(c) for c in r] for r in rows])


def _pid(v) -> str:
    return "—" if v is None else str(v)


def _fmt_n(v) -> str:
    return "—" if v is None else f"{v:.1f}"


def _latency(t: dict, side: str) -> str:
    lat = (t.get("latency") or {}).get(side)
    if not lat or lat["p50_s"] is None:
        return "—"
    return f"{lat['p50_s']:.3f}/{lat['p99_s']:.3f}"


def _hit_ratios(t: dict) -> str:
    h = t.get("cache_hits")
    if not h:
        return "—"
    return "/".join("—" if h[k] is None else f"{h[k]:.2f}" for k in ("before", "after"))


def render_md(blocks: list[tuple]) -> str:
    out = []
    for b in blocks:
        kind = b[0]
        if kind in ("h1", "h2"):
            out.append(("#" if kind == "h1" else "##") + " " + b[1])
        elif kind == "p":
            out.append(b[1])
        elif kind == "alert":
            out.append(f"> **{b[1]}**")
        elif kind == "pre":
            out.append("```\n" + b[1] + "\n```")
        elif kind == "img":
            out.append(f"![{b[3]}]({b[1]})")
        elif kind == "table" and b[1]:
            cell = lambda c: str(c).replace("|", "\\|")  # noqa: E731
            lines = ["| " + " | ".join(cell(h) for h in b[1]) + " |", "|" + "---|" * len(b[1])]
            lines += ["| " + " | ".join(cell(c) for c in r) + " |" for r in b[2]]
            out.append("\n".join(lines))
    return "\n\n".join(out) + "\n"


_CSS = (
    "body{font-family:sans-serif;max-width:72em;margin:2em auto;padding:0 1em}"
    "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #bbb;"
    "padding:.25em .6em;text-align:right}td:first-child,th:first-child{text-align:left}"
    "img{max-width:100%}pre{background:#f4f4f4;padding:.6em;overflow:auto}"
    ".alert{background:#fde8e8;border-left:.4em solid #c00;padding:.6em}"
)


def render_html(blocks: list[tuple]) -> str:
    e = html.escape
    body = []
    for b in blocks:
        kind = b[0]
        if kind in ("h1", "h2", "p"):
            body.append(f"<{kind}>{e(b[1])}</{kind}>")
        elif kind == "alert":
            body.append(f'<p class="alert"><strong>{e(b[1])}</strong></p>')
        elif kind == "pre":
            body.append(f"<pre>{e(b[1])}</pre>")
        elif kind == "img":
            data = base64.b64encode(b[2]).decode("ascii")
            body.append(f'<img alt="{e(b[3])}" src="data:image/png;base64,{data}">')
        elif kind == "table" and b[1]:
            rows = "".join(
                "<tr>" + "".join(f"<td>{e(str(c))}</td>" for c in r) + "</tr>" for r in b[2]
            )
            head = "".join(f"<th>{e(str(h))}</th>" for h in b[1])
            body.append(f"<table><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>")
    title = e(blocks[0][1]) if blocks else "crashbench report"
    return (
        f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{title}'
        f"</title><style>{_CSS}</style></head><body>\n" + "\n".join(body) + "\n</body></html>\n"
    )


# --- writing ---------------------------------------------------------------------------------


def write_report(dir: str | Path) -> list[Path]:
    """Write report.md, report.html and each figure as PNG, SVG and PDF into a result
    directory; return their paths (report.md and report.html first). A ResultsError, and
    nothing written, when the directory's run.json is missing or invalid."""
    d = Path(dir)
    run = results.load_run(d)
    summary = summarize(run)
    gs = groups(run)
    trials_by_label = {s["label"]: gs[s["key"]] for s in summary}
    modeled = set().union(*(s["modeled"] for s in summary)) if summary else set()
    images = {
        "throughput": plots.throughput_timeline(summary, trials_by_label),
        "cache-hits": plots.hit_ratio_timeline(summary, trials_by_label),
        "downtime": plots.downtime_cis(summary, trials_by_label),
        "phases": plots.phase_breakdown(
            summary, phase_order(s["phases"] for s in summary), modeled
        ),
    }
    blocks = _blocks(run, summary, images)
    files = [
        results.write_atomic(d / "report.md", render_md(blocks)),
        results.write_atomic(d / "report.html", render_html(blocks)),
    ]
    files += [
        results.write_atomic(d / f"{name}.{fmt}", data)
        for name, formats in images.items()
        for fmt, data in formats.items()
    ]
    return files
