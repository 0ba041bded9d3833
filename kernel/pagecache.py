"""The page cache: file pages in page frames of the partition's physical memory.

Promises to the VFS and the write-back code:

* a page of a file (ino, index) lives in one 4 KiB frame; its **page descriptor**
  (physmem.PAGE_DESC: ino, index, flags, generation, xxh3 checksum of the frame's content)
  is rewritten whenever the frame changes, so a foreign kernel can check each page;
* every dirty page of an inode is on that inode's dirty-page chain (descriptor.next_dirty,
  head in the in-core inode), and every inode with dirty pages is on the dirty-inode list
  hanging off the kernel superblock (kernel/icache.py): that is all a backup kernel needs
  to find the dirty file cache in the raw memory of a dead kernel;
* clean pages are reclaimed in LRU order under memory pressure; dirty pages and metadata
  pages (ino 0, flag META) are never reclaimed;
* all stores go through PhysMem.write (frames and descriptors alike).

The generation of a page increases on every store, so write-back can tell whether the
page changed while it was being written (then it stays dirty).
"""
from __future__ import annotations

import time
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np

from kernel import param
from kernel.icache import ICache
from kernel.physmem import (ICORE, PAGE_DESC, PG_DIRTY, PG_META, PG_UPTODATE, PG_VALID, PartLayout,
                            PhysMem, page_csum)

PAGE = param.PAGE_SIZE
ZERO_PAGE = bytes(PAGE)
_MAGIC, _VERSION = PAGE_DESC.magic, PAGE_DESC.version
_HEAD = ICORE.index["dirty_pages_head"]


@dataclass
class Adopted:
    """Pages of a dead kernel, validated, to be taken over in place (systems/orthros)."""
    frames: np.ndarray      # frame numbers
    ino: np.ndarray
    index: np.ndarray
    gen: np.ndarray
    csum: np.ndarray
    dirty: np.ndarray       # bool
    inodes: dict[int, dict] # validated in-core inodes of the dead kernel's dirty inodes


def _scatter(n: int, where: np.ndarray, values: np.ndarray) -> list[int]:
    out = np.zeros(n, np.uint64)
    out[where] = values
    return out.tolist()


class PageCache:
    def __init__(self, mem: PhysMem, lay: PartLayout, icache: ICache, adopt: Adopted | None = None):
        self.mem, self.lay, self.ic = mem, lay, icache
        n = lay.nframes
        self.nframes = n
        self.index: dict[tuple[int, int], int] = {}
        self.lru: OrderedDict[tuple[int, int], int] = OrderedDict()  # clean data pages
        self.free = list(range(n - 1, -1, -1))
        self.key: list = [None] * n
        self.flags = [0] * n
        self.gen = [0] * n
        self.csum = [0] * n  # content checksum last written into each descriptor
        self.dirty: dict[int, dict[int, int]] = {}  # ino -> {index: frame}, oldest first
        self._next_dirty: dict[int, int] = {}  # frame -> phys of the next descriptor in its chain
        self._dirtied: dict[int, int] = {}     # frame -> monotonic ns it became dirty
        self.ndirty = 0
        self.pages_of: dict[int, set[int]] = {}  # ino -> indexes cached
        self.stats = {"hits": 0, "misses": 0, "evictions": 0}
        self._view = mem.view
        if adopt is None:
            # zero every descriptor: a frame with no valid descriptor holds nothing
            mem.write(lay.desc, bytes(n * PAGE_DESC.size))
        else:
            self._adopt(adopt)

    def _adopt(self, a: Adopted) -> None:
        """Take over validated pages in place: frames and descriptors stay where they are;
        every other descriptor is cleared, in one store. Bulk operations throughout: this
        runs while the service is down."""
        n = self.nframes
        raw = np.frombuffer(self.mem.mm, np.uint8, n * 64, self.lay.desc).reshape(n, 64)
        keep = np.zeros((n, 64), np.uint8)
        keep[a.frames] = raw[a.frames]
        self.mem.write(self.lay.desc, keep.tobytes())
        taken = np.zeros(n, bool)
        taken[a.frames] = True
        self.free = np.flatnonzero(~taken)[::-1].tolist()
        frames, inos, idxs = a.frames.tolist(), a.ino.tolist(), a.index.tolist()
        keys = list(zip(inos, idxs))
        self.index = dict(zip(keys, frames))
        key = self.key
        for f, k in zip(frames, keys):
            key[f] = k
        self.gen = _scatter(n, a.frames, a.gen)       # whole lists at once: a loop per page
        self.csum = _scatter(n, a.frames, a.csum)     # is what the outage would pay for
        self.flags = _scatter(n, a.frames, np.where(a.dirty, PG_VALID | PG_UPTODATE | PG_DIRTY,
                                                    PG_VALID | PG_UPTODATE))
        for ino in np.unique(a.ino).tolist():
            self.pages_of[ino] = set(a.index[a.ino == ino].tolist())
        clean = ~a.dirty
        self.lru = OrderedDict(zip([keys[i] for i in np.flatnonzero(clean).tolist()],
                                   a.frames[clean].tolist()))
        self._adopt_dirty(a)

    def _adopt_dirty(self, a: Adopted) -> None:
        """Dirty pages stay dirty, chained by index; only descriptors whose link differs
        from the dead kernel's chain are rewritten."""
        d_frames, d_inos, d_idx = a.frames[a.dirty], a.ino[a.dirty], a.index[a.dirty]
        if not len(d_frames):
            return
        order = np.lexsort((d_idx, d_inos))
        d_frames, d_inos, d_idx = d_frames[order], d_inos[order], d_idx[order]
        phys = self.lay.desc + d_frames * 64
        want = np.zeros_like(phys)
        same = np.zeros(len(phys), bool)
        same[1:] = d_inos[1:] == d_inos[:-1]
        want[1:][same[1:]] = phys[:-1][same[1:]]     # oldest (lowest index) first, head = newest
        have = self.mem.array(PAGE_DESC.dtype, self.lay.desc, self.nframes)["next_dirty"][d_frames]
        now = time.monotonic_ns()
        self._next_dirty.update(zip(d_frames.tolist(), want.tolist()))
        self._dirtied.update((f, now) for f in d_frames.tolist())
        self._write_descs(d_frames[have != want].tolist())
        self.ndirty += len(d_frames)
        bounds = np.flatnonzero(np.r_[True, d_inos[1:] != d_inos[:-1], True])
        for lo, hi in zip(bounds[:-1].tolist(), bounds[1:].tolist()):
            ino = int(d_inos[lo])
            self.dirty[ino] = dict(zip(d_idx[lo:hi].tolist(), d_frames[lo:hi].tolist()))
            self.ic.set_dirty_pages(ino, int(phys[hi - 1]), hi - lo)

    # --- frames and descriptors --------------------------------------------------------
    def frame_view(self, frame: int) -> memoryview:
        p = self.lay.frames + frame * PAGE
        return self._view[p:p + PAGE]

    def _desc_bytes(self, f: int) -> bytes:
        ino, idx = self.key[f]
        return PAGE_DESC.encode_tuple((_MAGIC, _VERSION, self.flags[f], ino, idx, self.gen[f],
                                       self.csum[f], self._next_dirty.get(f, 0),
                                       self._dirtied.get(f, 0)))

    def _write_desc(self, frame: int, csum: int | None = None) -> None:
        """Rewrite a descriptor; csum None means the frame's content changed: checksum it."""
        if csum is None:
            csum = page_csum(self.frame_view(frame))
        self.csum[frame] = csum
        self.mem.write(self.lay.desc + frame * 64, self._desc_bytes(frame))

    def _write_descs(self, frames: list[int]) -> None:
        """Rewrite many descriptors (content unchanged), one store per run of adjacent ones."""
        if frames:
            frames = sorted(frames)
            self._store_runs(frames, lambda i, j: b"".join(self._desc_bytes(f) for f in frames[i:j]),
                             self.lay.desc, 64)

    def _clear_desc(self, frame: int) -> None:
        self.mem.write(self.lay.desc + frame * 64, bytes(64))

    # --- lookup and insertion ----------------------------------------------------------
    def lookup(self, ino: int, idx: int) -> int | None:
        f = self.index.get((ino, idx))
        if f is not None:
            self.stats["hits"] += 1
            if (ino, idx) in self.lru:
                self.lru.move_to_end((ino, idx))
        return f

    def _alloc_frame(self) -> int:
        if not self.free:
            self.reclaim(param.EVICT_BATCH)
        if not self.free:
            raise MemoryError("page cache: every frame is dirty or pinned "
                              "(write-back must run before more pages can be cached)")
        return self.free.pop()

    def insert(self, ino: int, idx: int, data, meta: bool = False) -> int:
        """Cache a clean page read from the device (data shorter than a page is zero-filled)."""
        self.stats["misses"] += 1
        f = self._alloc_frame()
        key = (ino, idx)
        p = self.lay.frames + f * PAGE
        if len(data) < PAGE:
            data = bytes(data) + bytes(PAGE - len(data))
        self.mem.write(p, data)
        self.key[f], self.flags[f] = key, PG_VALID | PG_UPTODATE | (PG_META if meta else 0)
        self.gen[f] += 1
        self._write_desc(f, page_csum(data))
        self.index[key] = f
        self.pages_of.setdefault(ino, set()).add(idx)
        if not meta:
            self.lru[key] = f
        return f

    def store(self, ino: int, idx: int, off: int, data, meta: bool = False) -> int:
        """Write data into a cached page (the caller filled it first if partial) and dirty it."""
        key = (ino, idx)
        f = self.index.get(key)
        if f is None:
            f = self._alloc_frame()
            self.key[f], self.flags[f] = key, PG_VALID | PG_UPTODATE | (PG_META if meta else 0)
            self.index[key] = f
            self.pages_of.setdefault(ino, set()).add(idx)
            if len(data) != PAGE:
                self.mem.write(self.lay.frames + f * PAGE, ZERO_PAGE)
        p = self.lay.frames + f * PAGE + off
        self.mem.write(p, data)
        self.gen[f] += 1
        csum = page_csum(data) if len(data) == PAGE else None
        if not self.flags[f] & PG_DIRTY:
            self._make_dirty(ino, idx, f, csum)
        else:
            self._write_desc(f, csum)
        return f

    def store_pages(self, ino: int, first: int, data: memoryview) -> None:
        """Overwrite whole pages first, first+1, ... with data (a multiple of PAGE) and dirty
        them: the bulk path of sequential writes, one store per run of adjacent frames."""
        n = len(data) // PAGE
        frames = []
        for i in range(n):
            key = (ino, first + i)
            f = self.index.get(key)
            if f is None:
                f = self._alloc_frame()
                self.key[f], self.flags[f] = key, PG_VALID | PG_UPTODATE
                self.index[key] = f
                self.pages_of.setdefault(ino, set()).add(first + i)
            frames.append(f)
        self._store_runs(frames, lambda i, j: data[i * PAGE:j * PAGE], self.lay.frames, PAGE)
        d = self.dirty.setdefault(ino, {})
        head = self.ic.get(ino)[_HEAD] if d else 0
        now = time.monotonic_ns()
        descs = []
        newly = 0
        for i, f in enumerate(frames):
            self.gen[f] += 1
            if not self.flags[f] & PG_DIRTY:
                self.flags[f] |= PG_DIRTY
                self._next_dirty[f] = head
                self._dirtied[f] = now
                self.lru.pop((ino, first + i), None)
                d[first + i] = f
                self.ndirty += 1
                newly += 1
                head = self.lay.desc + f * 64
            self.csum[f] = page_csum(data[i * PAGE:(i + 1) * PAGE])
            descs.append(self._desc_bytes(f))
        self._store_runs(frames, lambda i, j: b"".join(descs[i:j]), self.lay.desc, 64)
        if newly:
            self.ic.set_dirty_pages(ino, head, len(d))

    def _store_runs(self, frames: list[int], chunk, area: int, size: int) -> None:
        i = 0
        while i < len(frames):
            j = i + 1
            while j < len(frames) and frames[j] == frames[j - 1] + 1:
                j += 1
            self.mem.write(area + frames[i] * size, chunk(i, j))
            i = j

    # --- the dirty-page chain ---------------------------------------------------------

    def _make_dirty(self, ino: int, idx: int, f: int, csum: int | None) -> None:
        d = self.dirty.setdefault(ino, {})
        head = self.ic.get(ino)[_HEAD] if d else 0
        self.flags[f] |= PG_DIRTY
        self._next_dirty[f] = head
        self._dirtied[f] = time.monotonic_ns()
        self.lru.pop((ino, idx), None)
        self._write_desc(f, csum)
        d[idx] = f
        self.ndirty += 1
        self.ic.set_dirty_pages(ino, self.lay.desc + f * 64, len(d))

    def dirty_pages(self, ino: int) -> list[tuple[int, int, int]]:
        """(index, frame, generation) of every dirty page of ino, by index."""
        d = self.dirty.get(ino, {})
        return sorted((i, f, self.gen[f]) for i, f in d.items())

    def mark_clean(self, ino: int, written: list[tuple[int, int, int]]) -> None:
        """Pages written back at the given generations are clean unless stored to since."""
        d = self.dirty.get(ino)
        if not d:
            return
        cleaned = []
        for idx, f, g in written:
            if d.get(idx) == f and self.gen[f] == g:
                del d[idx]
                self.flags[f] &= ~PG_DIRTY
                self._next_dirty.pop(f, None)
                self._dirtied.pop(f, None)
                cleaned.append(f)
                if not self.flags[f] & PG_META:
                    self.lru[(ino, idx)] = f
        self.ndirty -= len(cleaned)
        self._write_descs(cleaned)
        self._rechain(ino)

    def _rechain(self, ino: int) -> None:
        d = self.dirty.get(ino, {})
        prev = 0
        moved = []
        for f in d.values():  # oldest first, so the newest ends at the head
            if self._next_dirty.get(f) != prev:
                self._next_dirty[f] = prev
                moved.append(f)
            prev = self.lay.desc + f * 64
        self._write_descs(moved)
        if not d:
            self.dirty.pop(ino, None)
        self.ic.set_dirty_pages(ino, prev, len(d))

    # --- removal ----------------------------------------------------------------------
    def _drop_frame(self, f: int) -> None:
        ino, idx = self.key[f]
        del self.index[(ino, idx)]
        self.lru.pop((ino, idx), None)
        s = self.pages_of.get(ino)
        if s is not None:
            s.discard(idx)
            if not s:
                del self.pages_of[ino]
        self.key[f], self.flags[f] = None, 0
        self._next_dirty.pop(f, None)
        self._dirtied.pop(f, None)
        self._clear_desc(f)
        self.free.append(f)

    def truncate(self, ino: int, first_idx: int) -> int:
        """Drop every page of ino at index >= first_idx, dirty or not; returns dirty dropped."""
        idxs = [i for i in self.pages_of.get(ino, ()) if i >= first_idx]
        d = self.dirty.get(ino, {})
        dropped = 0
        for i in idxs:
            f = self.index[(ino, i)]
            if i in d:
                del d[i]
                self.ndirty -= 1
                dropped += 1
            self._drop_frame(f)
        if dropped:
            self._rechain(ino)
        return dropped

    def truncate_one(self, ino: int, idx: int) -> None:
        f = self.index[(ino, idx)]
        d = self.dirty.get(ino, {})
        if d.pop(idx, None) is not None:
            self.ndirty -= 1
            self._drop_frame(f)
            self._rechain(ino)
        else:
            self._drop_frame(f)

    def reclaim(self, n: int) -> int:
        """Evict up to n clean, unpinned pages, least recently used first."""
        got = 0
        while got < n and self.lru:
            key, f = self.lru.popitem(last=False)
            self.lru[key] = f  # _drop_frame pops it again
            self._drop_frame(f)
            got += 1
        self.stats["evictions"] += got
        return got
