"""Orthros keeping processes (its default): unmodified applications run on across a
failover, same pid; a host that cannot keep them falls back to restarting them."""

import errno
import hashlib
import os
import signal
import socket
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from harness.testbed import Testbed
from systems.base import check_report
from systems.orthros import Orthros

pytestmark = [pytest.mark.root]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wsgidav(mount: str, port: int, log: str) -> dict:
    dav = str(Path(sys.executable).with_name("wsgidav"))
    argv = [dav, "--host", "127.0.0.1", "--port", str(port), "--root", mount]
    argv += ["--auth", "anonymous", "--no-config", "-q"]
    return {"name": "wsgidav", "argv": argv, "cwd": "/", "log": log}


def holder(path: str) -> dict:
    """An app that holds a file of the mount open and sleeps."""
    code = "import sys, time; f = open(sys.argv[1], 'ab'); time.sleep(600)"
    return {"name": "holder", "argv": [sys.executable, "-c", code, path], "cwd": "/"}


def http(method: str, url: str, data: bytes | None = None, timeout: float = 20.0) -> bytes:
    req = urllib.request.Request(url, data=data, method=method)
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return r.read()


def wait_http(url: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            http("GET", url, timeout=2)
            return
        except (urllib.error.URLError, OSError):
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def crash(host, s, fault, **kw):
    reply = host.control(s.active, {"cmd": "inject", "fault": fault, **kw})
    assert reply["ok"], reply
    return check_report(s.on_crash(reply, timeout=30))


@pytest.fixture
def kept():
    with Testbed(kind="test", delay=False) as bed:
        port = free_port()
        s = Orthros(keep_processes=True)
        mnt = str(bed.host.mountpoint(0))
        bed.deploy(s, [wsgidav(mnt, port, os.path.join(bed.workdir, "wsgidav.log"))])
        url = f"http://127.0.0.1:{port}"
        wait_http(url + "/")
        yield bed, s, url


def dav_pid(s, port_url: str) -> int:
    port = port_url.rsplit(":", 1)[1]
    out = os.popen(f"ss -Htlnp 'sport = :{port}'").read()
    return int(out.split("pid=")[1].split(",")[0])


@pytest.mark.parametrize("fault", ["panic", "kill", "hang"])
def test_webdav_server_keeps_its_pid_across_a_crash(kept, fault):
    bed, s, url = kept
    http("PUT", url + "/before.txt", b"written before")
    pid = dav_pid(s, url)
    r = crash(bed.host, s, fault)
    assert r.recovered
    assert [(p.name, p.pid, p.fate) for p in r.processes] == [("wsgidav", pid, "preserved")]
    assert r.process_counts() == {"preserved": 1, "restarted": 0, "lost": 0}
    assert http("GET", url + "/before.txt") == b"written before"
    http("PUT", url + "/after.txt", b"written after")
    assert dav_pid(s, url) == pid
    assert (Path(s.mount) / "after.txt").read_bytes() == b"written after"


def test_a_second_crash_after_re_pairing_keeps_it_again(kept):
    bed, s, url = kept
    pid = dav_pid(s, url)
    crash(bed.host, s, "panic")
    assert s.active == 1 and s.backup == 0
    http("PUT", url + "/between.txt", b"between the crashes")
    r = crash(bed.host, s, "kill")
    assert s.active == 0
    assert [(p.pid, p.fate) for p in r.processes] == [(pid, "preserved")]
    assert dav_pid(s, url) == pid
    assert http("GET", url + "/between.txt") == b"between the crashes"


def test_a_refused_transaction_keeps_no_process_and_the_next_crash_keeps_again(kept):
    """The backup refuses the running transaction (the kernel superblock fails its
    check): the server may have been told of changes the disk no longer has, so it is not
    kept — started again on a new mount, serving a whole version of the file — and after
    re-pairing the new server is kept across the next crash (the held connection is the
    new mount's)."""
    bed, s, url = kept
    http("PUT", url + "/f.txt", b"committed")
    bed.host.control(s.active, {"cmd": "sync"})
    http("PUT", url + "/f.txt", b"acknowledged, then undone")
    pid = dav_pid(s, url)
    r = crash(bed.host, s, "bit-flip", target="superblock")
    assert r.recovered and any("processes not kept" in n for n in r.notes), r.notes
    assert [(p.name, p.pid, p.fate) for p in r.processes] == []  # restarted, none kept
    wait_http(url + "/")
    assert dav_pid(s, url) != pid
    assert http("GET", url + "/f.txt") in (b"committed", b"acknowledged, then undone")  # whole
    http("PUT", url + "/g.txt", b"after")
    restarted = dav_pid(s, url)
    r = crash(bed.host, s, "panic")
    assert [(p.pid, p.fate) for p in r.processes] == [(restarted, "preserved")]
    assert http("GET", url + "/g.txt") == b"after"


WRITER = """
import hashlib, os, sys, time
path, chunks = sys.argv[1], int(sys.argv[2])
fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
for i in range(chunks):
    block = hashlib.sha256(str(i).encode()).digest() * 2048  # 64 KiB
    os.write(fd, block)
    time.sleep(0.01)
os.close(fd)
"""


def expected_writer_output(chunks: int) -> bytes:
    return b"".join(hashlib.sha256(str(i).encode()).digest() * 2048 for i in range(chunks))


def test_a_host_process_writing_across_the_failover_loses_no_byte(kept):
    import subprocess

    bed, s, url = kept
    path = Path(s.mount) / "stream.bin"
    chunks = 200  # about 2 s of writing; the crash comes in the middle
    w = subprocess.Popen([sys.executable, "-c", WRITER, str(path), str(chunks)])
    try:
        time.sleep(0.5)
        assert w.poll() is None, "the writer finished before the crash"
        crash(bed.host, s, "panic")
        assert w.wait(30) == 0
    finally:
        if w.poll() is None:
            w.kill()
            w.wait()
    want = hashlib.sha256(expected_writer_output(chunks)).hexdigest()
    assert hashlib.sha256(path.read_bytes()).hexdigest() == want


def test_a_write_in_flight_at_the_crash_is_applied_once(kept):
    bed, s, url = kept
    path = Path(s.mount) / "log.txt"
    head = b"first line\n"
    path.write_bytes(head)
    tail = os.urandom(3 * 4096 + 100)
    reply = bed.host.control(s.active, {"cmd": "inject", "fault": "panic", "site": "vfs.write"})
    assert reply["ok"], reply
    done = {}

    def append() -> None:
        # the kernel dies inside this request, after storing its first page; the backup
        # answers it, re-sent by the host
        fd = os.open(path, os.O_WRONLY | os.O_APPEND)
        try:
            done["n"] = os.write(fd, tail)
        finally:
            os.close(fd)

    t = threading.Thread(target=append)
    t.start()
    r = check_report(s.on_crash(reply, timeout=30))
    t.join(30)  # an unanswered request would block it for good (the bed's close ends it)
    assert not t.is_alive(), "the write in flight at the crash was never answered"
    assert r.recovered and r.fault == "panic" and done["n"] == len(tail)
    assert path.read_bytes() == head + tail


def crash_inside(bed, s, site: str, request, fault: str = "panic", **kw):
    """Crash the kernel at ``site`` inside ``request`` (run by a thread, as by an
    application); the request's outcome (its result or its exception) and the report."""
    reply = bed.host.control(s.active, {"cmd": "inject", "fault": fault, "site": site, **kw})
    assert reply["ok"], reply
    done = {}

    def run() -> None:
        try:
            done["result"] = request()
        except OSError as e:
            done["error"] = e

    t = threading.Thread(target=run)
    t.start()
    r = check_report(s.on_crash(reply, timeout=30))
    t.join(30)
    assert not t.is_alive(), f"the request in flight at the crash ({site}) was never answered"
    assert r.recovered and r.fault == fault
    return done, r


def exclusive_create(path: Path):
    """A request as an application makes it: create ``path`` with O_EXCL, write 4 bytes."""

    def create() -> int:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            return os.write(fd, b"held")
        finally:
            os.close(fd)

    return create


def inflight_note(r) -> str:
    return next(n for n in r.notes if n.startswith("in-flight requests"))


@pytest.mark.parametrize(
    "site, answered",
    [("fuse.reply", 1), ("vfs.create", 0)],  # applied and recorded / undone with its operation
)
def test_an_exclusive_create_in_flight_at_the_crash_is_answered_once(kept, site, answered):
    bed, s, url = kept
    path = Path(s.mount) / "lockfile"
    done, r = crash_inside(bed, s, site, exclusive_create(path))
    assert done == {"result": 4}, done  # not EEXIST: the create was not made twice
    assert path.read_bytes() == b"held"
    assert os.listdir(s.mount).count("lockfile") == 1
    assert inflight_note(r).startswith(f"in-flight requests: {answered} answered")


def test_a_rename_in_flight_at_the_crash_is_answered_once(kept):
    bed, s, url = kept
    old, new = Path(s.mount) / "draft.txt", Path(s.mount) / "final.txt"
    old.write_bytes(b"the text")
    done, r = crash_inside(bed, s, "fuse.reply", lambda: os.rename(old, new))
    assert done == {"result": None}, done  # not ENOENT: the rename was not made twice
    assert not old.exists() and new.read_bytes() == b"the text"
    assert inflight_note(r).startswith("in-flight requests: 1 answered")


@pytest.mark.parametrize("fault", ["bit-flip", "wild-write"])
def test_a_corrupted_in_flight_entry_is_rejected_counted_and_never_served(kept, fault):
    # the entry of a create applied and not yet answered is corrupted as the kernel dies:
    # the backup cannot tell whether it was applied, so the create is answered EIO, never
    # executed twice (EEXIST) nor answered from corrupted bytes
    bed, s, url = kept
    path = Path(s.mount) / "lockfile"

    def create() -> None:
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))

    done, r = crash_inside(bed, s, "fuse.reply", create, fault, target="in-flight")
    assert isinstance(done.get("error"), OSError) and done["error"].errno == errno.EIO, done
    assert sum("in-flight request at" in x for x in r.rejected) == 1
    assert inflight_note(r) == (
        "in-flight requests: 0 answered from the dead kernel's table, "
        "1 answered EIO (record rejected), 1 table entries rejected"
    )
    http("PUT", url + "/after.txt", b"served after")  # the rest goes on
    assert (Path(s.mount) / "after.txt").read_bytes() == b"served after"


def pids_running(argv_part: str) -> list[int]:
    out = []
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                cmd = Path(f"/proc/{d}/cmdline").read_bytes()
            except OSError:
                continue
            if argv_part.encode() in cmd and b"time.sleep" in cmd:
                out.append(int(d))
    return out


def wait_for(fn, timeout: float = 20.0):
    deadline = time.monotonic() + timeout
    while not (v := fn()):
        if time.monotonic() > deadline:
            raise AssertionError(f"{fn} still false after {timeout} s")
        time.sleep(0.05)
    return v


def corrupt_an_open_file_record_and_crash(scheme, fault: str) -> None:
    """A WebDAV server and a holder of an open file under ``scheme``; ``fault`` into an
    open-file record, then a panic: exactly the victim's process restarts (the reason
    names the rejection), the other keeps its pid, what was written is served whole."""
    with Testbed(kind="test", delay=False) as bed:
        port = free_port()
        s = scheme
        mnt = str(bed.host.mountpoint(0))
        held = os.path.join(mnt, "held.txt")
        apps = [wsgidav(mnt, port, os.path.join(bed.workdir, "wsgidav.log")), holder(held)]
        bed.deploy(s, apps)
        url = f"http://127.0.0.1:{port}"
        wait_http(url + "/")
        (old_holder,) = wait_for(lambda: pids_running(held))
        dav = dav_pid(s, url)
        http("PUT", url + "/page.txt", b"served before")
        reply = s.inject(fault, target="open-file")
        assert reply["ok"], reply
        victim = "holder" if "(holder)" in reply["detail"] else "wsgidav"
        r = check_report(s.on_crash(reply, timeout=30))
        fates = {p.name: p for p in r.processes}
        assert fates[victim].fate == "restarted" and "rejected" in fates[victim].reason
        assert all(p.fate == "preserved" for n, p in fates.items() if n != victim)
        assert r.process_counts() == {"preserved": 1, "restarted": 1, "lost": 0}
        assert r.processes_before == 2 and r.processes_recovered == 2
        (new_holder,) = wait_for(lambda: pids_running(held))
        assert (new_holder != old_holder) == (victim == "holder")
        if victim == "wsgidav":
            wait_http(url + "/")
            assert dav_pid(s, url) != dav
        else:
            assert dav_pid(s, url) == dav and fates["holder"].new_pid == new_holder
        assert http("GET", url + "/page.txt") == b"served before"


@pytest.mark.parametrize("fault", ["wild-write", "bit-flip"])
def test_a_corrupted_open_file_record_restarts_exactly_its_process(fault):
    corrupt_an_open_file_record_and_crash(Orthros(keep_processes=True), fault)


def test_a_files_trial_with_keeping_loses_no_write_and_keeps_the_server(tmp_path):
    from harness import driver

    timing = dict(driver.DEFAULTS, warmup_s=1.0, steady_s=2.0, post_s=2.0)
    spec = driver.TrialSpec(
        "orthros", "files", "panic", 0, 1, timing, scheme_options={"keep_processes": True}
    )
    rec = driver.run_one(spec, tmp_path)
    assert rec.get("error") is None and rec["recovered"]
    assert rec["acked_writes"] > 0 and rec["lost_writes"] == rec["corrupted_writes"] == 0
    assert rec["recovery"]["first_ok_after_s"] is not None  # the clients were served again
    kept = [(p["name"], p["fate"]) for p in rec["report"]["processes"]]
    assert kept == [("wsgidav", "preserved")]
    assert "process keeping" in rec["phases"] and "IP takeover" not in rec["phases"]  # NIC stays


def open_records(bed, part: int) -> dict[int, int]:
    """pid -> open-file records, as the active kernel's process table holds them."""
    from kernel.core.proc import read_proc_table
    from kernel.hw.physmem import PhysMem, partition_layout

    p = bed.machine.partition(part)
    mem = PhysMem(bed.host.physmem, readonly=True)
    try:
        entries, _ = read_proc_table(mem, partition_layout(p.id, p.base, p.size))
    finally:
        mem.close()
    return {e["pid"]: len(e["files"]) for e in entries}


def test_a_release_after_one_holder_exits_closes_its_record_not_the_other(tmp_path):
    # two apps hold the same file open; the host releases the open of the one that exits
    # from a kernel thread, without its pid: the other keeps its record
    with Testbed(kind="test", delay=False) as bed:
        s = Orthros(keep_processes=True)
        held = os.path.join(str(bed.host.mountpoint(0)), "held.txt")
        bed.deploy(s, [dict(holder(held), name="first"), dict(holder(held), name="second")])

        def both_open():
            r = open_records(bed, s.active)
            return r if list(r.values()) == [1, 1] else None

        recs = wait_for(both_open)
        first, second = list(recs)  # in table order: the first registered is found first
        os.kill(second, signal.SIGKILL)
        wait_for(lambda: sum(open_records(bed, s.active).values()) == 1)
        assert open_records(bed, s.active).get(first) == 1


def test_without_cgroup_process_sets_orthros_restarts_instead_and_refuses_to_be_asked(
    monkeypatch,
):
    monkeypatch.setenv("CRASHBENCH_PROCSET", "pids")  # kernels inherit it: no cgroup anywhere
    with Testbed(kind="test", delay=False) as bed:
        s = Orthros()
        bed.deploy(s)
        assert s.keep is False and not s.capabilities.keeps_unmodified_processes
        assert crash(bed.host, s, "panic").recovered
    with Testbed(kind="test", delay=False) as bed:
        with pytest.raises(RuntimeError, match="needs cgroup process sets"):
            bed.deploy(Orthros(keep_processes=True))
