"""Block and inode allocators: in-memory numpy maps kept in step with the on-disk bitmap.

Promises to the file system (kernel/core/fs.py):

* ``BlockAlloc`` hands out data-region blocks near a goal (contiguous when the disk allows)
  and sets their bits in the on-disk bitmap through the metadata buffers (so the change is
  in the running transaction). One call touches at most ``max_bm`` bitmap blocks, and may
  therefore return fewer blocks than asked (at least one), so that a caller can bound the
  size of a transaction;
* a freed block has its bit cleared at once but is NOT handed out again until
  ``release_pending()`` (called after the freeing transaction committed): a block whose
  free is not durable must not receive another file's data (ordered mode), nor could a
  stale journal copy of it land on new data;
* freeing a block that is not in use is corruption (FsError EUCLEAN), never ignored;
* ``reserved`` blocks are promised to dirty pages that have no block yet (kernel/core/reserve.py
  keeps the promises): ``available()`` is the free blocks, those whose free is pending
  included, minus them; ``reserve`` fails with ENOSPC rather than promise more, and
  ``alloc`` never hands out a promised block (write-back gives its promise back first);
* ``InodeAlloc``: free inodes are those whose mode is 0 in the inode table; inode 0 is
  never handed out.
"""

from __future__ import annotations

import errno

import numpy as np

from kernel.core.disklayout import BITS_PER_BLOCK, FsError, Superblock, corrupt

SEARCH_WINDOW = 1 << 16  # blocks of the map examined per numpy pass


class BlockAlloc:
    def __init__(self, bufs, sb: Superblock, used: np.ndarray):
        """`used`: one uint8 per block (1 = in use), the unpacked on-disk bitmap."""
        self.bufs, self.sb = bufs, sb
        self.busy = np.ascontiguousarray(used[: sb.nblocks], dtype=np.uint8).copy()
        self.busy[: sb.data_start] = 1
        self.nfree = int(sb.nblocks - sb.data_start - np.count_nonzero(self.busy[sb.data_start :]))
        self.pending: list[np.ndarray] = []
        self.npending = 0
        self.reserved = 0
        self.rotor = sb.data_start

    @staticmethod
    def unpack_bitmap(raw: bytes, nblocks: int) -> np.ndarray:
        return np.unpackbits(np.frombuffer(raw, np.uint8), bitorder="little")[:nblocks]

    def available(self) -> int:
        """Blocks free, or free once their free commits, and promised to nobody."""
        return self.nfree + self.npending - self.reserved

    def reserve(self, n: int, force: bool = False) -> int:
        """Promise n blocks; ENOSPC if fewer are available, unless ``force`` (pages already
        acknowledged must keep their promise): then returns how many were over-committed."""
        over = max(0, n - max(0, self.available()))
        if over and not force:
            raise FsError(
                errno.ENOSPC,
                f"no space left on the device: {n} blocks wanted, "
                f"{max(0, self.available())} available",
            )
        self.reserved += n
        return over

    def unreserve(self, n: int) -> None:
        if n > self.reserved:
            raise RuntimeError(
                f"block allocator: giving back {n} reserved blocks of {self.reserved}"
            )
        self.reserved -= n

    def alloc(self, n: int, goal: int | None = None, max_bm: int = 8) -> np.ndarray:
        sb = self.sb
        grant = min(n, self.nfree, self.available())
        if grant <= 0:
            raise FsError(
                errno.ENOSPC,
                f"no free blocks left on the device ({self.reserved} promised to dirty pages)",
            )
        goal = self.rotor if goal is None or not sb.data_start <= goal < sb.nblocks else int(goal)
        n = grant
        found, total = [], 0
        for lo, hi in ((goal, sb.nblocks), (sb.data_start, goal)):
            p = lo
            while p < hi and total < n:
                q = min(hi, p + max(SEARCH_WINDOW, 4 * n))
                idx = np.flatnonzero(self.busy[p:q] == 0)
                if idx.size:
                    take = idx[: n - total] + p
                    found.append(take)
                    total += take.size
                p = q
        blocks = np.concatenate(found).astype(np.int64) if found else np.zeros(0, np.int64)
        if blocks.size == 0:
            raise corrupt(f"block allocator: {self.nfree} blocks counted free but none found")
        bm = blocks // BITS_PER_BLOCK
        changes = np.flatnonzero(np.diff(bm)) + 1
        if changes.size >= max_bm:
            blocks = blocks[: changes[max_bm - 1]]
        self.busy[blocks] = 1
        self.nfree -= blocks.size
        self._set_bits(blocks, True)
        self.rotor = int(blocks[-1]) + 1
        if self.rotor >= sb.nblocks:
            self.rotor = sb.data_start
        return blocks.astype(np.uint32)

    def free(self, blocks) -> None:
        arr = np.asarray(blocks, dtype=np.int64).ravel()
        if arr.size == 0:
            return
        sb = self.sb
        bad = arr[(arr < sb.data_start) | (arr >= sb.nblocks)]
        if bad.size:
            raise corrupt(
                f"freeing block {int(bad[0])}, outside the data area "
                f"{sb.data_start}..{sb.nblocks - 1}"
            )
        if np.unique(arr).size != arr.size or not self.busy[arr].all():
            raise corrupt(f"freeing a block that is not in use (one of {arr[:8].tolist()}...)")
        self._set_bits(arr, False)
        self.pending.append(arr)
        self.npending += arr.size

    def release_pending(self) -> None:
        for arr in self.pending:
            self.busy[arr] = 0
            self.nfree += arr.size
        self.pending.clear()
        self.npending = 0

    def _set_bits(self, blocks: np.ndarray, value: bool) -> None:
        blocks = np.sort(blocks)
        bm = blocks // BITS_PER_BLOCK
        starts = np.flatnonzero(np.r_[True, np.diff(bm) != 0])
        ends = np.r_[starts[1:], blocks.size]
        for s, e in zip(starts.tolist(), ends.tolist()):
            k = int(bm[s])
            local = blocks[s:e] - k * BITS_PER_BLOCK
            byte, bit = local >> 3, (local & 7).astype(np.uint8)
            lo, hi = int(byte[0]), int(byte[-1]) + 1
            bno = self.sb.bitmap_start + k
            cur = np.frombuffer(self.bufs.read(bno), np.uint8)[lo:hi].copy()
            mask = (np.uint8(1) << bit).astype(np.uint8)
            was = (cur[byte - lo] & mask) != 0
            if value and was.any():
                b = int(blocks[s:e][was][0])
                raise corrupt(f"bitmap block {bno}: block {b} already marked in use")
            if not value and not was.all():
                b = int(blocks[s:e][~was][0])
                raise corrupt(f"bitmap block {bno}: block {b} already marked free")
            if value:
                np.bitwise_or.at(cur, byte - lo, mask)
            else:
                np.bitwise_and.at(cur, byte - lo, ~mask)
            self.bufs.write(bno, lo, cur.tobytes())


class InodeAlloc:
    def __init__(self, free: np.ndarray):
        self.free = np.asarray(free, dtype=bool).copy()
        self.free[0] = False
        self.nfree = int(np.count_nonzero(self.free))
        self.rotor = 1

    def alloc(self) -> int:
        if self.nfree <= 0:
            raise FsError(errno.ENOSPC, "no free inodes left")
        for lo, hi in ((self.rotor, self.free.size), (1, self.rotor)):
            seg = self.free[lo:hi]
            if seg.size:
                i = int(seg.argmax())
                if seg[i]:
                    ino = lo + i
                    self.free[ino] = False
                    self.nfree -= 1
                    self.rotor = ino + 1
                    return ino
        raise corrupt(f"inode allocator: {self.nfree} inodes counted free but none found")

    def release(self, ino: int) -> None:
        if self.free[ino]:
            raise corrupt(f"freeing inode {ino}, which is already free")
        self.free[ino] = True
        self.nfree += 1

    def in_use(self) -> np.ndarray:
        u = ~self.free
        u[0] = False
        return np.flatnonzero(u)
