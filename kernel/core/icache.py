"""In-core inodes and the dirty-inode list, kept in physical memory.

Promises to the VFS and page cache: one in-core inode object (physmem.ICORE) per inode in
use, in a slot of the partition's in-core inode table, mirrored in Python for speed but
always written through to physical memory. Every inode with dirty pages or dirty metadata
is on the **dirty-inode list**, a doubly linked list of in-core inodes whose head is in the
kernel superblock (physmem.KSUPER) — the list a backup kernel walks after a crash. An
inode records when it joined the list (``dirtied_ns``, CLOCK_MONOTONIC, which every process
of the machine shares); an inode a dead kernel had dirtied keeps that time when adopted
(``mark_meta_dirty(since=)``), so the flusher writes it back on the dead kernel's schedule.
Slot 0 is the block device's inode (ino 0): its dirty pages are the metadata blocks of the
running journal transaction.

The kernel superblock also mirrors the journal's state (running transaction id, handles
open), so a foreign kernel can tell whether this one died inside a file-system operation.
"""

from __future__ import annotations

import time

import numpy as np

from kernel.hw.physmem import (
    I_DIRTY_META,
    I_ON_DIRTY_LIST,
    I_USED,
    ICORE,
    KSUPER,
    PartLayout,
    PhysMem,
)

BDEV_INO = 0
# index of each field in the mirrored tuple (magic, version, flags, ino, mode, ...)
F = ICORE.index
K = KSUPER.index


class KSuper:
    """The in-memory superblock object of one partition's kernel."""

    def __init__(self, mem: PhysMem, lay: PartLayout, nblocks: int = 0):
        self.mem, self.phys = mem, lay.ksuper
        vals = [0] * len(KSUPER.names)
        vals[0], vals[1] = KSUPER.magic, KSUPER.version
        vals[K["part_id"]] = lay.part_id
        vals[K["nblocks"]] = nblocks
        vals[K["mount_gen"]] = time.monotonic_ns()
        self.v = vals
        self.flush()

    def set(self, **fields) -> None:
        for k, val in fields.items():
            self.v[K[k]] = val
        self.flush()

    def get(self, name: str) -> int:
        return self.v[K[name]]

    def flush(self) -> None:
        self.v[K["update_gen"]] += 1
        self.mem.write(self.phys, KSUPER.encode_tuple(tuple(self.v)))


class ICache:
    """Slots of in-core inodes, and the dirty-inode list through them."""

    def __init__(self, mem: PhysMem, lay: PartLayout, ksuper: KSuper):
        self.mem, self.lay, self.ks = mem, lay, ksuper
        self.slot: dict[int, int] = {}
        self.v: dict[int, list] = {}
        self.free = list(range(lay.n_icore - 1, 0, -1))  # slot 0 is the block device's
        self.dirty_head = -1  # ino at the head of the dirty-inode list; -1: empty
        self._next: dict[int, int] = {}
        self._prev: dict[int, int] = {}
        self._clear_table()
        self._load(BDEV_INO, 0, 0, 0, 0, 0, 0, slot=0)

    def _clear_table(self) -> None:
        """A previous kernel's objects must not look alive to a reader of this one: clear
        every slot that could pass for one (its magic/version/flags word is not zero), one
        store per run of them, instead of the whole table (8 MiB) while the service is down."""
        n, words = self.lay.n_icore, ICORE.size // 8
        head = np.frombuffer(self.mem.mm, np.uint64, n * words, self.lay.icore)[::words]
        used = np.flatnonzero(head != 0)
        if not len(used):
            return
        starts = np.flatnonzero(np.r_[True, np.diff(used) != 1])
        ends = np.r_[starts[1:], len(used)]
        for lo, hi in zip(used[starts].tolist(), (used[ends - 1] + 1).tolist()):
            self.mem.write(self.lay.icore_phys(lo), bytes((hi - lo) * ICORE.size))

    # --- slots -----------------------------------------------------------------------
    def _load(self, ino, mode, uid, gid, nlink, size, t, slot=None) -> list:
        if slot is None:
            if not self.free:
                self._reclaim_slots()
            slot = self.free.pop()
        vals = [
            ICORE.magic,
            ICORE.version,
            I_USED,
            ino,
            mode,
            uid,
            gid,
            nlink,
            size,
            t,
            t,
            t,
            0,
            0,
            0,
            0,
            0,
            0,
        ]
        self.slot[ino], self.v[ino] = slot, vals
        self._write(ino)
        return vals

    def load(
        self,
        ino: int,
        mode: int,
        uid: int,
        gid: int,
        nlink: int,
        size: int,
        atime_ns: int,
        mtime_ns: int,
        ctime_ns: int,
    ) -> list:
        vals = self._load(ino, mode, uid, gid, nlink, size, 0)
        vals[F["atime_ns"]], vals[F["mtime_ns"]], vals[F["ctime_ns"]] = atime_ns, mtime_ns, ctime_ns
        self._write(ino)
        return vals

    def drop(self, ino: int) -> None:
        """Forget an inode's in-core object (it must be off the dirty list)."""
        if ino not in self.slot or ino == BDEV_INO:
            return
        if self.v[ino][2] & I_ON_DIRTY_LIST:
            self._unlink_dirty(ino)
        slot = self.slot.pop(ino)
        del self.v[ino]
        self.mem.write(self.lay.icore_phys(slot), bytes(ICORE.size))
        self.free.append(slot)

    def _reclaim_slots(self) -> None:
        victims = [i for i, v in self.v.items() if i != BDEV_INO and not v[2] & I_ON_DIRTY_LIST]
        if not victims:
            raise MemoryError("in-core inode table full of dirty inodes")
        for ino in victims[: max(1, len(victims) // 4)]:
            self.drop(ino)

    def phys(self, ino: int) -> int:
        return self.lay.icore_phys(self.slot[ino])

    def _write(self, ino: int) -> None:
        self.mem.write(self.lay.icore_phys(self.slot[ino]), ICORE.encode_tuple(tuple(self.v[ino])))

    # --- fields ------------------------------------------------------------------------
    def get(self, ino: int) -> list | None:
        return self.v.get(ino)

    def set(self, ino: int, **fields) -> None:
        vals = self.v[ino]
        for k, val in fields.items():
            vals[F[k]] = val
        self._write(ino)

    def set_dirty_pages(self, ino: int, head_phys: int, n_dirty: int) -> None:
        """Called by the page cache when an inode's dirty-page chain changes."""
        vals = self.v[ino]
        vals[F["dirty_pages_head"]], vals[F["n_dirty"]] = head_phys, n_dirty
        if n_dirty and not vals[2] & I_ON_DIRTY_LIST:
            self._link_dirty(ino)  # writes the object
        elif not n_dirty and not vals[2] & I_DIRTY_META and vals[2] & I_ON_DIRTY_LIST:
            self._unlink_dirty(ino)
        else:
            self._write(ino)

    def mark_meta_dirty(self, ino: int, since: int = 0) -> None:
        """``since``: when the inode became dirty (CLOCK_MONOTONIC ns), for an inode a dead
        kernel had dirtied, so write-back keeps its schedule; 0 means now."""
        vals = self.v[ino]
        if vals[2] & I_DIRTY_META:
            return
        vals[2] |= I_DIRTY_META
        if not vals[2] & I_ON_DIRTY_LIST:
            self._link_dirty(ino, since)
        else:
            self._write(ino)

    def meta_clean(self, ino: int) -> None:
        vals = self.v.get(ino)
        if vals is None or not vals[2] & I_DIRTY_META:
            return
        vals[2] &= ~I_DIRTY_META
        if not vals[F["n_dirty"]] and vals[2] & I_ON_DIRTY_LIST:
            self._unlink_dirty(ino)
        else:
            self._write(ino)

    def dirty_inodes(self) -> list[int]:
        out, ino = [], self.dirty_head
        while ino != -1:
            out.append(ino)
            ino = self._next.get(ino, -1)
        return out

    def dirtied_ns(self, ino: int) -> int:
        return self.v[ino][F["dirtied_ns"]]

    # --- the dirty-inode list (head in the kernel superblock) --------------------------
    def _link_dirty(self, ino: int, since: int = 0) -> None:
        vals = self.v[ino]
        old = self.dirty_head
        vals[2] |= I_ON_DIRTY_LIST
        now = time.monotonic_ns()
        vals[F["dirtied_ns"]] = min(since, now) if since else now  # never in the future
        vals[F["prev_dirty"]] = 0
        vals[F["next_dirty"]] = self.phys(old) if old != -1 else 0
        self._write(ino)
        if old != -1:
            self.v[old][F["prev_dirty"]] = self.phys(ino)
            self._write(old)
            self._next[ino] = old
            self._prev[old] = ino
        self.dirty_head = ino
        self.ks.set(
            dirty_inode_head=self.phys(ino), n_dirty_inodes=self.ks.get("n_dirty_inodes") + 1
        )

    def _unlink_dirty(self, ino: int) -> None:
        vals = self.v[ino]
        prev, nxt = self._prev.pop(ino, -1), self._next.pop(ino, -1)
        if prev != -1:
            self.v[prev][F["next_dirty"]] = self.phys(nxt) if nxt != -1 else 0
            self._write(prev)
            if nxt != -1:
                self._next[prev] = nxt
            else:
                self._next.pop(prev, None)
        if nxt != -1:
            self.v[nxt][F["prev_dirty"]] = self.phys(prev) if prev != -1 else 0
            self._write(nxt)
            if prev != -1:
                self._prev[nxt] = prev
            else:
                self._prev.pop(nxt, None)
        vals[2] &= ~(I_ON_DIRTY_LIST | I_DIRTY_META)
        vals[F["next_dirty"]] = vals[F["prev_dirty"]] = vals[F["dirtied_ns"]] = 0
        self._write(ino)
        if self.dirty_head == ino:
            self.dirty_head = nxt
            self.ks.set(
                dirty_inode_head=self.phys(nxt) if nxt != -1 else 0,
                n_dirty_inodes=self.ks.get("n_dirty_inodes") - 1,
            )
        else:
            self.ks.set(n_dirty_inodes=self.ks.get("n_dirty_inodes") - 1)
