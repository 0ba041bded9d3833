"""The block map of an inode: direct, single, double and triple indirect pointers.

Part of FileSystem (kernel/core/fs.py, a mixin). Promises to the rest of the file system:

* ``_map(inode, fblock, count, alloc)`` returns the disk blocks of a run of file blocks
  (0 = hole) with one tree walk per indirect leaf, not per block; with ``alloc`` it fills
  holes (allocating indirect blocks, zeroed, on the way) and modifies ``inode.addrs`` in
  place (the caller stores the inode). Newly allocated data blocks are reported so that
  nobody reads their stale contents;
* ``_trim(inode, cut)`` frees every block that maps file block ``cut`` or later, and every
  indirect block left with nothing under it, from the end of the file backwards;
* both call ``self._progress(inode, low)`` between bounded steps (a leaf, one allocator or
  free batch): there the tree is consistent — every freed block is unreferenced, every
  allocated one is referenced — so the file system may commit the running transaction
  there if it would otherwise outgrow the journal's limit;
* a pointer outside the data area is corruption: FsError(EUCLEAN) naming the inode, the
  pointer and the valid range. It is never followed.

Pointers are u32 block numbers; NPTR per indirect block. File block f lives in
direct[f] (f < NDIRECT), else under single (NPTR blocks), double (NPTR^2), triple (NPTR^3).
"""

from __future__ import annotations

import struct

import numpy as np

from kernel import param
from kernel.core.disklayout import NPTR, Inode, corrupt

BSIZE = param.BLOCK_SIZE
ND = param.NDIRECT
ZERO_BLOCK = bytes(BSIZE)
# (root slot in inode.addrs, depth, first file block it maps)
ROOTS = ((ND, 1, ND), (ND + 1, 2, ND + NPTR), (ND + 2, 3, ND + NPTR + NPTR**2))
MAX_FBLOCKS = ND + NPTR + NPTR**2 + NPTR**3
FREE_BATCH = 8  # distinct bitmap blocks touched by one free or alloc batch
_PTR = struct.Struct("<I")


def _root_of(f: int) -> tuple[int, int, int]:
    for slot, depth, base in reversed(ROOTS):
        if f >= base:
            return slot, depth, base
    raise ValueError(f)


class BlockMapMixin:
    # provided by FileSystem: sb, bufs, balloc, _progress, _free_meta, _unwritten

    def _check_ptrs(self, inode: Inode, arr: np.ndarray) -> None:
        sb = self.sb
        bad = (arr != 0) & ((arr < sb.data_start) | (arr >= sb.nblocks))
        if bad.any():
            p = int(arr[bad][0])
            raise corrupt(
                f"inode {inode.ino}: block pointer {p} out of range "
                f"(data blocks {sb.data_start}..{sb.nblocks - 1})"
            )

    def _check_ptr(self, inode: Inode, p: int) -> int:
        if p and not self.sb.data_start <= p < self.sb.nblocks:
            raise corrupt(
                f"inode {inode.ino}: block pointer {p} out of range "
                f"(data blocks {self.sb.data_start}..{self.sb.nblocks - 1})"
            )
        return p

    def _ptrs(self, blk: int) -> np.ndarray:
        return np.frombuffer(self.bufs.read(blk), dtype="<u4")

    def _new_indirect(self, goal: int) -> int:
        b = int(self.balloc.alloc(1, goal)[0])
        self.bufs.write(b, 0, ZERO_BLOCK)
        self.faults.at("fs.block-alloc")
        return b

    # --- lookup and allocation ---------------------------------------------------------
    def _map(
        self, inode: Inode, fblock: int, count: int, alloc: bool = False, data: bool = True
    ) -> tuple[np.ndarray, np.ndarray]:
        """(disk blocks, mask of the ones allocated by this call) for fblock..fblock+count-1."""
        out = np.zeros(count, dtype=np.uint32)
        new = np.zeros(count, dtype=bool)
        pos = 0
        goal = 0
        while pos < count:
            f = fblock + pos
            if f < ND:
                n = min(count - pos, ND - f)
                arr = np.array(inode.addrs[f : f + n], dtype=np.uint32)
                self._check_ptrs(inode, arr)
                if alloc and not arr.all():

                    def store(a, f=f, n=n):
                        inode.addrs[f : f + n] = a.tolist()

                    new[pos : pos + n] = self._fill(inode, arr, goal, data, store)
            else:
                slot, depth, base = _root_of(f)
                rel = f - base
                off = rel % NPTR
                n = min(count - pos, NPTR - off)
                if alloc:
                    self._progress(inode, None)
                leaf = self._leaf(inode, slot, depth, rel, alloc, goal)
                if leaf == 0:
                    arr = np.zeros(n, dtype=np.uint32)
                else:
                    arr = self._ptrs(leaf)[off : off + n].copy()
                    self._check_ptrs(inode, arr)
                    if alloc and not arr.all():
                        lo = int(np.flatnonzero(arr == 0)[0])
                        got = self._fill(
                            inode,
                            arr,
                            goal or leaf + 1,
                            data,
                            lambda a: self.bufs.write(leaf, (off + lo) * 4, a[lo:].tobytes()),
                        )
                        new[pos : pos + n] = got
            out[pos : pos + n] = arr
            nz = arr[arr != 0]
            if nz.size:
                goal = int(nz[-1]) + 1
            pos += n
        return out, new

    def _fill(self, inode: Inode, arr: np.ndarray, goal: int, data: bool, store=None) -> np.ndarray:
        """Allocate a block for every 0 in arr (in place), in bitmap-bounded batches."""
        got = np.zeros(arr.size, dtype=bool)
        holes = np.flatnonzero(arr == 0)
        while holes.size:
            # data blocks whose free is pending come back with a commit (the tree is
            # consistent here); metadata callers are mid-operation, so they get ENOSPC
            if got.any() or (data and self.balloc.nfree < holes.size):
                self._progress(inode, None)
            blocks = self.balloc.alloc(holes.size, goal or None, FREE_BATCH)
            k = blocks.size
            arr[holes[:k]] = blocks
            got[holes[:k]] = True
            self.faults.at("fs.block-alloc")
            if data:
                self._unwritten.append(blocks)
            if store is not None:
                store(arr)
            goal = int(blocks[-1]) + 1
            holes = holes[k:]
        return got

    def _leaf(self, inode: Inode, slot: int, depth: int, rel: int, alloc: bool, goal: int) -> int:
        """The leaf indirect block mapping `rel` under root `slot` (0 if absent and not alloc)."""
        blk = self._check_ptr(inode, inode.addrs[slot])
        if blk == 0:
            if not alloc:
                return 0
            blk = inode.addrs[slot] = self._new_indirect(goal)
        for level in range(depth - 1, 0, -1):
            idx = (rel // NPTR**level) % NPTR
            child = self._check_ptr(inode, int(self._ptrs(blk)[idx]))
            if child == 0:
                if not alloc:
                    return 0
                child = self._new_indirect(blk + 1)
                self.bufs.write(blk, idx * 4, _PTR.pack(child))
            blk = child
        return blk

    # --- freeing ---------------------------------------------------------------------------
    def _trim(self, inode: Inode, cut: int, meta: bool = False) -> None:
        """Free every block mapping file block >= cut, and every indirect block left empty;
        `meta`: the leaves are metadata (directory or symlink blocks), so they are forgotten
        and revoked, not just freed."""
        for slot, depth, base in reversed(ROOTS):
            blk = self._check_ptr(inode, inode.addrs[slot])
            if blk == 0 or base + NPTR**depth <= cut:
                continue
            if self._trim_node(inode, blk, depth, base, cut, meta):
                inode.addrs[slot] = 0
                self._iput(inode)
                self._free_meta(blk)
                self._progress(inode, max(base, cut))
        live = [i for i in range(max(cut, 0), ND) if inode.addrs[i]]
        if live:
            blocks = [self._check_ptr(inode, inode.addrs[i]) for i in live]
            for i in live:
                inode.addrs[i] = 0
            self._iput(inode)
            if meta:
                for b in blocks:
                    self._free_meta(b)
            else:
                self.balloc.free(blocks)
            self._progress(inode, live[0])

    def _trim_node(
        self, inode: Inode, blk: int, depth: int, base: int, cut: int, meta: bool
    ) -> bool:
        """Trim the subtree of indirect block `blk`; True if nothing is left under it."""
        ptrs = self._ptrs(blk).copy()
        self._check_ptrs(inode, ptrs)
        span = NPTR ** (depth - 1)
        first = max(0, (cut - base) // span) if cut > base else 0
        live = np.flatnonzero(ptrs[first:]) + first
        if depth == 1:
            # from the end, in batches that touch a bounded number of bitmap blocks
            live = live[::-1]
            bm = ptrs[live].astype(np.int64) // (BSIZE * 8)
            cuts = np.flatnonzero(np.diff(bm)) + 1
            bounds = [0] + cuts[FREE_BATCH - 1 :: FREE_BATCH].tolist() + [live.size]
            for s, e in zip(bounds, bounds[1:]):
                if s == e:
                    continue
                idx = live[s:e]
                freed = ptrs[idx].copy()
                ptrs[idx] = 0
                lo, hi = int(idx.min()), int(idx.max()) + 1
                self.bufs.write(blk, lo * 4, ptrs[lo:hi].tobytes())
                if meta:
                    for b in freed.tolist():
                        self._free_meta(b)
                else:
                    self.balloc.free(freed)
                self._progress(inode, base + lo)
            return not ptrs.any()
        for i in live[::-1].tolist():
            child = int(ptrs[i])
            cbase = base + i * span
            if self._trim_node(inode, child, depth - 1, cbase, cut, meta):
                ptrs[i] = 0
                self.bufs.write(blk, i * 4, b"\0\0\0\0")
                self._free_meta(child)
                self._progress(inode, max(cbase, cut))
        return not ptrs.any()
