"""The VFS: file operations by inode number, over the file system and the page cache.

Promises to the FUSE adapter (kernel/core/fuse.py) and to tests that drive the kernel directly:

* the operations below, synchronous, each under the big kernel lock ``VFS.lock``; errors
  are OSError with a Linux errno; names are bytes; the root is ``ROOT_INO``;
* file data lives in the page cache (kernel/core/pagecache.py) and reaches the disk only by
  write-back (kernel/core/writeback.py): delayed allocation, so a dirty page has no disk block
  until it is written back, and the on-disk size follows the written-back data;
* a write is promised its blocks before a byte of it is applied (kernel/core/reserve.py): one
  that does not fit fails ENOSPC and changes nothing, an overwrite of pages that have a
  block succeeds on a full device, and what a write acknowledged reaches the disk at
  write-back; ``statfs`` counts promised blocks as used;
* ``fsync`` returns only when the file's pages, its inode and the journal are on the
  device; ``fsyncdir`` when the journal is;
* an inode whose last name is gone is freed only once no open file and no FUSE lookup
  reference holds it;
* a page a crash lost (pagecache ``lost``: adopted dirty data that failed its checks) is
  never read from the disk instead: reading it, or writing part of it, is EIO until a
  write covers it whole or a truncation drops it; a file whose lost pages are unknown
  reads as EIO until it is truncated to 0.
"""

from __future__ import annotations

import errno
import stat
import threading
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np

from kernel import param
from kernel.core.bufcache import PageCacheBuffers
from kernel.core.faults import NoFaults
from kernel.core.fs import FileSystem
from kernel.core.icache import F, ICache, KSuper
from kernel.core.pagecache import Adopted, PageCache
from kernel.core.reserve import Reservations
from kernel.core.writeback import Writeback
from kernel.hw.physmem import I_DIRTY_META, PartLayout, PhysMem

PAGE = param.PAGE_SIZE
_FLAGS, _MODE, _UID, _GID, _NLINK, _SIZE = (
    F[k] for k in ("flags", "mode", "uid", "gid", "nlink", "size")
)
_ATIME, _MTIME, _CTIME = F["atime_ns"], F["mtime_ns"], F["ctime_ns"]


def _lost(ino: int, idx: int | None = None) -> OSError:
    what = f"page {idx} of inode {ino}" if idx is not None else f"inode {ino}"
    return OSError(errno.EIO, f"{what}: unsynced data lost in a crash (see the recovery report)")


@dataclass
class Attr:
    ino: int
    mode: int
    nlink: int
    uid: int
    gid: int
    size: int
    blocks: int
    atime_ns: int
    mtime_ns: int
    ctime_ns: int
    generation: int = 0


class VFS:
    ROOT_INO = 1

    def __init__(self, mem: PhysMem, lay: PartLayout, dev, adopt: Adopted | None = None):
        """Mount. With ``adopt``, a dead kernel's validated pages in this partition's memory
        are taken over in place (its dirty inodes keep their in-core size and times)."""
        self.lock = threading.RLock()
        self.mem, self.lay, self.dev = mem, lay, dev
        self._faults = NoFaults()  # a running kernel replaces it with its FaultInjector
        # a request layer that can abort the request in hand instead of a panic, when the
        # stack's own check finds corruption inside it (systems/txipc_sim); None: panic
        self.contain: Callable[[str, str], None] | None = None
        self._mount(adopt)
        self.refs: dict[int, int] = {}
        self.opens: dict[int, int] = {}
        self.orphans: set[int] = set()
        self.writeback = Writeback(self)

    @property
    def faults(self):
        return self._faults

    @faults.setter
    def faults(self, f) -> None:
        self._faults = self.fs.faults = self.pc.faults = f

    def remount(self, adopt: Adopted) -> None:
        """Mount again in place, from this kernel's own memory (``adopt``: its pages as a
        cache walk found them) after the disk's running transaction was completed: every
        table of the storage stack is built afresh; the lock, the flusher, the fault
        injector and the lookup and open counts stay. The caller holds the lock."""
        self._mount(adopt)

    def _mount(self, adopt: Adopted | None) -> None:
        mem, lay, dev = self.mem, self.lay, self.dev
        self.ks = KSuper(mem, lay, dev.nblocks)
        self.ic = ICache(mem, lay, self.ks)
        # oldest first, so the dirty-inode list's tail stays the oldest (writeback.balance);
        # each keeps the time the dead kernel dirtied it: a takeover restarts no clock
        for ino, i in sorted(
            adopt.inodes.items() if adopt else (), key=lambda e: e[1]["dirtied_ns"]
        ):
            self.ic.load(
                ino,
                i["mode"],
                i["uid"],
                i["gid"],
                i["nlink"],
                i["size"],
                i["atime_ns"],
                i["mtime_ns"],
                i["ctime_ns"],
            )
            self.ic.mark_meta_dirty(ino, since=i["dirtied_ns"])
        self.pc = PageCache(mem, lay, self.ic, adopt)
        self.pc.faults = self._faults
        self.bufs = PageCacheBuffers(self.pc, dev)
        self.fs = FileSystem(dev, self.bufs, on_txn_state=self._txn_state)
        self.fs.faults = self._faults
        self.fs.found_corruption = self.pc.found_corruption = self.found_corruption
        self.resv = Reservations(self.fs, self.pc)
        if adopt is not None:
            self._adopt_reservations(adopt)

    def found_corruption(self, site: str, reason: str) -> None:
        """The storage stack's own check found its state corrupted (``faults.CHECK_SITES``):
        the request layer, if one is set, aborts the request in hand (it raises); otherwise,
        or outside a request, the kernel panics there. Never returns."""
        if self.contain is not None:
            self.contain(site, reason)
        self._faults.found_corruption(site, reason)

    def _adopt_reservations(self, a: Adopted) -> None:
        ino, idx = a.ino[a.dirty], a.index[a.dirty]
        u = a.unchecked
        if u is not None and u.left_dirty:
            keys = u.keys[u.open & u.dirty]
            ino = np.concatenate([ino, (keys >> np.uint64(32)).astype(np.int64)])
            idx = np.concatenate([idx, (keys & np.uint64(0xFFFFFFFF)).astype(np.int64)])
        self.resv.adopt(ino, idx)

    def _txn_state(self, running_tid: int, handles_open: int, op_gen: int) -> None:
        self.ks.set(running_tid=running_tid, handles_open=handles_open, op_gen=op_gen)

    @contextmanager
    def operation(self):
        """One request's changes as one file-system operation: a kernel that dies before
        it ends has all of it undone by its backup (its undo record), none of it kept.
        Yields the operation's generation (the kernel superblock's ``op_gen`` meanwhile)."""
        with self.lock, self.fs.handle() as fs:
            yield fs.op_gen

    # --- in-core inodes -----------------------------------------------------------------
    def _icore(self, ino: int) -> list:
        v = self.ic.get(ino)
        if v is None:
            i = self.fs.iget(ino)
            v = self.ic.load(
                ino, i.mode, i.uid, i.gid, i.nlink, i.size, i.atime_ns, i.mtime_ns, i.ctime_ns
            )
        return v

    def _attr(self, ino: int) -> Attr:
        v = self._icore(ino)
        size = v[_SIZE]
        return Attr(
            ino,
            v[_MODE],
            v[_NLINK],
            v[_UID],
            v[_GID],
            size,
            (size + 511) // 512,
            v[_ATIME],
            v[_MTIME],
            v[_CTIME],
        )

    def _refresh(self, ino: int, directory: bool = False) -> Attr:
        """Reload an inode's metadata from the file system after a namespace operation
        (for a directory that changed, its size and mtime too)."""
        if self.ic.get(ino) is not None:
            i = self.fs.iget(ino)
            fields = dict(mode=i.mode, uid=i.uid, gid=i.gid, nlink=i.nlink, ctime_ns=i.ctime_ns)
            if directory:
                fields.update(size=i.size, mtime_ns=i.mtime_ns)
            self.ic.set(ino, **fields)
        return self._attr(ino)

    # --- namespace ------------------------------------------------------------------------
    def lookup(self, parent: int, name: bytes) -> Attr:
        with self.lock:
            a = self._attr(self.fs.lookup(parent, name))
            self.faults.at("vfs.lookup")
            return a

    def getattr(self, ino: int) -> Attr:
        with self.lock:
            return self._attr(ino)

    def create(self, parent, name, mode, uid, gid) -> Attr:
        with self.lock:
            ino = self.fs.create(parent, name, mode, uid, gid)
            self.pc.lost.truncated(ino, 0)  # a reused number carries no loss
            self.faults.at("vfs.create")
            self._touch_dir(parent)
            return self._attr(ino)

    def mkdir(self, parent, name, mode, uid, gid) -> Attr:
        with self.lock:
            ino = self.fs.mkdir(parent, name, mode, uid, gid)
            self.pc.lost.truncated(ino, 0)  # a reused number carries no loss
            self.faults.at("vfs.mkdir")
            self._touch_dir(parent)
            return self._attr(ino)

    def symlink(self, parent, name, target: bytes, uid, gid) -> Attr:
        with self.lock:
            ino = self.fs.symlink(parent, name, target, uid, gid)
            self.pc.lost.truncated(ino, 0)
            self._touch_dir(parent)
            return self._attr(ino)

    def link(self, ino, new_parent, new_name) -> Attr:
        with self.lock:
            self.fs.link(ino, new_parent, new_name)
            self._touch_dir(new_parent)
            return self._refresh(ino)

    def unlink(self, parent, name) -> None:
        with self.lock:
            ino = self.fs.unlink(parent, name)
            self.faults.at("vfs.unlink")
            self._touch_dir(parent)
            self._after_unlink(ino)

    def rmdir(self, parent, name) -> None:
        with self.lock:
            ino = self.fs.rmdir(parent, name)
            self.faults.at("vfs.unlink")
            self._touch_dir(parent)
            self._after_unlink(ino)

    def rename(self, old_parent, old_name, new_parent, new_name, flags=0) -> None:
        with self.lock:
            replaced = self.fs.rename(old_parent, old_name, new_parent, new_name, flags)
            self.faults.at("vfs.rename")
            self._touch_dir(old_parent)
            if new_parent != old_parent:
                self._touch_dir(new_parent)
            if replaced:
                self._after_unlink(replaced)

    def readlink(self, ino) -> bytes:
        with self.lock:
            return self.fs.readlink(ino)

    def readdir(self, ino) -> list[tuple[bytes, Attr]]:
        with self.lock:
            out = []
            for name, child in self.fs.readdir(ino):
                if self.ic.get(child) is not None:
                    out.append((name, self._attr(child)))
                else:
                    i = self.fs.iget(child)
                    out.append(
                        (
                            name,
                            Attr(
                                child,
                                i.mode,
                                i.nlink,
                                i.uid,
                                i.gid,
                                i.size,
                                (i.size + 511) // 512,
                                i.atime_ns,
                                i.mtime_ns,
                                i.ctime_ns,
                            ),
                        )
                    )
            return out

    def _touch_dir(self, ino: int) -> None:
        if self.ic.get(ino) is not None:
            self._refresh(ino, directory=True)

    # --- references and freeing --------------------------------------------------------
    def ref(self, ino: int, n: int = 1) -> None:
        with self.lock:
            self.refs[ino] = self.refs.get(ino, 0) + n

    def forget(self, ino: int, n: int) -> None:
        with self.lock:
            left = self.refs.get(ino, 0) - n
            if left > 0:
                self.refs[ino] = left
            else:
                self.refs.pop(ino, None)
                self._maybe_free(ino)

    def open(self, ino: int, flags: int = 0) -> None:
        with self.lock:
            self._icore(ino)
            self.opens[ino] = self.opens.get(ino, 0) + 1

    def release(self, ino: int) -> None:
        with self.lock:
            left = self.opens.get(ino, 0) - 1
            if left > 0:
                self.opens[ino] = left
            else:
                self.opens.pop(ino, None)
                self._maybe_free(ino)

    def _after_unlink(self, ino: int) -> None:
        i = self.fs.iget(ino)
        if self.ic.get(ino) is not None:
            self.ic.set(ino, nlink=i.nlink, ctime_ns=i.ctime_ns)
        if i.nlink == 0:
            self.orphans.add(ino)
            self._maybe_free(ino)

    def _maybe_free(self, ino: int) -> None:
        if ino in self.orphans and not self.refs.get(ino) and not self.opens.get(ino):
            self.orphans.discard(ino)
            self.pc.truncate(ino, 0)
            self.resv.release(ino)
            self.ic.drop(ino)
            self.fs.release_inode(ino)

    def free_orphans(self) -> None:
        with self.lock:
            for ino in list(self.orphans):
                self.refs.pop(ino, None)
                self.opens.pop(ino, None)
                self._maybe_free(ino)

    # --- attributes ------------------------------------------------------------------------
    def setattr(
        self, ino, *, mode=None, uid=None, gid=None, size=None, atime_ns=None, mtime_ns=None
    ) -> Attr:
        with self.lock:
            v = self._icore(ino)
            now = time.time_ns()
            if size is not None:
                self._truncate(ino, v, size, now)
            meta = {
                k: val
                for k, val in (
                    ("mode", mode),
                    ("uid", uid),
                    ("gid", gid),
                    ("atime_ns", atime_ns),
                    ("mtime_ns", mtime_ns),
                )
                if val is not None
            }
            if mode is not None:
                meta["mode"] = (v[_MODE] & ~0o7777) | (mode & 0o7777)
            if meta:
                meta["ctime_ns"] = now
                self.fs.setattr(ino, **meta)
                self.faults.at("vfs.setattr")
                self.ic.set(ino, **meta)
            return self._attr(ino)

    def _truncate(self, ino: int, v: list, size: int, now: int) -> None:
        if stat.S_ISDIR(v[_MODE]):
            raise OSError(errno.EISDIR, "truncate of a directory")
        self._flush_meta(ino)
        self.pc.truncate(ino, (size + PAGE - 1) // PAGE)
        self.faults.at("vfs.truncate")
        tail = size % PAGE
        if (
            tail
            and self.pc.cached(ino, size // PAGE)
            and self._may_zero(ino, size // PAGE, v[_SIZE])
        ):
            self.pc.store(ino, size // PAGE, tail, bytes(PAGE - tail))
        self.fs.truncate(ino, size)
        if self.resv.tracks(ino):  # pages gone, indirect blocks freed: count again
            self.resv.recount(ino)
        self.fs.setattr(ino, mtime_ns=now, ctime_ns=now)
        self.ic.set(ino, size=size, mtime_ns=now, ctime_ns=now)

    def _may_zero(self, ino: int, idx: int, size: int) -> bool:
        """Whether a truncate may zero the tail of cached page idx. On a full device a clean
        page with no block is not dirtied: it reads as zeros already."""
        try:
            self.resv.for_write(ino, idx, idx, size)
        except OSError as e:
            if e.errno != errno.ENOSPC:
                raise
            return False
        return True

    def _flush_meta(self, ino: int) -> None:
        """Write the in-core size and times into the on-disk inode (in the running transaction)."""
        v = self.ic.get(ino)
        if v is None or not v[_FLAGS] & I_DIRTY_META:
            return
        self.fs.setattr(ino, atime_ns=v[_ATIME], mtime_ns=v[_MTIME], ctime_ns=v[_CTIME])
        self.ic.meta_clean(ino)

    # --- data --------------------------------------------------------------------------------
    def read(self, ino: int, off: int, size: int) -> bytes:
        with self.lock:
            v = self._icore(ino)
            if self.pc.lost.files and ino in self.pc.lost.files:
                raise _lost(ino)
            end = min(off + size, v[_SIZE])
            if off >= end:
                return b""
            first, last = off // PAGE, (end - 1) // PAGE
            parts = []
            for idx in range(first, last + 1):
                f = self.pc.lookup(ino, idx)
                if f is None:
                    self._not_lost(ino, idx)
                    f = self._fill(ino, idx, last, v[_SIZE])
                parts.append(self.pc.frame_view(f))
            data = b"".join(parts)
            lo = off - first * PAGE
            return data[lo : lo + end - off]

    def _fill(self, ino: int, idx: int, last_wanted: int, size: int) -> int:
        """Read a missing page, and what follows it up to the readahead window, from disk."""
        last_page = (size - 1) // PAGE
        end = min(last_page, max(last_wanted, idx + param.READAHEAD_PAGES - 1))
        n = 1
        lost = self.pc.lost.pages.get(ino, ())  # never read ahead into a lost page
        while idx + n <= end and not self.pc.cached(ino, idx + n) and idx + n not in lost:
            n += 1
        blocks = self.fs.bmap_range(ino, idx, n)
        i = 0
        while i < n:
            j = i + 1
            if blocks[i]:
                while j < n and blocks[j] == blocks[j - 1] + 1:
                    j += 1
                data = self.dev.read(blocks[i], j - i)
                for k in range(i, j):
                    self.pc.insert(ino, idx + k, data[(k - i) * PAGE : (k - i + 1) * PAGE])
            else:
                self.pc.insert(ino, idx + i, b"")
            i = j
        return self.pc.index[(ino, idx)]

    def write(self, ino: int, off: int, data) -> int:
        with self.lock:
            v = self._icore(ino)
            size = v[_SIZE]
            mv = memoryview(data)
            n = len(mv)
            if off < 0 or off + n > param.MAX_FILE_BYTES:
                raise OSError(
                    errno.EFBIG if off >= 0 else errno.EINVAL,
                    f"write of {n} bytes at {off}: outside 0..MAX_FILE_BYTES",
                )
            if not n:
                return 0
            self.resv.for_write(ino, off // PAGE, (off + n - 1) // PAGE, size)
            pos = 0
            while pos < n:
                idx, poff = divmod(off + pos, PAGE)
                whole = (n - pos) // PAGE * PAGE
                if poff == 0 and whole:
                    self.pc.store_pages(ino, idx, mv[pos : pos + whole])
                    pos += whole
                    self.faults.at("vfs.write")
                    continue
                chunk = min(PAGE - poff, n - pos)
                if chunk < PAGE and not self.pc.cached(ino, idx):
                    self._not_lost(ino, idx)  # nothing sound to merge a part into
                    if idx * PAGE < size:
                        self._fill(ino, idx, idx, size)
                self.pc.store(ino, idx, poff, mv[pos : pos + chunk])
                pos += chunk
                self.faults.at("vfs.write")
            now = time.time_ns()
            self.ic.set(ino, size=max(size, off + n), mtime_ns=now, ctime_ns=now)
            self.ic.mark_meta_dirty(ino)
        if self.pc.ndirty > param.DIRTY_RATIO * self.pc.nframes:
            self.writeback.balance()
        return n

    def _not_lost(self, ino: int, idx: int) -> None:
        """Before page idx of ino comes from the disk: EIO if a crash lost it (or the file)."""
        pc = self.pc
        if pc.unchecked is not None:
            pc.settle_dirty(ino)
        if pc.lost and pc.lost.any_page(ino, idx, idx):
            raise _lost(ino, idx)

    def fsync(self, ino: int, datasync: bool = False) -> None:
        self.writeback.sync_inode(ino)

    def fsyncdir(self, ino: int) -> None:
        self.writeback.sync_journal()

    def statfs(self) -> dict:
        with self.lock:
            return dict(self.fs.statfs())
