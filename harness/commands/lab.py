"""CLI commands that look into a machine: inspect, and the storage demo."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

from harness.commands.output import Output
from kernel.core.faults import SITES

console = Output()
err = Console(stderr=True, soft_wrap=True)
DEFAULT_WORKDIR = Path(".crashbench-lab")


def _machine(path: Optional[Path]):
    from kernel.hw import machine

    try:
        return machine.load(path)
    except machine.MachineError as e:
        err.print(f"crashbench: {e}")
        raise typer.Exit(2)


def render_inspect(info: dict) -> None:
    console.print(f"[bold]partition {info['partition']}[/]  {info['cmdline']}")
    mb = info.get("mailbox")
    if mb:
        console.print(
            f"kernel: {mb['state']} (pid {mb['pid']}), {mb['beats']} beats, last "
            f"{mb['heartbeat_age_s'] * 1000:.0f} ms ago; boot {mb['boot_s'] * 1000:.0f} ms; "
            f"devices {','.join(mb['devices']) or '-'}"
        )
        if mb["dying_message"]:
            console.print(f"dying message: {mb['dying_message']} (at {mb['site']})")
    if info.get("ksuper"):
        ks = info["ksuper"]
        console.print(
            f"kernel superblock: running tid {ks['running_tid']}, handles open "
            f"{ks['handles_open']}, dirty inodes {ks['n_dirty_inodes']}"
        )
    if "page_cache" in info:
        pc = info["page_cache"]
        console.print(
            f"page cache: {pc['pages']} pages in {pc['frames']} frames, "
            f"{pc['dirty']} dirty, {pc['metadata']} metadata"
        )
    t = Table(title="dirty-inode list (walked from raw memory)")
    for c in ("ino", "size", "dirty pages", "rejected"):
        t.add_column(c, justify="right")
    for d in info.get("dirty_inodes", []):
        t.add_row(str(d["ino"]), str(d["size"]), str(d["dirty_pages"]), str(d["pages_rejected"]))
    console.print(t)
    for p in info.get("processes", []):
        console.print(
            f"process {p['pid']} {p['name']}"
            + (f" (runtime-aware, state slot {p['state_slot']})" if p["runtime_aware"] else "")
            + f", {p['open_files']} open files recorded"
        )
    for r in info["rejected"]:
        console.print(f"[red]rejected[/] {r['object']} at {r['phys']}: {r['field']}: {r['why']}")


def inspect_cmd(
    workdir: Path = typer.Option(DEFAULT_WORKDIR, help="the lab's work directory"),
    partition: int = typer.Option(0, help="partition to decode"),
    machine_file: Optional[Path] = typer.Option(None, "--machine", help="machine description"),
    json_out: bool = typer.Option(False, "--json"),
):
    """Decode a partition's kernel objects from raw physical memory (also of a dead kernel)."""
    from harness.inspect import inspect_partition
    from harness.lab import STATE
    from kernel.hw.host import physmem_path_for
    from kernel.hw.machine import MachineError

    if machine_file is None and (workdir / STATE).exists():
        saved = json.loads((workdir / STATE).read_text()).get("machine_file")
        machine_file = Path(saved) if saved else None
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


def demo_storage(workdir: Path) -> dict:
    """Boot a machine, write files through its mount, crash it, inspect the dead kernel."""
    from harness.inspect import inspect_partition
    from harness.testbed import Testbed

    with Testbed(kind="bench", workdir=workdir, reformat=True) as bed:
        host, m = bed.host, bed.machine
        kp = host.boot(0)
        console.print(
            f"booted partition 0 ({m.partition(0).cmdline()}) in {kp.boot_wall_s:.3f} s; "
            f"file system mounted at {kp.mount}"
        )
        for i in range(8):
            Path(kp.mount, f"file{i}.txt").write_bytes(
                f"demo file {i}\n".encode() * (1000 * (i + 1))
            )
        console.print(
            "wrote 8 files through the mount, none fsynced; crashing the kernel (SIGKILL)"
        )
        host.crash(0)
        info = inspect_partition(host.physmem, m, 0)
        render_inspect(info)
        return info


def demo_failover(cache_mib: int = 32) -> dict:
    """One panic under each scheme with the same file cache, as recovery reports."""
    from harness.benchfailover import DEFAULT_SCHEMES, one_crash

    out = {}
    for name in DEFAULT_SCHEMES:
        console.print(
            f"\n[bold]{name}[/]: {cache_mib} MiB of file cache (half never fsynced), then a panic"
        )
        out[name] = one_crash(name, cache_mib)
        render_report(out[name])
    return out


# --- the live lab: up / status / crash / down ------------------------------------------------


def _lab(workdir: Path):
    from harness.lab import Lab, LabError

    try:
        return Lab.open(workdir)
    except LabError as e:
        err.print(f"crashbench: {e}")
        raise typer.Exit(2)


def up_cmd(
    machine_file: Optional[Path] = typer.Option(
        None, "--machine", help="machine description (TOML); default: the shipped one"
    ),
    scheme: str = typer.Option(
        "none",
        help="recovery scheme: none (record the outage, recover nothing), reboot, warmcache, orthros or otherworld (see `crashbench list`)",
    ),
    workdir: Path = typer.Option(
        DEFAULT_WORKDIR, help="where the lab keeps memory, disk, mount, logs, state"
    ),
    keep_apps: Optional[bool] = typer.Option(
        None,
        "--keep-apps/--no-keep-apps",
        help="a scheme that can keep the crashed kernel's processes running (orthros) does so "
        "(programs using the mount wait through a failover), or restarts them; "
        "default: the scheme's own",
        show_default=False,
    ),
):
    """Boot the machine in the background; return once its file system serves."""
    from harness.commands.options import OptionError, keep_apps_options
    from harness.lab import Lab, LabError
    from kernel.hw.machine import MachineError

    warn_orphans("up")
    try:
        options = keep_apps_options([scheme], keep_apps)
        lab = Lab.up(workdir, str(machine_file) if machine_file else None, scheme, options=options)
    except (LabError, MachineError, OptionError) as e:
        err.print(f"crashbench up: {e}")
        raise typer.Exit(2)
    st = lab.status()
    for p in st["partitions"]:
        console.print(f"partition {p['partition']} ({p['role']}): {p['cmdline']}")
    k = st["partitions"][st["active"]]["kernel"]
    console.print(f"active kernel pid {k['pid']}, file system mounted at [bold]{k['mount']}[/]")
    for p in st["partitions"]:
        b = p["kernel"]
        if b and b.get("state") == "standby":
            console.print(f"backup kernel pid {b['pid']} on partition {p['partition']} (standby)")
    net = st["network"]
    if net:
        console.print(
            f"service address {net['service_ip']} ({net['mode']} mode"
            + (f"; clients run in netns {net['client_netns']}" if net["client_netns"] else "")
            + ")"
        )
    kept = " (processes kept across a crash)" if st["keeps_processes"] else ""
    console.print(
        f"scheme: {st['scheme']}{kept}.  Try: crashbench status · crashbench crash --fault panic --wait · crashbench down"
    )


def status_cmd(
    workdir: Path = typer.Option(DEFAULT_WORKDIR, help="the lab's work directory"),
    json_out: bool = typer.Option(False, "--json"),
):
    """Each partition's kernel (pid, role, state, heartbeat age, boot time), devices, mount."""
    st = _lab(workdir).status()
    if json_out:
        print(json.dumps(st, indent=2))
        return
    t = Table(title=f"lab {st['workdir']} (scheme {st['scheme']})")
    for c in (
        "partition",
        "role",
        "devices (owned)",
        "kernel pid",
        "state",
        "heartbeat age",
        "boot",
        "mount",
    ):
        t.add_column(c)
    for p in st["partitions"]:
        k = p["kernel"] or {}
        owned = k.get("devices_owned") if k.get("alive") else None
        t.add_row(
            str(p["partition"]),
            k.get("role_now", p["role"]) if k.get("alive") else p["role"],
            ",".join(owned if owned is not None else p["devices"]) or "-",
            str(k.get("pid", "-")) + ("" if k.get("alive", True) else " (dead)"),
            k.get("state", "-"),
            f"{k['heartbeat_age_s'] * 1000:.0f} ms" if "heartbeat_age_s" in k else "-",
            f"{k['boot_s'] * 1000:.0f} ms" if "boot_s" in k else "-",
            (k.get("mount", "-") + ("" if k.get("mounted", True) else " (not mounted)"))
            if k
            else "-",
        )
    console.print(t)
    for p in st["partitions"]:
        k = p["kernel"] or {}
        if k.get("dying_message"):
            console.print(
                f"partition {p['partition']} dying message: {k['dying_message']} (at {k['site']})"
            )
    if st.get("last_recovery"):
        render_report(st["last_recovery"])


def crash_cmd(
    fault: str = typer.Option(
        ..., help="panic, hang, kill, wild-write, bit-flip, fs-corrupt, exception-in-request"
    ),
    target: Optional[str] = typer.Option(
        None,
        help="for wild-write/bit-flip: dirty-page, clean-page, page-descriptor, dirty-inode-list, "
        "inode, superblock, open-file (a kernel that keeps its processes), in-flight (the "
        "in-flight entry of the request in hand when the fault activates), crash-kernel "
        "(a partition with a loaded crash kernel)",
    ),
    site: Optional[str] = typer.Option(
        None, help="where the fault activates: " + ", ".join(SITES) + " (crashbench list)"
    ),
    wait: bool = typer.Option(
        False, "--wait", help="return when recovery is over, or when it is clear none will come"
    ),
    workdir: Path = typer.Option(DEFAULT_WORKDIR, help="the lab's work directory"),
    json_out: bool = typer.Option(False, "--json"),
):
    """Inject a fault into the active kernel."""
    from harness.lab import LabError
    from kernel.core.faults import FaultError, validate

    try:
        validate(fault, target, site)
    except FaultError as e:
        err.print(f"crashbench crash: {e}")
        raise typer.Exit(2)
    lab = _lab(workdir)
    try:
        res = lab.crash(fault, target, site, wait=wait)
    except LabError as e:
        err.print(f"crashbench crash: {e}")
        raise typer.Exit(2)
    if json_out:
        print(json.dumps(res, indent=2))
        return
    inj = res["injected"]
    console.print(
        f"injected {inj['fault']}"
        + (f" into {inj['target']}" if inj.get("target") else "")
        + f" at site {inj['site']}"
        + (f": {inj['detail']}" if inj.get("detail") else "")
    )
    if wait:
        if res["report"] is None:
            console.print("no failure followed (the fault did not bring the kernel down in time)")
        else:
            render_report(res["report"])


def render_report(r: dict) -> None:
    """A recovery report as a phase table, like the downtime breakdown of the Orthros paper."""
    t = Table(title=f"recovery by {r['scheme']} after {r['fault'] or 'a failure'}: {r['verdict']}")
    t.add_column("phase")
    t.add_column("time", justify="right")
    for p in r["phases"]:
        t.add_row(
            p["name"] + (" (modeled)" if p["modeled"] else ""), f"{p['seconds'] * 1000:.1f} ms"
        )
    if r["outage_s"] is not None:
        t.add_row("[bold]crash to service[/]", f"[bold]{r['outage_s'] * 1000:.1f} ms[/]")
    console.print(t)
    c = r["cache"]
    console.print(
        f"detected by {r['detected_by']}; file cache: {c['pages_before']} pages before "
        f"({c['dirty_pages_before']} dirty), {c['pages_recovered']} recovered "
        f"({c['dirty_pages_recovered']} dirty), {c['pages_rejected']} rejected, "
        f"{c['dirty_pages_lost']} dirty pages lost"
        + (
            f", {c['dirty_pages_superseded']} superseded (truncated by a request first)"
            if c.get("dirty_pages_superseded")
            else ""
        )
        + (
            f", {c['metadata_rejected']} metadata blocks refused"
            if c.get("metadata_rejected")
            else ""
        )
    )
    if r["modeled_s"]:
        console.print(f"includes {r['modeled_s'] * 1000:.1f} ms of modeled hardware time")
    for n in r.get("notes", []):
        console.print(f"note: {n}")


def down_cmd(
    workdir: Path = typer.Option(DEFAULT_WORKDIR, help="the lab's work directory"),
    all_: bool = typer.Option(
        False,
        "--all",
        help="instead: remove every machine left by a killed run or lab (one whose owner is gone)",
    ),
):
    """Stop everything: no process, mount, namespace or memory file of the lab remains."""
    if all_:
        raise typer.Exit(down_orphans())
    for line in _lab(workdir).down():
        console.print(line)
    console.print("lab is down")


def warn_orphans(command: str) -> None:
    """One line on stderr naming the machines killed runs or labs left, if any."""
    from harness import owners

    line = owners.warning(command)
    if line:
        err.print(line, markup=False, highlight=False)


def _down_stores() -> int:
    """Remove the scratch directories killed runs and campaigns left (their data sets:
    harness/prepared.py); 1 if one stays."""
    import shutil

    from harness import prepared

    status = 0
    for d in prepared.orphan_stores():
        try:
            shutil.rmtree(d)
            of_campaign = d.name.startswith(prepared.CAMPAIGN_PREFIX)
            what = "campaign's scratch directory" if of_campaign else "run's data set"
            console.print(f"removed a killed {what} {d}", markup=False, highlight=False)
        except OSError as e:
            err.print(f"crashbench down: {d}: {e}", markup=False, highlight=False)
            status = 1
    return status


def down_orphans() -> int:
    """Remove every orphan, print what went; 1 when one could not be removed entirely."""
    from harness import owners

    status = 0
    found = owners.orphans()
    live = len(owners.records()) - len(found)  # counted before the orphans' records go
    for r in found:
        console.print(f"{r.describe()}:", markup=False, highlight=False)
        try:
            for line in owners.clean(r):
                console.print(f"  {line}", markup=False, highlight=False)
        except Exception as e:  # noqa: BLE001 - named, and the next orphan still cleaned
            err.print(
                f"crashbench down: {r.describe()}: {type(e).__name__}: {e}",
                markup=False,
                highlight=False,
            )
            status = 1
    status = max(status, _down_stores())
    console.print(
        f"{len(found)} orphan(s) removed" if found else "no orphans", markup=False, highlight=False
    )
    if live:
        console.print(
            f"left alone: {live} machine(s) whose owner is alive", markup=False, highlight=False
        )
    return status
