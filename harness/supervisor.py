"""The lab's supervisor: one process that deploys a scheme and runs it, crash after crash.

Promises to the lab (harness/lab.py): ``python -m harness.supervisor`` deploys the scheme
(made with the keyword ``--options`` the lab's ``up`` was given) on the lab's machine (a harness/testbed.py ``Testbed`` in the lab's work directory, whose
ownership record the lab keeps), writes ``ready`` on the fd it was given (or, when the machine does not
come up, ``failed: `` and the cause in one line, e.g. the exception a kernel's boot ended
with), then waits for failures;
after each one it writes the scheme's RecoveryReport to ``reports/NNN.json`` and the kernels
that now run to ``supervisor.json`` (with whether the deployed scheme keeps processes). SIGTERM stops every kernel it started (cleanly when
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

from harness.testbed import Testbed
from kernel.core.kernel import notify_ready
from kernel.hw.host import Host
from systems.base import check_report, registry

STATE = "supervisor.json"


def write_json(path: Path, obj) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(obj, indent=2))
    os.replace(tmp, path)


def publish(host: Host, workdir: Path, scheme) -> None:
    write_json(
        workdir / STATE,
        {
            "pid": os.getpid(),
            "scheme": scheme.name,
            "active": scheme.active,
            "keeps_processes": scheme.capabilities.keeps_unmodified_processes,
            "kernels": {
                str(p): {"pid": k.pid, "mount": k.mount, "boot_wall_s": k.boot_wall_s}
                for p, k in host.kernels.items()
            },
        },
    )


def stop_beating(host: Host) -> None:
    """Clean shutdown of every kernel still beating; the testbed's teardown kills the rest."""
    for p in list(host.kernels):
        try:
            m = host.mail(p)
            beating = time.monotonic_ns() - m.beat_ns < 5 * m.interval_ns
        except Exception:  # unreadable mailbox: treat the kernel as dead
            beating = False
        if beating and host.kernels[p].alive():
            host.stop(p, timeout=30.0)


def tell_failure(fd: int | None, e: Exception) -> None:
    """The cause of a failed deploy, one line, to whoever waits for ``ready``. A BootError
    carries the end of the kernel's log, whose last line is the exception it died of."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()] or [type(e).__name__]
    cause = lines[0] if len(lines) == 1 else f"{lines[0]} {lines[-1]}"
    if fd is not None:
        os.write(fd, f"failed: {cause}\n".encode()[:4096])
        os.close(fd)


def serve(host: Host, workdir: Path, scheme, reports: Path, ready_fd: int | None) -> None:
    """Report ready, then one report per failure until stopped."""
    publish(host, workdir, scheme)
    notify_ready(ready_fd)
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
            signal.pause()  # nothing more will come; wait to be stopped


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m harness.supervisor")
    ap.add_argument("--workdir", required=True)
    ap.add_argument("--scheme", required=True)
    ap.add_argument("--machine")
    ap.add_argument("--ready-fd", type=int)
    ap.add_argument("--net-tag", help="the lab's network, for schemes that take the NIC over")
    ap.add_argument(
        "--options", default="{}", help="the scheme's keyword options (JSON object), as `up` set"
    )
    a = ap.parse_args(argv)
    workdir = Path(a.workdir)
    reports = workdir / "reports"
    reports.mkdir(exist_ok=True)
    scheme = registry()[a.scheme](**json.loads(a.options))
    if a.net_tag:
        scheme.net_tag = a.net_tag
    bed = Testbed(kind="lab", machine_file=a.machine, workdir=workdir, owned=False)
    try:
        try:
            bed.up()
            bed.deploy(scheme)
        except BaseException as e:
            tell_failure(a.ready_fd, e)
            raise
        try:
            serve(bed.host, workdir, scheme, reports, a.ready_fd)
        finally:
            stop_beating(bed.host)
    finally:
        bed.down()  # the scheme's teardown, then the host's: also after a failed boot
    return 0


if __name__ == "__main__":
    sys.exit(main())
