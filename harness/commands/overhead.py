"""CLI command `overhead`: what each scheme costs while nothing fails (harness/overhead.py)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Optional

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from harness.commands.run import (
    JSON_HELP,
    _fail,
    catalogue,
    check_names,
    check_out,
    check_params,
    check_root,
    console,
    err,
)


def _workload_params(pairs: list[str], workloads: list[str]) -> dict[str, dict]:
    """``NAME=VALUE`` for every workload named, ``WORKLOAD.NAME=VALUE`` for one."""
    from harness.commands.run import _params

    out: dict[str, dict] = {w: {} for w in workloads}
    for p in pairs:
        k, sep, v = p.partition("=")
        w, dot, name = k.partition(".")
        if not sep or not k or (dot and not name):
            _fail(f"--param {p!r}: expected NAME=VALUE or WORKLOAD.NAME=VALUE")
        if dot and w not in out:
            _fail(f"--param {p!r}: workload {w!r} is not among --workloads {','.join(workloads)}")
        parsed = _params([f"{name if dot else k}={v}"])
        for target in [w] if dot else workloads:
            out[target].update(parsed)
    return out


def _check(
    schemes: list[str],
    workloads: list[str],
    rounds: int,
    duration: float,
    warmup: float | None,
    micro_ops: int,
    params: dict[str, dict],
    warmup_runs: int,
) -> None:
    """Every name and number checked before anything is created."""
    from harness.overhead import VANILLA

    cat = catalogue()
    if VANILLA in schemes:
        _fail(f"--schemes: {VANILLA} is always run (it is the baseline); name the others")
    check_names("schemes", "scheme", schemes, cat["schemes"])
    check_names("workloads", "workload", workloads, [w for w in cat["workloads"] if w != "idle"])
    if not workloads and micro_ops == 0:
        _fail("--workloads is empty and --micro-ops is 0: nothing to measure")
    if rounds <= 0:
        _fail(f"--rounds: must be a positive number of rounds, got {rounds}")
    if not (math.isfinite(duration) and duration > 0):
        _fail(f"--duration: must be a finite positive number of seconds, got {duration}")
    if warmup is not None and not (math.isfinite(warmup) and warmup >= 0):
        _fail(f"--warmup: must be a finite number of seconds, not negative, got {warmup}")
    if micro_ops < 0:
        _fail(f"--micro-ops: must not be negative, got {micro_ops}")
    if warmup_runs < 0:
        _fail(f"--warmup-runs: must not be negative, got {warmup_runs}")
    for w, p in params.items():
        check_params(w, p)
    check_root("overhead")


def overhead_cmd(
    schemes: str = typer.Option(
        "orthros,warmcache,reboot", help="comma-separated schemes compared with vanilla"
    ),
    workloads: Optional[str] = typer.Option(
        None, help="comma-separated workloads (default: every workload of `crashbench list`)"
    ),
    rounds: int = typer.Option(3, help="rounds; each runs every scheme once, order rotated"),
    duration: float = typer.Option(5.0, help="seconds of steady-state load per run"),
    warmup: Optional[float] = typer.Option(
        None,
        help="seconds of load before the steady state (default: each workload's own "
        "- postgres 15, its page cache filling from the disk first - else 2)",
    ),
    micro_ops: int = typer.Option(200, help="FS micro-operations of each kind per run (0: none)"),
    seed: int = typer.Option(1, help="seed of round 0 (round r uses seed + r)"),
    warmup_runs: int = typer.Option(
        1,
        help="runs before round 0 whose figures are "
        "discarded (the first deployment pays cold caches)",
    ),
    param: list[str] = typer.Option(
        [], help="workload parameter NAME=VALUE or WORKLOAD.NAME=VALUE (repeatable)"
    ),
    machine_file: Optional[Path] = typer.Option(
        None, "--machine", help="machine description (TOML)"
    ),
    out: Optional[Path] = typer.Option(None, help="result directory (default: results/<run id>)"),
    json_out: bool = typer.Option(False, "--json", help=JSON_HELP),
):
    """Run each workload with no crash under vanilla (no scheme machinery) and every
    scheme, interleaved, plus FS micro-operations through the mount; write overhead.json,
    one pyperf suite per scheme and report.md; results/latest points at it."""
    names = [s.strip() for s in schemes.split(",") if s.strip()]
    if workloads is None:
        wls = [w for w in catalogue()["workloads"] if w != "idle"]
    else:
        wls = [w.strip() for w in workloads.split(",") if w.strip()]
    params = _workload_params(param, wls)
    _check(names, wls, rounds, duration, warmup, micro_ops, params, warmup_runs)
    check_out(out)
    from kernel.hw import machine

    try:
        mach = machine.load(str(machine_file) if machine_file else None)
    except machine.MachineError as e:
        _fail(str(e))
    from harness import driver, overhead, overheadreport, results

    timing = {**driver.DEFAULTS, "steady_s": duration}
    if warmup is not None:
        timing["warmup_s"] = warmup
    warm = overhead.warmups(wls, warmup, timing["warmup_s"])
    mf = str(machine_file) if machine_file else None
    specs = overhead.plan(names, wls, rounds, seed, timing, params, micro_ops, mf, warm)
    parameters = {
        "schemes": names,
        "workloads": wls,
        "rounds": rounds,
        "seed": seed,
        "timing": timing,
        "warmup_s": warm,
        "workload_params": params,
        "micro_ops": micro_ops,
        "machine_file": mf,
        "warmup_runs": warmup_runs,
        "load_cpus": sorted(overhead.load_cpus(mach, 0)),
    }
    d = results.new_run_dir(schemes=["overhead"]) if out is None else out
    d.mkdir(parents=True, exist_ok=True)
    env = results.environment()
    runs: list[dict] = []
    show = err if json_out else console  # with --json, stdout holds the document only
    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=show,
        transient=False,
    ) as bar:
        task = bar.add_task("starting", total=len(specs) + warmup_runs)
        for _ in range(warmup_runs):
            r = _discarded_run(specs[0], lambda m: bar.update(task, description=m))
            bar.advance(task)
            bar.console.print(f"warm-up, discarded: {_line(r)}")
        for spec in specs:
            r = overhead.run_one(spec, d, say=lambda m: bar.update(task, description=m))
            runs.append(r)
            bar.advance(task)
            bar.console.print(_line(r))
    doc = overhead.write(d, parameters, env, mach, runs)
    written = overheadreport.write_report(d, doc)
    results.point_latest(d)
    _summary(doc, show)
    show.print(
        f"results: {d}  (report: report.md, overhead.json, {', '.join(doc['pyperf'].values())})"
    )
    errors = [r for r in runs if r.get("error")]
    for r in errors:
        err.print(f"crashbench: run {r['id']} failed: {r['error']}", markup=False)
    if json_out:
        from harness.commands import output

        files = [overhead.FILE, *doc["pyperf"].values(), *(p.name for p in written)]
        output.emit("overhead", output.overhead_body(d, doc, files, 1 if errors else 0))
    raise typer.Exit(1 if errors else 0)


def _discarded_run(spec, say) -> dict:
    """One run whose figures and files are thrown away (logs, histories included)."""
    import shutil
    import tempfile

    from harness import overhead

    scratch = Path(tempfile.mkdtemp(prefix="crashbench-warmup-"))
    try:
        return overhead.run_one(spec, scratch, say=say)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _line(r: dict) -> str:
    if r.get("error"):
        return f"{r['id']}: [red]error[/] {r['error']}"
    f = r["figures"]
    if r["workload"] == "micro":
        import numpy as np

        return (
            r["id"]
            + ": "
            + ", ".join(f"{op} {np.median(v) * 1e6:.0f} µs" for op, v in f.items() if v)
        )
    p99 = f["latency_s"]["p99"]
    return (
        f"{r['id']}: {f['throughput_ops_s']:.1f} ops/s, p99 "
        f"{'-' if p99 is None else f'{p99 * 1e3:.1f} ms'}"
    )


def _summary(doc: dict, show) -> None:
    from harness.overheadreport import _fmt

    for w, per in doc["figures"]["workloads"].items():
        t = Table(title=f"{w}: means over rounds; 95 % CI in brackets")
        for c in ("scheme", "ops/s", "overhead %", "p99 ms", "machinery % of active CPU"):
            t.add_column(c)
        for s, e in per.items():
            t.add_row(
                s,
                _fmt(e["throughput_ops_s"], 1, 1),
                _fmt(e["overhead_pct"], 1, 1),
                _fmt(e["latency_p99_s"], 1e3),
                _fmt(e.get("machinery_share_pct"), 1, 2),
            )
        show.print(t)
    for op, per in doc["figures"]["micro"].items():
        show.print(
            f"{op}: " + "; ".join(f"{s} {_fmt(e['median_s'], 1e6, 1)} µs" for s, e in per.items())
        )
