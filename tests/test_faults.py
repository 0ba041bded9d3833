"""Fault injection into a running kernel: each fault kills or hangs it as named."""

import subprocess
import sys
import time
from pathlib import Path

import pytest

from harness.inspect import inspect_partition
from kernel.hw import mailbox

pytestmark = [pytest.mark.root]


def write_some(host, n=4, size=20_000):
    mnt = Path(host.kernels[0].mount)
    for i in range(n):
        (mnt / f"f{i}").write_bytes(bytes([65 + i]) * size)


def inject(host, fault, **kw):
    reply = host.control(0, {"cmd": "inject", "fault": fault, **kw})
    assert reply["ok"], reply
    return reply


def wait_dead(host, timeout=10.0):
    host.kernels[0].proc.wait(timeout)


def test_panic_leaves_a_dying_message_and_a_readable_dirty_list(host):
    write_some(host)
    inject(host, "panic")
    wait_dead(host)
    mail = host.mail(0)
    assert mail.state == mailbox.PANICKED and "injected panic" in mail.reason
    assert mail.fault == "panic" and mail.activated_ns >= mail.injected_ns > 0
    info = inspect_partition(host.physmem, host.machine, 0)
    assert info["rejected"] == []
    assert sum(d["dirty_pages"] for d in info["dirty_inodes"] if d["ino"]) == 4 * 5


def test_kill_leaves_no_dying_message(host):
    write_some(host)
    inject(host, "kill")
    wait_dead(host)
    mail = host.mail(0)
    assert mail.state == mailbox.RUNNING and mail.reason == "" and mail.panic_ns == 0
    info = inspect_partition(host.physmem, host.machine, 0)
    assert sum(d["dirty_pages"] for d in info["dirty_inodes"] if d["ino"]) == 4 * 5


def test_hang_stops_the_heartbeat_and_a_monitor_notices(host):
    write_some(host, n=1)
    interval = host.mail(0).interval_ns / 1e9
    reply = inject(host, "hang")
    t_inject = reply["injected_ns"]
    detected = None
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        m = host.mail(0)
        if time.monotonic_ns() - m.beat_ns > 3 * interval * 1e9:
            detected = time.monotonic_ns()
            break
        time.sleep(interval / 4)
    assert detected is not None, "the heartbeat kept beating after a hang"
    assert (detected - t_inject) / 1e9 < 2.0  # generous: 3 beats plus scheduling noise
    beat = host.mail(0).beat
    time.sleep(10 * interval)
    assert host.mail(0).beat == beat  # really stopped, not slowed
    assert host.kernels[0].alive()  # a hang is not a death
    m = host.mail(0)
    assert m.state == mailbox.RUNNING and m.reason == ""


@pytest.mark.parametrize(
    "target,kind", [("dirty-page", "page frame"), ("page-descriptor", "page descriptor")]
)
def test_wild_write_is_rejected_by_the_reader(host, target, kind):
    write_some(host)
    reply = inject(host, "wild-write", target=target)
    wait_dead(host)
    mail = host.mail(0)
    assert mail.state == mailbox.PANICKED and mail.fault_target == target
    info = inspect_partition(host.physmem, host.machine, 0)
    assert len(info["rejected"]) == 1, info["rejected"]
    assert info["rejected"][0]["object"] == kind
    good = sum(d["dirty_pages"] for d in info["dirty_inodes"] if d["ino"])
    assert good == 4 * 5 - 1, reply


def test_bit_flip_in_the_dirty_inode_list_is_rejected(host):
    write_some(host)
    inject(host, "bit-flip", target="dirty-inode-list")
    wait_dead(host)
    info = inspect_partition(host.physmem, host.machine, 0)
    inodes = [r for r in info["rejected"] if r["object"] == "in-core inode"]
    orphans = [r for r in info["rejected"] if r["object"] == "page descriptor"]
    assert [r["field"] for r in inodes] == ["checksum"]
    assert len(orphans) == 5 and all("no valid dirty-inode list" in r["why"] for r in orphans)
    good = sum(d["dirty_pages"] for d in info["dirty_inodes"] if d["ino"])
    assert good == 3 * 5  # the other three files lose nothing


def test_exception_in_request_panics_inside_a_write(host):
    inject(host, "exception-in-request", site="vfs.write")
    assert host.kernels[0].alive()  # armed, not yet activated
    target = Path(host.kernels[0].mount) / "victim"
    r = subprocess.run(
        [sys.executable, "-c", f"open({str(target)!r}, 'wb').write(b'x' * 9000)"],
        capture_output=True,
        timeout=30,
    )
    assert r.returncode != 0  # the writer saw its kernel die
    wait_dead(host)
    mail = host.mail(0)
    assert mail.state == mailbox.PANICKED and mail.site == "vfs.write"
    assert mail.fault_site == "vfs.write" and mail.activated_ns > mail.injected_ns


def test_fs_corrupt_trips_the_kernel(host):
    write_some(host)
    host.control(0, {"cmd": "sync"})
    inject(host, "fs-corrupt")
    wait_dead(host)
    mail = host.mail(0)
    assert mail.state == mailbox.PANICKED and mail.reason.startswith("fs: ")


def test_unknown_fault_is_refused_and_the_kernel_lives(host):
    reply = host.control(0, {"cmd": "inject", "fault": "meteor"})
    assert not reply["ok"] and "unknown fault 'meteor'" in reply["error"]
    reply = host.control(0, {"cmd": "inject", "fault": "wild-write", "target": "kitchen"})
    assert not reply["ok"] and "unknown target 'kitchen'" in reply["error"]
    assert host.kernels[0].alive()


def _pid_gone(pid: int, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with open(f"/proc/{pid}/stat") as f:
                if f.read().split(") ", 1)[1].startswith("Z"):
                    return True
        except OSError:
            return True
        time.sleep(0.01)
    return False


@pytest.mark.parametrize("fault", ["panic", "kill", "hang"])
def test_apps_of_the_partition_are_gone_after_the_fault(host, fault):
    from kernel.core.proc import ProcessSet, read_proc_table
    from kernel.hw.physmem import PhysMem, partition_layout

    host.stop(0)
    kp = host.boot(
        0,
        apps=[
            {"name": "sleeper", "argv": ["sleep", "600"]},
            {"name": "sleeper2", "argv": ["sleep", "601"]},
        ],
    )
    mem = PhysMem(host.physmem, readonly=True)
    try:
        p = host.machine.partition(0)
        entries, rejected = read_proc_table(mem, partition_layout(0, p.base, p.size))
    finally:
        mem.close()
    assert rejected == [] and sorted(e["name"] for e in entries) == ["sleeper", "sleeper2"]
    pids = [e["pid"] for e in entries]
    inject(host, fault)
    if fault == "hang":
        assert host.kernels[0].alive() and not any(_pid_gone(p, 0.2) for p in pids)
        report = ProcessSet(host.tag, 0).fence()  # what a recovery scheme does to a hung kernel
        assert report.killed >= 3  # the kernel and both apps
    else:
        wait_dead(host)
    assert all(_pid_gone(p) for p in pids), "an app outlived its kernel"
    assert kp.proc.wait(10) is not None


def _state(pid: int) -> str | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ", 1)[1][0]
    except OSError:
        return None


def test_a_panic_stops_every_process_of_the_partition_until_the_fence(host):
    """A grandchild that left its app's session outlives the app (no parent-death signal
    reaches it); the panic must still stop it, as a real panic halts every CPU, so it can
    answer nobody before the recovery scheme's fence kills it."""
    from kernel.core.proc import ProcessSet

    host.stop(0)
    pidfile = host.workdir / "grandchild.pid"
    host.boot(
        0,
        apps=[
            {
                "name": "forker",
                "argv": [
                    "sh",
                    "-c",
                    f"setsid sleep 600 & echo $! > {pidfile}.tmp && mv {pidfile}.tmp {pidfile}; wait",
                ],
            }
        ],
    )
    deadline = time.monotonic() + 10
    while not pidfile.exists() and time.monotonic() < deadline:
        time.sleep(0.01)
    gpid = int(pidfile.read_text())
    while _state(gpid) != "S" and time.monotonic() < deadline:
        time.sleep(0.01)  # exec'ing sleep: running, then asleep
    assert _state(gpid) == "S"
    inject(host, "panic")
    wait_dead(host)
    assert _state(gpid) == "T", "a process of the partition kept running after the panic"
    ProcessSet(host.tag, 0).fence()
    assert _pid_gone(gpid)
