"""CLI commands on the file system: mkfs, fsck, bench fs."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

from harness.commands.output import Output
from kernel.hw.machine import MachineError, parse_size

console = Output()
err = Console(stderr=True, soft_wrap=True)


def mkfs_cmd(
    image: Path = typer.Argument(..., help="disk image to create or overwrite"),
    size: str = typer.Option("2GiB", help="image size, e.g. 2GiB"),
    journal_blocks: Optional[int] = typer.Option(None, help="journal length in 4 KiB blocks"),
):
    """Create an empty crashbench file system in IMAGE (a sparse file)."""
    from kernel import param
    from kernel.tools.mkfs import MIN_JOURNAL_BLOCKS, mkfs

    try:
        nbytes = parse_size(size, "--size")
    except MachineError as e:
        _mkfs_fail(str(e))
    if journal_blocks is not None and journal_blocks < MIN_JOURNAL_BLOCKS:
        _mkfs_fail(f"--journal-blocks: at least {MIN_JOURNAL_BLOCKS}, got {journal_blocks}")
    if image.is_dir():
        _mkfs_fail(f"{image}: is a directory, not a disk image")
    if not image.absolute().parent.is_dir():
        _mkfs_fail(f"{image}: its directory {image.absolute().parent} does not exist")
    try:  # mkfs checks the size against the layout before it touches the image
        mkfs(
            str(image),
            nbytes,
            journal_blocks=param.JOURNAL_BLOCKS if journal_blocks is None else journal_blocks,
        )
    except ValueError as e:
        _mkfs_fail(f"--size {size}: {str(e).removeprefix('mkfs: ')}")
    except OSError as e:
        _mkfs_fail(f"{image}: {e.strerror or e}")
    console.print(f"{image}: {nbytes} bytes, crashbench file system created")


def _mkfs_fail(msg: str):
    err.print(f"crashbench mkfs: {msg}", markup=False, highlight=False)
    raise typer.Exit(2)


def fsck_cmd(
    image: Path = typer.Argument(..., help="disk image to check (never modified)"),
    json_out: bool = typer.Option(False, "--json", help="machine-readable result"),
):
    """Check IMAGE read-only. Exit status as e2fsck: 0 clean, 4 errors left, 8 operational error."""
    from kernel.tools.fsck import fsck

    res = fsck(str(image))
    if json_out:
        print(
            json.dumps(
                {
                    "image": str(image),
                    "exit_code": res.exit_code,
                    "problems": res.problems,
                    "notes": res.notes,
                    "counts": res.counts,
                },
                indent=2,
            )
        )
    else:
        for p in res.problems:
            console.print(f"  {p}")
        for n in res.notes:
            console.print(f"  note: {n}")
        verdict = {0: "clean", 4: "errors left uncorrected", 8: "operational error"}.get(
            res.exit_code, "?"
        )
        console.print(f"{image}: {verdict} ({len(res.problems)} problem(s))")
    raise typer.Exit(res.exit_code)


def bench_fs_cmd(
    mib: int = typer.Option(256, help="MiB written and read sequentially"),
    files: int = typer.Option(2000, help="small files created per run"),
    runs: int = typer.Option(3, min=1, help="repetitions of each measurement"),
    json_out: bool = typer.Option(False, "--json"),
):
    """Sequential write, cached read and small-file creates through the emulated kernel's
    mount, each beside the same work on tmpfs in the same run."""
    from harness.benchfs import run_all
    from harness.testbed import Testbed

    with Testbed(kind="bench") as bed:
        kp = bed.host.boot(0)
        with console.status("measuring…") as st:
            figs = run_all(
                Path(kp.mount),
                mib=mib,
                files=files,
                runs=runs,
                progress=lambda i, n: st.update(f"measuring… run {i}/{n} done"),
            )
        bed.host.stop(0)
    if json_out:
        print(json.dumps([f.as_dict() for f in figs], indent=2))
        return
    t = Table(title=f"file system through the mount vs tmpfs ({runs} runs, medians)")
    for c in ("measure", "mount", "tmpfs", "ratio"):
        t.add_column(c, justify="right" if c != "measure" else "left")
    for f in figs:
        t.add_row(
            f.name,
            f"{f.as_dict()['mount_median']:.0f} {f.unit}",
            f"{f.as_dict()['tmpfs_median']:.0f} {f.unit}",
            f"{f.ratio:.2f}",
        )
    console.print(t)
    console.print("device model: ssd (modeled time is waited for during write-back)")


def bench_detect_cmd(
    trials: int = typer.Option(10, min=0, help="crashes per fault kind (0: none)"),
    false_runs: int = typer.Option(
        0, min=0, help="runs watching a busy kernel that never fails: every verdict is false"
    ),
    false_s: float = typer.Option(5.0, min=0.5, help="seconds each false-verdict run watches"),
    load: int = typer.Option(0, min=0, help="CPU-bound processes beside each false-verdict run"),
    json_out: bool = typer.Option(False, "--json"),
):
    """Failure detection latency: doorbell after a panic, heartbeat after a hang or a kill;
    with --false-runs, false heartbeat verdicts on a living kernel."""
    rows = _detection_rows(trials) if trials else []
    vigils = _vigils(false_runs, false_s, load) if false_runs else []
    if json_out:
        print(json.dumps({"detection": rows, "false_verdicts": vigils}, indent=2))
        return
    if rows:
        _print_detection(rows, trials)
    if vigils:
        _print_vigils(vigils, false_s, load)


def _detection_rows(trials: int) -> list[dict]:
    from harness.benchdetect import run

    with console.status("crashing kernels…") as st:
        res = run(trials, progress=lambda f, i, n: st.update(f"{f}: {i}/{n} crashes"))
    return [d.summary() for d in res]


def _vigils(runs: int, seconds: float, load: int) -> list[dict]:
    from harness.benchfalse import run

    with console.status("watching living kernels…") as st:
        res = run(runs, seconds, load=load, progress=lambda i, n: st.update(f"run {i}/{n}"))
    return [v.as_dict() for v in res]


def _print_detection(rows: list[dict], trials: int) -> None:
    t = Table(title=f"failure detection, {trials} crashes each (fault activation -> verdict)")
    for c in ("fault", "detected by", "median", "min", "max", "median in beats"):
        t.add_column(c)
    for r in rows:
        t.add_row(
            r["fault"],
            r["detected_by"],
            f"{r['median_ms']:.1f} ms",
            f"{r['min_ms']:.1f} ms",
            f"{r['max_ms']:.1f} ms",
            f"{r['median_beats']:.1f}",
        )
    console.print(t)


def _print_vigils(vigils: list[dict], seconds: float, load: int) -> None:
    t = Table(
        title=f"false heartbeat verdicts: a busy living kernel watched {seconds:g} s a run, "
        f"{load} CPU-bound processes beside it"
    )
    for c in (
        "run",
        "false verdicts",
        "longest silence",
        "heartbeat waiting for a CPU",
        "watcher waiting for a CPU",
        "full GCs",
        "longest full GC",
        "frozen objects",
        "MiB written",
    ):
        t.add_column(c)
    for i, v in enumerate(vigils):
        t.add_row(
            str(i + 1),
            str(v["false_verdicts"]),
            f"{v['longest_silence_ms']:.1f} ms",
            f"{v['cpu_wait_ms']:.1f} ms",
            f"{v['watcher_wait_ms']:.1f} ms",
            str(v["full_collections"]),
            f"{v['full_longest_ms']:.1f} ms",
            str(v["frozen"]),
            str(v["mib_written"]),
        )
    console.print(t)
    total = sum(v["false_verdicts"] for v in vigils)
    console.print(f"{total} false verdicts in {len(vigils)} runs")


def bench_failover_cmd(
    crashes: int = typer.Option(10, min=1, help="crashes per scheme"),
    cache_mib: int = typer.Option(256, min=2, help="file cache before the crash (half dirty)"),
    json_out: bool = typer.Option(False, "--json"),
):
    """Crash-to-service per phase for orthros beside reboot, with the active kernel holding
    CACHE_MIB of file cache (half dirty); the cache-migration rate beside a memcpy."""
    from harness.benchfailover import DEFAULT_SCHEMES, ratio_key, run, summarize

    with console.status("crashing machines…") as st:
        res = run(crashes, cache_mib, progress=lambda s, i, n: st.update(f"{s}: crash {i}/{n}"))
    summary = summarize(res)
    if json_out:
        print(json.dumps({"summary": summary, "runs": res}, indent=2))
        return
    for name in DEFAULT_SCHEMES:
        e = summary[name]
        t = Table(title=f"{name}: {e['crashes']} panics, {cache_mib} MiB cache (medians)")
        t.add_column("phase")
        t.add_column("time", justify="right")
        for ph, sec in e["phases_median_s"].items():
            t.add_row(ph, f"{sec * 1000:.1f} ms")
        lo, hi = e["crash_to_service_range_s"]
        t.add_row(
            "[bold]crash to service[/]",
            f"[bold]{e['crash_to_service_median_s'] * 1000:.1f} ms[/] "
            f"({lo * 1000:.0f}–{hi * 1000:.0f})",
        )
        console.print(t)
        console.print(
            f"dirty pages before {e['dirty_pages_before']:.0f}, lost {e['dirty_pages_lost']:.0f}; "
            f"pages recovered {e['pages_recovered']:.0f}"
        )
    for name in DEFAULT_SCHEMES:
        o = summary[name]
        if "migration_rate_median" in o:
            console.print(
                f"{name} cache migration {o['migration_rate_median'] / 1e9:.2f} GB/s of "
                f"cache adopted; memcpy of the same bytes "
                f"{o['memcpy_rate_median'] / 1e9:.2f} GB/s (same run)"
            )
    a, b = DEFAULT_SCHEMES
    console.print(f"{a} crash-to-service / {b}'s: {summary[ratio_key(a, b)]:.3f}")
