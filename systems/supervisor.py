"""The lab's supervisor: one process that deploys a scheme and runs it, crash after crash.

Promises to the lab (harness/lab.py): ``python -m systems.supervisor`` deploys the scheme
on the lab's machine, writes ``ready`` on the fd it was given (or, when the machine does not
come up, ``failed: `` and the cause in one line, e.g. the exception a kernel's boot ended
with), then waits for failures;
after each one it writes the scheme's RecoveryReport to ``reports/NNN.json`` and the kernels
that now run to ``supervisor.json``. SIGTERM stops every kernel it started (cleanly when
it still beats, at once when it does not) and removes their mounts; whatever happened
(a failed boot, a failed teardown), the host's processes, process sets and memory go too.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from pathlib import Path

from kernel import machine as machine_mod
from kernel.host import Host
from kernel.kernel import notify_ready
from systems.base import check_report, registry

STATE = "supervisor.json"


def write_json(path: Path, obj) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(obj, indent=2))
    os.replace(tmp, path)


def publish(host: Host, workdir: Path, scheme) -> None:
    write_json(workdir / STATE, {
        "pid": os.getpid(), "scheme": scheme.name, "active": scheme.active,
        "kernels": {str(p): {"pid": k.pid, "mount": k.mount, "boot_wall_s": k.boot_wall_s}
                    for p, k in host.kernels.items()}})


def stop_all(host: Host, scheme) -> None:
    """Clean shutdown of every kernel still beating; the scheme's teardown kills the rest."""
    for p in list(host.kernels):
        try:
            m = host.mail(p)
            beating = time.monotonic_ns() - m.beat_ns < 5 * m.interval_ns
        except Exception:  # unreadable mailbox: treat the kernel as dead
            beating = False
        if beating and host.kernels[p].alive():
            host.stop(p, timeout=30.0)
    scheme.teardown()


def tell_failure(fd: int | None, e: Exception) -> None:
    """The cause of a failed deploy, one line, to whoever waits for ``ready``. A BootError
    carries the end of the kernel's log, whose last line is the exception it died of."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()] or [type(e).__name__]
    cause = lines[0] if len(lines) == 1 else f"{lines[0]} {lines[-1]}"
    if fd is not None:
        os.write(fd, f"failed: {cause}\n".encode()[:4096])
        os.close(fd)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m systems.supervisor")
    ap.add_argument("--workdir", required=True)
    ap.add_argument("--scheme", required=True)
    ap.add_argument("--machine")
    ap.add_argument("--ready-fd", type=int)
    ap.add_argument("--net-tag", help="the lab's network, for schemes that take the NIC over")
    a = ap.parse_args(argv)
    workdir = Path(a.workdir)
    reports = workdir / "reports"
    reports.mkdir(exist_ok=True)
    host = Host(workdir, machine_mod.load(a.machine), machine_file=a.machine)
    scheme = registry()[a.scheme]()
    if a.net_tag:
        scheme.net_tag = a.net_tag
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    try:
        try:
            host.create_memory()
            host.format_disks()
            scheme.deploy(host)
        except Exception as e:
            tell_failure(a.ready_fd, e)
            raise
        publish(host, workdir, scheme)
        notify_ready(a.ready_fd)
        n = len(list(reports.glob("*.json")))
        while True:
            try:
                report = check_report(scheme.on_crash(timeout=3600))
            except TimeoutError:
                continue
            n += 1
            write_json(reports / f"{n:03d}.json", report.to_dict())
            publish(host, workdir, scheme)
            if not report.recovered:
                signal.pause()   # nothing more will come; wait to be stopped
    finally:
        try:
            stop_all(host, scheme)
        finally:
            host.close()    # also when the scheme's teardown failed (a boot that failed)
    return 0


if __name__ == "__main__":
    sys.exit(main())
