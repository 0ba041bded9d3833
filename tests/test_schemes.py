"""Recovery schemes on a live machine; every report passes the validating wrapper."""

import os
from pathlib import Path

import pytest

from harness.testbed import Testbed
from systems.base import CacheCounts, RecoveryReport, ReportError, check_report, registry

pytestmark = [pytest.mark.root]
PAGE = 4096


@pytest.fixture
def deployed(request):
    with Testbed(kind="test", delay=False) as bed:
        scheme = registry()[request.param]()
        bed.deploy(scheme)
        yield bed.host, scheme


def write_files(host, synced: bool, n=3, size=10 * PAGE, prefix="f"):
    mnt = Path(host.kernels[0].mount)
    for i in range(n):
        with open(mnt / f"{prefix}{i}", "wb") as f:
            f.write(bytes([48 + i]) * size)
            if synced:
                f.flush()
                os.fsync(f.fileno())


@pytest.mark.parametrize("deployed", ["reboot"], indirect=True)
def test_reboot_keeps_fsynced_data_and_counts_lost_dirty_pages(deployed):
    host, scheme = deployed
    write_files(host, synced=True, prefix="s")
    write_files(host, synced=False, prefix="u")
    reply = host.control(0, {"cmd": "inject", "fault": "panic"})
    r = check_report(scheme.on_crash(reply))
    assert r.recovered and r.detected_by == "dying message"
    assert r.cache.dirty_pages_before == 3 * 10 and r.cache.dirty_pages_lost == 3 * 10
    assert r.cache.pages_recovered == 0
    assert [p.name for p in r.phases] == [
        "detect",
        "fence",
        "boot",
        "mount + replay",
        "first service",
    ]
    mnt = Path(host.kernels[0].mount)
    for i in range(3):
        assert (mnt / f"s{i}").read_bytes() == bytes([48 + i]) * 10 * PAGE
        assert (
            not (mnt / f"u{i}").exists()
            or (mnt / f"u{i}").read_bytes() != bytes([48 + i]) * 10 * PAGE
        )


def test_the_validating_wrapper_rejects_broken_reports():
    def rep(**kw):
        r = RecoveryReport("x", "panic", 10.0)
        r.phase("detect", 10.0, 10.1)
        r.phase("fence", 10.1, 10.2)
        r.service_at, r.recovered = 10.3, True
        for k, v in kw.items():
            setattr(r, k, v)
        return r

    check_report(rep())
    r = rep()
    r.phases[1].end = 10.05
    with pytest.raises(ReportError, match="ends before it starts"):
        check_report(r)
    r = rep()
    r.phases.reverse()
    with pytest.raises(ReportError, match="starts before the phase before it"):
        check_report(r)
    with pytest.raises(ReportError, match="ends after service was back"):
        check_report(rep(service_at=10.15))
    with pytest.raises(ReportError, match="recovered more pages than there were"):
        check_report(
            rep(cache=CacheCounts(pages_before=1, dirty_pages_before=1, dirty_pages_recovered=2))
        )
    with pytest.raises(ReportError, match="no time of first service"):
        check_report(rep(service_at=None))


def test_reboot_restarts_apps_without_their_state(tmp_path):
    import sys
    import time

    scheme = registry()["reboot"]()
    with Testbed(kind="test", delay=False) as bed:
        host, wd = bed.host, bed.workdir
        fifo, log = os.path.join(wd, "editor.fifo"), os.path.join(wd, "editor.log")
        apps = [
            {
                "name": "editor",
                "argv": [sys.executable, "-m", "kernel.apps.rtaware_editor", "--fifo", fifo],
                "runtime_aware": True,
                "log": log,
            }
        ]
        bed.deploy(scheme, apps)
        deadline = time.monotonic() + 20
        while not (os.path.exists(log) and "loaded" in Path(log).read_text()):
            assert time.monotonic() < deadline, "the editor did not start"
            time.sleep(0.05)
        fd = os.open(fifo, os.O_WRONLY)
        os.write(fd, b"unsaved\n")
        os.close(fd)
        while "lines=1" not in Path(log).read_text():
            assert time.monotonic() < deadline, "the editor did not save"
            time.sleep(0.05)
        r = check_report(scheme.on_crash(host.control(0, {"cmd": "inject", "fault": "panic"})))
        assert r.processes_before == 1 and r.processes_recovered == 1
        while Path(log).read_text().count("loaded") < 2:
            assert time.monotonic() < deadline + 20, "the editor was not restarted"
            time.sleep(0.05)
        last = [ln for ln in Path(log).read_text().splitlines() if ln.startswith("loaded")][-1]
        assert "lines=0" in last  # a reboot keeps no process state
