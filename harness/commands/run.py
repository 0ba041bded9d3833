"""CLI commands `run` and `list`: the harness as users run it.

Promises to users and CI jobs: bad input exits 2 with `crashbench: <what>` on stderr before
anything is created; with --json each prints one JSON document on stdout and its progress
and messages on stderr (harness/commands/output.py); tables piped or logged are never cut.
"""

from __future__ import annotations

import math
import os
import sys
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from harness.commands.output import Output

console = Output()
err = Console(stderr=True, soft_wrap=True)
JSON_HELP = "print one JSON document on stdout (docs/RESULTS.md), messages on stderr"


class Stopped(KeyboardInterrupt):
    """A run stopped by a signal other than SIGINT (harness/cli.py raises it on SIGTERM);
    a plain KeyboardInterrupt is SIGINT."""

    def __init__(self, signal_name: str):
        super().__init__(signal_name)
        self.signal_name = signal_name


def _fail(msg: str) -> None:
    err.print(f"crashbench: {msg}", markup=False, highlight=False)
    raise typer.Exit(2)


def _one_line(cls) -> str:
    doc = sys.modules[cls.__module__].__doc__ or cls.__doc__ or ""
    line = cls.description or doc.strip().splitlines()[0]
    return line.split(": ", 1)[1] if line.startswith("Scheme `") else line


def catalogue() -> dict[str, dict[str, str]]:
    from harness.workloads import registry as workloads
    from kernel.core.faults import FAULTS, SITES
    from systems.base import registry as schemes

    return {
        "schemes": {n: _one_line(c) for n, c in schemes().items()},
        "workloads": {n: c.description for n, c in workloads().items()},
        "faults": dict(FAULTS),
        "sites": dict(SITES),
    }


def list_cmd(json_out: bool = typer.Option(False, "--json", help=JSON_HELP)):
    """List the schemes, workloads and faults a run can name, one line each."""
    cat = catalogue()
    if json_out:
        from harness.commands import output

        output.emit("list", cat)
        return
    for kind, items in cat.items():
        t = Table(title=kind, show_header=False, title_justify="left")
        t.add_column(style="bold")
        t.add_column()
        for name, line in items.items():
            t.add_row(name, line)
        console.print(t)


def _params(pairs: list[str]) -> dict:
    out = {}
    for p in pairs:
        k, sep, v = p.partition("=")
        if not sep or not k:
            _fail(f"--param {p!r}: expected NAME=VALUE")
        try:
            out[k] = int(v)
        except ValueError:
            try:
                out[k] = float(v)
            except ValueError:
                out[k] = v
    return out


OPTION_OF = {
    "warmup_s": "warmup",
    "steady_s": "duration",
    "post_s": "post",
    "bin_s": "bin",
    "recovery_timeout_s": "recovery-timeout",
    "ready_timeout_s": "ready-timeout",
}


def check_names(option: str, kind: str, names: list[str], known) -> None:
    """Each of ``names`` known, none named twice; else exit 2 naming the option."""
    for n in names:
        if n not in known:
            _fail(f"--{option}: unknown {kind} {n!r}; known: {', '.join(known)}")
    if len(set(names)) != len(names):
        _fail(f"--{option}: a {kind} is named twice in {','.join(names)}")


def check_params(workload: str, params: dict) -> None:
    """The workload accepts these parameters, each of the type of its default (a number
    finite and not negative); else exit 2 with the reason."""
    from harness.workloads import WorkloadError, registry

    cls = registry()[workload]
    for k, v in params.items():
        if k in cls.defaults:
            _check_param_value(workload, k, v, cls.defaults[k])
    try:
        cls(**params)
    except WorkloadError as e:
        _fail(f"--param: {e}")


_KIND = {int: "an integer", float: "a number", str: "a word"}


def _check_param_value(workload: str, name: str, value, default) -> None:
    want = type(default)
    if not (isinstance(value, want) or (want is float and isinstance(value, int))):
        _fail(f"--param {name}: {workload} expects {_KIND.get(want, want.__name__)}, got {value!r}")
    if isinstance(value, (int, float)) and not (math.isfinite(value) and value >= 0):
        _fail(f"--param {name}: must be a finite number, not negative, got {value!r}")


def _scheme_options(names: list[str], keep_apps: bool | None) -> dict:
    """The options the run sets (``RecoveryScheme.options``); a flag no named scheme
    declares is refused, not ignored."""
    from harness.commands.options import OptionError, keep_apps_options

    try:
        return keep_apps_options(names, keep_apps)
    except OptionError as e:
        _fail(str(e))


def check_root(command: str) -> None:
    if os.geteuid() != 0:
        _fail(
            f"{command} needs root: the emulated machine mounts FUSE with allow_other and "
            f"builds network namespaces"
        )


def _check(
    schemes: list[str], workload: str, fault: str, trials: int, timing: dict, params: dict
) -> None:
    """Every name and number checked before anything is created."""
    cat = catalogue()
    if not schemes:
        _fail("--schemes: names no scheme (e.g. --schemes orthros,reboot)")
    check_names("schemes", "scheme", schemes, cat["schemes"])
    if workload not in cat["workloads"]:
        _fail(f"--workload: unknown workload {workload!r}; known: {', '.join(cat['workloads'])}")
    if fault not in cat["faults"]:
        _fail(f"--fault: unknown fault {fault!r}; known: {', '.join(cat['faults'])}")
    if trials <= 0:
        _fail(f"--trials: must be a positive number of trials, got {trials}")
    for k, v in timing.items():
        must_be_positive = k in ("steady_s", "bin_s", "recovery_timeout_s", "ready_timeout_s")
        if not math.isfinite(v):
            _fail(f"--{OPTION_OF.get(k, k)}: must be a finite number of seconds, got {v}")
        if v < 0 or (must_be_positive and v == 0):
            _fail(f"--{OPTION_OF.get(k, k)}: must be positive, got {v}")
    check_params(workload, params)
    check_root("run")


def check_out(out: Optional[Path], default_root: Path = Path("results")) -> None:
    """OUT (or the default results directory) can take a new run: an empty directory, or a
    path whose nearest existing ancestor is a directory this process may write in."""
    if out is None:
        if default_root.exists() and not default_root.is_dir():
            _fail(f"results directory {default_root}: exists and is not a directory")
        target = default_root
    elif out.exists():
        if not out.is_dir():
            _fail(f"--out: {out} exists and is not a directory")
        if any(out.iterdir()):
            _fail(f"--out: {out} exists and is not empty; results are never written over")
        target = out
    else:
        target = out
    anc = target.absolute()
    while not anc.exists():
        anc = anc.parent
    option = "--out" if out is not None else "results directory"
    if not anc.is_dir():
        _fail(f"{option} {target}: {anc} is not a directory")
    if not os.access(anc, os.W_OK | os.X_OK):
        _fail(f"{option} {target}: {anc} is not writable")


def run_cmd(
    schemes: str = typer.Option(
        "orthros,reboot", help="comma-separated schemes (see `crashbench list`)"
    ),
    workload: str = typer.Option("files", help="the workload every scheme runs"),
    fault: str = typer.Option("panic", help="the fault injected into the active kernel"),
    trials: int = typer.Option(3, help="trials per scheme (interleaved across schemes)"),
    duration: float = typer.Option(5.0, help="seconds of steady-state load before the crash"),
    warmup: Optional[float] = typer.Option(
        None,
        help="seconds of load before steady state "
        "(default: the workload's own, else 2), after "
        "which the load goes on until the cache is full",
    ),
    post: float = typer.Option(
        10.0,
        help="seconds of load after recovery (for time to 90 %; a cold cache on the default "
        "disk can take more than 5 s to refill)",
    ),
    recovery_timeout: float = typer.Option(
        30.0, help="seconds to wait for recovery before the trial counts as not recovered"
    ),
    bin_s: float = typer.Option(1.0, "--bin", help="throughput bin width in seconds"),
    seed: int = typer.Option(1, help="seed of trial 0 (trial i uses seed + i)"),
    param: list[str] = typer.Option([], help="workload parameter NAME=VALUE (repeatable)"),
    machine_file: Optional[Path] = typer.Option(
        None, "--machine", help="machine description (TOML), or a shipped one by name: paper"
    ),
    out: Optional[Path] = typer.Option(None, help="result directory (default: results/<run id>)"),
    keep_apps: Optional[bool] = typer.Option(
        None,
        "--keep-apps/--no-keep-apps",
        help="schemes that can keep the crashed kernel's processes running (orthros) do so, "
        "or restart them instead; default: each scheme's own",
        show_default=False,
    ),
    json_out: bool = typer.Option(False, "--json", help=JSON_HELP),
):
    """Run WORKLOAD under every scheme, inject FAULT in each trial, and write the results
    (run.json, trials.csv, histories, pyperf JSON, report.md/html with plots);
    results/latest points at the newest run."""
    from harness.commands.lab import warn_orphans

    warn_orphans("run")  # reported, not removed: `crashbench down --all` is explicit
    names = [s.strip() for s in schemes.split(",") if s.strip()]
    timing = {
        "warmup_s": 2.0 if warmup is None else warmup,
        "steady_s": duration,
        "post_s": post,
        "recovery_timeout_s": recovery_timeout,
        "ready_timeout_s": 30.0,
        "bin_s": bin_s,
        "cache_timeout_s": 120.0,
    }
    params = _params(param)
    _check(names, workload, fault, trials, timing, params)
    options = _scheme_options(names, keep_apps)
    from harness.driver import warmup_for

    timing["warmup_s"] = warmup_for(workload, warmup, 2.0)
    check_out(out)
    from kernel.hw import machine

    if machine_file is not None:
        machine_file = Path(machine.resolve(machine_file))
    try:
        m = machine.load(machine_file)
    except machine.MachineError as e:
        _fail(str(e))
    from harness import driver

    specs = driver.plan(
        names,
        workload,
        fault,
        trials,
        seed,
        timing,
        params,
        str(machine_file) if machine_file else None,
        options,
    )
    parameters = {
        "schemes": names,
        "workload": workload,
        "fault": fault,
        "trials": trials,
        "seed": seed,
        "timing": timing,
        "workload_params": params,
        "machine_file": str(machine_file) if machine_file else None,
        "modeled_hardware": m.modeled(),
        **({"scheme_options": options} if options else {}),
    }
    show = err if json_out else console  # with --json, stdout holds the document only
    d, records, files = _run_all(specs, parameters, out, show)
    errors = [r for r in records if r.get("error")]
    for r in errors:
        err.print(f"crashbench: trial {r['id']} failed: {r['error']}", markup=False)
    code = 1 if errors else 0
    if json_out:
        from harness import results
        from harness.commands import output

        output.emit(
            "run",
            {
                **output.summary_body(d, results.load_run(d), files),
                "exit_code": code,
                "failed_trials": [{"id": r["id"], "error": r["error"]} for r in errors],
            },
        )
    raise typer.Exit(code)


def _run_all(
    specs, parameters: dict, out: Optional[Path], show: Console
) -> tuple[Path, list[dict], list[Path]]:
    from harness import driver, prepared, report, results

    d = (
        results.new_run_dir(schemes=parameters["schemes"], workload=parameters["workload"])
        if out is None
        else out
    )
    d.mkdir(parents=True, exist_ok=True)
    env = results.environment()
    records: list[dict] = []
    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=show,
        transient=False,
    ) as bar:
        task = bar.add_task("starting", total=len(specs))
        try:
            with prepared.scratch_store() as store:
                _run_specs(
                    specs, driver.sharing_data(store), d, parameters, env, records, bar, task
                )
        except KeyboardInterrupt as e:
            name = e.signal_name if isinstance(e, Stopped) else "SIGINT"
            results.write_run(
                d,
                parameters,
                env,
                records,
                incomplete=results.stopped(name, len(records), len(specs)),
            )
            err.print(
                f"crashbench: run stopped by {name} after {len(records)} of {len(specs)} "
                f"trials; {d / results.RUN_FILE} is marked incomplete "
                f"(`crashbench report {d}` writes its report)",
                markup=False,
            )
            raise
    results.write_pyperf(d, records)
    results.point_latest(d)
    files = report.write_report(d) + [d / results.CSV_FILE]
    _print_summary(report, d, show)
    show.print(
        f"results: {d}  (report: {', '.join(str(f.name) for f in files[:2])}; "
        f"per-trial figures: {results.CSV_FILE})"
    )
    return d, records, files


def _run_specs(specs, kind, d: Path, parameters: dict, env: dict, records: list, bar, task) -> None:
    """Each trial in turn, run.json rewritten after each (a run stopped halfway keeps its
    trials); ``kind`` shares the run's data set between them."""
    from harness import driver, results

    for spec in specs:
        rec = driver.run_one(spec, d, say=lambda m: bar.update(task, description=m), kind=kind)
        records.append(rec)
        results.write_run(d, parameters, env, records)
        bar.advance(task)
        bar.console.print(_trial_line(rec))


def _trial_line(r: dict) -> str:
    if r.get("error"):
        return f"{r['id']}: [red]error[/] {r['error']}"
    dt = "not recovered" if r["downtime_s"] is None else f"downtime {r['downtime_s'] * 1e3:.0f} ms"
    lost = (
        "unverified"
        if r["lost_writes"] is None
        else f"{r['lost_writes']} lost, {r['corrupted_writes']} corrupted"
    )
    reused = r["cache"].get("pages_reused")
    return (
        f"{r['id']}: {dt}, acked writes {r['acked_writes']} ({lost}), "
        f"pages recovered {r['cache']['pages_recovered']}"
        + (f", reused {reused}" if reused else "")
    )


def _print_summary(report, d: Path, show: Console) -> None:
    from harness import results
    from harness.commands.results import summary_table

    run = results.load_run(d)
    rows = report.summary_rows(run)
    if rows:
        show.print(summary_table(rows, "summary (medians; 95 % CI in brackets)"))
    for line in report.ranking(report.summarize(run)):
        show.print(line, markup=False, highlight=False)
    hw = run["parameters"].get("modeled_hardware")
    if hw:
        show.print(report.modeled_line(hw), markup=False, highlight=False)
