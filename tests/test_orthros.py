"""Orthros: the backup kernel takes over the crashed kernel's disk, file cache and mount."""
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pytest

from kernel import machine
from kernel.fsck import fsck
from kernel.host import Host
from systems.base import check_report
from systems.orthros import Orthros
from tests.conftest import needs_root

pytestmark = [needs_root]
PAGE = 4096


@pytest.fixture
def orthros():
    wd = tempfile.mkdtemp(prefix="crashbench-orthros-")
    os.chmod(wd, 0o755)
    host = Host(Path(wd), machine.load(), delay=False)
    host.create_memory()
    host.format_disks()
    s = Orthros()
    try:
        s.deploy(host)
        yield host, s
    finally:
        s.teardown()
        if not os.environ.get("KEEP"):
            shutil.rmtree(wd, ignore_errors=True)


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


@pytest.mark.parametrize("fault,via", [("panic", "dying message"), ("kill", "heartbeat"),
                                       ("hang", "heartbeat")])
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
    assert names[-1] == "first service"
    assert_files(mnt, files)
    # the adopted dirty pages reach the disk: a clean shutdown, fsck, a fresh kernel reads them
    assert host.stop(s.active) == 0             # the backup sees a shutdown, not a crash
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


@pytest.mark.parametrize("target,kind", [("dirty-page", "page frame"),
                                         ("page-descriptor", "page descriptor")])
def test_corrupted_pages_are_rejected_and_never_reach_the_disk(orthros, target, kind):
    host, s = orthros
    mnt = Path(s.mount)
    files = write_unsynced(mnt, "w")
    r = crash(host, s, "wild-write", target=target)
    assert r.cache.pages_rejected == 1, r.rejected
    assert len(r.rejected) == 1 and r.rejected[0].startswith(kind)
    assert r.cache.dirty_pages_recovered == r.cache.dirty_pages_before - 1
    bad = [n for n, d in files.items() if (mnt / n).read_bytes() != d]
    assert len(bad) == 1       # exactly the file of the rejected page differs ...
    got = (mnt / bad[0]).read_bytes()
    diff = [i // PAGE for i in range(len(got)) if got[i] != files[bad[0]][i]]
    assert len(set(diff)) == 1  # ... in exactly one page, which reads as a hole, not garbage
    page = diff[0]
    assert got[page * PAGE:(page + 1) * PAGE].strip(b"\0") == b""


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
    wd = tempfile.mkdtemp(prefix="crashbench-orthros-")
    os.chmod(wd, 0o755)
    fifo, log = os.path.join(wd, "editor.fifo"), os.path.join(wd, "editor.log")
    apps = [{"name": "editor", "argv": [sys.executable, "-m", "kernel.rtaware_editor", "--fifo", fifo],
             "runtime_aware": True, "log": log},
            {"name": "sleeper", "argv": ["sleep", "600"]}]
    host = Host(Path(wd), machine.load(), delay=False)
    host.create_memory()
    host.format_disks()
    s = Orthros()

    def wait_log(text: str, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if os.path.exists(log) and text in Path(log).read_text():
                return
            time.sleep(0.05)
        raise AssertionError(f"{text!r} never appeared in the editor's log:\n"
                             + (Path(log).read_text() if os.path.exists(log) else "(no log)"))
    try:
        s.deploy(host, apps)
        wait_log("loaded seq=0 lines=0")
        fd = os.open(fifo, os.O_WRONLY)
        os.write(fd, b"first line\nsecond line\nthird line\n")
        os.close(fd)
        wait_log("lines=3")
        r = crash(host, s, "panic")
        assert r.processes_before == 2 and r.processes_recovered == 2
        assert "process migration" in [p.name for p in r.phases]
        assert any("1 processes migrated with their state, 1 restarted" in n for n in r.notes)
        wait_log("loaded seq=")                     # the resurrected editor ...
        loaded = [ln for ln in Path(log).read_text().splitlines() if ln.startswith("loaded")]
        assert loaded[-1].split()[2] == "lines=3"   # ... continues with its unsaved buffer
    finally:
        s.teardown()
        shutil.rmtree(wd, ignore_errors=True)


# --- adopted clean pages are checked on first use (in one process, no FUSE) -------------
@pytest.fixture
def adopted(tmp_path):
    """A kernel that cached a file's pages (clean, on disk) and died; a new kernel on the same
    memory and disk that adopted them unchecked. Yields (old vfs, new vfs, ino, data)."""
    from systems.orthros.adopt import collect
    from kernel.vfs import VFS
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
    old.mem.write(old.lay.frame_phys(f) + 100, b"wild")   # after the adoption, before any use
    u = new.pc.unchecked
    assert new.read(ino, 0, len(data)) == data           # page 3 comes from the disk instead
    assert len(u.rejected) == 1 and u.rejected[0].kind == "page frame"
    assert u.good == 7 and u.dropped == 0                 # checked with page 0, as read ahead
    assert new.pc.unchecked is None


def test_unchecked_pages_written_or_truncated_first_are_dropped_unread(adopted):
    old, new, ino, data = adopted
    u = new.pc.unchecked
    new.write(ino, 2 * PAGE + 10, b"new")                 # a partial write reads the page first
    new.setattr(ino, size=5 * PAGE + 7)                   # pages 5.. dropped, page 5 a tail
    new.write(ino, 6 * PAGE, b"end")                      # the rest of page 5 reads as zeros
    want = data[:2 * PAGE + 10] + b"new" + data[2 * PAGE + 13:5 * PAGE + 7]
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
    from systems.orthros.adopt import collect
    from kernel.vfs import VFS
    from tests.stack import MEM, Stack
    st = Stack(tmp_path, write_cache=False)
    ino = st.vfs.create(1, b"f", 0o100644, 0, 0).ino
    v1, v2 = os.urandom(16 * PAGE), os.urandom(4 * PAGE)
    st.vfs.write(ino, 0, v1)
    st.vfs.fsync(ino)
    st.vfs.pc.reclaim(16)                                 # pages 0-3 and 8-15: only on disk
    st.vfs.write(ino, 4 * PAGE, v2)
    h = collect(st.mem, 0, MEM, 0)
    assert (h.adopted.unchecked.left, h.adopted.unchecked.left_dirty, len(h.adopted.frames)) == (4, 4, 0)
    new = VFS(st.mem, st.lay, st.dev, h.adopted)
    yield st, st.vfs, new, ino, v1[:4 * PAGE] + v2 + v1[8 * PAGE:]
    st.close()


def on_disk(st, vfs, ino: int, npages: int) -> bytes:
    return b"".join(st.dev.read(b) for b in vfs.fs.bmap_range(ino, 0, npages))


def test_unchecked_dirty_pages_are_served_and_written_back(adopted_dirty):
    st, old, new, ino, want = adopted_dirty
    u = new.pc.unchecked
    assert new.read(ino, 0, len(want)) == want           # the read-ahead stops at page 4
    assert (u.good_dirty, new.pc.ndirty) == (4, 4)
    new.fsync(ino)
    assert on_disk(st, new, ino, 16) == want and new.pc.ndirty == 0


def test_write_back_checks_unchecked_dirty_pages_and_never_writes_a_corrupted_one(adopted_dirty):
    st, old, new, ino, want = adopted_dirty
    f = old.pc.index[(ino, 6)]
    old.mem.write(old.lay.frame_phys(f) + 100, b"wild")   # after the adoption, before any use
    u = new.pc.unchecked
    new.fsync(ino)                                        # checks pages 4-7 first
    assert len(u.rejected) == 1 and u.rejected[0].kind == "page frame" and u.good_dirty == 3
    disk = on_disk(st, new, ino, 16)
    assert disk[6 * PAGE:7 * PAGE] != want[6 * PAGE:7 * PAGE]   # v1's page 6, not the wild one
    assert disk[:6 * PAGE] == want[:6 * PAGE] and disk[7 * PAGE:] == want[7 * PAGE:]
    assert new.read(ino, 6 * PAGE, PAGE) == disk[6 * PAGE:7 * PAGE]


def test_partial_writes_truncation_and_reclaim_keep_unchecked_dirty_data(adopted_dirty):
    st, old, new, ino, want = adopted_dirty
    u = new.pc.unchecked
    assert new.pc.reclaim(100) == 0 and u.left_dirty == 4  # a dirty page's data is nowhere else
    new.write(ino, 5 * PAGE + 10, b"new")                # the rest of page 5 stays v2
    new.setattr(ino, size=7 * PAGE + 7)                  # page 7 becomes a tail of v2
    want = want[:5 * PAGE + 10] + b"new" + want[5 * PAGE + 13:7 * PAGE + 7]
    assert new.read(ino, 0, 8 * PAGE) == want
    assert u.rejected == [] and u.good_dirty == 4 and new.pc.unchecked is None


def test_verdicts_computed_without_the_lock_skip_pages_used_meanwhile(adopted_dirty):
    from kernel.memreader import check_pages
    st, old, new, ino, want = adopted_dirty
    u = new.pc.unchecked
    pos = np.flatnonzero(u.open)
    desc_ok, ok = check_pages(new.mem, new.lay, u.frames[pos])
    assert new.read(ino, 5 * PAGE, 10) == want[5 * PAGE:5 * PAGE + 10]   # page 5 checked on use
    new.pc.settle_checked(pos, desc_ok, ok)
    assert u.rejected == [] and u.good_dirty == 4 and new.pc.ndirty == 4
    assert new.read(ino, 0, len(want)) == want


def test_the_second_checker_agrees_with_a_check_done_alone(tmp_path):
    """The backup shares the page checks with a helper process (systems/orthros/checker.py):
    the same verdict for every page, a corrupted frame and descriptor included."""
    import numpy as np
    from kernel.memreader import check_pages
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
    assert np.flatnonzero(~shared[1]).tolist() == [700, 1200] and np.flatnonzero(~shared[0]).tolist() == [1200]


def _policies(pid: int) -> dict[int, int]:
    """Scheduling policy of every thread of a process (field 41 of its tasks' stat)."""
    out = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{tid}/stat") as f:
            out[int(tid)] = int(f.read().rsplit(")", 1)[1].split()[38])
    return out


def test_the_re_paired_backup_stands_by_at_normal_priority(orthros):
    """The host starts a backup at SCHED_IDLE (its start-up yields to the service); in
    standby every thread of it and of its checker must be SCHED_OTHER again: an idle
    heartbeat or takeover would starve under load."""
    host, s = orthros
    crash(host, s, "panic")                  # returns with the re-paired backup in standby
    backup = host.kernels[s.backup].proc.pid
    checker = [int(c) for c in open(f"/proc/{backup}/task/{backup}/children").read().split()]
    assert checker, "the backup's checker process is missing"
    for pid in [backup, *checker]:
        assert set(_policies(pid).values()) == {os.SCHED_OTHER}, (pid, _policies(pid))


def test_fs_corrupt_in_the_running_transaction_never_reaches_the_disk(orthros):
    host, s = orthros
    mnt = Path(s.mount)
    with open(mnt / "synced", "wb") as f:          # an inode with blocks for the fault to hit
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
    code = ("import os, sys; fd = os.open(sys.argv[1], os.O_WRONLY); "
            "os.write(fd, b'x' * 9000); os.fsync(fd)")
    syncer = subprocess.Popen([sys.executable, "-c", code, str(mnt / "fsynced")],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
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
