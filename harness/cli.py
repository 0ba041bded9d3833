"""The `crashbench` command line: one typer app; each command lives in the layer it drives."""
from __future__ import annotations

from pathlib import Path

import typer

from harness.commands import fs, lab

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


@app.command()
def demo(workdir: Path = typer.Option(Path(".crashbench-demo"), help="scratch directory")):
    """Boot the default machine, write files, crash it and show what survives in its memory."""
    lab.demo_storage(workdir)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
