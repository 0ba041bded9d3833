"""CLI commands that look into a machine: inspect, and the storage demo."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

console = Console()
err = Console(stderr=True)
DEFAULT_WORKDIR = Path(".crashbench-lab")


def _machine(path: Optional[Path]):
    from kernel import machine
    try:
        return machine.load(path)
    except machine.MachineError as e:
        err.print(f"crashbench: {e}")
        raise typer.Exit(2)


def render_inspect(info: dict) -> None:
    console.print(f"[bold]partition {info['partition']}[/]  {info['cmdline']}")
    if info.get("ksuper"):
        ks = info["ksuper"]
        console.print(f"kernel superblock: running tid {ks['running_tid']}, handles open "
                      f"{ks['handles_open']}, dirty inodes {ks['n_dirty_inodes']}")
    if "page_cache" in info:
        pc = info["page_cache"]
        console.print(f"page cache: {pc['pages']} pages in {pc['frames']} frames, "
                      f"{pc['dirty']} dirty, {pc['metadata']} metadata")
    t = Table(title="dirty-inode list (walked from raw memory)")
    for c in ("ino", "size", "dirty pages", "rejected"):
        t.add_column(c, justify="right")
    for d in info.get("dirty_inodes", []):
        t.add_row(str(d["ino"]), str(d["size"]), str(d["dirty_pages"]), str(d["pages_rejected"]))
    console.print(t)
    for r in info["rejected"]:
        console.print(f"[red]rejected[/] {r['object']} at {r['phys']}: {r['field']}: {r['why']}")


def inspect_cmd(workdir: Path = typer.Option(DEFAULT_WORKDIR, help="the lab's work directory"),
                partition: int = typer.Option(0, help="partition to decode"),
                machine_file: Optional[Path] = typer.Option(None, "--machine", help="machine description"),
                json_out: bool = typer.Option(False, "--json")):
    """Decode a partition's kernel objects from raw physical memory (also of a dead kernel)."""
    from harness.inspect import inspect_partition
    from kernel.host import physmem_path_for
    from kernel.machine import MachineError
    m = _machine(machine_file)
    try:
        info = inspect_partition(physmem_path_for(workdir), m, partition)
    except (FileNotFoundError, MachineError) as e:
        err.print(f"crashbench inspect: {e}")
        raise typer.Exit(2)
    if json_out:
        print(json.dumps(info, indent=2))
    else:
        render_inspect(info)


def demo_storage(workdir: Path) -> None:
    """Boot a machine, write files through its mount, crash it, inspect the dead kernel."""
    from harness.inspect import inspect_partition
    from kernel import machine
    from kernel.host import Host
    m = machine.load()
    host = Host(workdir, m)
    try:
        host.create_memory()
        host.format_disks(force=True)
        kp = host.boot(0)
        console.print(f"booted partition 0 ({m.partition(0).cmdline()}) in {kp.boot_wall_s:.3f} s; "
                      f"file system mounted at {kp.mount}")
        for i in range(8):
            Path(kp.mount, f"file{i}.txt").write_bytes(f"demo file {i}\n".encode() * (1000 * (i + 1)))
        console.print("wrote 8 files through the mount, none fsynced; crashing the kernel (SIGKILL)")
        host.crash(0)
        render_inspect(inspect_partition(host.physmem, m, 0))
    finally:
        host.close()
