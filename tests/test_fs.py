"""The file system over MemBuffers: every operation, remounts, crashes, limits."""

import errno
import hashlib
import os
import random
import re
import shutil
import stat
import tempfile

import pytest
from hypothesis import HealthCheck, event, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from kernel import param
from kernel.core.buffers import MemBuffers
from kernel.core.faults import KernelPanic
from kernel.core.fs import RENAME_EXCHANGE, RENAME_NOREPLACE, FileSystem, FsError, JournalDamaged
from kernel.hw.blockdev import BlockDevice
from kernel.tools.fsck import fsck
from kernel.tools.mkfs import mkfs

B = param.BLOCK_SIZE
ROOT = 1
REG = stat.S_IFREG | 0o644


class Mounted:
    """An image, a device and a mounted file system; remount() / crash() give a new one."""

    def __init__(self, img, *, write_cache=True, **on):
        self.img, self.write_cache = img, write_cache
        self.dev = BlockDevice(img, "none", write_cache=write_cache, delay=False)
        self.fs = FileSystem(self.dev, MemBuffers(self.dev), **on)

    def remount(self):
        self.fs.unmount()
        self.dev.close()
        return Mounted(self.img, write_cache=self.write_cache)

    def crash(self):
        self.dev.crash()
        self.dev.close()
        return Mounted(self.img, write_cache=self.write_cache)

    def sync(self):
        self.fs.commit()
        self.dev.flush()

    def close(self):
        if self.dev.fd >= 0:
            self.dev.close()


@pytest.fixture
def img(tmp_path):
    p = str(tmp_path / "disk.img")
    mkfs(p, 64 << 20)
    return p


@pytest.fixture
def m(img):
    mm = Mounted(img)
    yield mm
    mm.close()


def mkfile(fs, name, data=b"", parent=ROOT):
    ino = fs.create(parent, name, REG, 1000, 1000)
    if data:
        fs.write_data(ino, 0, data)
    return ino


def errno_of(fn, *a):
    with pytest.raises(OSError) as ei:
        fn(*a)
    return ei.value.errno


def digest(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# --- namespace -------------------------------------------------------------------------------
def test_create_lookup_readdir_iget(m):
    fs = m.fs
    a = fs.create(ROOT, b"alpha", REG, 1000, 2000)
    i = fs.iget(a)
    assert (i.ino, i.mode, i.uid, i.gid, i.nlink, i.size) == (a, REG, 1000, 2000, 1, 0)
    assert i.mtime_ns == i.ctime_ns == i.atime_ns > 0 and i.generation >= 1
    assert fs.lookup(ROOT, b"alpha") == a
    assert fs.lookup(ROOT, b".") == ROOT and fs.lookup(ROOT, b"..") == ROOT
    b = mkfile(fs, b"beta")
    assert sorted(fs.readdir(ROOT)) == [(b"alpha", a), (b"beta", b)]
    assert errno_of(fs.create, ROOT, b"alpha", REG, 0, 0) == errno.EEXIST
    assert errno_of(fs.lookup, ROOT, b"gamma") == errno.ENOENT
    assert errno_of(fs.create, ROOT, b"x" * (param.NAME_MAX + 1), REG, 0, 0) == errno.ENAMETOOLONG
    fs.create(ROOT, b"y" * param.NAME_MAX, REG, 0, 0)  # exactly NAME_MAX is fine
    assert errno_of(fs.lookup, a, b"x") == errno.ENOTDIR
    assert errno_of(fs.create, a, b"x", REG, 0, 0) == errno.ENOTDIR
    assert errno_of(fs.create, ROOT, b"a/b", REG, 0, 0) == errno.EINVAL
    assert errno_of(fs.iget, 999) == errno.ESTALE


def test_setattr_keeps_file_type_and_persists(m):
    a = mkfile(m.fs, b"f", b"data")
    m.fs.setattr(a, mode=0o4600, uid=7, gid=8, atime_ns=1, mtime_ns=2, ctime_ns=3)
    with pytest.raises(TypeError):
        m.fs.setattr(a, colour=1)
    m2 = m.remount()
    i = m2.fs.iget(a)
    assert (i.mode, i.uid, i.gid, i.atime_ns, i.mtime_ns, i.ctime_ns) == (
        stat.S_IFREG | 0o4600,
        7,
        8,
        1,
        2,
        3,
    )
    m2.close()


def test_mkdir_rmdir_and_link_counts(m):
    fs = m.fs
    d = fs.mkdir(ROOT, b"d", 0o755, 0, 0)
    assert stat.S_ISDIR(fs.iget(d).mode) and fs.iget(d).nlink == 2
    assert fs.iget(ROOT).nlink == 3 and fs.iget(d).size == B
    assert fs.lookup(d, b"..") == ROOT and fs.readdir(d) == []
    e = fs.mkdir(d, b"e", 0o700, 0, 0)
    mkfile(fs, b"f", b"x", parent=e)
    assert fs.iget(d).nlink == 3
    assert errno_of(fs.rmdir, ROOT, b"d") == errno.ENOTEMPTY
    assert errno_of(fs.rmdir, e, b"f") == errno.ENOTDIR
    assert errno_of(fs.unlink, d, b"e") == errno.EISDIR
    assert errno_of(fs.rmdir, d, b".") == errno.EINVAL
    assert errno_of(fs.rmdir, d, b"..") == errno.ENOTEMPTY
    ino_f = fs.unlink(e, b"f")
    fs.release_inode(ino_f)
    free = fs.statfs()["ffree"]
    assert fs.rmdir(d, b"e") == e
    assert fs.iget(e).nlink == 0 and fs.iget(d).nlink == 2
    assert errno_of(fs.create, e, b"late", REG, 0, 0) == errno.ENOENT  # removed directory
    fs.release_inode(e)
    assert fs.statfs()["ffree"] == free + 1
    assert errno_of(fs.iget, e) == errno.ESTALE


def test_big_directory_survives_remount_and_removals(m):
    fs = m.fs
    d = fs.mkdir(ROOT, b"big", 0o755, 0, 0)
    names = [b"file-%05d-%s" % (i, b"x" * (i % 40)) for i in range(600)]
    inos = {n: fs.create(d, n, REG, 0, 0) for n in names}
    assert fs.iget(d).size > 3 * B  # grew over several blocks
    for n in names[::3]:
        fs.release_inode(fs.unlink(d, n))
        del inos[n]
    for k in range(100):  # reuse the holes
        n = b"again-%03d" % k
        inos[n] = fs.create(d, n, REG, 0, 0)
    m2 = m.remount()
    assert dict(m2.fs.readdir(d)) == inos
    for n, ino in list(inos.items())[::50]:
        assert m2.fs.lookup(d, n) == ino
    m2.close()


def test_hard_links(m):
    fs = m.fs
    a = mkfile(fs, b"a", b"shared")
    d = fs.mkdir(ROOT, b"d", 0o755, 0, 0)
    fs.link(a, d, b"b")
    assert fs.iget(a).nlink == 2 and fs.lookup(d, b"b") == a
    assert errno_of(fs.link, a, d, b"b") == errno.EEXIST
    assert errno_of(fs.link, d, ROOT, b"dirlink") == errno.EPERM
    assert fs.unlink(ROOT, b"a") == a
    assert fs.iget(a).nlink == 1
    assert fs.read_data(a, 0, 100) == b"shared"
    m2 = m.remount()
    assert m2.fs.lookup(d, b"b") == a and m2.fs.iget(a).nlink == 1
    m2.fs.unmount()
    m2.close()
    assert fsck(m2.img).exit_code == 0


def test_symlinks_short_long_and_limits(m):
    fs = m.fs
    short = b"../target"
    long = b"/very/long/" + b"p" * 3000
    s1 = fs.symlink(ROOT, b"s", short, 0, 0)
    free = fs.statfs()["bfree"]
    s2 = fs.symlink(ROOT, b"l", long, 0, 0)
    assert fs.statfs()["bfree"] == free - 1  # the long one takes a block
    assert stat.S_ISLNK(fs.iget(s1).mode) and fs.iget(s1).size == len(short)
    assert fs.readlink(s1) == short and fs.readlink(s2) == long
    assert errno_of(fs.symlink, ROOT, b"x", b"q" * B, 0, 0) == errno.ENAMETOOLONG
    assert errno_of(fs.symlink, ROOT, b"x", b"", 0, 0) == errno.ENOENT
    assert errno_of(fs.readlink, ROOT) == errno.EINVAL
    fs.symlink(ROOT, b"edge", b"e" * 60, 0, 0)  # the longest inline target
    fs.symlink(ROOT, b"edge1", b"e" * 61, 0, 0)  # the shortest in a block
    m2 = m.remount()
    fs = m2.fs
    assert fs.readlink(fs.lookup(ROOT, b"s")) == short
    assert fs.readlink(fs.lookup(ROOT, b"l")) == long
    assert fs.readlink(fs.lookup(ROOT, b"edge")) == b"e" * 60
    assert fs.readlink(fs.lookup(ROOT, b"edge1")) == b"e" * 61
    free = fs.statfs()["bfree"]
    fs.release_inode(fs.unlink(ROOT, b"l"))
    fs.release_inode(fs.unlink(ROOT, b"s"))
    fs.commit()
    assert fs.statfs()["bfree"] == free + 1
    fs.unmount()
    m2.close()
    assert fsck(m2.img).exit_code == 0


# --- rename ------------------------------------------------------------------------------------
def test_rename_simple_and_over_an_existing_file(m):
    fs = m.fs
    a = mkfile(fs, b"a", b"new contents")
    b = mkfile(fs, b"b", b"old contents")
    assert fs.rename(ROOT, b"a", ROOT, b"c") is None
    assert fs.lookup(ROOT, b"c") == a and errno_of(fs.lookup, ROOT, b"a") == errno.ENOENT
    assert fs.rename(ROOT, b"c", ROOT, b"b") == b  # replaced: its nlink dropped
    assert fs.iget(b).nlink == 0 and fs.lookup(ROOT, b"b") == a
    assert fs.read_data(a, 0, 100) == b"new contents"
    fs.release_inode(b)
    assert sorted(n for n, _ in fs.readdir(ROOT)) == [b"b"]


def test_rename_errors(m):
    fs = m.fs
    f = mkfile(fs, b"f")
    mkfile(fs, b"g")
    d = fs.mkdir(ROOT, b"d", 0o755, 0, 0)
    sub = fs.mkdir(d, b"sub", 0o755, 0, 0)
    full = fs.mkdir(ROOT, b"full", 0o755, 0, 0)
    mkfile(fs, b"x", parent=full)
    assert errno_of(fs.rename, ROOT, b"nope", ROOT, b"z") == errno.ENOENT
    assert errno_of(fs.rename, ROOT, b"f", ROOT, b"d") == errno.EISDIR
    assert errno_of(fs.rename, ROOT, b"d", ROOT, b"f") == errno.ENOTDIR
    assert errno_of(fs.rename, ROOT, b"d", ROOT, b"full") == errno.ENOTEMPTY
    assert errno_of(fs.rename, ROOT, b"d", sub, b"inside") == errno.EINVAL
    assert errno_of(fs.rename, ROOT, b"d", d, b"self") == errno.EINVAL
    assert errno_of(fs.rename, ROOT, b"f", ROOT, b"g", RENAME_NOREPLACE) == errno.EEXIST
    assert errno_of(fs.rename, ROOT, b"f", ROOT, b"g", RENAME_EXCHANGE) == errno.EINVAL
    assert errno_of(fs.rename, ROOT, b"f", ROOT, b"q" * 300) == errno.ENAMETOOLONG
    # nothing changed on the way
    assert sorted(n for n, _ in fs.readdir(ROOT)) == [b"d", b"f", b"full", b"g"]
    assert fs.lookup(ROOT, b"f") == f and fs.iget(ROOT).nlink == 4


def test_rename_directory_across_parents_fixes_dotdot_and_nlink(m):
    fs = m.fs
    a = fs.mkdir(ROOT, b"a", 0o755, 0, 0)
    b = fs.mkdir(ROOT, b"b", 0o755, 0, 0)
    d = fs.mkdir(a, b"d", 0o755, 0, 0)
    mkfile(fs, b"inner", b"i", parent=d)
    empty = fs.mkdir(b, b"empty", 0o755, 0, 0)
    assert fs.rename(a, b"d", b, b"empty") == empty  # over an empty directory
    assert fs.iget(empty).nlink == 0
    fs.release_inode(empty)
    assert fs.lookup(d, b"..") == b and fs.lookup(b, b"empty") == d
    assert fs.iget(a).nlink == 2 and fs.iget(b).nlink == 3
    assert fs.rename(b, b"empty", ROOT, b"top") is None
    assert fs.lookup(d, b"..") == ROOT and fs.iget(ROOT).nlink == 5
    m2 = m.remount()
    assert m2.fs.lookup(m2.fs.lookup(ROOT, b"top"), b"inner")
    m2.fs.unmount()
    m2.close()
    assert fsck(m2.img).exit_code == 0


def test_rename_onto_another_link_of_the_same_inode_is_a_no_op(m):
    fs = m.fs
    a = mkfile(fs, b"a")
    fs.link(a, ROOT, b"b")
    assert fs.rename(ROOT, b"a", ROOT, b"b") is None
    assert fs.lookup(ROOT, b"a") == fs.lookup(ROOT, b"b") == a and fs.iget(a).nlink == 2


# --- data, truncate, big files ------------------------------------------------------------------
@pytest.mark.parametrize("off", [0, 5, B - 3, 11 * B + 100, (12 + 1024) * B - 10, 3 * B])
def test_write_read_round_trip_across_indirection(m, off):
    fs = m.fs
    a = mkfile(fs, b"f")
    data = random.Random(off).randbytes(3 * B + 17)
    fs.write_data(a, off, data)
    assert fs.iget(a).size == off + len(data)
    assert fs.read_data(a, off, len(data)) == data
    assert fs.read_data(a, 0, off) == bytes(off)  # the hole before reads as zeros
    fs.write_data(a, off + 10, b"PATCH")
    want = data[:10] + b"PATCH" + data[15:]
    m2 = m.remount()
    assert m2.fs.read_data(a, off, len(data) + 100) == want
    m2.close()


def test_bmap_range_matches_bmap_and_allocates(m):
    fs = m.fs
    a = mkfile(fs, b"f")
    got = fs.bmap_range(a, 0, 300, alloc=True)
    assert all(got) and len(set(got)) == 300
    assert got == [fs.bmap(a, k) for k in range(300)]
    assert fs.bmap_range(a, 300, 5) == [0] * 5
    d = fs.mkdir(ROOT, b"d", 0o755, 0, 0)
    assert errno_of(fs.bmap_range, d, 0, 1) == errno.EISDIR


def test_truncate_down_and_up(m):
    fs = m.fs
    data = random.Random(1).randbytes(40 * B + 123)
    a = mkfile(fs, b"f", data)
    fs.commit()
    free = fs.statfs()["bfree"]
    fs.truncate(a, 5000)
    fs.commit()
    assert fs.iget(a).size == 5000
    assert fs.statfs()["bfree"] == free + 41 - 2 + 1  # 41 data blocks - 2 kept + 1 indirect
    assert fs.read_data(a, 0, 10 * B) == data[:5000]
    fs.truncate(a, 20000)
    assert fs.read_data(a, 0, 10 * B) == data[:5000] + bytes(15000)
    fs.truncate(a, 0)
    assert fs.read_data(a, 0, 10) == b"" and fs.bmap(a, 0) == 0
    assert errno_of(fs.truncate, ROOT, 0) == errno.EISDIR
    assert errno_of(fs.truncate, a, param.MAX_FILE_BYTES + 1) == errno.EFBIG
    m2 = m.remount()
    assert m2.fs.iget(a).size == 0
    m2.fs.unmount()
    m2.close()
    assert fsck(m2.img).exit_code == 0


def test_sparse_file_of_several_gib(tmp_path):
    img = str(tmp_path / "big.img")
    mkfs(img, 6 << 30)
    mm = Mounted(img, write_cache=False)
    fs = mm.fs
    a = mkfile(fs, b"sparse")
    free = fs.statfs()["bfree"]
    fs.write_data(a, 5 << 30, b"!")
    assert fs.iget(a).size == (5 << 30) + 1
    assert free - fs.statfs()["bfree"] == 4  # data + triple/double/single indirect
    assert fs.read_data(a, (5 << 30) - 3, 10) == b"\0\0\0!"
    assert fs.read_data(a, 1 << 30, 8) == bytes(8)
    assert fs.bmap(a, (1 << 30) // B) == 0
    assert fs.bmap(a, (5 << 30) // B) != 0
    mm2 = mm.remount()
    assert mm2.fs.read_data(a, 5 << 30, 1) == b"!"
    mm2.fs.truncate(a, (5 << 30) - B)  # frees the whole indirect chain
    assert mm2.fs.statfs()["bfree"] == free
    mm2.fs.unmount()
    mm2.close()
    assert os.stat(img).st_blocks * 512 < 64 << 20  # the image stayed sparse
    assert fsck(img).exit_code == 0


def test_write_data_and_bmap_refuse_beyond_the_maximum_file_size(m):
    a = mkfile(m.fs, b"f")
    assert errno_of(m.fs.write_data, a, param.MAX_FILE_BYTES, b"x") == errno.EFBIG
    assert errno_of(m.fs.bmap_range, a, param.MAX_FILE_BYTES // B, 1) == errno.EFBIG


def test_running_out_of_space_leaves_a_consistent_file_system(tmp_path):
    img = str(tmp_path / "tiny.img")
    mkfs(img, 8 << 20, journal_blocks=256)
    mm = Mounted(img)
    fs = mm.fs
    a = mkfile(fs, b"a")
    with pytest.raises(OSError) as ei:
        fs.write_data(a, 0, b"w" * (16 << 20))
    assert ei.value.errno == errno.ENOSPC
    assert fs.statfs()["bfree"] == 0
    assert fs.read_data(a, 0, 10) in (b"", bytes(10))  # allocated, zeroed, size unchanged
    assert errno_of(fs.mkdir, ROOT, b"d", 0o755, 0, 0) == errno.ENOSPC
    assert errno_of(fs.lookup, ROOT, b"d") == errno.ENOENT  # nothing half made
    fs.truncate(a, 0)
    b = mkfile(fs, b"b", b"fits" * 1000)  # the space came back
    assert fs.read_data(b, 0, 4) == b"fits"
    fs.unmount()
    mm.close()
    res = fsck(img)
    assert res.exit_code == 0, res.problems


def test_statfs(m):
    s = m.fs.statfs()
    assert s["bsize"] == B and s["namemax"] == param.NAME_MAX
    assert s["blocks"] == (64 << 20) // B and 0 < s["bfree"] < s["blocks"]
    assert s["files"] == s["ffree"] + 1  # only the root is in use
    a = mkfile(m.fs, b"f", b"x" * (2 * B))
    t = m.fs.statfs()
    assert t["ffree"] == s["ffree"] - 1 and t["bfree"] == s["bfree"] - 2
    m.fs.release_inode(m.fs.unlink(ROOT, b"f"))
    m.fs.commit()
    assert m.fs.statfs() == s and a


def test_freed_blocks_are_not_reused_before_the_free_commits(m):
    fs = m.fs
    a = mkfile(fs, b"a", b"A" * B)
    fs.commit()
    old = fs.bmap(a, 0)
    fs.truncate(a, 0)  # frees `old` in the running transaction
    b = mkfile(fs, b"b", b"B" * B)
    assert fs.bmap(b, 0) != old  # ... so it must not get another file's data yet


def test_replay_never_writes_a_freed_indirect_block_over_new_data(m):
    fs = m.fs
    a = mkfile(fs, b"a")
    fs.write_data(a, 20 * B, b"a")  # needs the single indirect block
    m.sync()
    ind = fs.iget(a).addrs[param.NDIRECT]
    fs.truncate(a, 0)  # frees it (and revokes its journal copy)
    m.sync()
    fs.balloc.rotor = ind  # hand exactly that block out next
    b = mkfile(fs, b"b", b"new data" * 512)
    assert fs.bmap(b, 0) == ind
    m.sync()
    m2 = m.crash()  # the journal still holds the old copy
    assert m2.fs.read_data(b, 0, B) == b"new data" * 512
    m2.close()


# --- mount, journal, crashes ------------------------------------------------------------------
def test_mount_of_a_foreign_image_is_refused_and_nothing_written(tmp_path):
    img = str(tmp_path / "foreign.img")
    with open(img, "wb") as f:
        f.write(random.Random(5).randbytes(1 << 20))
    before = digest(img)
    dev = BlockDevice(img, "none", delay=False)
    with pytest.raises(FsError, match=r"not a crashbench file system \(bad magic 0x[0-9a-f]{8}"):
        FileSystem(dev, MemBuffers(dev))
    dev.close()
    assert digest(img) == before
    assert dev.stats["bytes_written"] == 0 and dev.stats["flushes"] == 0


def test_mount_with_a_damaged_journal_is_refused_and_nothing_written(m):
    fs = m.fs
    for k in range(5):
        mkfile(fs, b"f%d" % k, b"x")
    m.sync()
    sb = fs.sb
    m.dev.crash()
    m.dev.close()
    # the log: mount's transaction (descriptor, superblock, commit), then ours: descriptor
    # at +4, copies from +5. A bit flip in a journaled copy:
    with open(m.img, "r+b") as f:
        f.seek((sb.journal_start + 5) * B + 200)
        c = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([c[0] ^ 1]))
    before = digest(m.img)
    dev = BlockDevice(m.img, "none", delay=False)
    with pytest.raises(JournalDamaged, match="journal block"):
        FileSystem(dev, MemBuffers(dev))
    dev.close()
    assert digest(m.img) == before


def test_committed_operations_survive_power_loss_and_the_rest_is_gone(m):
    fs = m.fs
    a = mkfile(fs, b"durable", b"D" * 5000)
    d = fs.mkdir(ROOT, b"dir", 0o755, 0, 0)
    m.sync()
    mkfile(fs, b"volatile", b"V" * 100)
    fs.rename(ROOT, b"durable", d, b"moved")
    m2 = m.crash()
    fs = m2.fs
    assert fs.replayed["transactions"] >= 1
    assert fs.lookup(ROOT, b"durable") == a and fs.read_data(a, 0, 10**6) == b"D" * 5000
    assert errno_of(fs.lookup, ROOT, b"volatile") == errno.ENOENT
    assert fs.readdir(d) == []
    m2.close()
    assert fsck(m2.img).exit_code == 0


def test_orphans_are_freed_at_mount(m):
    fs = m.fs
    a = mkfile(fs, b"open-then-unlinked", b"z" * (3 * B))
    fs.unlink(ROOT, b"open-then-unlinked")  # still open: release_inode not called
    m.sync()
    ffree = fs.statfs()["ffree"]
    bfree = fs.statfs()["bfree"]
    res = fsck(m.img)
    assert res.exit_code == 0 and res.counts["orphans"] == 1
    assert any("orphan" in n for n in res.notes)
    m2 = m.crash()
    assert m2.fs.orphans_freed == 1
    assert m2.fs.statfs()["ffree"] == ffree + 1 and m2.fs.statfs()["bfree"] == bfree + 3
    assert errno_of(m2.fs.iget, a) == errno.ESTALE
    m2.sync()
    m2.close()
    assert fsck(m2.img).counts["orphans"] == 0


def test_txn_state_is_reported(img):
    seen = []
    mm = Mounted(img, on_txn_state=lambda tid, handles, _gen: seen.append((tid, handles)))
    fs = mm.fs
    tid0 = fs.journal.next_tid
    seen.clear()
    with fs.handle():
        assert seen[-1] == (tid0, 1)
        mkfile(fs, b"f")
        assert (tid0, 2) in seen
    assert seen[-1] == (tid0, 0)
    with pytest.raises(RuntimeError, match="inside an open handle"):
        with fs.handle():
            fs.commit()
    assert fs.commit() == tid0
    assert seen[-1] == (tid0 + 1, 0)
    assert fs.commit() is None  # nothing new: empty transactions are not written
    mm.close()


def test_small_journal_many_operations_never_overflow(tmp_path):
    img = str(tmp_path / "small.img")
    mkfs(img, 64 << 20, journal_blocks=256, inodes=4096)
    mm = Mounted(img)
    fs = mm.fs
    limit = fs.journal.max_txn_entries
    biggest = 0
    real_commit = fs.journal.commit

    def watch(blocks, revoked=()):
        nonlocal biggest
        biggest = max(biggest, len(blocks))
        return real_commit(blocks, revoked)

    fs.journal.commit = watch
    d = fs.mkdir(ROOT, b"d", 0o755, 0, 0)
    big = mkfile(fs, b"big")
    rounds = 0
    while fs.journal.stats["checkpoints"] < 2:  # no explicit commit at all
        assert rounds < 20, "the journal never filled up"
        names = [b"n%02d-%05d" % (rounds, k) for k in range(300)]
        for n in names:
            fs.create(d, n, REG, 0, 0)
        for n in names[::2]:
            fs.release_inode(fs.unlink(d, n))
        fs.write_data(big, 0, b"q" * (40 << 20))  # 40 MiB: 10240 blocks, 10 leaves
        fs.truncate(big, 3)
        rounds += 1
    assert 0 < biggest <= limit
    mm2 = mm.crash()
    mm2.fs.unmount()
    mm2.close()
    assert fsck(img).exit_code == 0


def test_inject_bad_pointer_is_caught(m):
    a = mkfile(m.fs, b"victim", b"v" * (2 * B))
    what = m.fs.inject_bad_pointer(random.Random(3))
    match = re.fullmatch(
        r"inode (\d+): block pointer (\d+) set to (\d+) \(the device has "
        r"(\d+) blocks\)",
        what,
    )
    assert match, what
    victim, bad = int(match[1]), int(match[3])
    assert victim in (a, ROOT) and bad >= m.fs.sb.nblocks
    with pytest.raises(FsError, match=f"inode {victim}: block pointer {bad} out of range") as ei:
        if victim == a:
            m.fs.read_data(a, 0, 2 * B)
        else:
            m.fs.readdir(ROOT)
    assert ei.value.errno == errno.EUCLEAN
    with pytest.raises(KernelPanic, match=f"inode {victim}: block pointer {bad} out of range"):
        m.sync()  # the commit's check: never on the disk (tests/test_selfcheck.py)
    res = fsck(m.img)
    assert res.exit_code == 0, res.problems


def test_directory_larger_than_the_file_system_is_corruption_not_an_allocation(m):
    sub = m.fs.mkdir(ROOT, b"sub", 0o755, 0, 0)
    with m.fs.handle():  # a size from disk, checksum right (a kernel bug)
        i = m.fs._iget(sub)
        i.size = 1 << 60
        m.fs._iput(i)
    m.fs.drop_caches()
    with pytest.raises(
        FsError, match=f"directory inode {sub}: size {1 << 60} is more than the file system's"
    ) as ei:
        m.fs.readdir(sub)
    assert ei.value.errno == errno.EUCLEAN


# --- crash consistency, property-based ---------------------------------------------------------
NAMES = [b"a", b"b", b"c", b"d"]
DIRS = [(), (b"d1",), (b"d1", b"d2"), (b"d3",)]


class MFile:
    def __init__(self, data=b""):
        self.data = bytearray(data)


def snapshot(tree):
    """A deep copy of the model (files shared between names stay shared)."""
    memo = {}

    def cp(node):
        if isinstance(node, dict):
            return {k: cp(v) for k, v in node.items()}
        if id(node) not in memo:
            memo[id(node)] = MFile(node.data)
        return memo[id(node)]

    return cp(tree)


def flatten(tree, prefix=()):
    out = {}
    for name, node in tree.items():
        p = prefix + (name,)
        if isinstance(node, dict):
            out[p] = "dir"
            out.update(flatten(node, p))
        else:
            out[p] = bytes(node.data)
    return out


class CrashMachine(RuleBasedStateMachine):
    """Random operations, durable points (commit + flush) and power losses. After every
    crash the image must be clean for fsck, and every path not touched since the last
    durable point must read back exactly as it was then."""

    @initialize()
    def setup(self):
        self.tmp = tempfile.mkdtemp(prefix="crashfs-")
        self.img = os.path.join(self.tmp, "disk.img")
        mkfs(self.img, 24 << 20, journal_blocks=256, inodes=512)
        self.m = Mounted(self.img)
        fs = self.m.fs
        d1 = fs.mkdir(ROOT, b"d1", 0o755, 0, 0)  # a durable starting point
        mkfile(fs, b"a", b"A" * 5000)
        mkfile(fs, b"b", b"B" * (13 * B + 1))
        mkfile(fs, b"c", b"C" * 10, parent=d1)
        self.m.sync()
        self.tree = {
            b"d1": {b"c": MFile(b"C" * 10)},
            b"a": MFile(b"A" * 5000),
            b"b": MFile(b"B" * (13 * B + 1)),
        }
        self.durable = snapshot(self.tree)
        self.touched: set = set()
        self.open_orphans = []

    def teardown(self):
        if hasattr(self, "m"):
            self.m.close()
            shutil.rmtree(self.tmp, ignore_errors=True)

    # --- model helpers ---
    def node(self, path):
        n = self.tree
        for p in path:
            if not isinstance(n, dict) or p not in n:
                return None
            n = n[p]
        return n

    def ino(self, path):
        ino = ROOT
        for p in path:
            ino = self.m.fs.lookup(ino, p)
        return ino

    def paths_of(self, f):
        return [p for p, n in self._walk(self.tree, ()) if n is f]

    def _walk(self, tree, prefix):
        for k, v in tree.items():
            yield prefix + (k,), v
            if isinstance(v, dict):
                yield from self._walk(v, prefix + (k,))

    def touch(self, *paths):
        self.touched.update(paths)

    def existing_files(self):
        return [p for p, n in self._walk(self.tree, ()) if not isinstance(n, dict)]

    # --- operations ---
    @rule(d=st.sampled_from(DIRS), name=st.sampled_from(NAMES))
    def create(self, d, name):
        parent = self.node(d)
        if not isinstance(parent, dict):
            return
        if name in parent:
            assert errno_of(self.m.fs.create, self.ino(d), name, REG, 0, 0) == errno.EEXIST
            return
        self.m.fs.create(self.ino(d), name, REG, 0, 0)
        parent[name] = MFile()
        self.touch(d + (name,))

    @rule(d=st.sampled_from(DIRS), name=st.sampled_from([b"d1", b"d2", b"d3"]))
    def mkdir(self, d, name):
        parent = self.node(d)
        if not isinstance(parent, dict):
            return
        if name in parent:
            assert errno_of(self.m.fs.mkdir, self.ino(d), name, 0o755, 0, 0) == errno.EEXIST
            return
        self.m.fs.mkdir(self.ino(d), name, 0o755, 0, 0)
        parent[name] = {}
        self.touch(d + (name,))

    @precondition(lambda self: self.existing_files())
    @rule(
        data=st.data(),
        off=st.sampled_from([0, 100, B - 1, 3 * B, 12 * B + 5, (12 + 1024) * B]),
        size=st.sampled_from([1, 50, B, 2 * B + 7]),
        fill=st.integers(1, 255),
    )
    def write(self, data, off, size, fill):
        path = data.draw(st.sampled_from(self.existing_files()))
        f = self.node(path)
        payload = bytes([fill]) * size
        self.m.fs.write_data(self.ino(path), off, payload)
        if len(f.data) < off:
            f.data.extend(bytes(off - len(f.data)))
        f.data[off : off + size] = payload
        self.touch(*self.paths_of(f))

    @precondition(lambda self: self.existing_files())
    @rule(data=st.data(), size=st.sampled_from([0, 1, 4000, B, 5 * B + 3, 14 * B]))
    def truncate(self, data, size):
        path = data.draw(st.sampled_from(self.existing_files()))
        f = self.node(path)
        self.m.fs.truncate(self.ino(path), size)
        if size < len(f.data):
            del f.data[size:]
        else:
            f.data.extend(bytes(size - len(f.data)))
        self.touch(*self.paths_of(f))

    @rule(
        src=st.sampled_from(DIRS),
        sname=st.sampled_from(NAMES + [b"d2"]),
        dst=st.sampled_from(DIRS),
        dname=st.sampled_from(NAMES + [b"d2"]),
    )
    def rename(self, src, sname, dst, dname):
        sp, dp = self.node(src), self.node(dst)
        if not isinstance(sp, dict) or not isinstance(dp, dict) or sname not in sp:
            return
        s, t = sp[sname], dp.get(dname)
        sd = isinstance(s, dict)
        if (
            sd
            and (dst + (dname,))[: len(src) + 1] == src + (sname,)
            and (src, sname) != (dst, dname)
        ):
            assert (
                errno_of(self.m.fs.rename, self.ino(src), sname, self.ino(dst), dname)
                == errno.EINVAL
            )
            return
        if t is not None and t is not s:
            if sd and not isinstance(t, dict):
                expect = errno.ENOTDIR
            elif not sd and isinstance(t, dict):
                expect = errno.EISDIR
            elif isinstance(t, dict) and t:
                expect = errno.ENOTEMPTY
            else:
                expect = 0
            if expect:
                assert (
                    errno_of(self.m.fs.rename, self.ino(src), sname, self.ino(dst), dname) == expect
                )
                return
        replaced = self.m.fs.rename(self.ino(src), sname, self.ino(dst), dname)
        if t is s:
            assert replaced is None
            return
        self.touch(
            src + (sname,),
            dst + (dname,),
            *(self.paths_of(t) if t is not None and not isinstance(t, dict) else ()),
        )
        del sp[sname]
        dp[dname] = s
        if replaced is not None:
            self.release(replaced, t)

    def release(self, ino, node):
        if isinstance(node, dict) or not self.paths_of(node):
            if random.Random(ino).random() < 0.5:
                self.m.fs.release_inode(ino)
            else:
                self.open_orphans.append(ino)  # still "open": freed later or at mount

    @precondition(lambda self: self.existing_files())
    @rule(data=st.data())
    def unlink(self, data):
        path = data.draw(st.sampled_from(self.existing_files()))
        f = self.node(path)
        parent = self.node(path[:-1])
        ino = self.m.fs.unlink(self.ino(path[:-1]), path[-1])
        del parent[path[-1]]
        self.touch(path, *self.paths_of(f))
        self.release(ino, f)

    @rule(d=st.sampled_from(DIRS[1:]))
    def rmdir(self, d):
        node = self.node(d)
        if not isinstance(node, dict):
            return
        if node:
            assert errno_of(self.m.fs.rmdir, self.ino(d[:-1]), d[-1]) == errno.ENOTEMPTY
            return
        ino = self.m.fs.rmdir(self.ino(d[:-1]), d[-1])
        del self.node(d[:-1])[d[-1]]
        self.touch(d)
        self.release(ino, node)

    @precondition(lambda self: self.existing_files())
    @rule(data=st.data(), d=st.sampled_from(DIRS), name=st.sampled_from(NAMES))
    def link(self, data, d, name):
        path = data.draw(st.sampled_from(self.existing_files()))
        parent = self.node(d)
        if not isinstance(parent, dict):
            return
        if name in parent:
            assert errno_of(self.m.fs.link, self.ino(path), self.ino(d), name) == errno.EEXIST
            return
        f = self.node(path)
        self.m.fs.link(self.ino(path), self.ino(d), name)
        parent[name] = f
        self.touch(d + (name,), *self.paths_of(f))

    @precondition(lambda self: self.open_orphans)
    @rule()
    def close_orphan(self):
        self.m.fs.release_inode(self.open_orphans.pop())

    @rule()
    def rewind_allocator(self):
        """Any free block may be handed out next: make freed blocks the next ones reused."""
        self.m.fs.balloc.rotor = self.m.fs.sb.data_start

    @rule()
    def fsync(self):
        self.m.sync()
        self.durable = snapshot(self.tree)
        self.touched = set()

    @rule()
    def crash(self):
        self.m.dev.crash()
        self.m.dev.close()
        res = fsck(self.img)
        assert res.exit_code == 0, res.problems
        self.m = Mounted(self.img)
        got = self.read_tree()
        want = flatten(self.durable)

        def untouched(p):
            return not any(p[:k] in self.touched for k in range(1, len(p) + 1))

        checked = 0
        for p, v in want.items():
            if untouched(p):
                assert got.get(p) == v, (p, self.touched)
                checked += 1
        event(f"crash: {min(checked, 5)}{'+' if checked >= 5 else ''} durable paths checked")
        for p in got:
            if p not in want:
                assert not untouched(p), ("appeared from nowhere", p)
        self.tree = self.model_from_disk()
        self.durable = snapshot(self.tree)
        self.touched = set()
        self.open_orphans = []

    def read_tree(self, ino=ROOT, prefix=()):
        out = {}
        for name, c in self.m.fs.readdir(ino):
            p = prefix + (name,)
            i = self.m.fs.iget(c)
            if stat.S_ISDIR(i.mode):
                out[p] = "dir"
                out.update(self.read_tree(c, p))
            else:
                out[p] = self.m.fs.read_data(c, 0, i.size)
        return out

    def model_from_disk(self, ino=ROOT, files=None):
        files = {} if files is None else files
        tree = {}
        for name, c in self.m.fs.readdir(ino):
            i = self.m.fs.iget(c)
            if stat.S_ISDIR(i.mode):
                tree[name] = self.model_from_disk(c, files)
            else:
                if c not in files:
                    files[c] = MFile(self.m.fs.read_data(c, 0, i.size))
                tree[name] = files[c]
        return tree

    @invariant()
    def matches_model(self):
        if hasattr(self, "m"):
            assert self.read_tree() == flatten(self.tree)


TestCrashConsistency = CrashMachine.TestCase
TestCrashConsistency.settings = settings(
    max_examples=150,
    stateful_step_count=50,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
