"""The page cache: file pages in page frames of the partition's physical memory.

Promises to the VFS and the write-back code:

* a page of a file (ino, index) lives in one 4 KiB frame; its **page descriptor**
  (physmem.PAGE_DESC: ino, index, flags, generation, xxh3 checksum of the frame's content)
  is rewritten whenever the frame changes, so a foreign kernel can check each page;
* every dirty page of an inode is on that inode's dirty-page chain (descriptor.next_dirty,
  head in the in-core inode), and every inode with dirty pages is on the dirty-inode list
  hanging off the kernel superblock (kernel/core/icache.py): that is all a backup kernel needs
  to find the dirty file cache in the raw memory of a dead kernel;
* clean pages are reclaimed in LRU order under memory pressure; dirty pages and metadata
  pages (ino 0, flag META) are never reclaimed;
* all stores go through PhysMem.write (frames and descriptors alike);
* pages adopted from a dead kernel, checked or not, are taken over in place
  (kernel/core/pageadopt.py says what is promised about the unchecked ones); ``cached`` is the
  only way to ask whether a page is cached, because it checks an unchecked dirty page;
* ``lost`` holds the dirty pages of a dead kernel that could not be adopted: a write that
  covers one whole, or a truncation, ends its loss (the VFS answers EIO for the rest);
* a frame lent to another layer (``lend_frame``, the undo record of kernel/core/bufcache.py) is
  never looked up, reclaimed or written back; what ``describe_lent`` stores in it carries a
  descriptor like any page's, so a reader of raw memory can check it, until ``blank_lent``.
* ``stats`` counts, since this kernel mounted, every ``lookup`` (a file page a read wants)
  as a hit (cached, adopted pages included) or a miss (to be read from the device), and
  the pages evicted; the kernel's ``status`` reply carries them (docs/METRICS.md, "Cache
  hit ratio");
* a page's content is checked against the checksum its descriptor was last given before a
  part of it is stored into (``store``: the new checksum would cover what a wild store left
  there) and before it is written back (``check_before_writeback``); a page that fails is
  a panic at site "pagecache" (``faults.found_corruption``), never written to disk;
* free frames are handed out lowest first, except those named to ``free.hand_out_last``
  (frames a VMM beneath the kernel keeps warm copies in), which come after all the others.

The generation of a page increases on every store, so write-back can tell whether the
page changed while it was being written (then it stays dirty).
"""

from __future__ import annotations

import time
from collections import OrderedDict

import numpy as np

from kernel import param
from kernel.core.faults import NoFaults
from kernel.core.icache import ICache
from kernel.core.pageadopt import WHOLE_FILE, Adopted, Adoption, Lost, Unchecked
from kernel.hw.physmem import (
    ICORE,
    PAGE_DESC,
    PG_DIRTY,
    PG_META,
    PG_UPTODATE,
    PG_VALID,
    PartLayout,
    PhysMem,
    page_csum,
)

__all__ = ["Adopted", "FreeFrames", "Lost", "PageCache", "Unchecked"]

PAGE = param.PAGE_SIZE
ZERO_PAGE = bytes(PAGE)
_MAGIC, _VERSION = PAGE_DESC.magic, PAGE_DESC.version
_HEAD = ICORE.index["dirty_pages_head"]


class FreeFrames:
    """The free frames, the lowest handed out first: frames given back (a Python list,
    last in first out) over an array of the frames free at mount, used from its end. An
    adopting mount builds one numpy array here instead of a Python int per free frame
    while the service is down."""

    def __init__(self, at_mount: np.ndarray):
        self._base, self._n, self._back = at_mount, len(at_mount), []  # base: descending

    def __len__(self) -> int:
        return self._n + len(self._back)

    def pop(self) -> int:
        if self._back:
            return self._back.pop()
        if not self._n:
            raise IndexError("no free frame")
        self._n -= 1
        return int(self._base[self._n])

    def append(self, frame: int) -> None:
        self._back.append(frame)

    def hand_out_last(self, frames: np.ndarray) -> None:
        """Of the frames free at mount, hand out these after all the others (each group
        still lowest first): a VMM keeps warm copies in them (kernel/hw/vmm.py), and a frame
        the kernel fills loses its copy once the VMM's spare pages are used up."""
        rest = self._base[: self._n]
        held = np.isin(rest, frames)
        self._base = np.concatenate([rest[held], rest[~held]])  # used from its end

    def extend(self, frames) -> None:
        self._back.extend(frames)


class PageCache(Adoption):
    def __init__(self, mem: PhysMem, lay: PartLayout, icache: ICache, adopt: Adopted | None = None):
        self.mem, self.lay, self.ic = mem, lay, icache
        n = lay.nframes
        self.nframes = n
        self.index: dict[tuple[int, int], int] = {}
        self.lru: OrderedDict[tuple[int, int], int] = OrderedDict()  # clean data pages
        self.key: list = [None] * n
        self.flags = [0] * n
        self.gen = [0] * n
        self.csum = [0] * n  # content checksum last written into each descriptor
        self.dirty: dict[int, dict[int, int]] = {}  # ino -> {index: frame}, oldest first
        self._next_dirty: dict[int, int] = {}  # frame -> phys of the next descriptor in its chain
        self._dirtied: dict[int, int] = {}  # frame -> monotonic ns it became dirty
        self.ndirty = 0
        self.pages_of: dict[int, set[int]] = {}  # ino -> indexes cached
        self.stats = {"hits": 0, "misses": 0, "evictions": 0}
        self.unchecked: Unchecked | None = None
        self.lost = (
            adopt.lost if adopt is not None else Lost()
        )  # read as EIO (kernel/core/pageadopt.py)
        self._view = mem.view
        self.faults = NoFaults()  # the VFS hands down its kernel's injector
        # the VFS hands down its own (kernel/core/vfs.py ``found_corruption``)
        self.found_corruption = lambda site, why: self.faults.found_corruption(site, why)
        if adopt is None:
            # zero every descriptor: a frame with no valid descriptor holds nothing
            mem.write(lay.desc, bytes(n * PAGE_DESC.size))
            self.free = FreeFrames(np.arange(n - 1, -1, -1))
        else:
            self.free = FreeFrames(self._adopt(adopt)[::-1])

    # --- frames and descriptors --------------------------------------------------------
    def frame_view(self, frame: int) -> memoryview:
        p = self.lay.frames + frame * PAGE
        return self._view[p : p + PAGE]

    def _desc_bytes(self, f: int) -> bytes:
        ino, idx = self.key[f]
        return PAGE_DESC.encode_tuple(
            (
                _MAGIC,
                _VERSION,
                self.flags[f],
                ino,
                idx,
                self.gen[f],
                self.csum[f],
                self._next_dirty.get(f, 0),
                self._dirtied.get(f, 0),
            )
        )

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
            self._store_runs(
                frames,
                lambda i, j: b"".join(self._desc_bytes(f) for f in frames[i:j]),
                self.lay.desc,
                64,
            )

    def _check_content(self, f: int, before: str) -> None:
        """Panic if frame f no longer holds what its checksum was computed over."""
        now = page_csum(self.frame_view(f))
        if now != self.csum[f]:
            ino, idx = self.key[f]
            self.found_corruption(
                "pagecache",
                f"pagecache: inode {ino} page {idx} (frame {f}) fails its checksum before "
                f"{before} (descriptor {self.csum[f]:#x}, content {now:#x})",
            )

    def check_before_writeback(self, frames: list[int]) -> None:
        for f in frames:
            self._check_content(f, "write-back")

    def _clear_desc(self, frame: int) -> None:
        self.mem.write(self.lay.desc + frame * 64, bytes(64))

    def _clear_descs(self, frames: list[int]) -> None:
        """Clear many descriptors (sorted frames), one store per run of adjacent ones."""
        self._store_runs(frames, lambda i, j: bytes((j - i) * 64), self.lay.desc, 64)

    # --- lookup and insertion ----------------------------------------------------------
    def lookup(self, ino: int, idx: int) -> int | None:
        f = self.index.get((ino, idx))
        if f is None and self.unchecked is not None:
            f = self._first_use(ino, idx)
        if f is None:
            self.stats["misses"] += 1
            return None
        self.stats["hits"] += 1
        if (ino, idx) in self.lru:
            self.lru.move_to_end((ino, idx))
        return f

    def _alloc_frame(self) -> int:
        if not self.free:
            self.reclaim(param.EVICT_BATCH)
        if not self.free:
            raise MemoryError(
                "page cache: every frame is dirty or pinned "
                "(write-back must run before more pages can be cached)"
            )
        return self.free.pop()

    def insert(self, ino: int, idx: int, data, meta: bool = False) -> int:
        """Cache a clean page read from the device (data shorter than a page is zero-filled)."""
        key = (ino, idx)
        if self.unchecked is not None:
            self._settle(ino, idx)
            if key in self.index:  # an adopted dirty page: newer than the disk
                return self.index[key]
        f = self._alloc_frame()
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
        if f is None and self.unchecked is not None:
            self._settle(ino, idx)
            f = self.index.get(key)
        if f is None:
            f = self._alloc_frame()
            self.key[f], self.flags[f] = key, PG_VALID | PG_UPTODATE | (PG_META if meta else 0)
            self.index[key] = f
            self.pages_of.setdefault(ino, set()).add(idx)
            if len(data) != PAGE:
                self.mem.write(self.lay.frames + f * PAGE, ZERO_PAGE)
        elif len(data) != PAGE:
            self._check_content(f, "a partial store")
        p = self.lay.frames + f * PAGE + off
        self.mem.write(p, data)
        self.gen[f] += 1
        csum = page_csum(data) if len(data) == PAGE else None
        if self.lost and csum is not None:
            self.lost.overwritten(ino, idx)
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
            if f is None and self.unchecked is not None:
                self._settle(ino, first + i)
                f = self.index.get(key)
            if f is None:
                f = self._alloc_frame()
                self.key[f], self.flags[f] = key, PG_VALID | PG_UPTODATE
                self.index[key] = f
                self.pages_of.setdefault(ino, set()).add(first + i)
            frames.append(f)
        self._store_runs(frames, lambda i, j: data[i * PAGE : j * PAGE], self.lay.frames, PAGE)
        if self.lost:
            self.lost.overwritten(ino, first, n)
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
            self.csum[f] = page_csum(data[i * PAGE : (i + 1) * PAGE])
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

    # --- frames lent to another layer ---------------------------------------------------
    def lend_frame(self) -> int:
        """A frame out of the cache until given back with ``take_back``."""
        return self._alloc_frame()

    def describe_lent(self, f: int, ino: int, idx: int, page, flags: int) -> None:
        """Store a whole page into lent frame f and its descriptor: one store each."""
        self.mem.write(self.lay.frames + f * PAGE, page)
        self.gen[f] += 1
        self.mem.write(
            self.lay.desc + f * 64,
            PAGE_DESC.encode_tuple(
                (_MAGIC, _VERSION, flags, ino, idx, self.gen[f], page_csum(page), 0, 0)
            ),
        )

    def blank_lent(self, frames: list[int]) -> None:
        """Clear the descriptors of lent frames (sorted): one store per run of adjacent ones."""
        self._clear_descs(frames)

    def take_back(self, frames: list[int]) -> None:
        self.free.extend(frames)

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
        """(index, frame, generation) of every dirty page of ino, by index; its unchecked
        adopted dirty pages are checked first (what is written back must be sound)."""
        if self.unchecked is not None:
            self._settle(ino, 0, WHOLE_FILE, keep_clean=True)
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

    def truncate(self, ino: int, first_idx: int, orphaned: bool = False) -> int:
        """Drop every page of ino at index >= first_idx, dirty or not; returns dirty dropped.
        ``orphaned``: the file never reached the disk, so adopted dirty pages dropped here
        are lost rather than superseded (pageadopt ``_drop_unchecked``)."""
        if self.unchecked is not None and first_idx:  # the page before may become a partial tail
            self._settle(ino, first_idx - 1)
        if self.unchecked is not None:
            self._drop_unchecked(
                self.unchecked.find(ino, first_idx, WHOLE_FILE), superseded=not orphaned
            )
        if self.lost:
            self.lost.truncated(ino, first_idx)
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
        """Evict up to n clean, unpinned pages, least recently used first (never used:
        unchecked adopted pages, first)."""
        got = 0
        if self.unchecked is not None:  # clean ones only: a dirty page's data is nowhere else
            u = self.unchecked
            got = self._drop_unchecked(np.flatnonzero(u.open & ~u.dirty)[:n])
        while got < n and self.lru:
            key, f = self.lru.popitem(last=False)
            self.lru[key] = f  # _drop_frame pops it again
            self._drop_frame(f)
            got += 1
        self.stats["evictions"] += got
        return got
