"""The `crashbench` command line: one typer app; each command lives in the layer it drives."""

from __future__ import annotations

import signal
from pathlib import Path

import typer

from harness.commands import campaign, fs, lab, overhead, results, run

app = typer.Typer(
    help="crashbench: compare ways of surviving an operating-system kernel crash.",
    no_args_is_help=True,
    add_completion=False,
)
bench = typer.Typer(help="Micro-benchmarks of the emulated platform.", no_args_is_help=True)
app.add_typer(bench, name="bench")

app.command("mkfs")(fs.mkfs_cmd)
app.command("fsck")(fs.fsck_cmd)
bench.command("fs")(fs.bench_fs_cmd)
bench.command("detect")(fs.bench_detect_cmd)
bench.command("failover")(fs.bench_failover_cmd)
app.command("up")(lab.up_cmd)
app.command("status")(lab.status_cmd)
app.command("crash")(lab.crash_cmd)
app.command("inspect")(lab.inspect_cmd)
app.command("down")(lab.down_cmd)
app.command("run")(run.run_cmd)
app.command("overhead")(overhead.overhead_cmd)
app.command("list")(run.list_cmd)
app.add_typer(campaign.app, name="campaign")
app.command("report")(results.report_cmd)
app.command("compare")(results.compare_cmd)


@app.command()
def demo(
    workdir: Path = typer.Option(Path(".crashbench-demo"), help="scratch directory"),
    out: Path = typer.Option(Path("results/demo"), help="where the demo's results go"),
):
    """Crash a machine and look into the dead kernel's memory; then one panic under orthros
    and under reboot, side by side. Writes OUT/demo.json."""
    import json
    import time

    inspected = lab.demo_storage(workdir)
    reports = lab.demo_failover()
    out.mkdir(parents=True, exist_ok=True)
    (out / "demo.json").write_text(
        json.dumps(
            {
                "schema_version": 1,
                "kind": "crashbench demo",
                "time": time.time(),
                "inspect_after_crash": inspected,
                "recovery_reports": reports,
            },
            indent=2,
        )
    )
    lab.console.print(f"\nresults written to {out / 'demo.json'}")


def main() -> None:
    # `kill`, or a CI job's timeout, stops a run the way Ctrl-C does: through its teardown,
    # which leaves no mount, namespace, process or memory file behind.
    signal.signal(signal.SIGTERM, _interrupt)
    app()


def _interrupt(signum, frame) -> None:
    raise run.Stopped(signal.Signals(signum).name)


if __name__ == "__main__":
    main()
