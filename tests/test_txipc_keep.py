"""txipc_sim when its kernel dies: inside a request, the request is rolled back and a new
kernel on the same partition keeps the applications (same pids) and the connection; a
damaged undo log, or a death outside any request, falls back to a reboot, reported so."""

from __future__ import annotations

import errno
import os
import threading
import time
from pathlib import Path

import pytest

from harness.testbed import Testbed
from kernel.core.txlog import HEADER, OPEN, RECORD, UndoLog
from kernel.hw.physmem import PhysMem, partition_layout
from kernel.tools.fsck import fsck
from systems.base import check_report
from systems.txipc_sim import TxIPCSim
from tests.test_keep_processes import crash_inside, dav_pid, free_port, http, wait_http, wsgidav

pytestmark = pytest.mark.root

TAKEN_OVER = [
    "detect",
    "fence",
    "log check",
    "kernel start",
    "roll-back",
    "cache migration",
    "mount + replay",
    "process resurrection",
    "first service",
]


@pytest.fixture
def dav():
    with Testbed(kind="test", delay=False) as bed:
        port = free_port()
        s = TxIPCSim()
        mnt = str(bed.host.mountpoint(0))
        bed.deploy(s, [wsgidav(mnt, port, os.path.join(bed.workdir, "wsgidav.log"))])
        url = f"http://127.0.0.1:{port}"
        wait_http(url + "/")
        yield bed, s, url


def put_some(url: str, tag: str, n: int = 3) -> dict[str, bytes]:
    """Acknowledged writes: each PUT answered."""
    out = {f"{tag}{i}.bin": os.urandom(7000 * (i + 1)) for i in range(n)}
    for name, data in out.items():
        http("PUT", f"{url}/{name}", data)
    return out


def check_served(url: str, want: dict[str, bytes]) -> None:
    for name, data in want.items():
        assert http("GET", f"{url}/{name}") == data, name


def fsck_after_stop(bed) -> list:
    host = bed.host
    disk = host.workdir / host.machine.disks[0].image
    assert host.stop(0) == 0
    return fsck(disk).problems


@pytest.mark.parametrize("fault", ["panic", "kill"])
@pytest.mark.parametrize("site", ["vfs.write", "vfs.create"])
def test_a_death_inside_a_request_is_rolled_back_and_the_server_goes_on_with_its_pid(
    dav, fault, site
):
    bed, s, url = dav
    before = put_some(url, "a")
    pid = dav_pid(s, url)
    body = os.urandom(50_000)
    done, r = crash_inside(bed, s, site, lambda: http("PUT", url + "/during.bin", body), fault)
    assert "error" not in done, done  # the request in hand: executed again, answered
    assert [p.name for p in r.phases] == TAKEN_OVER
    assert r.figures["taken_over"] == 1 and r.figures["stores_rolled_back"] > 0
    assert "not_recovered" not in r.figures
    assert [(p.name, p.pid, p.fate) for p in r.processes] == [("wsgidav", pid, "preserved")]
    assert r.processes_before == r.processes_recovered == 1
    after = put_some(url, "b")
    assert dav_pid(s, url) == pid
    check_served(url, before | after | {"during.bin": body})  # 0 acknowledged writes lost
    assert fsck_after_stop(bed) == []


def test_a_second_death_inside_a_request_is_survived_too(dav):
    bed, s, url = dav
    pid = dav_pid(s, url)
    first = put_some(url, "a", 1)
    crash_inside(bed, s, "vfs.write", lambda: http("PUT", url + "/one.bin", b"1" * 9000))
    done, r = crash_inside(bed, s, "vfs.write", lambda: http("PUT", url + "/two.bin", b"2" * 9000))
    assert "error" not in done and r.figures["taken_over"] == 1
    assert dav_pid(s, url) == pid
    check_served(url, first | {"one.bin": b"1" * 9000, "two.bin": b"2" * 9000})


def log_header(bed) -> tuple[PhysMem, int]:
    p = bed.host.machine.partition(0)
    _, phys, _ = UndoLog.place(partition_layout(0, p.base, p.size))
    return PhysMem(bed.host.physmem), phys


def wait_hung(bed, timeout: float = 10.0) -> None:
    """Until the hang activated: the kernel stopped inside the request, its log open."""
    deadline = time.monotonic() + timeout
    while not bed.host.mail(0).activated_ns:
        assert time.monotonic() < deadline, "the hang never activated"
        time.sleep(0.01)


@pytest.mark.parametrize("where", ["header", "record"])
def test_a_damaged_undo_log_is_refused_counted_and_the_machine_reboots(dav, where):
    bed, s, url = dav
    pid = dav_pid(s, url)
    reply = s.inject("hang", site="vfs.write")  # the request stays open, its stores logged
    assert reply["ok"], reply
    hung = threading.Thread(target=lambda: put_quietly(url + "/during.bin", b"x" * 20_000))
    hung.start()
    wait_hung(bed)
    mem, phys = log_header(bed)
    try:
        assert mem.read(phys + 6, 1)[0] == OPEN
        # the header's tid, or the first record's old bytes (past its 24-byte head)
        at = phys + 8 if where == "header" else phys + HEADER.itemsize + RECORD.itemsize
        mem.write(at, bytes([mem.read(at, 1)[0] ^ 0x10]))
    finally:
        mem.close()
    r = check_report(s.on_crash(reply, timeout=30))
    hung.join(30)
    assert r.recovered and r.figures["not_recovered"] == 1 and r.figures["logs_refused"] == 1
    assert s.logs_refused == 1 and "taken_over" not in r.figures
    assert any(x.startswith("undo log: LogDamaged") for x in r.rejected)
    assert any(n.startswith("not recovered by the transaction: undo log refused") for n in r.notes)
    assert [p.name for p in r.phases][:3] == ["detect", "fence", "log check"]
    assert [p.name for p in r.phases][-1] == "first service"  # the reboot's
    wait_http(url + "/")
    assert dav_pid(s, url) != pid  # started again by the reboot, not kept
    assert fsck_after_stop(bed) == []


def put_quietly(url: str, data: bytes) -> None:
    """A PUT whose request the crash may fail (a reboot aborts the connection)."""
    try:
        http("PUT", url, data)
    except OSError:
        pass


def test_a_death_outside_any_request_falls_back_to_a_reboot(dav):
    bed, s, url = dav
    pid = dav_pid(s, url)
    reply = s.inject("panic")  # at once, from the control thread: no request open
    assert reply["ok"], reply
    r = check_report(s.on_crash(reply, timeout=30))
    assert r.recovered and r.figures["not_recovered"] == 1 and "taken_over" not in r.figures
    assert any(
        n.startswith("not recovered by the transaction") and "no request open" in n for n in r.notes
    )
    assert [p.name for p in r.phases][:3] == ["detect", "fence", "log check"]
    assert s.logs_refused == 0
    wait_http(url + "/")
    assert dav_pid(s, url) != pid
    assert fsck_after_stop(bed) == []


@pytest.mark.parametrize("fault", ["wild-write", "bit-flip"])
def test_a_corruption_whose_oops_comes_inside_a_request_is_rolled_back_and_rejected(dav, fault):
    """What is caught: the corruption is made outside any request (it is no store of one),
    its oops comes inside a request; that request is rolled back, the corrupted page is
    refused by its checksum when the new kernel adopts the memory, and the rest is kept."""
    bed, s, url = dav
    pid = dav_pid(s, url)
    mnt = Path(bed.host.kernels[0].mount)
    unsynced = {f"u{i}": os.urandom(5 * 4096) for i in range(3)}
    for name, data in unsynced.items():
        (mnt / name).write_bytes(data)
    body = os.urandom(9000)
    done, r = crash_inside(
        bed,
        s,
        "vfs.create",
        lambda: http("PUT", url + "/new.bin", body),
        fault,
        target="dirty-page",
    )
    assert "error" not in done, done
    assert r.figures["taken_over"] == 1 and [p.name for p in r.phases] == TAKEN_OVER
    assert r.cache.pages_rejected == 1 and r.rejected[0].startswith("page frame"), r.rejected
    assert r.cache.dirty_pages_recovered == r.cache.dirty_pages_before - 1
    assert [(p.name, p.pid, p.fate) for p in r.processes] == [("wsgidav", pid, "preserved")]
    check_served(url, {"new.bin": body})
    intact = 0
    for name, data in unsynced.items():  # the data or EIO, never zeros nor stale data
        try:
            intact += (mnt / name).read_bytes() == data
        except OSError as e:
            assert e.errno == errno.EIO, e
    assert intact == len(unsynced) - 1
