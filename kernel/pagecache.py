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
* all stores go through PhysMem.write (frames and descriptors alike);
* clean pages adopted from a dead kernel unchecked (``Unchecked``) are checked — descriptor
  and content checksums — on their first use, before a byte of them is served; one that
  fails is rejected, counted, its descriptor cleared; one whose page is written, truncated
  or reclaimed first is dropped unread. ``check_unchecked`` checks the rest in batches.

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
from kernel.memreader import check_pages, page_problem
from kernel.physmem import (ICORE, PAGE_DESC, PG_DIRTY, PG_META, PG_UPTODATE, PG_VALID, CorruptObject,
                            PartLayout, PhysMem, page_csum)

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
    unchecked: "Unchecked | None" = None   # clean pages taken over to be checked on first use


_KEY_SHIFT = np.uint64(32)


class Unchecked:
    """Clean pages of a dead kernel, taken over in place with their checks still to do: a
    table of their frames sorted by key (ino << 32 | index; both must fit 32 bits). The
    page cache checks an entry on its first use; ``left`` entries are still open."""

    def __init__(self, frames: np.ndarray, ino: np.ndarray, index: np.ndarray):
        keys = (ino.astype(np.uint64) << _KEY_SHIFT) | index.astype(np.uint64)
        order = np.argsort(keys, kind="stable")
        self.keys, self.frames = keys[order], frames[order].astype(np.int64)
        self.open = np.ones(len(keys), bool)
        self.left = len(keys)
        self.good = 0                                  # checked, now cached
        self.dropped = 0                               # written, truncated or reclaimed unread
        self.rejected: list[CorruptObject] = []

    def find(self, ino: int, idx: int, upto: int | None = None) -> np.ndarray:
        """Open entries of page (ino, idx), or of pages idx .. upto-1 of ino."""
        lo = (ino << 32) + idx
        hi = lo + 1 if upto is None else (ino << 32) + upto
        a, b = np.searchsorted(self.keys, np.array([lo, hi], np.uint64))
        return a + np.flatnonzero(self.open[a:b])

    def close(self, pos: np.ndarray) -> np.ndarray:
        """Take entries out of the table; their frames."""
        self.open[pos] = False
        self.left -= len(pos)
        return self.frames[pos]


class FreeFrames:
    """The free frames, the lowest handed out first: frames given back (a Python list,
    last in first out) over an array of the frames free at mount, used from its end. An
    adopting mount builds one numpy array here instead of a Python int per free frame
    while the service is down."""

    def __init__(self, at_mount: np.ndarray):
        self._base, self._n, self._back = at_mount, len(at_mount), []   # base: descending

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

    def extend(self, frames) -> None:
        self._back.extend(frames)


class PageCache:
    def __init__(self, mem: PhysMem, lay: PartLayout, icache: ICache, adopt: Adopted | None = None):
        self.mem, self.lay, self.ic = mem, lay, icache
        n = lay.nframes
        self.nframes = n
        self.index: dict[tuple[int, int], int] = {}
        self.lru: OrderedDict[tuple[int, int], int] = OrderedDict()  # clean data pages
        self.free = FreeFrames(np.arange(n - 1, -1, -1) if adopt is None
                               else np.empty(0, np.int64))   # adopt: set there
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
        self.unchecked: Unchecked | None = None
        self._view = mem.view
        if adopt is None:
            # zero every descriptor: a frame with no valid descriptor holds nothing
            mem.write(lay.desc, bytes(n * PAGE_DESC.size))
        else:
            self._adopt(adopt)

    def _adopt(self, a: Adopted) -> None:
        """Take over validated pages in place: frames and descriptors stay where they are,
        and so do those of the unchecked clean pages; every other descriptor that could
        pass for one is cleared. Bulk operations, and Python work only per adopted page
        (not per frame): this runs while the service is down."""
        n = self.nframes
        held = np.zeros(n, bool)
        held[a.frames] = True
        if a.unchecked is not None and a.unchecked.left:
            held[a.unchecked.frames[a.unchecked.open]] = True
            self.unchecked = a.unchecked
        head = np.frombuffer(self.mem.mm, np.uint64, n * 8, self.lay.desc)[::8]  # magic, version, flags
        self._clear_descs(np.flatnonzero((head != 0) & ~held).tolist())
        self.free = FreeFrames(np.flatnonzero(~held)[::-1])
        frames = a.frames.tolist()
        keys = list(zip(a.ino.tolist(), a.index.tolist()))
        self.index = dict(zip(keys, frames))
        flags = np.where(a.dirty, PG_VALID | PG_UPTODATE | PG_DIRTY, PG_VALID | PG_UPTODATE).tolist()
        gens, csums = a.gen.tolist(), a.csum.tolist()
        # the frames come in runs of adjacent ones (a dead kernel allocates them in order):
        # one slice assignment per run and per list, not four stores per page
        cut = np.flatnonzero(np.diff(a.frames) != 1) + 1
        for lo, hi in zip([0, *cut.tolist()], [*cut.tolist(), len(frames)]) if frames else ():
            f0, f1 = frames[lo], frames[lo] + hi - lo
            self.key[f0:f1], self.gen[f0:f1] = keys[lo:hi], gens[lo:hi]
            self.csum[f0:f1], self.flags[f0:f1] = csums[lo:hi], flags[lo:hi]
        order = np.argsort(a.ino, kind="stable")
        by_ino, idx_l = a.ino[order], a.index[order].tolist()
        bounds = np.flatnonzero(np.r_[True, by_ino[1:] != by_ino[:-1], True]).tolist()
        for lo, hi in zip(bounds[:-1], bounds[1:]) if idx_l else ():
            self.pages_of[int(by_ino[lo])] = set(idx_l[lo:hi])
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
        fl = d_frames.tolist()
        self._next_dirty.update(zip(fl, want.tolist()))
        self._dirtied.update(dict.fromkeys(fl, now))
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

    def _clear_descs(self, frames: list[int]) -> None:
        """Clear many descriptors (sorted frames), one store per run of adjacent ones."""
        self._store_runs(frames, lambda i, j: bytes((j - i) * 64), self.lay.desc, 64)

    # --- lookup and insertion ----------------------------------------------------------
    def lookup(self, ino: int, idx: int) -> int | None:
        f = self.index.get((ino, idx))
        if f is None and self.unchecked is not None:
            f = self._first_use(ino, idx)
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
        if self.unchecked is not None:
            self._drop_unchecked(self.unchecked.find(ino, idx))
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
            if self.unchecked is not None:
                self._drop_unchecked(self.unchecked.find(ino, idx))
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
                if self.unchecked is not None:
                    self._drop_unchecked(self.unchecked.find(ino, first + i))
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
        if self.unchecked is not None:   # and the page before: it may become a partial tail
            self._drop_unchecked(self.unchecked.find(ino, max(first_idx - 1, 0), 1 << 32))
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
        if self.unchecked is not None:
            got = self._drop_unchecked(np.flatnonzero(self.unchecked.open)[:n])
        while got < n and self.lru:
            key, f = self.lru.popitem(last=False)
            self.lru[key] = f  # _drop_frame pops it again
            self._drop_frame(f)
            got += 1
        self.stats["evictions"] += got
        return got

    # --- adopted pages still to check ---------------------------------------------------
    def _first_use(self, ino: int, idx: int) -> int | None:
        pos = self.unchecked.find(ino, idx)
        if not len(pos):
            return None
        self._check(pos)
        return self.index.get((ino, idx))

    def check_unchecked(self, n: int) -> int:
        """Check up to n unchecked pages (the caller holds the kernel lock); how many are left."""
        if self.unchecked is None:
            return 0
        self._check(np.flatnonzero(self.unchecked.open)[:n])
        return self.unchecked.left if self.unchecked is not None else 0

    def _check(self, pos: np.ndarray) -> None:
        """Check unchecked pages in bulk: a sound one is cached as a clean page, in place; one
        that fails is rejected, its descriptor cleared and its frame freed."""
        u = self.unchecked
        want = u.keys[pos]
        frames = u.close(pos)
        desc_ok, ok = check_pages(self.mem, self.lay, frames)
        d = self.mem.array(PAGE_DESC.dtype, self.lay.desc, self.nframes)[frames]
        same = (((d["ino"] << _KEY_SHIFT) | d["index"]) == want) \
            & ((d["flags"] & (PG_VALID | PG_DIRTY | PG_META)) == PG_VALID)
        desc_ok &= same     # still the clean page it was adopted as
        ok &= same
        bad = []
        for f, ino, idx, gen, cs in zip(frames[ok].tolist(), d["ino"][ok].tolist(),
                                        d["index"][ok].tolist(), d["gen"][ok].tolist(),
                                        d["content_csum"][ok].tolist()):
            key = (ino, idx)
            if key in self.index:
                u.rejected.append(CorruptObject(PAGE_DESC.kind, self.lay.desc_phys(f), "index",
                                                f"a second page {idx} of inode {ino}"))
                bad.append(f)
                continue
            self.key[f], self.flags[f], self.gen[f], self.csum[f] = key, PG_VALID | PG_UPTODATE, gen, cs
            self.index[key] = f
            self.pages_of.setdefault(ino, set()).add(idx)
            self.lru[key] = f
            u.good += 1
        for f, dok in zip(frames[~ok].tolist(), desc_ok[~ok].tolist()):
            u.rejected.append(page_problem(self.mem, self.lay, f, dok))
            bad.append(f)
        self._release(sorted(bad))

    def _drop_unchecked(self, pos: np.ndarray) -> int:
        """Unchecked pages whose data is not needed (written, truncated, reclaimed): freed unread."""
        if not len(pos):
            return 0
        self.unchecked.dropped += len(pos)
        self._release(np.sort(self.unchecked.close(pos)).tolist())
        return len(pos)

    def _release(self, frames: list[int]) -> None:
        """Frames of the unchecked table back to the free list, their descriptors cleared:
        a frame without a valid descriptor holds nothing for a later reader of this memory."""
        self._clear_descs(frames)
        self.free.extend(frames)
        if not self.unchecked.left:
            self.unchecked = None
