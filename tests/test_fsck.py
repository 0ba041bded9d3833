"""fsck: clean images pass; each kind of damage is reported with its own message; read-only;
on any input it keeps its 0/4/8 contract within bounded memory."""

import hashlib
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kernel import param
from kernel.core.buffers import MemBuffers
from kernel.core.disklayout import (
    DIRENT,
    INODES_PER_BLOCK,
    NPTR,
    SB_BLOCK,
    Inode,
    Superblock,
    pack_inode,
    unpack_inode,
)
from kernel.core.fs import FileSystem
from kernel.hw.blockdev import BlockDevice
from kernel.tools.fsck import fsck
from kernel.tools.mkfs import mkfs

B = param.BLOCK_SIZE
ISZ = param.INODE_SIZE
ROOT = 1
REG = 0o100644


def digest(path) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


class Image:
    """A small populated image, unmounted cleanly, plus raw editing helpers."""

    def __init__(self, path):
        self.path = path
        mkfs(path, 32 << 20)
        dev = BlockDevice(path, "none", delay=False)
        fs = FileSystem(dev, MemBuffers(dev))
        self.f = fs.create(ROOT, b"f", REG, 0, 0)
        fs.write_data(self.f, 0, b"F" * (2 * B))
        self.g = fs.create(ROOT, b"g", REG, 0, 0)
        fs.write_data(self.g, 0, b"G" * 100)
        self.sub = fs.mkdir(ROOT, b"sub", 0o755, 0, 0)
        self.other = fs.mkdir(ROOT, b"other", 0o755, 0, 0)
        self.h = fs.create(self.sub, b"h", REG, 0, 0)
        fs.symlink(self.sub, b"long", b"t" * 200, 0, 0)
        self.free_ino = fs.ialloc.alloc()  # a number that is certainly free on disk
        fs.unmount()
        dev.close()
        with open(path, "rb") as fh:
            self.sb = Superblock.unpack(fh.read(2 * B)[B:], path)

    def block(self, b) -> bytearray:
        with open(self.path, "rb") as fh:
            fh.seek(b * B)
            return bytearray(fh.read(B))

    def put(self, b, data) -> None:
        with open(self.path, "r+b") as fh:
            fh.seek(b * B)
            fh.write(data)

    def inode(self, ino) -> Inode:
        blk = self.block(self.sb.inode_start + ino // INODES_PER_BLOCK)
        off = (ino % INODES_PER_BLOCK) * ISZ
        return unpack_inode(ino, blk[off : off + ISZ], self.sb.csum_seed)

    def put_inode(self, i: Inode) -> None:
        """Write an inode with a valid checksum (a logic error, not a bit flip)."""
        b = self.sb.inode_start + i.ino // INODES_PER_BLOCK
        blk = self.block(b)
        off = (i.ino % INODES_PER_BLOCK) * ISZ
        blk[off : off + ISZ] = pack_inode(i, self.sb.csum_seed)
        self.put(b, blk)

    def set_bit(self, blockno, value) -> None:
        b = self.sb.bitmap_start + blockno // (B * 8)
        blk = self.block(b)
        byte, bit = divmod(blockno % (B * 8), 8)
        blk[byte] = blk[byte] | (1 << bit) if value else blk[byte] & ~(1 << bit)
        self.put(b, blk)

    def dir_entry_offset(self, dir_ino, name) -> tuple[int, int]:
        b = self.inode(dir_ino).addrs[0]
        blk = self.block(b)
        off = 0
        while off < B:
            ino, rec_len, nl, ft = DIRENT.unpack_from(blk, off)
            if ino and bytes(blk[off + 8 : off + 8 + nl]) == name:
                return b, off
            off += rec_len
        raise KeyError(name)


@pytest.fixture
def im(tmp_path):
    return Image(str(tmp_path / "disk.img"))


def test_clean_image_after_operations_and_unmount(im):
    res = fsck(im.path)
    assert res.exit_code == 0, res.problems
    assert res.problems == [] and res.notes == []
    c = res.counts
    assert (c["files"], c["directories"], c["symlinks"]) == (3, 3, 1)
    assert c["blocks_used"] == c["blocks_referenced"] and c["leaked"] == 0


def test_not_a_file_system_and_missing_image_are_operational_errors(tmp_path):
    junk = tmp_path / "junk.img"
    junk.write_bytes(os.urandom(64 * B))
    res = fsck(str(junk))
    assert res.exit_code == 8 and "not a crashbench file system (bad magic" in res.problems[0]
    res = fsck(str(tmp_path / "absent.img"))
    assert res.exit_code == 8 and "cannot open" in res.problems[0]


def test_bad_superblock_checksum_is_an_operational_error(im):
    blk = im.block(SB_BLOCK)
    blk[40] ^= 1
    im.put(SB_BLOCK, blk)
    res = fsck(im.path)
    assert res.exit_code == 8 and "superblock checksum mismatch" in res.problems[0]


def test_crashed_image_is_checked_with_its_journal_and_never_written(tmp_path):
    path = str(tmp_path / "crashed.img")
    mkfs(path, 32 << 20)
    dev = BlockDevice(path, "none", write_cache=True, delay=False)
    fs = FileSystem(dev, MemBuffers(dev))
    d = fs.mkdir(ROOT, b"d", 0o755, 0, 0)
    for k in range(20):
        fs.create(d, b"n%d" % k, REG, 0, 0)
    fs.commit()
    dev.flush()
    dev.crash()
    dev.close()  # committed, never checkpointed: only the log has it
    before = digest(path)
    res = fsck(path)
    assert res.exit_code == 0, res.problems
    assert res.counts["journal_transactions"] >= 1 and res.counts["files"] == 20
    assert any("replayed in memory" in n for n in res.notes)
    assert any("not cleanly unmounted" in n for n in res.notes)
    assert digest(path) == before


def test_damaged_journal_is_reported(tmp_path):
    path = str(tmp_path / "j.img")
    mkfs(path, 32 << 20)
    dev = BlockDevice(path, "none", write_cache=True, delay=False)
    fs = FileSystem(dev, MemBuffers(dev))
    fs.create(ROOT, b"x", REG, 0, 0)
    fs.commit()
    js = fs.sb.journal_start
    dev.crash()
    dev.close()
    with open(path, "r+b") as fh:  # a copy of the second transaction (descriptor at +4)
        fh.seek((js + 5) * B + 77)
        fh.write(b"\xee")
    res = fsck(path)
    assert res.exit_code == 4
    assert any(
        p.startswith("journal: ") and "do not match the commit checksum" in p for p in res.problems
    )


def test_corrupted_inode_checksum(im):
    b = im.sb.inode_start + im.f // INODES_PER_BLOCK
    blk = im.block(b)
    blk[(im.f % INODES_PER_BLOCK) * ISZ + 20] ^= 0x10  # a bit of the size field
    im.put(b, blk)
    res = fsck(im.path)
    assert res.exit_code == 4
    assert any(p.startswith(f"inode {im.f}: bad checksum (stored") for p in res.problems)


def test_block_used_twice(im):
    fi, gi = im.inode(im.f), im.inode(im.g)
    shared, lost = fi.addrs[0], gi.addrs[0]
    gi.addrs[0] = shared
    im.put_inode(gi)
    res = fsck(im.path)
    assert res.exit_code == 4
    assert f"block {shared} used twice (by inode {im.f} and inode {im.g})" in res.problems
    assert f"block {lost} marked in use in the bitmap but not referenced (leaked)" in res.problems


def test_block_pointer_out_of_range(im):
    gi = im.inode(im.g)
    gi.addrs[3] = im.sb.nblocks + 5
    im.put_inode(gi)
    res = fsck(im.path)
    assert res.exit_code == 4
    assert any(
        p.startswith(f"inode {im.g}: block pointer {im.sb.nblocks + 5} out of range")
        for p in res.problems
    )


def test_bitmap_disagreeing_with_the_references(im):
    used = im.inode(im.f).addrs[1]
    im.set_bit(used, False)
    stray = im.sb.nblocks - 3
    im.set_bit(stray, True)
    res = fsck(im.path)
    assert f"block {used} in use by inode {im.f} but marked free in the bitmap" in res.problems
    assert f"block {stray} marked in use in the bitmap but not referenced (leaked)" in res.problems
    assert res.exit_code == 4


def test_bad_directory_entry_rec_len(im):
    b, off = im.dir_entry_offset(ROOT, b"g")
    blk = im.block(b)
    blk[off + 4 : off + 6] = (3).to_bytes(2, "little")
    im.put(b, blk)
    res = fsck(im.path)
    assert res.exit_code == 4
    assert (
        f"directory inode {ROOT} block {b} offset {off}: bad entry (rec_len 3, name_len 1)"
        in res.problems
    )


def test_directory_entry_pointing_at_a_free_inode(im):
    b, off = im.dir_entry_offset(ROOT, b"g")
    blk = im.block(b)
    blk[off : off + 4] = im.free_ino.to_bytes(4, "little")
    im.put(b, blk)
    res = fsck(im.path)
    assert f"directory inode {ROOT}: entry b'g' points at free inode {im.free_ino}" in res.problems
    assert any(f"inode {im.g} (nlink 1) is in no directory: unreachable" == p for p in res.problems)


def test_directory_entry_with_the_wrong_type(im):
    b, off = im.dir_entry_offset(ROOT, b"g")
    blk = im.block(b)
    blk[off + 7] = 2  # claims a directory
    im.put(b, blk)
    res = fsck(im.path)
    assert (
        f"directory inode {ROOT}: entry b'g' has type directory but inode {im.g} is a file"
        in res.problems
    )


def test_nlink_disagreeing_with_the_entries(im):
    fi = im.inode(im.f)
    fi.nlink = 2
    im.put_inode(fi)
    res = fsck(im.path)
    assert f"inode {im.f}: nlink 2 but 1 directory entries" in res.problems


def test_wrong_dotdot(im):
    b, off = im.dir_entry_offset(im.sub, b"..")
    blk = im.block(b)
    blk[off : off + 4] = im.other.to_bytes(4, "little")
    im.put(b, blk)
    res = fsck(im.path)
    assert (
        f"directory inode {im.sub}: '..' points at inode {im.other}, but its parent is inode {ROOT}"
    ) in res.problems


def test_unreachable_inode(im):
    ghost = Inode(im.free_ino, REG, 0, 0, 1, 0, 1, 1, 1, 1)
    im.put_inode(ghost)
    res = fsck(im.path)
    assert f"inode {im.free_ino} (nlink 1) is in no directory: unreachable" in res.problems


def test_orphan_is_a_note_not_an_error(im):
    gi = im.inode(im.g)
    b, off = im.dir_entry_offset(ROOT, b"g")  # unlink by hand: merge into the predecessor
    blk = im.block(b)
    prev = 0
    while True:
        ino, rec_len, nl, ft = DIRENT.unpack_from(blk, prev)
        if prev + rec_len == off:
            break
        prev += rec_len
    g_len = DIRENT.unpack_from(blk, off)[1]
    blk[prev + 4 : prev + 6] = (rec_len + g_len).to_bytes(2, "little")
    im.put(b, blk)
    gi.nlink = 0
    im.put_inode(gi)
    res = fsck(im.path)
    assert res.exit_code == 0, res.problems
    assert res.counts["orphans"] == 1
    assert f"inode {im.g}: orphan (nlink 0), freed at the next mount" in res.notes


# --- any input: bounded memory and time, exit 0/4/8 ------------------------------------------
FSCK_HEADROOM = 256 << 20  # address space fsck may grow by, beyond what its imports took
FSCK_TIMEOUT_S = 120  # generous: the machine is shared; a runaway takes far longer
_BOUNDED_FSCK = """
import json, resource, sys
from kernel.tools.fsck import fsck
vm = int(open('/proc/self/status').read().split('VmSize:')[1].split()[0]) * 1024
resource.setrlimit(resource.RLIMIT_AS, (vm + %d, vm + %d))
res = fsck(sys.argv[1])
print(json.dumps({"exit_code": res.exit_code, "problems": res.problems}))
""" % (FSCK_HEADROOM, FSCK_HEADROOM)


def bounded_fsck(path) -> dict:
    """fsck in a child whose address space may grow by FSCK_HEADROOM only: a MemoryError
    or any traceback fails the test, as does running past FSCK_TIMEOUT_S."""
    p = subprocess.run(
        [sys.executable, "-c", _BOUNDED_FSCK, str(path)],
        capture_output=True,
        text=True,
        timeout=FSCK_TIMEOUT_S,
        env={**os.environ, "OPENBLAS_NUM_THREADS": "1"},
    )
    assert p.returncode == 0, p.stderr[-2000:]
    res = json.loads(p.stdout)
    assert res["exit_code"] in (0, 4, 8)
    assert (res["exit_code"] == 0) == (not res["problems"]), res
    return res


def test_random_bytes_over_an_inode_table_block(im):
    im.put(im.sb.inode_start, random.Random(0).randbytes(B))  # inodes 0..31: root, f, g, ...
    res = bounded_fsck(im.path)
    assert res["exit_code"] == 4
    assert any(p.startswith(f"inode {ROOT}: bad checksum") for p in res["problems"])


def test_directory_of_size_2_to_the_60(im):
    si = im.inode(im.sub)
    si.size = 1 << 60
    im.put_inode(si)
    res = bounded_fsck(im.path)
    assert res["exit_code"] == 4
    assert any(
        p.startswith(f"directory inode {im.sub}: size {1 << 60} is more than")
        for p in res["problems"]
    ), res["problems"]


def test_triple_indirect_block_pointing_at_itself(im):
    loop = im.sb.nblocks - 7  # a free data block, marked used
    im.put(loop, loop.to_bytes(4, "little") * NPTR)
    im.set_bit(loop, True)
    gi = im.inode(im.g)
    gi.addrs[param.NDIRECT + 2] = loop
    im.put_inode(gi)
    res = bounded_fsck(im.path)
    assert res["exit_code"] == 4
    assert (
        f"block {loop} used twice (both times by inode {im.g}): an indirect block met again, not followed"
        in res["problems"]
    ), res["problems"]


@pytest.fixture(scope="module")
def metadata_image():
    """An image with every kind of metadata block: (path, metadata block numbers, inodes in use)."""
    d = tempfile.mkdtemp(prefix="cb-fsck-")
    path = os.path.join(d, "meta.img")
    mkfs(path, 32 << 20)
    dev = BlockDevice(path, "none", delay=False)
    fs = FileSystem(dev, MemBuffers(dev))
    sub = fs.mkdir(ROOT, b"sub", 0o755, 0, 0)
    for k in range(40):  # a second directory block
        fs.create(sub, b"name-%03d-" % k + b"x" * 80, REG, 0, 0)
    big = fs.create(ROOT, b"big", REG, 0, 0)
    for fb in (0, param.NDIRECT, param.NDIRECT + NPTR, param.NDIRECT + NPTR + NPTR**2):
        fs.write_data(big, fb * B, b"D" * B)  # direct, single, double, triple indirect
    fs.symlink(ROOT, b"long", b"t" * 200, 0, 0)
    sb = fs.sb
    meta = [SB_BLOCK, sb.journal_start, sb.inode_start, sb.bitmap_start]
    inos = fs.ialloc.in_use().tolist()
    for ino in inos:
        i = fs.iget(ino)
        for depth, p in enumerate(i.addrs[param.NDIRECT :], 1):  # the indirect blocks
            while p:
                meta.append(p)
                p = fs._ptrs(p)[np.flatnonzero(fs._ptrs(p))[0]] if depth > 1 else 0
                depth -= 1
        if not i.is_reg:
            meta += [a for a in i.addrs[: param.NDIRECT] if a]
    fs.unmount()
    dev.close()
    yield path, sorted(set(int(b) for b in meta)), inos
    shutil.rmtree(d, ignore_errors=True)


NBLOCKS = (32 << 20) // B
# damage: random bytes anywhere in a metadata block; a block number (in the disk or just
# past it) over a pointer of an indirect or directory block; an inode's size or block
# pointer set to a number, its checksum left stale or made right (a bug rather than rot)
HITS = st.one_of(
    st.tuples(
        st.just("bytes"),
        st.integers(0, 1 << 20),
        st.integers(0, B - 1),
        st.binary(min_size=1, max_size=64),
    ),
    st.tuples(
        st.just("pointer"),
        st.integers(0, 1 << 20),
        st.integers(0, NPTR - 1),
        st.integers(0, NBLOCKS + 16),
    ),
    st.tuples(st.just("size"), st.integers(0, 1 << 20), st.booleans(), st.integers(0, 63)),
    st.tuples(
        st.just("addr"),
        st.integers(0, 1 << 20),
        st.booleans(),
        st.tuples(st.integers(0, 14), st.integers(0, NBLOCKS + 16)),
    ),
)


def _apply(path, sb, meta, inos, hit) -> None:
    kind, which, where, what = hit
    with open(path, "r+b") as fh:
        if kind in ("bytes", "pointer"):
            fh.seek(meta[which % len(meta)] * B + (where if kind == "bytes" else 4 * where))
            fh.write(what[: B - where] if kind == "bytes" else what.to_bytes(4, "little"))
            return
        ino = inos[which % len(inos)]
        blk = sb.inode_start + ino // INODES_PER_BLOCK
        off = (ino % INODES_PER_BLOCK) * ISZ
        fh.seek(blk * B + off)
        i = unpack_inode(ino, fh.read(ISZ), sb.csum_seed, verify=False)
        if kind == "size":
            i.size = 1 << what
        else:
            i.addrs[what[0]] = what[1]
        raw = pack_inode(i, sb.csum_seed if where else sb.csum_seed + 1)
        fh.seek(blk * B + off)
        fh.write(raw)


@settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(st.lists(HITS, min_size=1, max_size=4))
def test_fsck_on_randomly_damaged_metadata_keeps_its_contract(metadata_image, tmp_path, hits):
    src, meta, inos = metadata_image
    path = str(tmp_path / "damaged.img")
    shutil.copyfile(src, path)
    with open(src, "rb") as fh:
        sb = Superblock.unpack(fh.read(2 * B)[B:], src)
    for hit in hits:
        _apply(path, sb, meta, inos, hit)
    bounded_fsck(path)
