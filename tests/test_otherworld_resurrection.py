"""Otherworld resurrects the crashed kernel's processes in place: same pid, open files, state."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from harness.testbed import Testbed
from systems.base import check_report
from systems.otherworld import Otherworld
from tests.test_keep_processes import (
    corrupt_an_open_file_record_and_crash,
    crash_inside,
    dav_pid,
    exclusive_create,
    free_port,
    http,
    inflight_note,
    wait_for,
    wait_http,
    wsgidav,
)
from tests.test_otherworld import PHASES

pytestmark = [pytest.mark.root]


def crash(s, fault, **kw):
    reply = s.inject(fault, **kw)
    assert reply["ok"], reply
    return check_report(s.on_crash(reply, timeout=30))


@pytest.fixture
def dav():
    with Testbed(kind="test", delay=False) as bed:
        port = free_port()
        s = Otherworld()
        mnt = str(bed.host.mountpoint(0))
        bed.deploy(s, [wsgidav(mnt, port, os.path.join(bed.workdir, "wsgidav.log"))])
        url = f"http://127.0.0.1:{port}"
        wait_http(url + "/")
        yield bed, s, url


@pytest.mark.parametrize("fault", ["panic", "kill", "hang"])
def test_webdav_server_goes_on_with_its_pid_after_the_crash_kernel_takes_over(dav, fault):
    bed, s, url = dav
    http("PUT", url + "/before.txt", b"written before")
    pid = dav_pid(s, url)
    r = crash(s, fault)
    assert r.recovered and [p.name for p in r.phases] == PHASES
    assert [(p.name, p.pid, p.fate) for p in r.processes] == [("wsgidav", pid, "preserved")]
    assert r.process_counts() == {"preserved": 1, "restarted": 0, "lost": 0}
    assert r.processes_before == r.processes_recovered == 1
    assert http("GET", url + "/before.txt") == b"written before"
    http("PUT", url + "/after.txt", b"written after")
    assert dav_pid(s, url) == pid
    assert (Path(bed.host.kernels[0].mount) / "after.txt").read_bytes() == b"written after"


def test_a_second_crash_is_survived_with_the_same_pid_again(dav):
    bed, s, url = dav
    pid = dav_pid(s, url)
    r1 = crash(s, "panic")
    assert any("generation 1 loaded" in n for n in r1.notes)
    http("PUT", url + "/between.txt", b"between the crashes")
    r2 = crash(s, "kill")
    assert any("generation 2 loaded" in n for n in r2.notes)
    assert [(p.pid, p.fate) for p in r2.processes] == [(pid, "preserved")]
    assert dav_pid(s, url) == pid and s.images_refused == 0
    assert http("GET", url + "/between.txt") == b"between the crashes"


def test_a_refused_transaction_resurrects_no_process_and_the_next_crash_does_again(dav):
    """The crash kernel refuses the running transaction (the kernel superblock fails its
    check): nothing is resurrected — the server starts again on a new mount — and the
    next crash resurrects the new server (the host holds the new mount's connection)."""
    bed, s, url = dav
    http("PUT", url + "/f.txt", b"committed")
    bed.host.control(0, {"cmd": "sync"})
    http("PUT", url + "/f.txt", b"acknowledged, then maybe undone")
    pid = dav_pid(s, url)
    r = crash(s, "bit-flip", target="superblock")
    assert r.recovered and any("processes not resurrected" in n for n in r.notes), r.notes
    assert [p.fate for p in r.processes if p.fate == "preserved"] == []
    wait_http(url + "/")
    assert dav_pid(s, url) != pid
    assert http("GET", url + "/f.txt") in (b"committed", b"acknowledged, then maybe undone")
    http("PUT", url + "/g.txt", b"after")
    restarted = dav_pid(s, url)
    r = crash(s, "panic")
    assert [(p.pid, p.fate) for p in r.processes] == [(restarted, "preserved")]
    assert http("GET", url + "/g.txt") == b"after"


@pytest.mark.parametrize("fault", ["wild-write", "bit-flip"])
def test_a_corrupted_open_file_record_is_refused_and_restarts_exactly_its_process(fault):
    corrupt_an_open_file_record_and_crash(Otherworld(), fault)


def editor(wd: Path, save: Path | None) -> dict:
    argv = [sys.executable, "-m", "kernel.apps.rtaware_editor", "--fifo", str(wd / "ed.fifo")]
    if save is not None:
        argv += ["--crash-save", str(save)]
    return {"name": "editor", "argv": argv, "runtime_aware": True, "log": str(wd / "ed.log")}


def feed(wd: Path, text: bytes) -> None:
    fd = os.open(wd / "ed.fifo", os.O_WRONLY)
    try:
        os.write(fd, text)
    finally:
        os.close(fd)


def log_lines(wd: Path) -> list[str]:
    p = wd / "ed.log"
    return p.read_text().splitlines() if p.exists() else []


def editor_pid(wd: Path) -> int:
    out = subprocess.run(["pgrep", "-f", str(wd / "ed.fifo")], capture_output=True, text=True)
    (pid,) = out.stdout.split()
    return int(pid)


@pytest.mark.parametrize("fault", ["panic", "hang"])
def test_a_runtime_aware_editor_runs_its_crash_procedure_then_goes_on(fault):
    with Testbed(kind="test", delay=False) as bed:
        wd = Path(bed.workdir)
        s = Otherworld()
        save = Path(bed.host.mountpoint(0)) / "rescued.txt"
        bed.deploy(s, [editor(wd, save)])
        wait_for(lambda: any(ln.startswith("loaded") for ln in log_lines(wd)))
        feed(wd, b"unsaved one\nunsaved two\n")
        wait_for(lambda: any("lines=2" in ln for ln in log_lines(wd)))
        pid = editor_pid(wd)
        r = crash(s, fault)
        (fate,) = r.processes
        assert (fate.name, fate.pid, fate.fate) == ("editor", pid, "preserved")
        assert fate.reason.endswith("its crash procedure called")
        assert any("1 crash procedures called" in n for n in r.notes)
        wait_for(lambda: any(ln.startswith("crash procedure") for ln in log_lines(wd)))
        assert save.read_bytes() == b"unsaved one\nunsaved two\n"
        feed(wd, b"after the crash\n")
        wait_for(lambda: any("lines=3" in ln for ln in log_lines(wd)))
        lines = log_lines(wd)
        assert sum(ln.startswith("loaded") for ln in lines) == 1 and editor_pid(wd) == pid
        # the procedure ran before the editor took anything new, on the buffer it had
        procedure = next(i for i, ln in enumerate(lines) if ln.startswith("crash procedure"))
        assert "lines=2" in lines[procedure]
        assert procedure < next(i for i, ln in enumerate(lines) if "lines=3" in ln)


def test_an_editor_with_no_crash_procedure_goes_on_without_one():
    with Testbed(kind="test", delay=False) as bed:
        wd = Path(bed.workdir)
        s = Otherworld()
        bed.deploy(s, [editor(wd, None)])
        wait_for(lambda: any(ln.startswith("loaded") for ln in log_lines(wd)))
        feed(wd, b"only line\n")
        wait_for(lambda: any("lines=1" in ln for ln in log_lines(wd)))
        pid = editor_pid(wd)
        r = crash(s, "panic")
        (fate,) = r.processes
        assert fate.fate == "preserved" and fate.reason == "entry valid, process running"
        feed(wd, b"second line\n")
        wait_for(lambda: any("lines=2" in ln for ln in log_lines(wd)))
        assert editor_pid(wd) == pid
        assert not any(ln.startswith("crash procedure") for ln in log_lines(wd))


def test_a_files_trial_loses_no_write_and_keeps_the_server(tmp_path):
    from harness import driver

    timing = dict(driver.DEFAULTS, warmup_s=1.0, steady_s=2.0, post_s=2.0)
    spec = driver.TrialSpec("otherworld", "files", "panic", 0, 1, timing)
    rec = driver.run_one(spec, tmp_path)
    assert rec.get("error") is None and rec["recovered"]
    assert rec["acked_writes"] > 0 and rec["lost_writes"] == rec["corrupted_writes"] == 0
    assert rec["recovery"]["first_ok_after_s"] is not None
    assert [(p["name"], p["fate"]) for p in rec["report"]["processes"]] == [
        ("wsgidav", "preserved")
    ]
    assert "process resurrection" in rec["phases"]


@pytest.mark.parametrize("fault", ["panic", "kill", "hang"])
def test_postgres_goes_on_with_its_pid_and_runs_no_crash_recovery(tmp_path, fault):
    from harness import driver

    timing = dict(driver.DEFAULTS, warmup_s=1.0, steady_s=2.0, post_s=2.0)
    spec = driver.TrialSpec(
        "otherworld", "postgres", fault, 0, 1, timing, workload_params={"scale": 2, "clients": 3}
    )
    rec = driver.run_one(spec, tmp_path)
    assert rec.get("error") is None and rec["recovered"]
    assert rec["acked_writes"] > 0 and rec["lost_writes"] == 0
    assert [(p["name"], p["fate"]) for p in rec["report"]["processes"]] == [
        ("postgres", "preserved")
    ]
    # the server never started again: one start in its log, the first, without recovery
    (start,) = rec["checks"]["server_starts"]
    assert start["recovery"] is False and start["redo_s"] is None
    assert rec["checks"]["amcheck"]["checked"] and rec["checks"]["amcheck"]["ok"]
    assert rec["checks"]["bank"]["ok"] is True


def test_an_exclusive_create_the_dead_kernel_applied_is_answered_from_its_table(dav):
    bed, s, url = dav
    path = Path(bed.host.kernels[0].mount) / "lockfile"
    done, r = crash_inside(bed, s, "fuse.reply", exclusive_create(path))  # applied, unanswered
    assert done == {"result": 4}, done  # not EEXIST: the create was not made twice
    assert path.read_bytes() == b"held"
    assert inflight_note(r).startswith("in-flight requests: 1 answered")
