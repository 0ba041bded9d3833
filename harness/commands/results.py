"""CLI commands `report` and `compare`: reading result directories back.

Promises to users and to CI jobs: bad input (a missing directory, an unreadable or invalid
run.json, a threshold or alpha out of range) is refused with `crashbench: <what>` on stderr
and exit status 2 before anything is written; `compare` exits 1 when a metric got
significantly worse or a count regressed (fewer trials recovered, writes lost or corrupted,
a checker finding, where there were none) and 0 otherwise, printing its tables either way;
given two campaign directories it compares their coverage (harness/campaign/compare.py)
the same way. Both say so when a run is incomplete (stopped before its last trial); that
alone does not change the exit status. With --json each prints one JSON document on stdout
and nothing else (harness/commands/output.py); `report` also (re)writes trials.csv.
"""

from __future__ import annotations

import math
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from harness.commands.output import Output

console = Output()
err = Console(stderr=True, soft_wrap=True)
JSON_HELP = "print one JSON document on stdout (docs/RESULTS.md), messages on stderr"


def _fail(msg: str) -> None:
    err.print(f"crashbench: {msg}", markup=False, highlight=False)
    raise typer.Exit(2)


def _load(path: Path) -> dict:
    from harness.results import ResultsError, load_run

    try:
        return load_run(path)
    except ResultsError as e:
        _fail(str(e))


def summary_table(rows: list[dict], title: str) -> Table:
    t = Table(title=title)
    for i, k in enumerate(rows[0] if rows else []):
        t.add_column(k, justify="left" if i == 0 else "right")
    for r in rows:
        t.add_row(*(str(v) for v in r.values()))
    return t


def report_cmd(
    dir: Path = typer.Argument(..., help="a result directory (holding run.json)"),
    json_out: bool = typer.Option(False, "--json", help=JSON_HELP),
):
    """(Re)write report.md, report.html, the plots and trials.csv of a result directory and
    print its summary table."""
    from harness import report, results

    run = _load(dir)
    try:
        files = report.write_report(dir) + [results.write_csv(dir, run["trials"])]
    except OSError as e:
        _fail(f"{dir}: cannot write the report: {e}")
    if json_out:
        from harness.commands import output

        output.emit("report", output.summary_body(dir, run, files))
        return
    rows = report.summary_rows(run)
    if results.incomplete_line(run):
        console.print(results.incomplete_line(run), style="bold red", markup=False, highlight=False)
    console.print(summary_table(rows, f"{run['run_id']}: medians, 95 % CI in brackets"))
    console.print(report.SUMMARY_NOTE, style="dim", markup=False, highlight=False)
    for line in report.ranking(report.summarize(run)):
        console.print(line, markup=False, highlight=False)
    console.print(f"report: {files[0]}, {files[1]}")
    console.print(f"plots: {', '.join(str(f) for f in files[2:-1])}")
    console.print(f"per-trial figures: {files[-1]}")


def compare_cmd(
    old: Path = typer.Argument(..., help="the baseline result directory"),
    new: Path = typer.Argument(..., help="the result directory to judge"),
    threshold: float = typer.Option(
        0.10,
        help="relative change a verdict needs: "
        "worse only when the median ratio new/old "
        "exceeds 1 + THRESHOLD",
    ),
    alpha: float = typer.Option(
        0.05, help="significance level of the one-sided Mann-Whitney U test"
    ),
    json_out: bool = typer.Option(False, "--json", help=JSON_HELP),
):
    """Compare two runs per scheme and metric (median ratio and a one-sided Mann-Whitney U
    test) and per count (trials recovered, writes lost or corrupted, checker findings);
    exit 1 when a metric got significantly worse by more than THRESHOLD or a count
    regressed, whatever the number of trials."""
    if not (math.isfinite(threshold) and threshold > 0):
        _fail(f"--threshold: must be a positive fraction (0.10 = 10 %), got {threshold}")
    if not 0 < alpha < 1:
        _fail(f"--alpha: must be between 0 and 1, got {alpha}")
    from harness.campaign.store import CAMPAIGN_FILE

    campaigns = [(d / CAMPAIGN_FILE).exists() for d in (old, new)]
    if any(campaigns):
        if not all(campaigns):
            _fail(
                f"{old if not campaigns[0] else new}: not a campaign directory; a campaign "
                f"is compared with a campaign"
            )
        if json_out:
            _fail(
                "--json: two campaigns are compared as a table only; their campaign.json "
                "files are the documents"
            )
        _compare_campaigns(old, new)
    from harness.compare import compare

    result = compare(_load(old), _load(new), threshold, alpha)
    if json_out:
        from harness.commands import output

        output.emit("compare", output.compare_body(result, old, new))
        raise typer.Exit(result.exit_code)
    console.print(compare_table(result, old, new))
    console.print(counts_table(result))
    for n in result.notes:
        console.print(n, markup=False, highlight=False)
    for n in sorted({r.note for r in result.rows if r.verdict == "too few"}):
        console.print(f"note: {n}", style="yellow", markup=False, highlight=False)
    worse, regressed = result.worse, result.regressions
    for c in regressed:
        console.print(f"[red]regression[/] {c.scheme}/{c.workload}/{c.fault}: {c.note}")
    if worse:
        console.print(
            f"[red]{len(worse)} metric(s) worse[/] (p < {alpha:g} and ratio > {1 + threshold:g})"
        )
    if not worse and not regressed:
        console.print("no metric significantly worse, no count regressed")
    raise typer.Exit(result.exit_code)


def _compare_campaigns(old: Path, new: Path) -> None:
    from harness.campaign import compare, store, summary

    try:
        a, b = store.load(old), store.load(new)
    except store.CampaignError as e:
        _fail(str(e))
    result = compare.compare(a, b)
    t = Table(title=f"{old} → {new}: coverage, Wilson 95 % CI")
    for c in ("scheme", "fault", "old", "new", "corrupted old/new", "verdict", "why"):
        t.add_column(c)
    for r in result.rows:
        cov = lambda g: summary.pct(g["coverage"]) if g else "—"  # noqa: E731
        cor = lambda g: str(g["counts"]["corrupted"]) if g else "—"  # noqa: E731
        style = _STYLE[r.verdict]
        t.add_row(
            r.scheme,
            r.fault,
            cov(r.old),
            cov(r.new),
            f"{cor(r.old)}/{cor(r.new)}",
            f"[{style}]{r.verdict}[/]" if style else r.verdict,
            r.why,
        )
    console.print(t)
    worse = result.worse
    console.print(
        f"[red]{len(worse)} coverage row(s) worse[/]"
        if worse
        else "no coverage significantly worse, no new corruption"
    )
    raise typer.Exit(result.exit_code)


_STYLE = {"worse": "bold red", "better": "green", "same": "", "too few": "yellow", "n/a": "dim"}
_METRIC = {"downtime_s": "downtime s", "time_to_90pct_s": "time to 90% s", "lost_bytes": "lost MiB"}


def compare_table(result, old: Path, new: Path) -> Table:
    """One row per (scheme, workload, fault) and metric; workload and fault get columns
    only when the rows do not all share them (they are in the title then)."""
    kinds = {(r.workload, r.fault) for r in result.rows}
    title = f"{old} → {new}: threshold {result.threshold:g}, alpha {result.alpha:g}"
    if len(kinds) == 1:
        title += "; workload {}, fault {}".format(*next(iter(kinds)))
    t = Table(title=title)
    t.add_column("scheme", no_wrap=True)
    if len(kinds) > 1:
        t.add_column("workload")
        t.add_column("fault")
    t.add_column("metric", no_wrap=True)
    for c in ("n old/new", "median old", "median new", "ratio", "p worse"):
        t.add_column(c, justify="right")
    t.add_column("verdict", no_wrap=True)
    for r in result.rows:
        med = _mib if r.metric == "lost_bytes" else _g
        t.add_row(
            r.scheme,
            *((r.workload, r.fault) if len(kinds) > 1 else ()),
            _METRIC.get(r.metric, r.metric),
            f"{r.n_old}/{r.n_new}",
            med(r.median_old),
            med(r.median_new),
            _g(r.ratio, "{:.2f}"),
            _g(r.p_worse, "{:.3g}"),
            _verdict(r.verdict),
        )
    return t


_CHECK = {
    "recovered": "trials recovered",
    "lost_writes": "acked writes lost",
    "corrupted_writes": "acked writes corrupted",
}


def counts_table(result) -> Table:
    """One row per (scheme, workload, fault) and count, old and new: "2 of 3" trials, or
    "12 in 3 trials" for writes counted over the verified trials."""
    t = Table(title="counts that must not regress (judged at any number of trials)")
    for c in ("scheme", "workload", "fault", "count", "old", "new"):
        t.add_column(c, no_wrap=True, justify="right" if c in ("old", "new") else "left")
    t.add_column("verdict", no_wrap=True)
    for c in result.categorical:
        name = _CHECK.get(c.check, c.check.replace("checks.", "trials with a finding of "))
        fmt = "{count} in {of} trials" if c.check.endswith("_writes") else "{count} of {of}"
        t.add_row(
            c.scheme,
            c.workload,
            c.fault,
            name,
            fmt.format(**c.old),
            fmt.format(**c.new),
            _verdict(c.verdict),
        )
    return t


def _verdict(v: str) -> str:
    return f"[{_STYLE[v]}]{v}[/]" if _STYLE[v] else v


def _mib(v) -> str:
    from harness.report import mib

    return "∞" if v is not None and math.isinf(v) else mib(v)


def _g(v, fmt: str = "{:.4g}") -> str:
    if v is None:
        return "—"
    if math.isinf(v):
        return "∞"
    return f"{v:.0f}" if abs(v) >= 1000 else fmt.format(v)
