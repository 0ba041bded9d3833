"""The warm-cache VMM beneath a kernel's storage stack, in one process (no mounts)."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import xxhash

from kernel.core.pagecache import FreeFrames
from kernel.core.vfs import VFS
from kernel.hw import vmm
from kernel.hw.blockdev import BlockDevice
from kernel.hw.physmem import PAGE_DESC, PhysMem, partition_layout
from kernel.tools.mkfs import mkfs

PAGE = 4096
MEM = 64 << 20


class Machine:
    """physmem + disk + the VMM's region; ``boot()`` a kernel beneath the VMM, ``crash()`` it."""

    def __init__(self, tmp, spare=64):
        self.img = str(tmp / "disk.img")
        mkfs(self.img, 128 << 20)
        self.mem = PhysMem(str(tmp / "physmem"), MEM, create=True)
        self.lay = partition_layout(0, 0, MEM)
        self.mem.write(0, self.lay.header_bytes())
        self.rpath = str(tmp / "vmm")
        self.dev = BlockDevice(self.img, "ssd", delay=False)
        self.region = vmm.Region.create(self.rpath, self.lay, self.dev.nblocks, spare)
        self.dev.close()
        self.dev = None

    def boot(self) -> VFS:
        self.dev = BlockDevice(self.img, "ssd", delay=False)
        self.v = vmm.Vmm(self.mem, self.lay, vmm.Region(self.rpath))
        self.mem.watchers[:] = []
        self.v.install()
        return VFS(self.mem, self.lay, vmm.VmmDisk(self.dev, self.v))

    def crash(self) -> dict:
        """The kernel dies (nothing written back); the VMM checks what its frames hold."""
        self.mem.watchers[:] = []
        self.dev.close()
        return vmm.preserve(self.region, self.mem, self.lay)

    def frame_of(self, ino: int, idx: int) -> int:
        d = self.mem.array(PAGE_DESC.dtype, self.lay.desc, self.lay.nframes)
        return int(np.flatnonzero((d["ino"] == ino) & (d["index"] == idx))[0])

    def close(self):
        self.mem.watchers[:] = []
        if self.dev is not None:
            self.dev.close()
        self.region.close()
        self.mem.close()


@pytest.fixture
def m(tmp_path):
    mc = Machine(tmp_path)
    yield mc
    mc.close()


def synced_file(fs, name: bytes, data: bytes) -> int:
    ino = fs.create(1, name, 0o100644, 0, 0).ino
    fs.write(ino, 0, data)
    fs.fsync(ino)
    return ino


def test_a_written_back_file_is_served_warm_after_the_crash(m):
    fs = m.boot()
    data = os.urandom(40 * PAGE)
    synced_file(fs, b"a", data)
    got = m.crash()
    assert got["kept"] >= 40 and got["corrupted"] == 0
    fs = m.boot()
    ino = fs.lookup(1, b"a").ino
    before, modeled = m.v.r.stats(), m.dev.stats["modeled_s"]
    assert fs.read(ino, 0, 40 * PAGE) == data
    after = m.v.r.stats()
    assert after["reused"] - before["reused"] == 40
    assert m.dev.stats["modeled_s"] - modeled < 40 * 80e-6  # not 40 pages' worth of device time
    assert fs.read(ino, 0, 40 * PAGE) == data  # then from the new page cache
    assert m.v.r.stats()["reused"] == after["reused"]


def test_a_frame_stored_into_before_the_crash_is_refused(m):
    fs = m.boot()
    ino = synced_file(fs, b"b", b"x" * 10 * PAGE)
    fs.write(ino, 0, b"y" * 4 * PAGE)  # four pages dirty, never written back
    got = m.crash()
    assert got["inconsistent"] >= 4
    fs = m.boot()
    ino = fs.lookup(1, b"b").ino
    r0 = m.v.r.stats()["reused"]
    assert fs.read(ino, 0, 10 * PAGE) == b"x" * 10 * PAGE  # the disk's, not the dirty frames'
    assert m.v.r.stats()["reused"] - r0 == 6


def test_a_frame_corrupted_behind_the_vmm_is_refused_by_its_checksum(m):
    fs = m.boot()
    data = os.urandom(10 * PAGE)
    ino = synced_file(fs, b"c", data)
    raw = PhysMem(m.mem.path)  # no watcher: a memory error the VMM cannot see
    raw.write(m.lay.frame_phys(m.frame_of(ino, 3)) + 100, b"\xff" * 8)
    raw.close()
    got = m.crash()
    assert got["corrupted"] == 1 and len(got["corrupted_frames"]) == 1
    fs = m.boot()
    r0 = m.v.r.stats()["reused"]
    assert fs.read(fs.lookup(1, b"c").ino, 0, 10 * PAGE) == data
    assert m.v.r.stats()["reused"] - r0 == 9


def test_a_block_written_after_the_crash_is_not_served_from_its_old_copy(m):
    fs = m.boot()
    synced_file(fs, b"d", b"1" * 4 * PAGE)
    m.crash()
    fs = m.boot()
    ino = fs.lookup(1, b"d").ino
    blocks = fs.fs.bmap_range(ino, 0, 4)
    st = m.v.r.stats()
    fs.dev.write(blocks[0], b"2" * PAGE)  # e.g. journal replay: a new generation of the block
    assert m.v.r.stats()["refused_inconsistent"] == st["refused_inconsistent"] + 1
    assert fs.read(ino, 0, PAGE) == b"2" * PAGE
    assert m.v.r.stats()["reused"] == st["reused"] + 3  # readahead: the three others, still warm


def test_a_warm_page_is_moved_aside_when_the_new_kernel_reuses_its_frame(m):
    fs = m.boot()
    data = os.urandom(8 * PAGE)
    ino = synced_file(fs, b"e", data)
    frame = m.frame_of(ino, 0)
    m.crash()
    fs = m.boot()
    # the new kernel stores into the frame that holds the warm page: it must survive elsewhere
    m.mem.write(m.lay.frame_phys(frame), b"z" * PAGE)
    assert m.v.r.stats()["moved_aside"] >= 1
    r0 = m.v.r.stats()["reused"]
    assert fs.read(fs.lookup(1, b"e").ino, 0, 8 * PAGE) == data
    assert m.v.r.stats()["reused"] - r0 == 8


def test_without_spare_pages_a_reused_frame_loses_its_warm_page(tmp_path):
    mc = Machine(tmp_path, spare=0)
    try:
        fs = mc.boot()
        ino = synced_file(fs, b"f", os.urandom(2 * PAGE))
        frame = mc.frame_of(ino, 0)
        mc.crash()
        mc.boot()
        mc.mem.write(mc.lay.frame_phys(frame), b"z" * PAGE)
        assert mc.v.r.stats()["dropped"] == 1
    finally:
        mc.close()


def test_free_frames_handed_out_last_come_after_every_other_lowest_first():
    free = FreeFrames(np.arange(9, -1, -1))
    assert free.pop() == 0  # taken before the hint (the mount's own reads)
    free.hand_out_last(np.array([1, 5, 2]))
    assert [free.pop() for _ in range(len(free))] == [3, 4, 6, 7, 8, 9, 1, 2, 5]


def test_a_new_kernel_fills_the_frames_without_warm_copies_first(tmp_path):
    mc = Machine(tmp_path, spare=0)  # no spare page: a warm frame the kernel fills is lost
    try:
        fs = mc.boot()
        old = os.urandom(8 * PAGE)
        ino = synced_file(fs, b"old", old)
        warm = {mc.frame_of(ino, k) for k in range(8)}
        mc.crash()
        fs = mc.boot()
        assert warm <= set(mc.v.warm_frames().tolist())
        fs.pc.free.hand_out_last(mc.v.warm_frames())  # what Kernel.boot does beneath a VMM
        new = synced_file(fs, b"new", os.urandom(32 * PAGE))
        assert not warm & {mc.frame_of(new, k) for k in range(32)}
        assert mc.v.r.stats()["dropped"] == 0 and mc.v.r.stats()["moved_aside"] == 0
        r0 = mc.v.r.stats()["reused"]
        assert fs.read(fs.lookup(1, b"old").ino, 0, 8 * PAGE) == old
        assert mc.v.r.stats()["reused"] - r0 == 8
    finally:
        mc.close()


def test_only_the_first_store_into_a_frame_with_a_copy_reaches_the_vmm(m):
    """Write protection: a CLEAN frame traps once, is invalidated, and then stores freely;
    a frame without a copy never traps; a read landing in one is seen all the same."""
    fs = m.boot()
    ino = synced_file(fs, b"w", os.urandom(4 * PAGE))
    seen = []
    m.mem.watchers.append(lambda phys, data: seen.append(phys))  # sees what the VMM sees
    frames = [m.frame_of(ino, i) for i in range(4)]
    p = m.lay.frame_phys(frames[1])
    free = int(np.flatnonzero(m.v.r.ft["state"] == vmm.FREE)[-1])
    inv = m.v.r.stats()["invalidated"]
    m.mem.write(p + 10, b"x")
    m.mem.write(p + 20, b"y")
    m.mem.write(m.lay.frame_phys(free), b"z")
    assert seen == [p + 10]
    assert m.v.r.stats()["invalidated"] == inv + 1
    got = m.crash()
    assert set(got["kept_frames"].tolist()) & set(frames) == {frames[0], frames[2], frames[3]}
    fs = m.boot()
    reg = m.v.r.stats()["registered"]
    fs.read(fs.lookup(1, b"w").ino, 0, 4 * PAGE)  # lands in frames that were not protected
    assert m.v.r.stats()["registered"] - reg >= 4
    assert all(m.v.wp[m.frame_of(fs.lookup(1, b"w").ino, i)] for i in range(4))


def test_a_region_for_another_guest_is_refused(m, tmp_path):
    other = partition_layout(0, 0, MEM // 2)
    with pytest.raises(vmm.VmmError, match="the guest has"):
        vmm.Vmm(m.mem, other, m.region)
    open(tmp_path / "junk", "wb").write(bytes(3 * PAGE))
    with pytest.raises(vmm.VmmError, match="bad magic"):
        vmm.Region(str(tmp_path / "junk"))
    with pytest.raises(vmm.VmmError, match="no VMM region"):
        vmm.Region(str(tmp_path / "absent"))


def test_a_torn_table_entry_is_refused_as_corrupted(m):
    fs = m.boot()
    ino = synced_file(fs, b"g", os.urandom(2 * PAGE))
    f = m.frame_of(ino, 1)
    m.region.ft["gen"][f] += 7  # a stray store into the VMM's own table
    got = m.crash()
    assert got["corrupted"] == 1 and got["corrupted_frames"].tolist() == [f]


def test_a_kernel_without_the_vmm_has_no_watcher(tmp_path):
    from tests.stack import Stack

    s = Stack(tmp_path)
    try:
        assert s.mem.watchers == [] and type(s.dev) is BlockDevice
    finally:
        s.close()


def test_the_vmm_counts_the_time_inside_its_entry_points(m):
    """busy_ns grows with the VMM's work beneath a kernel, and never by more than the wall
    time of the operations that made it (harness/cpuuse.py reads it as the VMM's CPU)."""
    import time

    fs = m.boot()
    before = m.v.r.stats()["busy_ns"]
    t0 = time.perf_counter_ns()
    synced_file(fs, b"a", os.urandom(40 * PAGE))
    wall = time.perf_counter_ns() - t0
    spent = m.v.r.stats()["busy_ns"] - before
    assert 0 < spent <= wall


def test_of_two_copies_of_a_block_one_is_kept_and_corrupted_spare_pages_are_refused(m):
    """preserve() over the frame table and the spare pages: a block held twice is kept
    once (the first copy), a spare page whose content no longer matches is corrupted."""
    fs = m.boot()
    ino = synced_file(fs, b"h", os.urandom(3 * PAGE))
    f0, f1 = m.frame_of(ino, 0), m.frame_of(ino, 1)
    free = np.flatnonzero(m.region.ft["state"] == vmm.FREE)
    twin = int(free[free > f0][0])
    m.mem.watchers[:] = []  # stores behind the VMM: a second copy, and spare pages
    m.mem.write(m.lay.frame_phys(twin), bytes(m.mem.view[m.lay.frame_phys(f0) :][:PAGE]))
    m.region.ft[twin] = m.region.ft[f0]
    for slot, f, junk in ((0, f1, False), (1, f1, True)):
        m.region.spare[slot] = np.frombuffer(m.mem.view[m.lay.frame_phys(f) :][:PAGE], np.uint8)
        m.region.st[slot] = m.region.ft[f]
        m.region.st["state"][slot] = vmm.WARM
        if junk:
            m.region.spare[slot, 7] ^= 1
    got = m.crash()
    assert got["duplicates"] == 2  # the twin of page 0, the good spare copy of page 1
    assert got["corrupted"] == 1
    kept = set(got["kept_frames"].tolist())
    assert f0 in kept and twin not in kept and f1 in kept
    assert m.region.ft["state"][twin] == vmm.FREE
    assert (m.region.st["state"][:2] == vmm.FREE).all()


def test_page_hashes_are_one_xxh3_per_page_in_runs_and_alone():
    pages = np.random.default_rng(0).integers(0, 256, (200, PAGE), dtype=np.uint8)
    idx = np.r_[0, 2, 5 : 5 + vmm._RUN + 3, 90, 91, 120:200]
    want = [xxhash.xxh3_64_intdigest(pages[i]) for i in idx.tolist()]
    assert vmm.page_hashes(pages, idx).tolist() == want
    assert len(vmm.page_hashes(pages, idx[:0])) == 0


def test_the_check_benchmark_finds_the_same_pages_in_every_variant():
    """scripts/bench_warm_check.py, this tree against itself: every variant agrees."""
    root = Path(__file__).resolve().parent.parent
    script = [sys.executable, str(root / "scripts" / "bench_warm_check.py")]
    small = ["--frames", "300", "--rounds", "1", "--fence", "0", "--before", str(root)]
    out = subprocess.run(script + small, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "300 preserved, 6 inconsistent" in out.stdout and "before / after" in out.stdout
    bad = subprocess.run(script + ["--rounds", "0"], capture_output=True, text=True, timeout=60)
    assert bad.returncode != 0 and "must be positive" in bad.stderr


def test_a_preserved_page_corrupted_after_the_check_is_refused_when_read(m):
    """The content is checked again in the copy a read serves: a frame that changed behind
    the VMM after preserve() is refused, counted, and the disk's block served instead."""
    fs = m.boot()
    data = os.urandom(8 * PAGE)
    ino = synced_file(fs, b"k", data)
    frame = m.frame_of(ino, 5)
    got = m.crash()
    assert got["corrupted"] == 0 and frame in got["kept_frames"].tolist()
    raw = PhysMem(m.mem.path)  # no watcher: a memory error the VMM cannot see
    raw.write(m.lay.frame_phys(frame) + 7, b"\x00\x01")
    raw.close()
    fs = m.boot()
    ino = fs.lookup(1, b"k").ino
    st = m.v.r.stats()
    assert fs.read(ino, 0, 8 * PAGE) == data
    after = m.v.r.stats()
    assert after["refused_corrupted"] - st["refused_corrupted"] == 1
    assert after["reused"] - st["reused"] == 7
    assert after["device_blocks"] - st["device_blocks"] == 1


def test_a_read_mixing_warm_moved_aside_and_device_pages_is_served_whole(m):
    """One read over blocks held in frames, in spare pages and by the disk alone: the bytes
    are the file's, each page counted once where it came from."""
    fs = m.boot()
    data = os.urandom(12 * PAGE)
    ino = synced_file(fs, b"x", data)
    frames = [m.frame_of(ino, i) for i in range(12)]
    fs.write(ino, 3 * PAGE, data[3 * PAGE : 5 * PAGE])  # pages 3, 4: dirtied, not preserved
    m.crash()
    fs = m.boot()
    m.mem.write(m.lay.frame_phys(frames[8]), b"z" * PAGE)  # page 8 moves into a spare page
    ino = fs.lookup(1, b"x").ino
    assert m.v.r.stats()["moved_aside"] == 1 and (m.v.r.st["state"] == vmm.WARM).sum() == 1
    st = m.v.r.stats()
    assert fs.read(ino, 0, 12 * PAGE) == data
    after = m.v.r.stats()
    assert (m.v.r.st["state"] == vmm.WARM).sum() == 0  # the spare copy was served
    assert after["reused"] - st["reused"] == 10
    assert after["device_blocks"] - st["device_blocks"] == 2


def test_a_corrupted_spare_page_is_refused_when_read(m):
    fs = m.boot()
    data = os.urandom(2 * PAGE)
    ino = synced_file(fs, b"s", data)
    frame = m.frame_of(ino, 1)
    m.crash()
    fs = m.boot()
    m.mem.write(m.lay.frame_phys(frame), b"z" * PAGE)  # moved aside into spare slot
    slot = int(np.flatnonzero(m.v.r.st["state"] == vmm.WARM)[0])
    m.v.r.spare[slot, 100] ^= 0xFF
    ino = fs.lookup(1, b"s").ino
    st = m.v.r.stats()
    assert fs.read(ino, 0, 2 * PAGE) == data
    after = m.v.r.stats()
    assert after["refused_corrupted"] - st["refused_corrupted"] == 1
    assert after["reused"] - st["reused"] == 1
    assert m.v.r.st["state"][slot] == vmm.FREE and slot in m.v.free_spare


def test_a_page_served_warm_lands_registered_with_a_sound_entry(m):
    """A warm page's landing reuses the hash and seal checked when it was served: the
    entry it leaves is exactly what a fresh hash and seal give, so a second crash keeps it."""
    fs = m.boot()
    data = os.urandom(6 * PAGE)
    synced_file(fs, b"r", data)
    m.crash()
    fs = m.boot()
    ino = fs.lookup(1, b"r").ino
    assert fs.read(ino, 0, 6 * PAGE) == data
    for i in range(6):
        f = m.frame_of(ino, i)
        e = m.v.r.ft[f]
        page = m.mem.view[m.lay.frame_phys(f) :][:PAGE]
        assert e["state"] == vmm.CLEAN and int(e["csum"]) == xxhash.xxh3_64_intdigest(page)
        assert int(e["seal"]) == vmm.seal(int(e["block"]), int(e["csum"]), int(e["gen"]))
    got = m.crash()
    assert got["corrupted"] == 0 and got["kept"] >= 6


def test_the_read_benchmark_serves_every_page_warm_and_right():
    """scripts/bench_warm_read.py, small: every variant reads the files back unchanged and
    the warm one reuses every page (the script fails otherwise)."""
    root = Path(__file__).resolve().parent.parent
    script = [sys.executable, str(root / "scripts" / "bench_warm_read.py")]
    small = ["--files", "3", "--pages", "5", "--rounds", "1", "--before", str(root)]
    out = subprocess.run(script + small, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "warm / cold, VMM" in out.stdout and "warm, before / warm" in out.stdout
    bad = subprocess.run(script + ["--pages", "0"], capture_output=True, text=True, timeout=60)
    assert bad.returncode != 0 and "must be positive" in bad.stderr
