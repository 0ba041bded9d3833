"""report.md and overhead.png of a `crashbench overhead` run, from its overhead.json.

Promises to the CLI (and to whoever rewrites a report from a kept overhead.json): the
tables show every figure of the document's "figures" with its 95 % interval, or says
there is none; the CPU tables say which roles are a scheme's machinery and how a VMM
running inline is told from the kernel; the plot's error bars are the same intervals.
"""

from __future__ import annotations

from pathlib import Path

from harness import cpuuse, results, stats
from harness.overhead import VANILLA


def _fmt(c: dict, scale: float = 1.0, digits: int = 2) -> str:
    if c is None or c.get("mean") is None:
        return "-"
    m = f"{c['mean'] * scale:.{digits}f}"
    if c["lo"] is None:
        return f"{m} (no CI, n={c['n']})"
    return f"{m} [{c['lo'] * scale:.{digits}f}, {c['hi'] * scale:.{digits}f}]"


def _warmups(p: dict) -> str:
    """'2 s' or '2 s (files), 15 s (postgres)': results before per-workload warm-ups have one."""
    per = p.get("warmup_s") or {}
    if len(set(per.values())) <= 1:
        return f"{next(iter(per.values()), p['timing']['warmup_s']):g} s"
    return ", ".join(f"{s:g} s ({w})" for w, s in per.items())


def report_md(doc: dict) -> str:
    p = doc["parameters"]
    lines = [
        f"# Steady-state overhead — {doc['run_id']}",
        "",
        f"Schemes {', '.join([VANILLA, *p['schemes']])}; workloads "
        f"{', '.join(p['workloads']) or '-'}; {p['rounds']} round(s) of "
        f"{p['timing']['steady_s']:g} s steady state after {_warmups(p)} of "
        f"warm-up; {p['micro_ops']} micro-operations of each kind per round. Means over "
        "rounds with 95 % bootstrap intervals (harness.stats; none below "
        f"{stats.min_n()} rounds); ratios are scheme / vanilla of the same round. "
        'Definitions: docs/METRICS.md, "Steady state".',
        "",
    ]
    for w, per in doc["figures"]["workloads"].items():
        lines += [
            f"## Workload `{w}`",
            "",
            "| scheme | rounds | throughput (ops/s) | overhead (%) | p50 (ms) | p95 (ms) "
            "| p99 (ms) | p99 ratio |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for s, e in per.items():
            lines.append(
                f"| {s} | {e['rounds']} | {_fmt(e['throughput_ops_s'], 1, 1)} | "
                f"{_fmt(e['overhead_pct'], 1, 1)} | "
                f"{_fmt(e['latency_p50_s'], 1e3)} | {_fmt(e['latency_p95_s'], 1e3)} | "
                f"{_fmt(e['latency_p99_s'], 1e3)} | "
                f"{_fmt(e['ratio_to_vanilla']['latency_p99_s'], 1, 3)} |"
            )
        lines.append("")
    if doc["figures"]["micro"]:
        lines += [
            "## FS micro-operations through the mount",
            "",
            "Median time of one operation per round, then the mean over rounds.",
            "",
            "| operation | scheme | median (µs) | ratio to vanilla | overhead (%) |",
            "|---|---|---|---|---|",
        ]
        for op, per in doc["figures"]["micro"].items():
            for s, e in per.items():
                lines.append(
                    f"| {op} | {s} | {_fmt(e['median_s'], 1e6, 1)} | "
                    f"{_fmt(e['ratio_to_vanilla'], 1, 3)} | "
                    f"{_fmt(e['overhead_pct'], 1, 1)} |"
                )
        lines.append("")
    lines += cpu_md(doc["figures"])
    lines += [
        "## Resources each scheme reserves",
        "",
        "| scheme | cores | memory | what |",
        "|---|---|---|---|",
    ]
    for s, r in doc["resources"].items():
        mem = "-" if r["memory_bytes"] is None else f"{r['memory_bytes'] / 2**20:.1f} MiB"
        lines.append(f"| {s} | {r['cores']} | {mem} | {r.get('what', '')} |")
    errors = [r for r in doc["runs"] if r.get("error")]
    if errors:
        lines += ["", "## Failed runs", ""] + [f"- {r['id']}: {r['error']}" for r in errors]
    lines += [
        "",
        "![overhead per scheme](overhead.png)",
        "",
        "pyperf suites: "
        + ", ".join(f"`{f}`" for f in doc["pyperf"].values())
        + f" (`python -m pyperf compare_to {VANILLA}.pyperf.json <scheme>.pyperf.json`).",
        "",
    ]
    return "\n".join(lines)


def cpu_md(figs: dict) -> list[str]:
    """Tables of CPU by role (harness/cpuuse.py): cores kept busy per role during the
    steady state (and during the micro-operations), and the machinery's share of the
    active partition's CPU time."""
    tables = [(f"steady state of `{w}`", per) for w, per in figs["workloads"].items()]
    if figs.get("micro_cpu"):
        tables.append(
            ("the micro-operations (no clients: the driver times them)", figs["micro_cpu"])
        )
    tables = [(t, per) for t, per in tables if any("cpu_cores" in e for e in per.values())]
    if not tables:
        return []
    lines = [
        "## CPU by role",
        "",
        "Cores kept busy (CPU-seconds per second, from the scheduler's per-thread "
        "accounting) by each role. The scheme's machinery is "
        f"{', '.join(cpuuse.MACHINERY)}; its share is ({' + '.join(cpuuse.ON_ACTIVE)}) / ("
        f"{' + '.join(cpuuse.ACTIVE)}), the part of the active partition's CPU time it "
        "took there. The VMM's figure is the wall time its entry points counted (an "
        "upper bound), taken out of the kernel's. Definitions: docs/METRICS.md, "
        '"CPU by role".',
        "",
    ]
    head = " | ".join(cpuuse.ROLES)
    for title, per in tables:
        lines += [
            f"During {title}:",
            "",
            f"| scheme | {head} | machinery share (%) |",
            "|---" * (len(cpuuse.ROLES) + 2) + "|",
        ]
        for s, e in per.items():
            if "cpu_cores" not in e:
                continue
            cells = " | ".join(_fmt(e["cpu_cores"][r], 1, 3) for r in cpuuse.ROLES)
            lines.append(f"| {s} | {cells} | {_fmt(e['machinery_share_pct'], 1, 2)} |")
        lines.append("")
    return lines


def plot(doc: dict) -> bytes:
    """Overhead in percent per scheme (vanilla is 0 by definition), one bar per measure,
    error bars the 95 % intervals of overhead.json (drawn only where one exists)."""
    from harness.plots import _plt, png_only

    plt, sns = _plt("notebook", 1.0)
    rows = []
    for w, per in doc["figures"]["workloads"].items():
        for s, e in per.items():
            if s != VANILLA:
                rows.append((s, f"{w} throughput", e["overhead_pct"]))
    for op, per in doc["figures"]["micro"].items():
        for s, e in per.items():
            if s != VANILLA:
                rows.append((s, op, e["overhead_pct"]))
    rows = [r for r in rows if r[2]["mean"] is not None]
    fig, ax = plt.subplots(figsize=(8, 4))
    if rows:
        schemes = list(dict.fromkeys(r[0] for r in rows))
        measures = list(dict.fromkeys(r[1] for r in rows))
        data = {
            "scheme": [r[0] for r in rows],
            "measure": [r[1] for r in rows],
            "overhead": [r[2]["mean"] for r in rows],
        }
        sns.barplot(
            data=data,
            x="scheme",
            y="overhead",
            hue="measure",
            order=schemes,
            hue_order=measures,
            errorbar=None,
            ax=ax,
            palette="colorblind",
        )
        for patch_group, m in zip(ax.containers, measures):
            for bar, s in zip(patch_group, schemes):
                c = next((r[2] for r in rows if r[0] == s and r[1] == m), None)
                if c is None or c["lo"] is None:
                    continue
                x = bar.get_x() + bar.get_width() / 2
                ax.errorbar(
                    x,
                    c["mean"],
                    yerr=[[c["mean"] - c["lo"]], [c["hi"] - c["mean"]]],
                    fmt="none",
                    ecolor="black",
                    capsize=3,
                    linewidth=1,
                )
        ax.axhline(0, color="black", linewidth=0.8)
        ax.legend(title=None, fontsize="small")
    ax.set_xlabel("")
    ax.set_ylabel("overhead vs vanilla (%)")
    ax.set_title(f"steady-state overhead (95 % CI where ≥ {stats.min_n()} rounds)")
    return png_only(fig)


def write_report(d: Path, doc: dict) -> list[Path]:
    md = report_md(doc)
    png = plot(doc)
    return [
        results.write_atomic(d / "report.md", md),
        results.write_atomic(d / "overhead.png", png),
    ]
