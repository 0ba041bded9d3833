"""The report's figures, sized for one column of a two-column paper and legible in greyscale.

Promises to harness/report.py: each figure is drawn from the numbers ``report.summarize``
computed and the trials' recorded figures (nothing recomputed here but per-bin means
across trials), and rendered as PNG (300 dpi), SVG (text kept as text) and PDF, all
WIDTH_IN wide; schemes differ by line style and marker and phases by hatch, never by
colour alone; a bin that is not ``full`` is never drawn; a figure with nothing to draw
says so in its axes instead of failing. Rendering uses the non-interactive Agg backend.
"""

from __future__ import annotations

import io

from harness import stats

WIDTH_IN = 3.5  # one column of a two-column paper
FORMATS = ("png", "svg", "pdf")
PNG_DPI = 300
STYLES = [
    ("-", "o"),
    ("--", "s"),
    (":", "^"),
    ("-.", "D"),
    ((0, (5, 1, 1, 1)), "v"),
    ((0, (1, 3)), "P"),
]
HATCHES = ["", "..", "\\\\\\", "||", "--", "++", "oo", "**", "OO", ".."]
MODELED_HATCH = "////"
GAP_HATCH = "xxx"
GAP = "clients' gap"
PRE_S = 2.0  # seconds before the crash the timelines show


def _plt(context: str = "paper", font_scale: float = 0.8):
    import matplotlib

    matplotlib.use("Agg")  # no display: reports are written on servers and in CI
    import matplotlib.pyplot as plt
    import seaborn as sns

    sns.set_theme(style="whitegrid", context=context, font_scale=font_scale)
    plt.rcParams.update({"svg.fonttype": "none", "pdf.fonttype": 42, "hatch.linewidth": 0.5})
    return plt, sns


def render(fig) -> dict[str, bytes]:
    """The figure in every format of FORMATS, without a date, so reruns give equal files."""
    import matplotlib.pyplot as plt

    out = {}
    meta = {"png": {}, "svg": {"Date": None}, "pdf": {"CreationDate": None}}
    for fmt in FORMATS:
        buf = io.BytesIO()
        fig.savefig(buf, format=fmt, dpi=PNG_DPI, bbox_inches="tight", metadata=meta[fmt])
        out[fmt] = buf.getvalue()
    plt.close(fig)
    return out


def png_only(fig, dpi: int = 110) -> bytes:
    """The figure as PNG alone (the overhead report's plot, which the HTML-less report.md
    links)."""
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


def _styles(summary: list[dict]) -> dict[str, dict]:
    _, sns = _plt()
    pal = sns.color_palette("colorblind", max(len(summary), 1))
    return {
        s["label"]: {
            "color": pal[i],
            "linestyle": STYLES[i % len(STYLES)][0],
            "marker": STYLES[i % len(STYLES)][1],
        }
        for i, s in enumerate(summary)
    }


def _empty(ax, text: str) -> None:
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes)


def _mean_by_bin(series: list[list[dict]], key: str, bin_s: float) -> tuple[list, list]:
    """(bin starts, mean of ``key`` over the trials whose bin is full and has a value)."""
    acc: dict[int, list[float]] = {}
    for bins in series:
        for b in bins:
            if b.get("full") and b.get(key) is not None:
                acc.setdefault(round(b["t"] / bin_s), []).append(b[key])
    ks = sorted(acc)
    return [k * bin_s for k in ks], [sum(acc[k]) / len(acc[k]) for k in ks]


def _timeline_bins(t: dict) -> tuple[list[dict], float]:
    """The finest throughput bins a trial has (run.json v1 has only the coarse ones)."""
    r = t.get("recovery")
    if r and r["bins"]:
        return r["bins"], r["bin_s"]
    return t["throughput"]["bins"], t["throughput"]["bin_s"]


def throughput_timeline(summary: list[dict], trials: dict[str, list[dict]]) -> dict[str, bytes]:
    plt, _ = _plt()
    fig, ax = plt.subplots(figsize=(WIDTH_IN, 2.3))
    st, drawn = _styles(summary), 0
    for s in summary:
        ts = [t for t in trials[s["label"]] if not t.get("error")]
        series = [_timeline_bins(t) for t in ts]
        if not series:
            continue
        bin_s = min(b for _, b in series)
        xs, ys = _mean_by_bin([bins for bins, b in series if b == bin_s], "ops_per_s", bin_s)
        keep = [(x, y) for x, y in zip(xs, ys) if x >= -PRE_S]
        if keep:
            drawn += 1
            ax.step(
                [x for x, _ in keep],
                [y for _, y in keep],
                where="post",
                linewidth=1.1,
                color=st[s["label"]]["color"],
                linestyle=st[s["label"]]["linestyle"],
                label=f"{s['label']} (mean of {len(series)})",
            )
    ax.axvline(0, color="black", linewidth=0.8)
    ax.annotate(
        "crash",
        (0, 1),
        xycoords=("data", "axes fraction"),
        xytext=(2, -8),
        textcoords="offset points",
        fontsize="small",
    )
    if not drawn:
        _empty(ax, "no throughput recorded")
    else:
        ax.legend(loc="lower right", fontsize="x-small", frameon=True)
    ax.set(xlabel="time from the crash (s)", ylabel="completed ops / s")
    ax.set_ylim(bottom=0)
    return render(fig)


def hit_ratio_timeline(summary: list[dict], trials: dict[str, list[dict]]) -> dict[str, bytes]:
    plt, _ = _plt()
    fig, ax = plt.subplots(figsize=(WIDTH_IN, 2.1))
    st = _styles(summary)
    drawn = 0
    for s in summary:
        hs = [
            t["cache_hits"]
            for t in trials[s["label"]]
            if t.get("cache_hits") and t["cache_hits"]["bins"]
        ]
        if not hs:
            continue
        xs, ys = _mean_by_bin([h["bins"] for h in hs], "ratio", hs[0]["bin_s"])
        keep = [(x, y) for x, y in zip(xs, ys) if x >= -PRE_S]
        if keep:
            drawn += 1
            ax.plot(
                [x + hs[0]["bin_s"] / 2 for x, _ in keep],
                [y for _, y in keep],
                markersize=2.5,
                linewidth=1,
                **st[s["label"]],
                label=f"{s['label']} (mean of {len(hs)})",
            )
    ax.axvline(0, color="black", linewidth=0.8)
    if not drawn:
        _empty(ax, "no kernel counter samples in this run")
    else:
        ax.legend(loc="lower right", fontsize="x-small", frameon=True)
    ax.set(xlabel="time from the crash (s)", ylabel="page-cache hit ratio", ylim=(0, 1.05))
    return render(fig)


def downtime_cis(summary: list[dict], trials: dict[str, list[dict]]) -> dict[str, bytes]:
    plt, _ = _plt()
    fig, ax = plt.subplots(figsize=(WIDTH_IN, 0.7 + 0.35 * max(len(summary), 1)))
    st = _styles(summary)
    for i, s in enumerate(summary):
        values = [
            t["downtime_s"]
            for t in trials[s["label"]]
            if t["recovered"] and t["downtime_s"] is not None
        ]
        c, d = st[s["label"]], s["downtime"]
        ax.plot(
            values,
            [i] * len(values),
            linestyle="none",
            marker=c["marker"],
            markersize=3,
            markerfacecolor="none",
            color=c["color"],
            alpha=0.8,
        )
        if d["median"] is None:
            ax.annotate("nothing recovered", (0, i), fontsize="x-small", va="center")
            continue
        lo, hi = (d["lo"], d["hi"]) if d["lo"] is not None else (d["median"], d["median"])
        ax.errorbar(
            [d["median"]],
            [i],
            xerr=[[d["median"] - lo], [hi - d["median"]]],
            marker=c["marker"],
            color="black",
            markersize=5,
            capsize=3,
            linewidth=1,
        )
        if d["lo"] is None:
            ax.annotate(
                f" no CI (n={d['n']})",
                (d["median"], i),
                xytext=(4, 4),
                textcoords="offset points",
                fontsize="x-small",
            )
    ax.set_yticks(range(len(summary)), [s["label"] for s in summary])
    ax.set_ylim(len(summary) - 0.5, -0.5)
    if not summary:
        _empty(ax, "no trials")
    ax.set_xlim(left=0)
    ax.set(xlabel=f"client-observed downtime (s): median, 95 % CI (n ≥ {stats.min_n()}), trials")
    return render(fig)


def phase_breakdown(summary: list[dict], names: list[str], modeled: set[str]) -> dict[str, bytes]:
    """Stacked median phases per scheme, then the clients' gap (its median, 0 when the
    clients were served before the scheme's own end of outage)."""
    plt, sns = _plt()
    fig, ax = plt.subplots(figsize=(WIDTH_IN, 1.3 + 0.35 * max(len(summary), 1)))
    segs = names + [GAP]
    greys = sns.color_palette("Greys", len(segs) + 1)[1:]
    labels = [s["label"] for s in summary]
    left = [0.0] * len(summary)
    for j, n in enumerate(segs):
        widths = [
            max(0.0, s["client_gap"]["median"] or 0.0) if n == GAP else s["phases"].get(n) or 0.0
            for s in summary
        ]
        hatch = (
            GAP_HATCH if n == GAP else MODELED_HATCH if n in modeled else HATCHES[j % len(HATCHES)]
        )
        ax.barh(
            labels,
            widths,
            left=left,
            color=greys[j],
            edgecolor="black",
            linewidth=0.4,
            hatch=hatch,
            label=n + (" (modeled)" if n in modeled else ""),
        )
        left = [a + w for a, w in zip(left, widths)]
    for i, total in enumerate(left):
        if total:
            ax.text(total, i, f" {total:.3f}", va="center", fontsize="x-small")
    if not names and not any(left):
        _empty(ax, "no recovery phases reported")
    else:
        ax.legend(
            loc="upper center",
            bbox_to_anchor=(0.5, -0.25 - 0.03 * len(summary)),
            ncol=2,
            fontsize="x-small",
            frameon=False,
        )
    ax.invert_yaxis()
    ax.set(xlabel="seconds (medians; hatched //: modeled)")
    return render(fig)
