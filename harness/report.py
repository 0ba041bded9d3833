"""The report of a result directory: report.md, a self-contained report.html and PNG plots.

Promises to the CLI and to readers: everything comes from run.json (validated by
harness.results) and nothing else; every median and interval is computed once, in
``summarize`` through harness.stats, and the tables and the plots draw those same numbers;
phases that are modeled hardware time are labelled "(modeled)" wherever they appear; an
incomplete run (stopped before its last trial) says so above everything else;
report.html embeds its images and loads nothing. The files are rendered in memory first
and each is replaced atomically, so an invalid run writes nothing.
"""
from __future__ import annotations

import base64
import html
import json
from pathlib import Path

from harness import results, stats

METRICS_DOC = "docs/METRICS.md"
NO_CI = "no CI"


# --- the numbers -----------------------------------------------------------------------------

def groups(run: dict) -> dict[tuple[str, str, str], list[dict]]:
    """Trials by (scheme, workload, fault), schemes in the order the run named them."""
    order = {s: i for i, s in enumerate(run["parameters"].get("schemes", []))}
    out: dict[tuple[str, str, str], list[dict]] = {}
    for t in sorted(run["trials"], key=lambda t: (order.get(t["scheme"], len(order)),
                                                   t["scheme"], t["trial"])):
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
        pages = [t["cache"]["pages_recovered"] for t in ok
                 if t["cache"]["pages_recovered"] is not None]
        out.append({
            "key": (scheme, workload, fault),
            "label": scheme if one_kind else f"{scheme}/{workload}/{fault}",
            "trials": len(ts), "failed": len(ts) - len(ok),
            "recovered": sum(1 for t in ok if t["recovered"]),
            "downtime": _ci(down), "time_to_90pct": _ci(t90),
            "lost_bytes_total": sum(lost) if lost else None,
            "lost_bytes_median": stats.median_ci(lost)[0], "unverified": len(ok) - len(lost),
            "pages_recovered_median": stats.median_ci(pages)[0],
            "phases": _phase_medians(ok), "modeled": _modeled(ok)})
    return out


def _ci(values: list[float]) -> dict:
    median, lo, hi = stats.median_ci(values)
    return {"median": median, "lo": lo, "hi": hi, "n": len(values)}


def _phase_medians(trials: list[dict]) -> dict[str, float]:
    """Median seconds of each phase over the trials whose report has that phase."""
    names = phase_order(list(t["phases"]) for t in trials)
    return {n: stats.median_ci([t["phases"][n] for t in trials if n in t["phases"]])[0]
            for n in names}


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
    m = f"{c['median']:.{digits}f}"
    if c["lo"] is None:
        return f"{m} ({NO_CI}: n={c['n']})"
    return f"{m} [{c['lo']:.{digits}f}, {c['hi']:.{digits}f}]"


def modeled_line(hw: dict) -> str:
    """The machine's modeled hardware time (run.json ``parameters.modeled_hardware``), in
    one line that says it is modeled."""
    parts = [f"{name}: {d['model']}, {d['latency_s'] * 1e6:g} µs per request + "
             + (f"{d['bandwidth_bytes_s'] / 1e6:g} MB/s" if d["bandwidth_bytes_s"] else
                "unlimited bandwidth") + " (modeled)" for name, d in hw["disks"].items()]
    r = hw.get("reboot")
    if r:
        parts.append(f"reboot: firmware/POST {r['firmware_s']:g} s + kernel boot "
                     f"{r['kernel_boot_s']:g} s (modeled; {r['description']})")
    return "Modeled hardware time — " + "; ".join(parts) + "."


def _num(v) -> str:
    return "—" if v is None else f"{v:g}"


def _whole(v) -> str:
    """A byte count, never in exponent notation (a median of two counts may end in .5)."""
    return "—" if v is None else f"{v:.0f}" if v == int(v) else f"{v:.1f}"


def summary_rows(run: dict) -> list[dict]:
    """The summary table as display strings, one row per (scheme, workload, fault); the
    CLI, report.md and report.html print exactly these."""
    rows = []
    for s in summarize(run):
        lost = "— (unverified)" if s["lost_bytes_total"] is None else \
            f"{s['lost_bytes_total']} ({_whole(s['lost_bytes_median'])})"
        if s["unverified"] and s["lost_bytes_total"] is not None:
            lost += f", {s['unverified']} unverified"
        rows.append({
            "scheme": s["label"],
            "trials": f"{s['trials']}" + (f" ({s['failed']} failed)" if s["failed"] else ""),
            "recovered": f"{s['recovered']}/{s['trials']}",
            "downtime s: median [95% CI]": fmt_ci(s["downtime"]),
            "time to 90% s: median [95% CI]": fmt_ci(s["time_to_90pct"]),
            "lost bytes: total (median)": lost,
            "pages recovered: median": _num(s["pages_recovered_median"])})
    return rows


SUMMARY_NOTE = (f"Medians over the recovered trials (downtime) or the trials that returned to "
                f"90 % of the pre-crash throughput (time to 90 %). 95 % CIs are distribution-free "
                f"order-statistic intervals for the median (harness/stats.py); \"{NO_CI}\" means "
                f"fewer than {stats.min_n()} values, with which no such interval reaches 95 %. "
                f"Lost bytes: the sum over the verified trials, the per-trial median in "
                f"brackets. Definitions: {METRICS_DOC}.")


RANKED = (("downtime", "Downtime"), ("time_to_90pct", "Time to 90 %"))


def ranking(summary: list[dict]) -> list[str]:
    """One line per ranked metric: the schemes from the lowest median to the highest (lower
    is better; equal medians share a rank), those without a median (nothing recovered, never back to 90 %) last; then
    which neighbours the 95 % CIs separate, so that an order the data cannot support is not
    read as one. Empty with fewer than two schemes."""
    if len(summary) < 2:
        return []
    lines = []
    for key, name in RANKED:
        known = sorted((s for s in summary if s[key]["median"] is not None),
                       key=lambda s: s[key]["median"])
        order = [f"{_rank(known, key, i)}. {s['label']} {s[key]['median']:.3f} s"
                 for i, s in enumerate(known)]
        order += [f"{s['label']} (no median)" for s in summary if s[key]["median"] is None]
        lines.append(f"{name}, median, lower is better: {', '.join(order)}. "
                     f"{_separation(known, key)}")
    return lines


def _rank(known: list[dict], key: str, i: int) -> int:
    """Competition ranking: equal medians share the better rank (1, 1, 3)."""
    m = known[i][key]["median"]
    return next(j for j, s in enumerate(known) if s[key]["median"] == m) + 1


def _separation(known: list[dict], key: str) -> str:
    pairs = list(zip(known, known[1:]))
    if not pairs:
        return ""
    apart = [f"{a['label']} < {b['label']}" for a, b in pairs
             if a[key]["hi"] is not None and b[key]["lo"] is not None
             and a[key]["hi"] < b[key]["lo"]]
    if apart:
        return f"Separated by disjoint 95 % CIs: {'; '.join(apart)}."
    if all(a[key]["hi"] is None or b[key]["lo"] is None for a, b in pairs):
        return (f"No neighbours are separated: a 95 % CI needs {stats.min_n()} values "
                f"a scheme.")
    return "No neighbours are separated by disjoint 95 % CIs."


# --- the document, as blocks both renderers share ---------------------------------------------

def _blocks(run: dict, summary: list[dict], images: dict[str, bytes]) -> list[tuple]:
    p = run["parameters"]
    b: list[tuple] = [("h1", f"crashbench run {run['run_id']}")]
    if results.incomplete_line(run):
        b.append(("alert", results.incomplete_line(run)))
    b += [("p", f"Created {run['created']}. Workload {p['workload']}, fault "
                            f"{p['fault']}, schemes {', '.join(p['schemes'])}, {p['trials']} "
                            f"trials each, seed {p['seed']}.")]
    if p.get("modeled_hardware"):
        b.append(("p", modeled_line(p["modeled_hardware"])))
    rows = summary_rows(run)
    b += [("h2", "Summary"), ("table", list(rows[0]) if rows else [],
                              [list(r.values()) for r in rows]), ("p", SUMMARY_NOTE)]
    ranked = ranking(summary)
    if ranked:
        b += [("h2", "Ranking")] + [("p", line) for line in ranked]
    captions = {
        "downtime-ecdf.png": "Client-observed downtime, ECDF per scheme over the recovered "
                             "trials; dashed line: the median, band: its 95 % CI (as in the table).",
        "throughput.png": "Completed operations per second relative to the crash (t = 0): "
                          "each trial faint, the mean over trials bold; dashed: each scheme's "
                          "median downtime.",
        "phases.png": "Recovery phases: the median seconds of each phase over the trials; "
                      "hatched phases are modeled hardware time. A stack is a sum of medians, "
                      "not the median of the totals."}
    b.append(("h2", "Plots"))
    for name, png in images.items():
        b += [("img", name, png, name.removesuffix(".png")), ("p", captions[name])]
    b += [("h2", "Recovery phases (median seconds)"), _phase_table(summary)]
    b += [("h2", "Trials"), _trial_table(run)]
    errs = [f"{t['id']}: {t['error']}" for t in run["trials"] if t.get("error")]
    if errs:
        b += [("h2", "Failed trials"), ("pre", "\n".join(errs))]
    b += [("h2", "Parameters"), ("pre", json.dumps(p, indent=2)),
          ("h2", "Environment"), ("pre", json.dumps(run["environment"], indent=2))]
    return b


def _phase_table(summary: list[dict]) -> tuple:
    names = phase_order(s["phases"] for s in summary)
    modeled = set().union(*(s["modeled"] for s in summary)) if summary else set()
    head = ["phase"] + [s["label"] for s in summary]
    rows = [[n + (" (modeled)" if n in modeled else "")]
            + [_fmt_s(s["phases"].get(n)) for s in summary] for n in names]
    return ("table", head, rows)


def _fmt_s(v) -> str:
    return "—" if v is None else f"{v:.3f}"


def _trial_table(run: dict) -> tuple:
    head = ["trial", "seed", "recovered", "downtime s", "max s", "scheme outage s",
            "acked writes", "lost writes", "corrupted", "lost bytes", "pages recovered",
            "pages reused", "time to 90% s"]
    rows = [[t["id"], t["seed"], "yes" if t["recovered"] else "no", _fmt_s(t["downtime_s"]),
             _fmt_s(t["downtime_max_s"]), _fmt_s(t["outage_s"]), _num(t["acked_writes"]),
             _num(t["lost_writes"]), _num(t["corrupted_writes"]), _num(t["lost_bytes"]),
             _num(t["cache"]["pages_recovered"]), _num(t["cache"].get("pages_reused")),
             _fmt_s(t["time_to_90pct_s"])]
            for ts in groups(run).values() for t in ts]
    return ("table", head, [[str(c) for c in r] for r in rows])


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
            cell = lambda c: str(c).replace("|", "\\|")     # noqa: E731
            lines = ["| " + " | ".join(cell(h) for h in b[1]) + " |",
                     "|" + "---|" * len(b[1])]
            lines += ["| " + " | ".join(cell(c) for c in r) + " |" for r in b[2]]
            out.append("\n".join(lines))
    return "\n\n".join(out) + "\n"


_CSS = ("body{font-family:sans-serif;max-width:72em;margin:2em auto;padding:0 1em}"
        "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #bbb;"
        "padding:.25em .6em;text-align:right}td:first-child,th:first-child{text-align:left}"
        "img{max-width:100%}pre{background:#f4f4f4;padding:.6em;overflow:auto}"
        ".alert{background:#fde8e8;border-left:.4em solid #c00;padding:.6em}")


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
            rows = "".join("<tr>" + "".join(f"<td>{e(str(c))}</td>" for c in r) + "</tr>"
                           for r in b[2])
            head = "".join(f"<th>{e(str(h))}</th>" for h in b[1])
            body.append(f"<table><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>")
    title = e(blocks[0][1]) if blocks else "crashbench report"
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{title}'
            f"</title><style>{_CSS}</style></head><body>\n" + "\n".join(body)
            + "\n</body></html>\n")


# --- plots (seaborn, rendered to PNG bytes with the non-interactive Agg backend) -------------

def _plt():
    import matplotlib
    matplotlib.use("Agg")         # no display: reports are written on servers and in CI
    import matplotlib.pyplot as plt
    import seaborn as sns
    sns.set_theme(style="whitegrid", context="notebook")
    return plt, sns


def _png(fig) -> bytes:
    import io
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    fig.clf()
    import matplotlib.pyplot as plt
    plt.close(fig)
    return buf.getvalue()


def _colors(summary: list[dict]) -> dict[str, tuple]:
    _, sns = _plt()
    pal = sns.color_palette("colorblind", max(len(summary), 1))
    return {s["label"]: pal[i] for i, s in enumerate(summary)}


def downtime_ecdf(summary: list[dict], trials: dict[str, list[dict]]) -> bytes:
    plt, sns = _plt()
    fig, ax = plt.subplots(figsize=(7, 4))
    colors = _colors(summary)
    for s in summary:
        c, values = colors[s["label"]], [t["downtime_s"] for t in trials[s["label"]]
                                         if t["recovered"] and t["downtime_s"] is not None]
        if not values:
            continue
        sns.ecdfplot(x=values, ax=ax, color=c, linewidth=2,
                     label=f"{s['label']} ({s['recovered']}/{s['trials']} recovered)")
        d = s["downtime"]
        ax.axvline(d["median"], color=c, linestyle="--", linewidth=1)
        if d["lo"] is not None:
            ax.axvspan(d["lo"], d["hi"], color=c, alpha=0.15, linewidth=0)
    if not ax.lines:
        ax.text(0.5, 0.5, "no recovered trials", ha="center", transform=ax.transAxes)
    else:
        ax.legend(loc="lower right")
    ax.set(xlabel="client-observed downtime (s)", ylabel="fraction of recovered trials",
           title=f"Downtime per scheme (dashed: median; band: 95 % CI, n ≥ {stats.min_n()})")
    return _png(fig)


def throughput_timeline(summary: list[dict], trials: dict[str, list[dict]]) -> bytes:
    plt, _ = _plt()
    fig, ax = plt.subplots(figsize=(8, 4))
    colors = _colors(summary)
    for s in summary:
        c, by_t, n = colors[s["label"]], {}, 0
        for t in trials[s["label"]]:
            tp = t["throughput"]
            xs, ys = _steps(tp["bins"], tp["bin_s"])
            if xs:
                n += 1
                ax.plot(xs, ys, drawstyle="steps-post", color=c, alpha=0.25, linewidth=0.8)
            for b in tp["bins"]:
                by_t.setdefault(b["t"], []).append(b["ops_per_s"])
        if by_t:
            mean = [{"t": k, "ops_per_s": sum(v) / len(v)} for k, v in sorted(by_t.items())]
            xs, ys = _steps(mean, trials[s["label"]][0]["throughput"]["bin_s"])
            ax.plot(xs, ys, drawstyle="steps-post", color=c, linewidth=2.2,
                    label=f"{s['label']} (mean of {n} trials)")
        if s["downtime"]["median"] is not None:
            ax.axvline(s["downtime"]["median"], color=c, linestyle="--", linewidth=1.2,
                       label=f"{s['label']} back: median downtime {s['downtime']['median']:.3f} s"
                       + (f" ({s['recovered']}/{s['trials']} recovered)"
                          if s["recovered"] < s["trials"] else ""))
    ax.axvline(0, color="black", linewidth=1.5, label="crash")
    ax.set(xlabel="time relative to the crash (s)", ylabel="completed operations / s",
           title="Throughput around the crash")
    ax.set_ylim(bottom=0)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1), fontsize="small")
    return _png(fig)


def _steps(bins: list[dict], bin_s: float) -> tuple[list[float], list[float]]:
    """Bin starts plus the last bin's end, so a step plot shows every bin's full width."""
    if not bins:
        return [], []
    xs = [b["t"] for b in bins] + [bins[-1]["t"] + bin_s]
    ys = [b["ops_per_s"] for b in bins] + [bins[-1]["ops_per_s"]]
    return xs, ys


def phase_breakdown(summary: list[dict]) -> bytes:
    plt, sns = _plt()
    fig, ax = plt.subplots(figsize=(8, 1.2 + 0.7 * max(len(summary), 1)))
    names = phase_order(s["phases"] for s in summary)
    modeled = set().union(*(s["modeled"] for s in summary)) if summary else set()
    pal = dict(zip(names, sns.color_palette("Set2" if len(names) <= 8 else "tab20",
                                            max(len(names), 1))))
    labels = [s["label"] for s in summary]
    left = [0.0] * len(summary)
    for n in names:
        widths = [s["phases"].get(n) or 0.0 for s in summary]
        ax.barh(labels, widths, left=left, color=pal[n], edgecolor="black", linewidth=0.5,
                hatch="//" if n in modeled else None,
                label=n + (" (modeled)" if n in modeled else ""))
        left = [a + w for a, w in zip(left, widths)]
    for i, total in enumerate(left):
        if total:
            ax.text(total, i, f" {total:.3f} s", va="center", fontsize="small")
    if not names:
        ax.text(0.5, 0.5, "no recovery phases reported", ha="center", transform=ax.transAxes)
    else:
        ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.35 if len(summary) < 3 else -0.2),
                  ncol=4, fontsize="small")
    ax.invert_yaxis()
    ax.set(xlabel="seconds (median of each phase; hatched: modeled hardware time)",
           title="Recovery phases per scheme")
    return _png(fig)


# --- writing ---------------------------------------------------------------------------------

def write_report(dir: str | Path) -> list[Path]:
    """Write report.md, report.html and the PNGs of a result directory; return their paths
    (report.md and report.html first). A ResultsError, and nothing written, when the
    directory's run.json is missing or invalid."""
    d = Path(dir)
    run = results.load_run(d)
    summary = summarize(run)
    gs = groups(run)
    trials_by_label = {s["label"]: gs[s["key"]] for s in summary}
    images = {"downtime-ecdf.png": downtime_ecdf(summary, trials_by_label),
              "throughput.png": throughput_timeline(summary, trials_by_label),
              "phases.png": phase_breakdown(summary)}
    blocks = _blocks(run, summary, images)
    files = [results.write_atomic(d / "report.md", render_md(blocks)),
             results.write_atomic(d / "report.html", render_html(blocks))]
    files += [results.write_atomic(d / name, png) for name, png in images.items()]
    return files
