"""Scheme warmcache on a live machine: the page cache survives the reboot beneath the VMM."""

import os
import time
from pathlib import Path

import numpy as np
import pytest

from harness.testbed import Testbed
from kernel.hw import vmm
from kernel.hw.physmem import PAGE_DESC, PhysMem, partition_layout
from systems.base import check_report, registry

pytestmark = [pytest.mark.root]
PAGE = 4096


@pytest.fixture
def warm():
    scheme = registry()["warmcache"]()
    with Testbed(kind="test", delay=False) as bed:
        bed.deploy(scheme)
        yield bed.host, scheme
    assert not os.path.exists(scheme.region_path)


def mnt(host) -> Path:
    return Path(host.kernels[0].mount)


def write(path: Path, data: bytes, synced: bool = True) -> None:
    with open(path, "wb") as f:
        f.write(data)
        if synced:
            f.flush()
            os.fsync(f.fileno())


def panic(host, scheme):
    return check_report(scheme.on_crash(host.control(0, {"cmd": "inject", "fault": "panic"})))


def test_a_file_read_twice_is_served_first_from_the_preserved_frames(warm):
    host, scheme = warm
    data = os.urandom(40 * PAGE)
    write(mnt(host) / "a", data)
    r = panic(host, scheme)
    assert r.recovered and r.verdict == "recovered"
    assert [p.name for p in r.phases] == [
        "detect",
        "fence",
        "cache check",
        "boot",
        "mount + replay",
        "first service",
    ]
    assert r.cache.pages_before == 40 and r.cache.pages_recovered == 40
    assert r.cache.pages_preserved >= 40 and r.cache.pages_corrupted == 0
    s0 = scheme.stats()
    assert (mnt(host) / "a").read_bytes() == data  # what fsync put on the disk
    s1 = scheme.stats()
    assert s1["reused"] - s0["reused"] == 40  # every data page from memory;
    assert s1["device_blocks"] - s0["device_blocks"] <= 2  # metadata the dead kernel dirtied
    assert (mnt(host) / "a").read_bytes() == data
    s2 = scheme.stats()  # then from the new page cache
    assert (s2["reused"], s2["device_blocks"]) == (s1["reused"], s1["device_blocks"])
    r = check_report(scheme.refresh(r))
    assert r.cache.pages_reused >= 40


def test_a_frame_dirtied_before_the_crash_is_not_reused(warm):
    host, scheme = warm
    write(mnt(host) / "b", b"x" * 10 * PAGE)
    with open(mnt(host) / "b", "r+b") as f:  # four pages dirtied, not synced
        f.write(b"y" * 4 * PAGE)
    r = panic(host, scheme)
    assert r.cache.dirty_pages_before == 4 and r.cache.dirty_pages_lost == 4
    assert r.cache.pages_inconsistent >= 4 and r.cache.pages_recovered == 6
    s0 = scheme.stats()
    assert (mnt(host) / "b").read_bytes() == b"x" * 10 * PAGE
    s1 = scheme.stats()
    assert s1["reused"] - s0["reused"] == 6
    assert s1["device_blocks"] - s0["device_blocks"] >= 4


def corrupt_behind_the_vmm(host, ino: int, idx: int) -> None:
    """A memory error in the frame of (ino, idx): a store the VMM's tracking never sees."""
    p = host.machine.partition(0)
    lay = partition_layout(0, p.base, p.size)
    mem = PhysMem(host.physmem)
    try:
        d = mem.array(PAGE_DESC.dtype, lay.desc, lay.nframes)
        frame = int(np.flatnonzero((d["ino"] == ino) & (d["index"] == idx))[0])
        old = mem.read(lay.frame_phys(frame) + 64, 1)[0]
        mem.write(lay.frame_phys(frame) + 64, bytes([old ^ 0x10]))
    finally:
        mem.close()


def test_a_frame_whose_content_was_corrupted_is_not_reused(warm):
    host, scheme = warm
    data = os.urandom(10 * PAGE)
    write(mnt(host) / "c", data)
    corrupt_behind_the_vmm(host, os.stat(mnt(host) / "c").st_ino, 3)
    r = panic(host, scheme)
    assert r.cache.pages_corrupted == 1 and r.cache.pages_rejected == 1
    assert r.cache.pages_recovered == 9 and r.verdict == "recovered with loss"
    s0 = scheme.stats()
    assert (mnt(host) / "c").read_bytes() == data  # the corrupted page from the disk
    s1 = scheme.stats()
    assert s1["reused"] - s0["reused"] == 9 and s1["device_blocks"] > s0["device_blocks"]


def test_a_wild_write_by_the_kernel_is_seen_by_the_vmm_and_not_reused(warm):
    host, scheme = warm
    data = os.urandom(10 * PAGE)
    write(mnt(host) / "w", data)
    reply = host.control(0, {"cmd": "inject", "fault": "wild-write", "target": "clean-page"})
    assert reply["ok"], reply
    r = check_report(scheme.on_crash(reply))
    assert r.cache.pages_recovered == 9 and r.cache.pages_inconsistent >= 1
    s0 = scheme.stats()
    assert (mnt(host) / "w").read_bytes() == data
    assert scheme.stats()["reused"] - s0["reused"] == 9


def test_unsynced_writes_are_lost_and_counted(warm):
    host, scheme = warm
    for i in range(3):
        write(mnt(host) / f"s{i}", bytes([48 + i]) * 10 * PAGE)
        write(mnt(host) / f"u{i}", bytes([65 + i]) * 10 * PAGE, synced=False)
    r = panic(host, scheme)
    assert r.cache.dirty_pages_before == 30 and r.cache.dirty_pages_lost == 30
    assert r.cache.dirty_pages_recovered == 0 and r.verdict == "recovered with loss"
    assert any("30 dirty pages" in n for n in r.notes)
    for i in range(3):
        assert (mnt(host) / f"s{i}").read_bytes() == bytes([48 + i]) * 10 * PAGE
        u = mnt(host) / f"u{i}"
        assert not u.exists() or u.read_bytes() != bytes([65 + i]) * 10 * PAGE


def test_a_second_crash_is_survived_warm_too(warm):
    host, scheme = warm
    data = os.urandom(16 * PAGE)
    write(mnt(host) / "t", data)
    panic(host, scheme)
    assert (mnt(host) / "t").read_bytes() == data  # lands in the new kernel's frames
    r = panic(host, scheme)
    assert r.cache.pages_recovered == 16
    s0 = scheme.stats()
    assert (mnt(host) / "t").read_bytes() == data
    assert scheme.stats()["reused"] - s0["reused"] >= 16  # and metadata the new kernel read


def test_the_new_kernel_keeps_the_warm_frames_for_last(warm):
    host, scheme = warm
    data = os.urandom(16 * PAGE)
    write(mnt(host) / "kept", data)
    panic(host, scheme)
    write(mnt(host) / "fresh", os.urandom(64 * PAGE))  # fills frames: none of the warm ones
    s = scheme.stats()
    assert s["moved_aside"] == 0 and s["dropped"] == 0
    r0 = s["reused"]
    assert (mnt(host) / "kept").read_bytes() == data
    assert scheme.stats()["reused"] - r0 == 16


def test_the_new_kernel_waits_for_the_cache_check_it_boots_beside(warm, monkeypatch):
    host, scheme = warm
    write(mnt(host) / "c", b"z" * 8 * PAGE)
    ended = []
    check = type(scheme)._check

    def slow_check(self):
        time.sleep(1.0)  # longer than the kernel's start-up: it must wait at the gate
        got = check(self)
        ended.append(time.monotonic())
        return got

    monkeypatch.setattr(type(scheme), "_check", slow_check)
    r = panic(host, scheme)
    assert r.recovered and r.cache.pages_recovered == 8
    assert host.mail(0).mount_start_ns / 1e9 > ended[0]  # memory touched after the check
    names = [p.name for p in r.phases]
    assert names.index("cache check") + 1 == names.index("boot")
    for a, b in zip(r.phases, r.phases[1:]):
        assert a.end <= b.start + 1e-9  # end to end, no overlap
    assert (mnt(host) / "c").read_bytes() == b"z" * 8 * PAGE


def test_a_failed_cache_check_stops_the_new_kernel_before_it_boots(warm, monkeypatch):
    host, scheme = warm

    def broken(self):
        self._close_guest()
        raise vmm.VmmError("region unreadable")

    monkeypatch.setattr(type(scheme), "_check", broken)
    with pytest.raises(vmm.VmmError, match="region unreadable"):
        scheme.on_crash(host.control(0, {"cmd": "inject", "fault": "panic"}))
    kp = host.kernels.get(0)
    assert kp is None or kp.proc.poll() is not None  # no kernel serves an unchecked cache
    log = Path(host.workdir / "logs" / "kernel-p0.log").read_text()
    assert "the VMM's cache check failed: not booting" in log


def test_the_warm_counts_round_trip_are_checked_and_old_reports_still_load():
    from systems.base import CacheCounts, RecoveryReport, ReportError

    r = RecoveryReport("warmcache", "panic", 10.0, service_at=10.3, recovered=True)
    r.phase("detect", 10.0, 10.1)
    r.cache = CacheCounts(
        pages_before=5,
        pages_recovered=4,
        pages_preserved=9,
        pages_inconsistent=3,
        pages_corrupted=1,
        pages_reused=4,
    )
    d = check_report(r).to_dict()
    assert RecoveryReport.from_dict(d).cache == r.cache
    old = dict(
        d,
        cache={
            k: v
            for k, v in d["cache"].items()
            if not k.startswith(
                ("pages_preserved", "pages_inconsistent", "pages_corrupted", "pages_reused")
            )
        },
    )
    assert RecoveryReport.from_dict(old).cache.pages_preserved == 0
    r.cache.pages_reused = 6
    with pytest.raises(ReportError, match="exceed the pages preserved"):
        check_report(r)
