"""CLI commands `campaign`, `campaign replay` and `campaign report`: fault campaigns.

Promises to users: every name and number is checked before anything is made (exit 2 with
`crashbench: <what>`); `campaign` runs the plan of harness/campaign (each fault one trial,
here or on Dask), prints each fault's outcome as it completes and the coverage table at the
end, and exits 0, or 1 when a fault ended in a harness error; Ctrl-C or SIGTERM stops it
cleanly (exit 130), and the same command continues it. `campaign replay ID` runs one fault
of a campaign alone, with its seed; `campaign report DIR` (re)writes a campaign's report.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Optional

import typer

from harness.campaign import FAST_FAULTS
from harness.commands.run import (
    Stopped,
    _fail,
    _params,
    check_names,
    check_params,
    check_root,
    console,
    err,
)

app = typer.Typer(
    help="Fault campaigns: many faults per scheme, coverage with 95 % intervals.",
    invoke_without_command=True,
    no_args_is_help=False,
)


@app.callback()
def campaign_cmd(
    ctx: typer.Context,
    schemes: str = typer.Option("orthros,reboot", help="comma-separated schemes"),
    workload: str = typer.Option("files", help="the workload running while faults are injected"),
    faults: str = typer.Option("all", help="fault kinds: all, or a comma-separated list"),
    sites: str = typer.Option(
        "all",
        help="only faults activated at these sites: all, or a "
        "comma-separated list (memory faults are activated at now)",
    ),
    targets: str = typer.Option(
        "all",
        help="only memory faults (wild-write, bit-flip) into these kernel objects: all, or "
        "a comma-separated list of dirty-page, clean-page, page-descriptor, "
        "dirty-inode-list, inode, superblock",
    ),
    per_scheme: Optional[int] = typer.Option(
        None, help="faults per scheme (default: one per fault cell — kind with its target or site)"
    ),
    seed: int = typer.Option(1, help="the campaign's seed (each fault's seed derives from it)"),
    duration: float = typer.Option(1.0, help="seconds of steady-state load before each fault"),
    warmup: float = typer.Option(1.0, help="seconds of load before steady state"),
    post: float = typer.Option(1.0, help="seconds of load after recovery"),
    recovery_timeout: float = typer.Option(20.0, help="seconds to wait for recovery"),
    param: list[str] = typer.Option([], help="workload parameter NAME=VALUE (repeatable)"),
    machine_file: Optional[Path] = typer.Option(
        None, "--machine", help="machine description (TOML)"
    ),
    out: Optional[Path] = typer.Option(
        None, help="campaign directory (default: results/campaign-<id of the parameters>)"
    ),
    redeploy_every: Optional[int] = typer.Option(
        None,
        help="fast faults: up to N faults of a scheme in one machine, the next going into "
        "the recovered machine; redeployed after a fault it did not survive intact or with "
        f"loss, or after N (1: a fresh machine per fault; default: {FAST_FAULTS} where the "
        "workload lets faults share a machine, else 1)",
    ),
    executor: str = typer.Option(
        "dask",
        help="dask (a LocalCluster, or --scheduler), local, "
        "or docker (each machine in a container of --image)",
    ),
    image: str = typer.Option(
        "crashbench-worker",
        help="--executor docker: the worker image (a root file system imported with docker import)",
    ),
    workers: int = typer.Option(1, help="Dask workers of the LocalCluster on this machine"),
    scheduler: Optional[str] = typer.Option(
        None, help="an existing Dask scheduler, tcp://HOST:PORT"
    ),
):
    """Run SCHEMES × fault cells × repetitions with WORKLOAD running, each fault ending in
    one outcome class; print coverage per scheme and fault kind with Wilson 95 % intervals
    and write campaign.json and a report. The same command again continues a stopped one."""
    if ctx.invoked_subcommand is not None:
        return
    from harness.campaign import store
    from harness.campaign.executor import EXECUTORS

    names = [s.strip() for s in schemes.split(",") if s.strip()]
    parameters = _checked(
        names,
        workload,
        faults,
        (sites, targets),
        per_scheme,
        seed,
        {
            "warmup_s": warmup,
            "steady_s": duration,
            "post_s": post,
            "recovery_timeout_s": recovery_timeout,
            "ready_timeout_s": 30.0,
            "bin_s": 1.0,
        },
        _params(param),
        machine_file,
    )
    if executor not in EXECUTORS:
        _fail(f"--executor: unknown executor {executor!r}; known: {', '.join(EXECUTORS)}")
    if workers < 1:
        _fail(f"--workers: must be at least 1, got {workers}")
    if scheduler is not None and (executor != "dask" or not scheduler.startswith("tcp://")):
        _fail(f"--scheduler: expected tcp://HOST:PORT with --executor dask, got {scheduler!r}")
    redeploy_every = _redeploy_every(redeploy_every, workload)
    if executor == "docker":
        from harness.campaign.container import check

        why = check(image)
        if why:
            _fail(f"--executor docker: image {image!r} cannot be used: {why}")
    parameters.update(
        redeploy_every=redeploy_every,
        executor=executor,
        workers=workers,
        scheduler=scheduler,
        image=image,
    )
    d = out or Path("results") / f"campaign-{store.campaign_id(parameters)}"
    if d.exists() and not d.is_dir():
        _fail(f"--out: {d} exists and is not a directory")
    if d.is_dir() and any(d.iterdir()) and not (d / store.CAMPAIGN_FILE).exists():
        _fail(f"--out: {d} is not empty and holds no campaign.json; results are never written over")
    _run(d, parameters)


def _redeploy_every(asked: int | None, workload: str) -> int:
    """The faults a machine takes before it is redeployed: fast faults by default, a
    fresh machine each for a workload whose machine cannot be shared."""
    from harness.workloads import registry

    shares = registry()[workload].shares_machine
    if asked is None:
        return FAST_FAULTS if shares else 1
    if asked < 1:
        _fail(f"--redeploy-every: must be at least 1, got {asked}")
    if asked > 1 and not shares:
        _fail(
            f"--redeploy-every: workload {workload} cannot run a fault on a machine an "
            f"earlier fault ran on; use 1"
        )
    return asked


def _checked(
    names, workload, faults, where_to, per_scheme, seed, timing, params, machine_file
) -> dict:
    from harness.campaign import plan
    from harness.commands.run import catalogue

    cat = catalogue()
    if not names:
        _fail("--schemes: names no scheme (e.g. --schemes orthros,reboot)")
    check_names("schemes", "scheme", names, cat["schemes"])
    if workload not in cat["workloads"]:
        _fail(f"--workload: unknown workload {workload!r}; known: {', '.join(cat['workloads'])}")
    try:
        sites, targets = where_to
        kinds, where, into = plan.kinds_of(faults), plan.sites_of(sites), plan.targets_of(targets)
        per = len(plan.cells(kinds, where, into)) if per_scheme is None else per_scheme
        plan.plan(names, kinds, per, seed, where, into)
    except plan.PlanError as e:
        _fail(str(e))
    if seed < 0:
        _fail(f"--seed: must not be negative, got {seed}")
    for k, v in timing.items():
        if not math.isfinite(v) or v < 0 or (v == 0 and k in ("steady_s", "recovery_timeout_s")):
            _fail(
                f"--{k.removesuffix('_s').replace('steady', 'duration').replace('_', '-')}: "
                f"must be a finite positive number of seconds, got {v}"
            )
    check_params(workload, params)
    if machine_file is not None:
        from kernel.hw import machine

        try:
            machine.load(machine_file)
        except machine.MachineError as e:
            _fail(str(e))
    check_root("campaign")
    return {
        "schemes": names,
        "workload": workload,
        "faults": faults.strip(),
        "sites": sites.strip(),
        # only when narrowed: a campaign of every target keeps the identity it had before
        **({"targets": targets.strip()} if into is not None else {}),
        "per_scheme": per,
        "seed": seed,
        "timing": timing,
        "workload_params": params,
        "machine_file": str(machine_file) if machine_file else None,
    }


def _run(d: Path, parameters: dict) -> None:
    from harness import results
    from harness.campaign import report, run, store, summary
    from harness.commands.results import summary_table

    def say(res, done, total):
        console.print(
            f"[{done}/{total}] {res['id']}: {res['outcome']} ({res['why']}, {res['wall_s']:.1f} s)",
            markup=False,
            highlight=False,
        )

    console.print(f"campaign directory: {d}", markup=False, highlight=False)
    try:
        doc = run.run(d, parameters, results.environment(), say)
    except store.CampaignError as e:
        _fail(str(e))
    except KeyboardInterrupt as e:
        name = e.signal_name if isinstance(e, Stopped) else "SIGINT"
        doc = store.load(d)
        report.write_report(d, doc)
        err.print(
            f"crashbench: campaign stopped by {name} after {len(doc['faults'])} of "
            f"{len(doc['plan'])} faults; the same command continues it",
            markup=False,
        )
        raise typer.Exit(130)
    report.write_report(d, doc)
    console.print(summary_table(summary.table_rows(doc["summary"]), "coverage (Wilson 95 % CI)"))
    console.print(summary.NOTE, style="dim", markup=False, highlight=False)
    t = doc["time"]
    console.print(
        f"{t['faults_run']} faults in {t['wall_s']:.0f} s: "
        f"{t['per_fault_s']:.2f} s a fault (wall clock); results: {d}",
        markup=False,
        highlight=False,
    )
    for n in doc.get("notes", []):
        err.print(f"crashbench: {n}", markup=False)
    errors = doc["summary"]["schemes"]
    raise typer.Exit(1 if any(g["all"]["harness_errors"] for g in errors.values()) else 0)


@app.command("replay")
def replay_cmd(
    fault_id: str = typer.Argument(..., help="a fault's id, as campaign.json names it"),
    dir: Path = typer.Option(..., "--dir", help="the campaign directory"),
    json_out: bool = typer.Option(False, "--json", help="print the result as JSON"),
):
    """Run one fault of a campaign alone (same scheme, kind, target or site, and seed) and
    print its outcome; the campaign itself is not changed."""
    from harness.campaign import store
    from harness.campaign.task import iter_batch

    try:
        doc = store.load(dir)
    except store.CampaignError as e:
        _fail(str(e))
    spec = next((f for f in doc["plan"] if f["id"] == fault_id), None)
    if spec is None:
        _fail(
            f"{fault_id!r}: no such fault in campaign {doc['campaign_id']} (ids look like "
            f"{doc['plan'][0]['id']!r})"
        )
    check_root("campaign replay")
    p = doc["parameters"]
    res = list(
        iter_batch(
            [spec],
            {
                "campaign_id": doc["campaign_id"] + "-replay",
                **{k: p[k] for k in ("workload", "timing", "workload_params", "machine_file")},
                "data_seed": p["seed"],  # the campaign's data set
            },
        )
    )[0]
    from harness.campaign.run import clean_scratch

    clean_scratch(doc["campaign_id"] + "-replay")
    if json_out:
        print(json.dumps(res, indent=1))
    else:
        logged, _ = store.load_log(dir, {f["id"] for f in doc["plan"]})  # also while it runs
        was = next((r["outcome"] for r in logged if r["id"] == fault_id), "not run")
        console.print(
            f"{fault_id} (seed {res['seed']}): {res['outcome']} — {res['why']} "
            f"(in the campaign: {was})",
            markup=False,
            highlight=False,
        )
    raise typer.Exit(1 if res["outcome"] == "harness-error" else 0)


@app.command("report")
def report_cmd(dir: Path = typer.Argument(..., help="a campaign directory")):
    """(Re)write a campaign's report.md, report.html and coverage.png; print its table."""
    from harness.campaign import report, store, summary
    from harness.commands.results import summary_table

    try:
        doc = store.load(dir)
    except store.CampaignError as e:
        _fail(str(e))
    files = report.write_report(dir, doc)
    console.print(summary_table(summary.table_rows(doc["summary"]), "coverage (Wilson 95 % CI)"))
    console.print(f"report: {', '.join(str(f) for f in files)}", markup=False, highlight=False)
