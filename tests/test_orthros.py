"""Orthros: the backup kernel takes over the crashed kernel's disk, file cache and mount."""

import errno
import os
from pathlib import Path

import numpy as np
import pytest

from harness.testbed import Testbed
from kernel.hw.physmem import ICORE
from kernel.tools.fsck import fsck
from systems.base import check_report
from systems.orthros import Orthros

pytestmark = [pytest.mark.root]
PAGE = 4096


@pytest.fixture
def orthros():
    with Testbed(kind="test", delay=False) as bed:
        s = Orthros()
        bed.deploy(s)
        yield bed.host, s


def write_unsynced(mnt: Path, tag: str, n=5) -> dict[str, bytes]:
    files = {f"{tag}{i}": os.urandom(3 * PAGE * (i + 1) + i) for i in range(n)}
    for name, data in files.items():
        (mnt / name).write_bytes(data)
    return files


def crash(host, s, fault, **kw):
    reply = host.control(s.active, {"cmd": "inject", "fault": fault, **kw})
    assert reply["ok"], reply
    return check_report(s.on_crash(reply, timeout=30))


def assert_files(mnt: Path, files: dict[str, bytes]) -> None:
    for name, data in files.items():
        assert (mnt / name).read_bytes() == data, f"{name} differs after failover"


@pytest.mark.parametrize(
    "fault,via", [("panic", "dying message"), ("kill", "heartbeat"), ("hang", "heartbeat")]
)
def test_unsynced_files_survive_failover_and_a_clean_remount(orthros, fault, via):
    host, s = orthros
    mnt = Path(s.mount)
    files = write_unsynced(mnt, "u")
    r = crash(host, s, fault)
    assert r.recovered and r.detected_by == via and r.verdict == "recovered"
    assert r.cache.dirty_pages_recovered == r.cache.dirty_pages_before > 0
    assert r.cache.pages_rejected == 0 and r.rejected == []
    names = [p.name for p in r.phases]
    # the cache migration only reads memory: it runs while the host releases the dead kernel
    assert names[:5] == ["detect", "fence", "cache migration", "device takeover", "mount + replay"]
    assert names[5:] == ["first service", "process keeping"]  # no app: the dead set is fenced
    assert_files(mnt, files)
    # the adopted dirty pages reach the disk: a clean shutdown, fsck, a fresh kernel reads them
    assert host.stop(s.active) == 0  # the backup sees a shutdown, not a crash
    assert host.kernels.pop(s.backup).proc.wait(10) == 0
    assert fsck(str(host.disk_image())).exit_code == 0
    kp = host.boot(0)
    assert_files(Path(kp.mount), files)


def test_two_crashes_in_a_row_are_survived(orthros):
    host, s = orthros
    mnt = Path(s.mount)
    first = write_unsynced(mnt, "a")
    crash(host, s, "panic")
    assert s.active == 1 and s.backup == 0
    second = write_unsynced(mnt, "b")
    r = crash(host, s, "panic")
    assert r.recovered and s.active == 0
    assert_files(mnt, first | second)


def test_a_deferred_re_pairing_is_awaited_and_then_survives_a_second_crash(orthros):
    """With ``defer_protection`` the takeover's report comes back while the next backup is
    still launching (its readiness not yet awaited); ``await_protection`` waits for it, and
    the machine then survives a second crash."""
    host, s = orthros
    s.defer_protection = True
    mnt = Path(s.mount)
    first = write_unsynced(mnt, "a")
    crash(host, s, "panic")
    kp = host.kernels[s.backup]
    assert kp.ready_fd is not None and kp.boot_wall_s == 0.0  # launched, not awaited
    s.await_protection()
    assert kp.ready_fd is None and kp.boot_wall_s > 0 and kp.alive()
    second = write_unsynced(mnt, "b")
    r = crash(host, s, "kill")
    assert r.recovered and s.active == 0
    s.await_protection()
    assert_files(mnt, first | second)


@pytest.mark.parametrize("fault", ["wild-write", "bit-flip"])
@pytest.mark.parametrize(
    "target,kind", [("dirty-page", "page frame"), ("page-descriptor", "page descriptor")]
)
def test_corrupted_pages_are_rejected_and_read_as_eio_not_zeros(orthros, fault, target, kind):
    import errno
    import re

    host, s = orthros
    mnt = Path(s.mount)
    files = write_unsynced(mnt, "w")
    reply = host.control(s.active, {"cmd": "inject", "fault": fault, "target": target})
    assert reply["ok"], reply
    ino, page = map(int, re.match(r"inode (\d+) page (\d+):", reply["detail"]).groups())
    r = check_report(s.on_crash(reply, timeout=30))
    assert r.cache.pages_rejected == 1 and r.rejected[0].startswith(kind), r.rejected
    assert r.cache.dirty_pages_recovered == r.cache.dirty_pages_before - 1
    lost = [n for n in r.notes if n.startswith("lost")]
    name = next(n for n in files if os.stat(mnt / n).st_ino == ino)
    for n, data in files.items():  # never zeros nor stale data: the data or EIO
        try:
            assert (mnt / n).read_bytes() == data, f"{n} differs after failover"
        except OSError as e:
            assert e.errno == errno.EIO, e
            assert any(f"inode {os.stat(mnt / n).st_ino} " in w for w in lost), (n, lost)
        else:
            assert n != name, f"{name} lost page {page} yet read without an error"
    if target == "dirty-page":  # its descriptor names the page: only it is lost
        assert any(f"inode {ino} page {page}: dirty page rejected" in w for w in lost), lost
        with open(mnt / name, "r+b") as f:
            f.seek(page * PAGE)
            with pytest.raises(OSError) as e:
                f.read(PAGE)
            assert e.value.errno == errno.EIO
            rest = files[name][(page + 1) * PAGE :]
            assert os.pread(f.fileno(), len(rest), (page + 1) * PAGE) == rest
            new = os.urandom(PAGE)
            os.pwrite(f.fileno(), new, page * PAGE)  # overwritten whole: data again
        want = files[name][: page * PAGE] + new + files[name][(page + 1) * PAGE :]
        assert (mnt / name).read_bytes() == want
    else:  # which page is unknown: the whole file
        assert any(f"inode {ino} (the whole file)" in w for w in lost), lost
        with open(mnt / name, "r+b") as f:
            f.truncate(0)  # truncated to 0: a file again
        assert (mnt / name).read_bytes() == b""


@pytest.mark.parametrize("fault", ["wild-write", "bit-flip"])
def test_a_corrupted_superblock_loses_uncommitted_files_and_counts_their_pages_once(orthros, fault):
    """The running transaction is refused with the superblock: files it created have no
    home and their dirty pages, adopted unchecked, are dropped and counted lost once; the
    dirty pages of a file already on disk are recovered (a count never below zero)."""
    host, s = orthros
    mnt = Path(s.mount)
    with open(mnt / "kept", "wb") as f:
        f.write(os.urandom(6 * PAGE))
        f.flush()
        os.fsync(f.fileno())
    fd = os.open(mnt, os.O_RDONLY)
    os.fsync(fd)  # its creation committed
    os.close(fd)
    kept = os.urandom(6 * PAGE)
    (mnt / "kept").write_bytes(kept)  # 6 dirty pages of a committed file
    files = write_unsynced(mnt, "u")  # created in the running transaction
    orphans = sum(-(-len(d) // PAGE) for d in files.values())
    r = crash(host, s, fault, target="superblock", seed=3)
    c = r.cache
    assert r.recovered and any("kernel superblock corrupted" in n for n in r.notes), r.notes
    assert (c.dirty_pages_before, c.dirty_pages_recovered) == (6 + orphans, 6)
    assert c.dirty_pages_lost == orphans
    assert any(f"{orphans} dirty pages belonged to files" in n for n in r.notes), r.notes
    assert (mnt / "kept").read_bytes() == kept
    assert sorted(os.listdir(mnt)) == ["kept"]


def test_a_corrupted_clean_page_is_rejected_and_read_from_disk(orthros):
    host, s = orthros
    mnt = Path(s.mount)
    data = os.urandom(8 * PAGE)
    with open(mnt / "synced", "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    r = crash(host, s, "wild-write", target="clean-page")
    assert r.cache.pages_rejected == 1 and r.rejected[0].startswith("page frame"), r.rejected
    assert (mnt / "synced").read_bytes() == data


def test_failover_with_no_dirty_pages(orthros):
    host, s = orthros
    mnt = Path(s.mount)
    with open(mnt / "synced", "wb") as f:
        f.write(b"s" * 5 * PAGE)
        f.flush()
        os.fsync(f.fileno())
    r = crash(host, s, "kill")
    assert r.recovered and r.cache.dirty_pages_before == 0 and r.cache.pages_recovered >= 5
    assert (mnt / "synced").read_bytes() == b"s" * 5 * PAGE


def test_runtime_aware_process_migrates_with_its_state_and_apps_restart():
    import sys
    import time

    s = Orthros(keep_processes=False)  # keeping would continue them instead

    def wait_log(text: str, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if os.path.exists(log) and text in Path(log).read_text():
                return
            time.sleep(0.05)
        raise AssertionError(
            f"{text!r} never appeared in the editor's log:\n"
            + (Path(log).read_text() if os.path.exists(log) else "(no log)")
        )

    with Testbed(kind="test", delay=False) as bed:
        host, wd = bed.host, bed.workdir
        fifo, log = os.path.join(wd, "editor.fifo"), os.path.join(wd, "editor.log")
        apps = [
            {
                "name": "editor",
                "argv": [sys.executable, "-m", "kernel.apps.rtaware_editor", "--fifo", fifo],
                "runtime_aware": True,
                "log": log,
            },
            {"name": "sleeper", "argv": ["sleep", "600"]},
        ]
        bed.deploy(s, apps)
        wait_log("loaded seq=0 lines=0")
        fd = os.open(fifo, os.O_WRONLY)
        os.write(fd, b"first line\nsecond line\nthird line\n")
        os.close(fd)
        wait_log("lines=3")
        r = crash(host, s, "panic")
        assert r.processes_before == 2 and r.processes_recovered == 2
        assert "process migration" in [p.name for p in r.phases]
        assert any("1 processes migrated with their state, 1 restarted" in n for n in r.notes)
        wait_log("loaded seq=")  # the resurrected editor ...
        loaded = [ln for ln in Path(log).read_text().splitlines() if ln.startswith("loaded")]
        assert loaded[-1].split()[2] == "lines=3"  # ... continues with its unsaved buffer


# --- adopted clean pages are checked on first use (in one process, no FUSE) -------------
@pytest.fixture
def adopted(tmp_path):
    """A kernel that cached a file's pages (clean, on disk) and died; a new kernel on the same
    memory and disk that adopted them unchecked. Yields (old vfs, new vfs, ino, data)."""
    from kernel.core.cachewalk import collect
    from kernel.core.vfs import VFS
    from tests.stack import MEM, Stack

    st = Stack(tmp_path, write_cache=False)
    ino = st.vfs.create(1, b"f", 0o100644, 0, 0).ino
    data = os.urandom(8 * PAGE)
    st.vfs.write(ino, 0, data)
    st.vfs.fsync(ino)
    h = collect(st.mem, 0, MEM, 0)
    assert h.adopted.unchecked.left == 8
    new = VFS(st.mem, st.lay, st.dev, h.adopted)
    yield st.vfs, new, ino, data
    st.close()


def test_a_corrupted_unchecked_page_is_never_served(adopted):
    old, new, ino, data = adopted
    f = old.pc.index[(ino, 3)]
    old.mem.write(old.lay.frame_phys(f) + 100, b"wild")  # after the adoption, before any use
    u = new.pc.unchecked
    assert new.read(ino, 0, len(data)) == data  # page 3 comes from the disk instead
    assert len(u.rejected) == 1 and u.rejected[0].kind == "page frame"
    assert u.good == 7 and u.dropped == 0  # checked with page 0, as read ahead
    assert new.pc.unchecked is None


def test_unchecked_pages_written_or_truncated_first_are_dropped_unread(adopted):
    old, new, ino, data = adopted
    u = new.pc.unchecked
    new.write(ino, 2 * PAGE + 10, b"new")  # a partial write reads the page first
    new.setattr(ino, size=5 * PAGE + 7)  # pages 5.. dropped, page 5 a tail
    new.write(ino, 6 * PAGE, b"end")  # the rest of page 5 reads as zeros
    want = data[: 2 * PAGE + 10] + b"new" + data[2 * PAGE + 13 : 5 * PAGE + 7]
    want += bytes(6 * PAGE - len(want)) + b"end"
    assert new.read(ino, 0, 7 * PAGE) == want
    assert new.pc.check_unchecked(100) == 0
    assert u.rejected == [] and u.good + u.dropped == 8 and u.dropped >= 4


# --- adopted dirty pages: unchecked too, checked before use or write-back -----------------
@pytest.fixture
def adopted_dirty(tmp_path):
    """A kernel that wrote a file (v1, 16 pages, on disk), dropped the clean pages from its
    cache, then rewrote pages 4-7 (v2, dirty, never synced) and died; a new kernel that
    adopted them unchecked. Yields (stack, old vfs, new vfs, ino, what the file must read)."""
    from kernel.core.cachewalk import collect
    from kernel.core.vfs import VFS
    from tests.stack import MEM, Stack

    st = Stack(tmp_path, write_cache=False)
    ino = st.vfs.create(1, b"f", 0o100644, 0, 0).ino
    v1, v2 = os.urandom(16 * PAGE), os.urandom(4 * PAGE)
    st.vfs.write(ino, 0, v1)
    st.vfs.fsync(ino)
    st.vfs.pc.reclaim(16)  # pages 0-3 and 8-15: only on disk
    st.vfs.write(ino, 4 * PAGE, v2)
    h = collect(st.mem, 0, MEM, 0)
    assert (h.adopted.unchecked.left, h.adopted.unchecked.left_dirty, len(h.adopted.frames)) == (
        4,
        4,
        0,
    )
    new = VFS(st.mem, st.lay, st.dev, h.adopted)
    yield st, st.vfs, new, ino, v1[: 4 * PAGE] + v2 + v1[8 * PAGE :]
    st.close()


def on_disk(st, vfs, ino: int, npages: int) -> bytes:
    return b"".join(st.dev.read(b) for b in vfs.fs.bmap_range(ino, 0, npages))


def test_unchecked_dirty_pages_are_served_and_written_back(adopted_dirty):
    st, old, new, ino, want = adopted_dirty
    u = new.pc.unchecked
    assert new.read(ino, 0, len(want)) == want  # the read-ahead stops at page 4
    assert (u.good_dirty, new.pc.ndirty) == (4, 4)
    new.fsync(ino)
    assert on_disk(st, new, ino, 16) == want and new.pc.ndirty == 0


def test_dirty_pages_a_request_truncates_unread_are_superseded_not_lost(adopted_dirty):
    """Adopted dirty pages that a request after the takeover cuts off before their check
    are dropped unread: their data was replaced by the request, so the report counts them
    superseded, not lost, and the verdict stays "recovered"."""
    from kernel.core.memreader import check_pages
    from systems.adoption import check_rest
    from systems.base import RecoveryReport

    st, old, new, ino, want = adopted_dirty
    u = new.pc.unchecked
    r = RecoveryReport("orthros", "test", 0.0)
    r.recovered, r.service_at = True, 0.0
    r.cache.dirty_pages_before = r.cache.pages_before = 4
    new.setattr(ino, size=4 * PAGE)  # pages 4-7 (dirty, unchecked) cut off unread
    check_rest(new, r, u, lambda f: check_pages(new.mem, new.lay, f))
    check_report(r)
    c = r.cache
    assert (c.dirty_pages_recovered, c.dirty_pages_superseded, c.dirty_pages_lost) == (0, 4, 0)
    assert r.verdict == "recovered"
    assert new.read(ino, 0, 8 * PAGE) == want[: 4 * PAGE]


def test_write_back_checks_unchecked_dirty_pages_and_never_writes_a_corrupted_one(adopted_dirty):
    st, old, new, ino, want = adopted_dirty
    f = old.pc.index[(ino, 6)]
    old.mem.write(old.lay.frame_phys(f) + 100, b"wild")  # after the adoption, before any use
    u = new.pc.unchecked
    new.fsync(ino)  # checks pages 4-7 first
    assert len(u.rejected) == 1 and u.rejected[0].kind == "page frame" and u.good_dirty == 3
    disk = on_disk(st, new, ino, 16)
    assert disk[6 * PAGE : 7 * PAGE] != want[6 * PAGE : 7 * PAGE]  # v1's page 6, not the wild one
    assert disk[: 6 * PAGE] == want[: 6 * PAGE] and disk[7 * PAGE :] == want[7 * PAGE :]
    with pytest.raises(OSError) as e:  # lost: EIO, not v1's stale page 6
        new.read(ino, 6 * PAGE, PAGE)
    assert e.value.errno == errno.EIO and new.pc.lost.pages == {ino: {6}}
    assert any(w.startswith(f"inode {ino} page 6: dirty page rejected") for w in new.pc.lost.why)


def test_a_lost_page_is_eio_until_overwritten_whole_or_truncated(adopted_dirty):
    st, old, new, ino, want = adopted_dirty
    for p in (5, 6):
        f = old.pc.index[(ino, p)]
        old.mem.write(old.lay.frame_phys(f) + 100, b"wild")
    for off, n in ((0, 16 * PAGE), (6 * PAGE + 1, 1), (3 * PAGE, 3 * PAGE)):
        with pytest.raises(OSError) as e:
            new.read(ino, off, n)
        assert e.value.errno == errno.EIO
    assert new.pc.lost.pages == {ino: {5, 6}}
    assert new.read(ino, 0, 5 * PAGE) == want[: 5 * PAGE]  # read-ahead stopped short of 5
    with pytest.raises(OSError):
        new.write(ino, 5 * PAGE + 10, b"part")  # nothing sound to merge into
    new.write(ino, 5 * PAGE, b"w" * PAGE)  # whole: page 5 is data again
    assert new.read(ino, 5 * PAGE, PAGE) == b"w" * PAGE
    new.setattr(ino, size=6 * PAGE + 10)  # page 6 stays lost (a tail)
    with pytest.raises(OSError):
        new.read(ino, 6 * PAGE, 10)
    new.setattr(ino, size=6 * PAGE)  # truncated away
    assert new.pc.lost.pages == {} and new.read(ino, 0, 7 * PAGE) == want[: 5 * PAGE] + b"w" * PAGE


def test_a_lost_in_core_inode_with_dirty_pages_reads_as_eio_not_size_0(tmp_path):
    """The in-core inode of a file with unsynced data is corrupted (its dirty-inode list
    links): its pages are homeless and its size unknown; the file reads as EIO, named."""
    from kernel.core.cachewalk import collect
    from kernel.core.vfs import VFS
    from tests.stack import MEM, Stack

    st = Stack(tmp_path, write_cache=False)
    a = st.vfs.create(1, b"a", 0o100644, 0, 0).ino
    b = st.vfs.create(1, b"b", 0o100644, 0, 0).ino
    st.vfs.fsyncdir(1)  # both exist on disk, size 0
    st.vfs.write(a, 0, b"a" * 3 * PAGE)
    st.vfs.write(b, 0, b"b" * 2 * PAGE)
    links = st.vfs.ic.phys(a) + ICORE.dtype.fields["next_dirty"][1]
    st.mem.write(links, os.urandom(16))  # a wild write, checksum stale
    h = collect(st.mem, 0, MEM, 0)
    new = VFS(st.mem, st.lay, st.dev, h.adopted)
    with pytest.raises(OSError) as e:
        new.read(a, 0, PAGE)
    assert e.value.errno == errno.EIO
    assert new.read(b, 0, 2 * PAGE) == b"b" * 2 * PAGE
    why = "\n".join(new.pc.lost.why)
    assert f"inode {a} (the whole file): its in-core inode" in why and f"inode {a} page 2:" in why
    new.setattr(a, size=0)  # truncated to 0: a file again
    assert new.read(a, 0, PAGE) == b""


def test_partial_writes_truncation_and_reclaim_keep_unchecked_dirty_data(adopted_dirty):
    st, old, new, ino, want = adopted_dirty
    u = new.pc.unchecked
    assert new.pc.reclaim(100) == 0 and u.left_dirty == 4  # a dirty page's data is nowhere else
    new.write(ino, 5 * PAGE + 10, b"new")  # the rest of page 5 stays v2
    new.setattr(ino, size=7 * PAGE + 7)  # page 7 becomes a tail of v2
    want = want[: 5 * PAGE + 10] + b"new" + want[5 * PAGE + 13 : 7 * PAGE + 7]
    assert new.read(ino, 0, 8 * PAGE) == want
    assert u.rejected == [] and u.good_dirty == 4 and new.pc.unchecked is None


def test_verdicts_computed_without_the_lock_skip_pages_used_meanwhile(adopted_dirty):
    from kernel.core.memreader import check_pages

    st, old, new, ino, want = adopted_dirty
    u = new.pc.unchecked
    pos = np.flatnonzero(u.open)
    desc_ok, ok = check_pages(new.mem, new.lay, u.frames[pos])
    assert new.read(ino, 5 * PAGE, 10) == want[5 * PAGE : 5 * PAGE + 10]  # page 5 checked on use
    new.pc.settle_checked(pos, desc_ok, ok)
    assert u.rejected == [] and u.good_dirty == 4 and new.pc.ndirty == 4
    assert new.read(ino, 0, len(want)) == want


def test_the_second_checker_agrees_with_a_check_done_alone(tmp_path):
    """The backup shares the page checks with a helper process (systems/orthros/checker.py):
    the same verdict for every page, a corrupted frame and descriptor included."""
    import numpy as np

    from kernel.core.memreader import check_pages
    from systems.orthros.checker import Checker
    from tests.stack import Stack

    st = Stack(tmp_path)
    ino = st.vfs.create(1, b"f", 0o100644, 0, 0).ino
    st.vfs.write(ino, 0, os.urandom(1500 * PAGE))
    pc = st.vfs.pc
    frames = np.array(sorted(pc.index.values()), np.int64)
    st.mem.write(st.lay.frame_phys(int(frames[700])) + 9, b"wild")
    st.mem.write(st.lay.desc_phys(int(frames[1200])) + 20, b"wild")
    c = Checker.start(st.mem_path)
    try:
        alone = check_pages(st.mem, st.lay, frames)
        shared = c.check(st.mem, st.lay, frames, list(os.sched_getaffinity(0)))
    finally:
        c.close()
        st.close()
    assert (alone[0] == shared[0]).all() and (alone[1] == shared[1]).all()
    assert np.flatnonzero(~shared[1]).tolist() == [700, 1200] and np.flatnonzero(
        ~shared[0]
    ).tolist() == [1200]


def _policies(pid: int) -> dict[int, int]:
    """Scheduling policy of every thread of a process (field 41 of its tasks' stat)."""
    out = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{tid}/stat") as f:
            out[int(tid)] = int(f.read().rsplit(")", 1)[1].split()[38])
    return out


def test_the_re_paired_backup_stands_by_at_normal_priority(orthros):
    """The host starts a backup behind everything else (its start-up yields to the service
    and the load); in standby every thread of it and of its checker must be SCHED_OTHER
    again, and their session's autogroup at nice 0: an idle heartbeat or takeover would
    starve under load."""
    from kernel.hw import priority

    host, s = orthros
    crash(host, s, "panic")  # returns with the re-paired backup in standby
    backup = host.kernels[s.backup].proc.pid
    checker = [int(c) for c in open(f"/proc/{backup}/task/{backup}/children").read().split()]
    assert checker, "the backup's checker process is missing"
    for pid in [backup, *checker]:
        assert set(_policies(pid).values()) == {os.SCHED_OTHER}, (pid, _policies(pid))
        assert priority.group_nice(pid) in (0, None), (pid, priority.group_nice(pid))


def test_adopted_dirty_inodes_keep_their_age_and_are_written_back_on_schedule(tmp_path):
    """A takeover does not restart the dirty-age clock: an inode the dead kernel dirtied
    longer than DIRTY_EXPIRE_S ago is written back by the new kernel's first flusher pass,
    without an fsync; one dirtied just now is not."""
    from kernel import param
    from kernel.core.cachewalk import collect
    from kernel.core.icache import F
    from kernel.core.vfs import VFS
    from tests.stack import MEM, Stack

    st = Stack(tmp_path, write_cache=False)
    old_ino = st.vfs.create(1, b"old", 0o100644, 0, 0).ino
    new_ino = st.vfs.create(1, b"new", 0o100644, 0, 0).ino
    st.vfs.fsyncdir(1)
    old_data, new_data = os.urandom(6 * PAGE), os.urandom(3 * PAGE)
    st.vfs.write(old_ino, 0, old_data)
    st.vfs.write(new_ino, 0, new_data)
    # the dead kernel dirtied "old" long ago (its own write-through keeps the checksum sound)
    st.vfs.ic.v[old_ino][F["dirtied_ns"]] -= int((param.DIRTY_EXPIRE_S + 5) * 1e9)
    st.vfs.ic._write(old_ino)
    h = collect(st.mem, 0, MEM, 0)
    new = VFS(st.mem, st.lay, st.dev, h.adopted)
    assert new.ic.dirty_inodes()[-1] == old_ino  # the list's tail is the oldest
    new.writeback.flush_expired()
    assert on_disk(st, new, old_ino, 6) == old_data and not new.pc.dirty.get(old_ino)
    assert new.fs.iget(old_ino).size == len(old_data)
    assert new_ino in new.ic.dirty_inodes() and len(new.pc.dirty_pages(new_ino)) == 3  # young
    st.close()


def test_fs_corrupt_in_the_running_transaction_never_reaches_the_disk(orthros):
    host, s = orthros
    mnt = Path(s.mount)
    with open(mnt / "synced", "wb") as f:  # an inode with blocks for the fault to hit
        f.write(os.urandom(20 * PAGE))
        f.flush()
        os.fsync(f.fileno())
    files = write_unsynced(mnt, "u")
    r = crash(host, s, "fs-corrupt")
    assert r.recovered and r.verdict == "recovered with loss" and r.cache.metadata_rejected > 0
    assert any("block pointer" in x and "out of range" in x for x in r.rejected), r.rejected
    assert_files(mnt, files)
    assert host.stop(s.active) == 0
    assert host.kernels.pop(s.backup).proc.wait(10) == 0
    res = fsck(str(host.disk_image()))
    assert res.exit_code == 0, res.problems


def test_acknowledged_files_survive_a_crash_inside_a_file_system_operation(orthros):
    """A panic at the site `writeback` while another process runs fsync: the files created
    and written before (acknowledged, not synced) survive, byte for byte, and fsck is clean."""
    import hashlib
    import subprocess
    import sys

    host, s = orthros
    mnt = Path(s.mount)
    files = write_unsynced(mnt, "u")
    (mnt / "fsynced").write_bytes(os.urandom(7 * PAGE))
    reply = host.control(s.active, {"cmd": "inject", "fault": "panic", "site": "writeback"})
    assert reply["ok"], reply
    code = (
        "import os, sys; fd = os.open(sys.argv[1], os.O_WRONLY); "
        "os.write(fd, b'x' * 9000); os.fsync(fd)"
    )
    syncer = subprocess.Popen(
        [sys.executable, "-c", code, str(mnt / "fsynced")],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        r = check_report(s.on_crash(reply, timeout=30))
    finally:
        try:
            syncer.wait(30)
        except subprocess.TimeoutExpired:
            syncer.kill()
            syncer.wait()
    assert r.recovered and not any("not completed" in n for n in r.notes), r.notes
    assert any("undo record" in n for n in r.notes), r.notes
    for name, data in files.items():
        got = hashlib.sha256((mnt / name).read_bytes()).hexdigest()
        assert got == hashlib.sha256(data).hexdigest(), f"{name} differs after failover"
    assert host.stop(s.active) == 0
    assert host.kernels.pop(s.backup).proc.wait(10) == 0
    res = fsck(str(host.disk_image()))
    assert res.exit_code == 0, res.problems


def test_the_backup_loads_the_fuse_server_in_standby_not_at_first_service():
    """The backup imports in standby what serving the mount needs, so the first service
    after a takeover does not pay the import of the FUSE server (a fresh interpreter:
    this one has it loaded already)."""
    import subprocess
    import sys

    probe = (
        "import sys\n"
        "from systems.orthros import backup\n"
        "fuse = ('kernel.core.fuse', 'kernel.core.fuseproto')\n"
        "print(any(m in sys.modules for m in fuse))\n"
        "backup.warm_imports()\n"
        "print(all(m in sys.modules for m in fuse))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True, timeout=120
    )
    assert out.stdout.split() == ["False", "True"], out.stdout + out.stderr
