"""The crashbench file system: xv6/ext3-like, with a metadata journal in ordered mode.

Promises to the VFS (kernel/core/vfs.py), write-back (kernel/core/writeback.py), mkfs/fsck and tests:

* operations by inode number, each one a *handle* in the running journal transaction;
  errors are OSError(errno, message) as Linux gives them (ENOENT, EEXIST, ENOTDIR, EISDIR,
  ENOTEMPTY, ENAMETOOLONG, EINVAL, EPERM, EMLINK, EFBIG, ENOSPC, ESTALE for an inode not in
  use); corruption is FsError(EUCLEAN) naming the structure. No permission checks (FUSE
  default_permissions does them);
* metadata (superblock, inode table, bitmap, indirect, directory and symlink blocks) is
  read and written only through the MetaBuffers given at mount (kernel/core/buffers.py) and
  reaches the disk only through the journal: ``commit()`` hands every block written since
  the last commit to the journal. File data is not cached here: the kernel's page cache
  asks ``bmap_range`` where blocks are (``has_leaf``: whether the indirect blocks mapping
  one exist) and writes them itself (``read_data``/``write_data``
  are the uncached path for tools and tests). Ordered mode: data blocks are written before
  the commit that makes their allocation durable;
* a transaction never outgrows the journal's limit: at the start of every handle, and at
  consistent points inside long operations (truncate, freeing, allocating a long run), the
  running transaction is committed if it is close to ``journal.max_txn_entries``. So
  inside a handle, write the data of blocks from ``bmap_range(alloc=True)`` before the next
  file-system call. Blocks so allocated but not yet returned are zeroed before such a
  commit, so a crash never exposes stale data;
* ``unlink``/``rmdir``/``rename`` drop a link; the inode is freed by ``release_inode`` once
  the caller no longer uses it. Inodes with nlink 0 found at mount (orphans of a crash)
  are freed at mount;
* ``statfs`` reports free blocks net of those the allocator has promised to dirty pages
  (kernel/core/reserve.py), and no allocation here takes a promised block;
* ``on_txn_state(running_tid, handles_open, op_gen)`` is called whenever either of the
  first two changes; when the outermost handle closes, the buffers' ``end_op()`` is called
  after it. ``op_gen`` counts the outermost handles opened (the open one's, while open).

The pieces: namei.py (name space), dir.py (directory blocks), bmap.py (block map,
truncation), balloc.py (allocators), disklayout.py (structures), journal.py, buffers.py.

Mount refuses, having written nothing:
  FsError(EINVAL)  "<image>: not a crashbench file system (bad magic 0x…, expected 0x53464243)"
  FsError(EUCLEAN) "<image>: superblock checksum mismatch (stored 0x…, computed 0x…)"
  FsError(EINVAL)  "<image>: superblock says N blocks, the device has M"
  JournalDamaged   "journal block B (commit of transaction T): …" (see journal.py)
At run time: FsError(EUCLEAN) "inode N: bad checksum (stored …, computed …)",
  "inode N: block pointer P out of range (data blocks D..E)", "directory inode D block B
  offset O: bad entry (rec_len R, name_len L)", "directory inode D: size S is more than the
  file system's N data blocks"; FsError(EIO) "<image>: file system is not
  mounted" after unmount or after a failed commit (the journal is then aborted).

On-disk format (BLOCK_SIZE = 4096; all integers little-endian; layouts in disklayout.py):

  block 0          1          2 .. J+1         J+2 .. J+I+1      .. +B              .. nblocks-1
  +--------+------------+-----------------+-----------------+------------+------------------------+
  | unused | superblock |     journal     |   inode table   |   block    |  data: file blocks,    |
  | (boot) |            |  (journal.py)   |  128 B inodes,  |   bitmap   |  indirect blocks,      |
  |        |            | jsb | log ...   |  32 per block   | 1 bit/blk  |  directory & symlink   |
  +--------+------------+-----------------+-----------------+------------+------------------------+

  superblock   magic "CBFS", version, block size, state (clean/mounted), nblocks, ninodes,
               root ino (1), journal start/len, inode table start/len, bitmap start/len,
               data start, checksum seed, uuid, mkfs time, xxh32
  inode (128)  +0 mode | +4 uid | +8 gid | +12 nlink | +16 size u64 | +24 atime ns | +32 mtime
               | +40 ctime | +48 generation | +52 flags (0) | +56 addrs[15] u32: NDIRECT direct,
               single, double, triple indirect | +116 reserved | +124 xxh32 (seed + ino)
               inode 0 is never used (the block device's inode in the page cache); an
               all-zero inode was never used; a freed one keeps its generation. A symlink
               target of <= 60 bytes lives in addrs, a longer one (< 4096) in one block
  bitmap       bit (b % 8) of byte b // 8: block b in use; the blocks before the data
               area are always marked in use
  directory    blocks of ext2-style entries (kernel/core/dir.py): ino, rec_len, name_len, type, name
  indirect     NPTR = 1024 u32 block numbers (0 = hole); files up to MAX_FILE_BYTES
"""

from __future__ import annotations

import errno
import math
import stat
import threading
import time
from collections import OrderedDict
from contextlib import contextmanager
from typing import Callable

import numpy as np

from kernel import param
from kernel.core.balloc import BlockAlloc, InodeAlloc
from kernel.core.bmap import MAX_FBLOCKS, BlockMapMixin, _root_of
from kernel.core.dir import DirMixin
from kernel.core.disklayout import (
    INODE_DTYPE,
    INODES_PER_BLOCK,
    ROOT_INO,
    SB_BLOCK,
    STATE_CLEAN,
    STATE_MOUNTED,
    FsError,
    Inode,
    Superblock,
    corrupt,
    pack_inode,
    pointers_outside,
    unpack_inode,
)
from kernel.core.faults import NoFaults
from kernel.core.journal import Journal, JournalDamaged  # noqa: F401  (re-exported)
from kernel.core.namei import RENAME_EXCHANGE, RENAME_NOREPLACE, NamespaceMixin

BSIZE = param.BLOCK_SIZE
ISIZE = param.INODE_SIZE
OP_RESERVE = 24  # metadata blocks one bounded step may dirty; commit before less is left
MAX_BLOCKS = min(MAX_FBLOCKS, param.MAX_FILE_BYTES // BSIZE)
_SETATTR = {"mode", "uid", "gid", "size", "atime_ns", "mtime_ns", "ctime_ns", "nlink"}
_SCAN_CHUNK = 256  # inode-table blocks read at once by the mount scan

__all__ = [
    "FileSystem",
    "FsError",
    "Inode",
    "JournalDamaged",
    "RENAME_NOREPLACE",
    "RENAME_EXCHANGE",
]


def _err(code: int, msg: str) -> OSError:
    return OSError(code, msg)


class FileSystem(NamespaceMixin, BlockMapMixin, DirMixin):
    ROOT_INO = ROOT_INO

    def __init__(self, dev, bufs, *, on_txn_state: Callable[[int, int, int], None] | None = None):
        self.dev, self.bufs, self.on_txn_state = dev, bufs, on_txn_state
        self._lock = threading.RLock()
        self._handles = 0
        self.op_gen = 0
        self._dirs: OrderedDict = OrderedDict()
        self._unwritten: list[np.ndarray] = []
        self._freed_meta: set[int] = set()
        self.faults = NoFaults()  # the VFS hands down its kernel's injector
        # the VFS hands down its own (kernel/core/vfs.py ``found_corruption``)
        self.found_corruption = lambda site, why: self.faults.found_corruption(site, why)
        self.mounted = False
        sb = Superblock.unpack(dev.read(SB_BLOCK), dev.path)
        if sb.nblocks > dev.nblocks:
            raise FsError(
                errno.EINVAL,
                f"{dev.path}: superblock says {sb.nblocks} blocks, the device has {dev.nblocks}",
            )
        js, jl = sb.journal_start, sb.journal_len
        self.journal = Journal(
            dev,
            js,
            jl,
            sb.csum_seed,
            home_ok=lambda b: 0 < b < sb.nblocks and not js <= b < js + jl,
        )
        rep = self.journal.replay()  # JournalDamaged: nothing was written
        for b in rep.blocks:
            bufs.forget(b)
        self.replayed = {"transactions": rep.transactions, "blocks": len(rep.blocks)}
        self.errors: list[str] = []  # corruption met (and skipped) at mount
        self.sb = sb = Superblock.unpack(bufs.read(SB_BLOCK), dev.path)
        self.seed = sb.csum_seed
        # Allocators from a scan of the device: right after replay nothing is dirty, and the
        # device is the truth (the buffers hold no newer copy of these blocks).
        self.ialloc, orphans = self._scan_inodes()
        raw = dev.read(sb.bitmap_start, sb.bitmap_len)
        self.balloc = BlockAlloc(bufs, sb, BlockAlloc.unpack_bitmap(raw, sb.nblocks))
        self._soft_limit = max(1, self.journal.max_txn_entries - OP_RESERVE)
        self._last_commit = time.monotonic()
        self.mounted = True
        with self.handle():
            self._set_state(STATE_MOUNTED)
            for ino in orphans:
                try:
                    self._release(self._iget(ino))
                except FsError as e:
                    self.errors.append(f"orphan inode {ino} not freed: {e.strerror}")
        self.orphans_freed = len(orphans)
        self._commit_now()

    def _scan_inodes(self) -> tuple[InodeAlloc, list[int]]:
        sb = self.sb
        free = np.zeros(sb.ninodes, dtype=bool)
        orphans: list[int] = []
        for s in range(0, sb.inode_len, _SCAN_CHUNK):
            n = min(_SCAN_CHUNK, sb.inode_len - s)
            arr = np.frombuffer(self.dev.read(sb.inode_start + s, n), INODE_DTYPE)
            first = s * INODES_PER_BLOCK
            k = min(arr.size, sb.ninodes - first)
            if k <= 0:
                break
            mode, nlink = arr["mode"][:k], arr["nlink"][:k]
            free[first : first + k] = mode == 0
            orphans += (np.flatnonzero((mode != 0) & (nlink == 0)) + first).tolist()
        return InodeAlloc(free), [i for i in orphans if i not in (0, ROOT_INO)]

    # --- transactions ----------------------------------------------------------------------
    @contextmanager
    def handle(self):
        """One file-system operation in the running transaction (nesting is fine)."""
        with self._lock:
            if not self.mounted:
                raise FsError(errno.EIO, f"{self.dev.path}: file system is not mounted")
            if not self._handles:  # a commit inside would keep part of the operation
                self._make_room()
                self.op_gen += 1
            self._handles += 1
            self._notify()
            try:
                self.faults.at("fs.journal-start")
                yield self
            finally:
                self._handles -= 1
                self._notify()
                if not self._handles:  # after _notify: a crash in between is outside
                    self.bufs.end_op()  # any operation, so the undo record is not used
                    self._trim_dircache()

    def _notify(self) -> None:
        if self.on_txn_state is not None:
            self.on_txn_state(self.journal.next_tid, self._handles, self.op_gen)

    def _must_commit(self) -> bool:
        """The transaction is close to the journal's limit, or so many blocks wait for their
        free to commit that the free space is short (ext4 commits to retry an allocation)."""
        ba = self.balloc
        return self.bufs.ndirty() >= self._soft_limit or (
            ba.npending and ba.nfree < max(ba.npending, OP_RESERVE)
        )

    def _make_room(self) -> None:
        if self._must_commit():
            self._commit_now()

    def _progress(self, inode: Inode, low: int | None) -> None:
        """A consistent point inside a long operation: commit if the transaction is full.
        `low`: every block of `inode` from file block `low` on is free (size shrinks to it)."""
        if self._must_commit():
            if low is not None:
                inode.size = min(inode.size, low * BSIZE)
            self._iput(inode)
            self._commit_now()

    def commit(self) -> int | None:
        """Commit the running transaction; None if it is empty. Not inside a handle."""
        with self._lock:
            if self._handles:
                raise RuntimeError("FileSystem.commit() inside an open handle")
            if not self.mounted:
                raise FsError(errno.EIO, f"{self.dev.path}: file system is not mounted")
            return self._commit_now()

    def _commit_now(self) -> int | None:
        if self._unwritten:
            self._zero_blocks(np.concatenate(self._unwritten))
            self._unwritten.clear()
        blocks = self.bufs.take_dirty()
        if not blocks and not self._freed_meta:
            return None
        self._check_pointers(blocks)
        try:
            tid = self.journal.commit(blocks, self._freed_meta)
        except BaseException:
            self.mounted = (
                False  # the buffers' dirty state is gone: stop, as ext4 errors=remount-ro
            )
            raise
        self._freed_meta = set()
        settle = getattr(self.bufs, "settle", None)  # optional: the taken blocks are journaled
        if settle is not None:
            settle()
        self.balloc.release_pending()
        self._last_commit = time.monotonic()
        self._notify()
        return tid

    def _check_pointers(self, blocks: dict[int, bytes]) -> None:
        """Before the transaction reaches the journal: an inode pointing outside the data
        area is this kernel's own corruption, a panic (it would be on disk for good)."""
        bad = pointers_outside(blocks, self.sb)
        if bad:
            ino, p = bad[0]
            self.found_corruption(
                "fs.check",
                f"fs: inode {ino}: block pointer {p} out of range "
                f"(data blocks {self.sb.data_start}..{self.sb.nblocks - 1}) in the transaction "
                f"to commit ({len(bad)} such pointers)",
            )

    def maybe_commit(self) -> None:
        """Commit if COMMIT_INTERVAL_S has passed since the last commit or the transaction is big."""
        with self._lock:
            if self._handles or not self.mounted or not self.bufs.ndirty():
                return
            if (
                time.monotonic() - self._last_commit >= param.COMMIT_INTERVAL_S
                or self.bufs.ndirty() >= self._soft_limit
            ):
                self._commit_now()

    def unmount(self) -> None:
        with self._lock:
            if not self.mounted:
                return
            self._commit_now()
            self._set_state(STATE_CLEAN)
            self._commit_now()
            self.journal.checkpoint()
            self.dev.flush()
            self.mounted = False

    def _set_state(self, state: int) -> None:
        self.sb.state = state
        self.bufs.write(SB_BLOCK, 0, self.sb.pack())

    @contextmanager
    def _alloc_scope(self):
        """Data blocks allocated in here are the caller's to write; if it fails before,
        they are zeroed, so the file never exposes stale contents."""
        self._unwritten = []
        try:
            yield
        except BaseException:
            if self._unwritten:
                self._zero_blocks(np.concatenate(self._unwritten))
            raise
        finally:
            self._unwritten = []

    def _zero_blocks(self, blocks: np.ndarray) -> None:
        blocks = np.unique(blocks)
        starts = np.flatnonzero(np.r_[True, np.diff(blocks) != 1])
        for s, e in zip(starts.tolist(), np.r_[starts[1:], blocks.size].tolist()):
            for k in range(s, e, 256):
                n = min(256, e - k)
                self.dev.write(int(blocks[k]), bytes(n * BSIZE))

    # --- inodes --------------------------------------------------------------------------
    def _iloc(self, ino: int) -> tuple[int, int]:
        if not 0 < ino < self.sb.ninodes:
            raise FsError(errno.ESTALE, f"inode {ino} out of range (1..{self.sb.ninodes - 1})")
        return self.sb.inode_start + ino // INODES_PER_BLOCK, (ino % INODES_PER_BLOCK) * ISIZE

    def _iread(self, ino: int, verify: bool = True) -> Inode:
        blk, off = self._iloc(ino)
        return unpack_inode(ino, self.bufs.read(blk)[off : off + ISIZE], self.seed, verify=verify)

    def _iget(self, ino: int) -> Inode:
        i = self._iread(ino)
        if i.mode == 0:
            raise FsError(errno.ESTALE, f"inode {ino} is not in use")
        return i

    def _iput(self, i: Inode) -> None:
        blk, off = self._iloc(i.ino)
        self.bufs.write(blk, off, pack_inode(i, self.seed))

    def _free_meta(self, b: int) -> None:
        self.bufs.forget(b)
        self._freed_meta.add(b)
        self.balloc.free([b])

    def iget(self, ino: int) -> Inode:
        with self._lock:
            return self._iget(ino)

    def setattr(self, ino: int, **fields) -> None:
        bad = set(fields) - _SETATTR
        if bad:
            raise TypeError(f"setattr: unknown field(s) {', '.join(sorted(bad))}")
        with self.handle():
            i = self._iget(ino)
            if "mode" in fields:
                fields["mode"] = stat.S_IFMT(i.mode) | (fields["mode"] & 0o7777)
            if "size" in fields and fields["size"] != i.size:
                if not i.is_reg:
                    raise _err(
                        errno.EISDIR if i.is_dir else errno.EINVAL,
                        f"inode {ino}: size of a non-regular file cannot be set",
                    )
                if not 0 <= fields["size"] <= param.MAX_FILE_BYTES:
                    raise _err(errno.EFBIG, f"inode {ino}: size {fields['size']} too large")
            for k, v in fields.items():
                setattr(i, k, int(v))
            self._iput(i)

    def _alloc_inode(self, mode: int, uid: int, gid: int, nlink: int) -> Inode:
        ino = self.ialloc.alloc()
        self.faults.at("fs.inode-alloc")
        old = self._iread(ino, verify=False)
        if old.mode:
            self.ialloc.free[ino] = False
            raise corrupt(f"inode {ino}: free in the allocator but in use on disk")
        now = time.time_ns()
        return Inode(
            ino, mode, uid, gid, nlink, 0, now, now, now, (old.generation + 1) & 0xFFFFFFFF or 1
        )

    # --- block map and size -----------------------------------------------------------------
    def _reg(self, ino: int) -> Inode:
        i = self._iget(ino)
        if not i.is_reg:
            raise _err(
                errno.EISDIR if i.is_dir else errno.EINVAL, f"inode {ino} is not a regular file"
            )
        return i

    def bmap(self, ino: int, fblock: int, alloc: bool = False) -> int:
        return self.bmap_range(ino, fblock, 1, alloc)[0]

    def bmap_range(self, ino: int, fblock: int, count: int, alloc: bool = False) -> list[int]:
        """Disk blocks of file blocks fblock..fblock+count-1 (0 = hole); `alloc` fills holes."""
        if fblock < 0 or count < 0:
            raise _err(errno.EINVAL, f"bmap of blocks {fblock}+{count}")
        if fblock + count > MAX_BLOCKS:
            raise _err(errno.EFBIG, f"file block {fblock + count - 1} beyond the maximum file size")
        if not alloc:
            with self._lock:
                return self._map(self._reg(ino), fblock, count)[0].tolist()
        with self.handle():
            i = self._reg(ino)
            before = list(i.addrs)
            try:
                with self._alloc_scope():
                    blocks, _ = self._map(i, fblock, count, alloc=True)
            finally:  # what was allocated stays referenced, even on ENOSPC
                if i.addrs != before:
                    self._iput(i)
            return blocks.tolist()

    def has_leaf(self, ino: int, fblock: int) -> bool:
        """Whether the block map already has the indirect blocks that map file block fblock."""
        with self._lock:
            i = self._reg(ino)
            if fblock < param.NDIRECT:
                return True
            slot, depth, base = _root_of(fblock)
            return self._leaf(i, slot, depth, fblock - base, False, 0) != 0

    def truncate(self, ino: int, size: int) -> None:
        """Free the blocks past `size` and set the size (growing leaves a hole)."""
        with self.handle():
            i = self._reg(ino)
            if size < 0:
                raise _err(errno.EINVAL, f"negative size {size}")
            if size > param.MAX_FILE_BYTES:
                raise _err(errno.EFBIG, f"size {size} beyond MAX_FILE_BYTES")
            self._trim(i, math.ceil(size / BSIZE))
            edge = min(size, i.size)  # bytes past it, up to its block's end, must read 0
            if edge % BSIZE:
                b = int(self._map(i, edge // BSIZE, 1)[0][0])
                if b:
                    blk = bytearray(self.dev.read(b))
                    blk[edge % BSIZE :] = bytes(BSIZE - edge % BSIZE)
                    self.dev.write(b, blk)
            i.size = size
            self._iput(i)

    def statfs(self) -> dict:
        with self._lock:
            free = max(0, self.balloc.available())  # net of blocks promised to dirty pages
            return {
                "bsize": BSIZE,
                "frsize": BSIZE,
                "blocks": self.sb.nblocks,
                "bfree": free,
                "bavail": free,
                "files": self.sb.ninodes - 1,
                "ffree": self.ialloc.nfree,
                "namemax": param.NAME_MAX,
            }

    # --- uncached data path (tools, tests) -----------------------------------------------
    def read_data(self, ino: int, off: int, n: int) -> bytes:
        with self._lock:
            i = self._reg(ino)
            end = min(off + n, i.size)
            if off < 0 or n < 0:
                raise _err(errno.EINVAL, f"read of {n} bytes at {off}")
            if off >= end:
                return b""
            fb0, fb1 = off // BSIZE, (end - 1) // BSIZE
            blocks = self._map(i, fb0, fb1 - fb0 + 1)[0]
            buf = bytearray(blocks.size * BSIZE)
            for s, e in _runs(blocks):
                if blocks[s]:
                    buf[s * BSIZE : e * BSIZE] = self.dev.read(int(blocks[s]), e - s)
            lo = off - fb0 * BSIZE
            return bytes(buf[lo : lo + end - off])

    def write_data(self, ino: int, off: int, data) -> None:
        mv = memoryview(data).cast("B")
        n = mv.nbytes
        if off < 0:
            raise _err(errno.EINVAL, f"write at offset {off}")
        if off + n > param.MAX_FILE_BYTES:
            raise _err(errno.EFBIG, "write past MAX_FILE_BYTES")
        with self.handle():
            i = self._reg(ino)
            if n:
                fb0, fb1 = off // BSIZE, (off + n - 1) // BSIZE
                before = list(i.addrs)
                try:
                    self._write_blocks(i, fb0, fb1 - fb0 + 1, off - fb0 * BSIZE, mv)
                finally:  # what was allocated stays referenced, even on ENOSPC
                    if i.addrs != before:
                        self._iput(i)
            now = time.time_ns()
            i.size = max(i.size, off + n)
            i.mtime_ns = i.ctime_ns = now
            self._iput(i)

    def _write_blocks(self, i: Inode, fb0: int, nb: int, lo: int, mv) -> None:
        """Write mv at byte lo of file blocks fb0..fb0+nb-1, allocating (uncached path)."""
        with self._alloc_scope():
            blocks, new = self._map(i, fb0, nb, alloc=True)
            buf = bytearray(nb * BSIZE)
            partial = set()  # blocks only partly overwritten
            if lo:
                partial.add(0)
            if (lo + mv.nbytes) % BSIZE:
                partial.add(nb - 1)
            for k in partial:
                if blocks[k] and not new[k]:
                    buf[k * BSIZE : (k + 1) * BSIZE] = self.dev.read(int(blocks[k]))
            buf[lo : lo + mv.nbytes] = mv
            for s, e in _runs(blocks):
                self.dev.write(int(blocks[s]), memoryview(buf)[s * BSIZE : e * BSIZE])

    # --- fault injection ---------------------------------------------------------------------
    def inject_bad_pointer(self, rng) -> str:
        """fs-corrupt: write an out-of-range block pointer into an inode (checksum kept valid,
        as a buggy kernel would) in the running transaction. Returns what was done."""
        with self.handle():
            inos = self.ialloc.in_use().tolist()
            rng.shuffle(inos)
            victim = None
            for ino in inos[:256]:
                try:
                    i = self._iread(ino)
                except FsError:
                    continue
                if (i.is_reg or i.is_dir) and any(i.addrs):
                    victim = i
                    break
            if victim is None:
                victim = self._iget(ROOT_INO)
            slots = [k for k, a in enumerate(victim.addrs) if a] or [0]
            k = rng.choice(slots)
            bad = self.sb.nblocks + rng.randrange(1, 1 << 20)
            victim.addrs[k] = bad
            self._iput(victim)
            self._dirs.pop(victim.ino, None)
            return (
                f"inode {victim.ino}: block pointer {k} set to {bad} "
                f"(the device has {self.sb.nblocks} blocks)"
            )


def _runs(blocks: np.ndarray):
    """(start, end) index ranges of `blocks` that are contiguous on disk (holes: one run each)."""
    n = blocks.size
    if n == 0:
        return []
    b = blocks.astype(np.int64)
    brk = np.flatnonzero((np.diff(b) != 1) | (b[1:] == 0) | (b[:-1] == 0)) + 1
    bounds = [0] + brk.tolist() + [n]
    return list(zip(bounds, bounds[1:]))
