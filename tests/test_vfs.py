"""The VFS over the page cache and the file system, in one process (no FUSE)."""

import errno
import os
import stat

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as stt

from kernel import param
from kernel.core.memreader import PartitionReader
from kernel.hw.physmem import PhysMem
from kernel.tools.fsck import fsck
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
    st.vfs.fsyncdir(ROOT)  # b's name is durable, its data is not
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
    st2 = st.crash()  # everything written back was flushed and committed
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


# --- a full device (delayed allocation with reservation) ---------------------------------
def _fill(st, ino, chunk, acked, limit=4000):
    """Write `chunk`-byte pieces at the end of ino until ENOSPC; each failed write must
    leave the file as it was. Appends what was acknowledged to `acked`."""
    for k in range(limit):
        piece = bytes([k % 251 + 1]) * chunk
        before = st.vfs.getattr(ino).size
        try:
            st.vfs.write(ino, len(acked), piece)
        except OSError as e:
            assert e.errno == errno.ENOSPC
            assert st.vfs.getattr(ino).size == before == len(acked)
            assert st.vfs.read(ino, 0, len(acked) + chunk) == bytes(acked)
            return
        acked += piece
    raise AssertionError(f"no ENOSPC after {limit} writes")


def test_full_device_fails_writes_cleanly_and_keeps_every_acknowledged_byte(tmp_path, caplog):
    st = Stack(tmp_path, disk=8 << 20, journal_blocks=256)
    a = create(st, b"a")
    acked = bytearray()
    for chunk in (64 << 10, PAGE, 1):  # with nothing written back, then after each sync
        _fill(st, a, chunk, acked)
        st.vfs.writeback.sync_all()
    assert st.vfs.statfs()["bfree"] == 0
    b = create(st, b"b")
    assert st.vfs.getattr(b).size == 0 and st.vfs.read(b, 0, 10) == b""
    with pytest.raises(OSError) as ei:
        st.vfs.write(b, 0, b"x" * (3 * PAGE))
    assert ei.value.errno == errno.ENOSPC
    assert st.vfs.getattr(b).size == 0 and st.vfs.read(b, 0, 10) == b""
    with pytest.raises(OSError) as ei:
        st.vfs.mkdir(ROOT, b"d", 0o755, 0, 0)
    assert ei.value.errno == errno.ENOSPC
    st.vfs.write(a, 5 * PAGE + 7, b"over" * 3000)  # allocated blocks: no space needed
    acked[5 * PAGE + 7 : 5 * PAGE + 7 + 12000] = b"over" * 3000
    st.vfs.fsync(a)
    st2 = st.remount()
    try:
        ia = st2.path_ino("a")
        assert st2.vfs.getattr(ia).size == len(acked)
        assert st2.vfs.read(ia, 0, len(acked) + 1) == bytes(acked)
        st2.vfs.fs.unmount()
        res = fsck(st2.img)
        assert res.exit_code == 0, res.problems
    finally:
        st2.close()
    assert not [r for r in caplog.records if r.exc_info or r.levelname == "ERROR"]


def test_truncate_and_unlink_give_reserved_space_back(tmp_path):
    st = Stack(tmp_path, disk=8 << 20, journal_blocks=256)
    free = st.vfs.statfs()["bfree"]
    a = create(st, b"a", b"a" * (200 * PAGE))
    assert st.vfs.statfs()["bfree"] <= free - 200  # promised before anything is written back
    st.vfs.setattr(a, size=10 * PAGE + 1)
    assert free - 200 < st.vfs.statfs()["bfree"] <= free - 11
    st.vfs.unlink(ROOT, b"a")
    assert st.vfs.statfs()["bfree"] == free
    st.close()


def test_a_write_within_the_direct_pointers_promises_its_pages_and_looks_for_no_indirect_block(
    tmp_path, monkeypatch
):
    """No page before NDIRECT needs an indirect block, so the small-file path promises one
    block a page and computes no node keys (bulk numpy: costly on a 1 KiB write); past the
    direct pointers the leaf is promised too."""
    from kernel.core import reserve

    st = Stack(tmp_path, disk=8 << 20, journal_blocks=256)
    real = reserve.node_keys

    def no_nodes(idx):
        raise AssertionError(f"node keys asked for pages {list(idx)}")

    monkeypatch.setattr(reserve, "node_keys", no_nodes)
    a = create(st, b"a")
    free = st.vfs.statfs()["bfree"]
    st.vfs.write(a, 0, b"x" * 1024)
    st.vfs.write(
        a, 3 * PAGE + 5, b"y" * ((param.NDIRECT - 3) * PAGE - 5)
    )  # to the last direct page
    assert st.vfs.statfs()["bfree"] == free - (1 + param.NDIRECT - 3)
    monkeypatch.setattr(reserve, "node_keys", real)
    st.vfs.write(a, param.NDIRECT * PAGE, b"z")  # one page and its leaf
    assert st.vfs.statfs()["bfree"] == free - (1 + param.NDIRECT - 3) - 2
    st.vfs.fsync(a)
    assert st.vfs.read(a, 0, 1025) == b"x" * 1024 + bytes(1)
    st.close()


@settings(
    max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    pages=stt.lists(
        stt.tuples(stt.integers(2, 5), stt.one_of(stt.integers(0, 40), stt.integers(0, 1 << 21))),
        max_size=300,
    )
)
def test_adopted_dirty_pages_are_promised_each_a_block_and_the_nodes_on_their_paths(st, pages):
    """Adoption's promise, computed from the distinct leaves in bulk, is per inode its pages
    plus the distinct indirect blocks any of its pages' paths holds."""
    import numpy as np

    from kernel.core.reserve import node_keys

    r = st.vfs.resv
    for i in list(r.pages):
        r.release(i)
    r.adopt(np.array([i for i, _ in pages], np.int64), np.array([x for _, x in pages], np.int64))
    for i in {i for i, _ in pages}:
        mine = [x for j, x in pages if j == i]
        assert r.pages[i] == len(mine)
        assert r.meta[i] == len(node_keys(np.array(mine, np.int64)))
    assert r.ba.reserved == sum(r.held(i) for i in r.pages)


@settings(
    max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    ops=stt.lists(
        stt.tuples(
            stt.sampled_from(["write", "write", "write", "truncate", "unlink", "sync"]),
            stt.integers(0, 2),
            stt.sampled_from([0, 100, PAGE, 5 * PAGE - 1, 1 << 20, 3 << 20]),
            stt.sampled_from([1, PAGE - 1, PAGE, 3 * PAGE + 5, 1 << 20, 3 << 20]),
        ),
        min_size=4,
        max_size=25,
    )
)
def test_on_a_tiny_device_what_was_acknowledged_is_on_disk_after_sync(tmp_path_factory, ops):
    st = Stack(tmp_path_factory.mktemp("tiny"), disk=6 << 20, journal_blocks=256)
    model: dict[bytes, bytearray] = {}
    try:
        for k, (op, f, off, n) in enumerate(ops):
            name = b"f%d" % f
            if op == "write":
                if name not in model:
                    create(st, name)
                    model[name] = bytearray()
                ino = st.path_ino(name.decode())
                data = bytes([k % 251 + 1]) * n
                try:
                    st.vfs.write(ino, off, data)
                except OSError as e:
                    assert e.errno == errno.ENOSPC
                else:
                    m = model[name]
                    m.extend(bytes(max(0, off + n - len(m))))
                    m[off : off + n] = data
                assert st.vfs.getattr(ino).size == len(model[name])
            elif op == "truncate" and name in model:
                st.vfs.setattr(st.path_ino(name.decode()), size=off)
                m = model[name]
                del m[off:]
                m.extend(bytes(off - len(m)))
            elif op == "unlink" and name in model:
                st.vfs.unlink(ROOT, name)
                del model[name]
            elif op == "sync":
                st.vfs.writeback.sync_all()
    finally:
        st2 = st.remount()
    try:
        for name, m in model.items():
            ino = st2.path_ino(name.decode())
            assert st2.vfs.read(ino, 0, len(m) + 1) == bytes(m), name
    finally:
        st2.close()
