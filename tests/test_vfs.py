"""The VFS over the page cache and the file system, in one process (no FUSE)."""
import errno
import os
import stat

import pytest

from kernel import param
from kernel.fsck import fsck
from kernel.memreader import PartitionReader
from kernel.physmem import PhysMem
from tests.stack import MEM, Stack

PAGE = param.PAGE_SIZE
ROOT = 1


@pytest.fixture
def st(tmp_path):
    s = Stack(tmp_path)
    yield s
    s.close()


def create(st, name, data=b"", parent=ROOT):
    a = st.vfs.create(parent, name, 0o100644, 0, 0)
    if data:
        st.vfs.write(a.ino, 0, data)
    return a.ino


def test_write_read_roundtrip_unaligned(st):
    ino = create(st, b"f")
    data = os.urandom(3 * PAGE + 123)
    st.vfs.write(ino, 0, data)
    st.vfs.write(ino, 5000, b"X" * 10)
    want = data[:5000] + b"X" * 10 + data[5010:]
    assert st.vfs.read(ino, 0, len(want) + 100) == want
    assert st.vfs.read(ino, 4090, 20) == want[4090:4110]
    assert st.vfs.getattr(ino).size == len(want)


def test_unsynced_writes_are_dirty_in_physical_memory(st):
    ino = create(st, b"f", b"a" * (2 * PAGE))
    r = PartitionReader(PhysMem(st.mem_path, readonly=True), 0, MEM, 0)
    walk = r.walk_dirty()
    pages = [d for i in walk.inodes if i.icore["ino"] == ino for d in i.pages]
    assert sorted(d["index"] for d in pages) == [0, 1]
    assert all(r.page(d) == b"a" * PAGE for d in pages)


def test_fsync_makes_data_durable_and_the_rest_is_lost(st):
    a = create(st, b"a", b"durable" * 1000)
    st.vfs.fsync(a)
    create(st, b"b", b"volatile" * 1000)
    st.vfs.fsyncdir(ROOT)            # b's name is durable, its data is not
    st2 = st.crash()
    try:
        ia = st2.path_ino("a")
        assert st2.vfs.read(ia, 0, 10**6) == b"durable" * 1000
        ib = st2.path_ino("b")
        assert st2.vfs.read(ib, 0, 10**6) == b""
    finally:
        st2.close()


def test_remount_keeps_everything_and_fsck_is_clean(st, tmp_path):
    create(st, b"one", b"1" * 10000)
    d = st.vfs.mkdir(ROOT, b"dir", 0o40755, 0, 0).ino
    create(st, b"two", b"2" * 70000, parent=d)
    st.vfs.symlink(d, b"ln", b"../one", 0, 0)
    st2 = st.remount()
    try:
        assert st2.vfs.read(st2.path_ino("dir/two"), 0, 10**6) == b"2" * 70000
        assert st2.vfs.readlink(st2.path_ino("dir/ln")) == b"../one"
        st2.vfs.fs.unmount()
        st2.dev.flush()
        assert fsck(st2.img).exit_code == 0
    finally:
        st2.close()


def test_truncate_drops_cached_and_dirty_pages(st):
    ino = create(st, b"f", b"z" * (5 * PAGE))
    st.vfs.setattr(ino, size=PAGE + 10)
    assert st.vfs.read(ino, 0, 10 * PAGE) == b"z" * (PAGE + 10)
    st.vfs.setattr(ino, size=3 * PAGE)
    assert st.vfs.read(ino, 0, 10 * PAGE) == b"z" * (PAGE + 10) + bytes(2 * PAGE - 10)
    assert [i for i, _, _ in st.vfs.pc.dirty_pages(ino)] == [0, 1]


def test_unlinked_open_file_lives_until_released(st):
    ino = create(st, b"f", b"keep")
    st.vfs.open(ino)
    st.vfs.unlink(ROOT, b"f")
    with pytest.raises(OSError) as e:
        st.vfs.lookup(ROOT, b"f")
    assert e.value.errno == errno.ENOENT
    assert st.vfs.read(ino, 0, 10) == b"keep"
    free_before = st.vfs.statfs()["ffree"]
    st.vfs.release(ino)
    assert st.vfs.statfs()["ffree"] == free_before + 1


def test_setattr_mode_owner_times(st):
    ino = create(st, b"f")
    a = st.vfs.setattr(ino, mode=0o600, uid=7, gid=8, mtime_ns=10**18)
    assert (stat.S_IMODE(a.mode), a.uid, a.gid, a.mtime_ns) == (0o600, 7, 8, 10**18)
    assert stat.S_ISREG(a.mode)
    st2 = st.remount()
    try:
        b = st2.vfs.getattr(st2.path_ino("f"))
        assert (stat.S_IMODE(b.mode), b.uid, b.gid, b.mtime_ns) == (0o600, 7, 8, 10**18)
    finally:
        st2.close()


def test_flusher_writes_back_expired_inodes(st):
    ino = create(st, b"f", b"q" * PAGE)
    st.vfs.writeback.flush_expired(expire_s=0.0)
    assert st.vfs.pc.dirty_pages(ino) == []
    st2 = st.crash()                  # everything written back was flushed and committed
    try:
        assert st2.vfs.read(st2.path_ino("f"), 0, PAGE) == b"q" * PAGE
    finally:
        st2.close()


def test_memory_pressure_evicts_clean_pages(tmp_path):
    s = Stack(tmp_path, mem=48 << 20, write_cache=False)
    try:
        n = s.lay.nframes
        ino = create(s, b"big", b"")
        chunk = os.urandom(256 * PAGE)
        for i in range(0, n + 512, 256):
            s.vfs.write(ino, i * PAGE, chunk)
        s.vfs.fsync(ino)
        total = (n + 512 + 255) // 256 * 256
        for i in range(0, total, 256):
            assert s.vfs.read(ino, i * PAGE, 256 * PAGE) == chunk
        assert s.vfs.pc.stats["evictions"] > 0
    finally:
        s.close()
