"""Adopted pages: a dead kernel's file cache taken over in place by the page cache.

Promises to the page cache (kernel/core/pagecache.py, which mixes ``Adoption`` in) and through
it to a backup kernel (systems/orthros):

* ``Adopted`` pages — already checked — are taken over at mount: frames and descriptors
  stay where they are, dirty pages stay dirty and chained;
* ``Unchecked`` pages, clean and dirty, are taken over at mount with their checks still to
  do, so the outage pays for none of them. An entry is checked — descriptor and content
  checksums, and that it is still the page it was adopted as — before a byte of it is
  served, overwritten in part, written back or made a partial tail (with the entries after
  it, up to param.ADOPT_FIRST_USE_PAGES, as read-ahead would read them); one that fails is
  rejected, counted, its descriptor cleared and its frame freed: never served, never
  written to disk. A clean entry whose page is written, read from the disk or truncated
  first is dropped unread; a dirty one is checked first unless truncated (its data is
  nowhere else); one truncated unread is counted superseded (``superseded_dirty``: the
  request that cut or removed its file replaced its data), unless its file never reached
  the disk. ``check_unchecked`` checks the rest in batches.
* A checked dirty page joins its inode's dirty-page chain; its descriptor is rewritten
  only when its link differs from the dead kernel's.

Until an entry is checked, its frame is not free and its descriptor is the dead kernel's,
so a second crash in that window finds it as the first did.

* A rejected dirty page's data is lost: it is recorded in ``Lost`` (like Linux's hwpoison),
  so it reads as EIO, never as the disk's stale data or a hole. A page is lost when its
  descriptor is sound and its frame is not (the descriptor names it); when the descriptor
  itself is unsound its (inode, index) cannot be trusted, and the inode it claims loses its
  whole file (``Lost.files``), as does an inode whose in-core object was lost with dirty
  pages or which counted more dirty pages than were found (kernel/core/cachewalk.py).
  A lost page reads as EIO until a write covers it whole or a truncation drops it; a write
  into part of it is EIO too. A lost file reads as EIO, and a write needing a page from the
  disk is EIO, until it is truncated to size 0.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from kernel import param
from kernel.core.memreader import check_pages, page_problem
from kernel.hw.physmem import (
    ICORE,
    PAGE_DESC,
    PG_DIRTY,
    PG_META,
    PG_UPTODATE,
    PG_VALID,
    CorruptObject,
)

_HEAD = ICORE.index["dirty_pages_head"]
_KEY_SHIFT = np.uint64(32)
WHOLE_FILE = 1 << 32


class Lost:
    """Dirty pages of a dead kernel that could not be adopted: ``pages`` (ino -> indexes)
    read as EIO until overwritten whole or truncated; ``files``, whose lost pages are not
    known, read as EIO until truncated to 0. ``why``: one line per loss, for the report."""

    def __init__(self):
        self.pages: dict[int, set[int]] = {}
        self.files: set[int] = set()
        self.why: list[str] = []

    def __bool__(self) -> bool:
        return bool(self.pages or self.files)

    def page(self, ino: int, idx: int, why: str) -> None:
        self.pages.setdefault(ino, set()).add(idx)
        self.why.append(f"inode {ino} page {idx}: {why}")

    def file(self, ino: int, why: str) -> None:
        if ino not in self.files:
            self.files.add(ino)
            self.why.append(f"inode {ino} (the whole file): {why}")

    def any_page(self, ino: int, first: int, last: int) -> bool:
        """Whether the file is lost or a page first..last of it is."""
        if ino in self.files:
            return True
        s = self.pages.get(ino)
        return bool(s) and any(first <= i <= last for i in s)

    def overwritten(self, ino: int, first: int, n: int = 1) -> None:
        """Pages first .. first+n-1 were written whole: they hold data again."""
        s = self.pages.get(ino)
        if s:
            s.difference_update(range(first, first + n))
            if not s:
                del self.pages[ino]

    def truncated(self, ino: int, first: int) -> None:
        """Pages from ``first`` on are gone; at 0 the whole file is."""
        s = self.pages.get(ino)
        if s:
            s.difference_update([i for i in s if i >= first])
            if not s:
                del self.pages[ino]
        if not first:
            self.files.discard(ino)


@dataclass
class Adopted:
    """Pages of a dead kernel, validated, to be taken over in place (systems/orthros)."""

    frames: np.ndarray  # frame numbers
    ino: np.ndarray
    index: np.ndarray
    gen: np.ndarray
    csum: np.ndarray
    dirty: np.ndarray  # bool
    inodes: dict[int, dict]  # validated in-core inodes of the dead kernel's dirty inodes
    unchecked: "Unchecked | None" = None  # pages taken over to be checked on first use
    lost: Lost = field(default_factory=Lost)  # dirty pages found lost while collecting


class Unchecked:
    """Pages of a dead kernel, taken over in place with their checks still to do: a table
    of their frames sorted by key (ino << 32 | index; both must fit 32 bits), each clean or
    dirty as its descriptor claimed. ``left`` entries are still open."""

    def __init__(
        self,
        frames: np.ndarray,
        ino: np.ndarray,
        index: np.ndarray,
        dirty: np.ndarray | None = None,
    ):
        keys = (ino.astype(np.uint64) << _KEY_SHIFT) | index.astype(np.uint64)
        order = np.argsort(keys, kind="stable")
        self.keys, self.frames = keys[order], frames[order].astype(np.int64)
        self.dirty = (np.zeros(len(keys), bool) if dirty is None else np.asarray(dirty, bool))[
            order
        ]
        self.open = np.ones(len(keys), bool)
        self.left = len(keys)
        self.left_dirty = int(np.count_nonzero(self.dirty))
        self.good = 0  # checked, now cached
        self.good_dirty = 0  # of which dirty
        self.dropped = 0  # written, truncated or reclaimed unread
        self.superseded_dirty = 0  # of which dirty: truncated by a request, data replaced
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
        self.left_dirty -= int(np.count_nonzero(self.dirty[pos]))
        return self.frames[pos]


class Adoption:
    """The page cache's side of adoption (mixed into kernel/core/pagecache.py PageCache)."""

    def _adopt(self, a: Adopted) -> np.ndarray:
        """Take over checked pages in place: frames and descriptors stay where they are,
        and so do those of the unchecked pages; every other descriptor that could pass for
        one is cleared. Bulk operations, and Python work only per checked page (not per
        frame): this runs while the service is down. Returns the frames left free."""
        n = self.nframes
        held = np.zeros(n, bool)
        held[a.frames] = True
        if a.unchecked is not None and a.unchecked.left:
            held[a.unchecked.frames[a.unchecked.open]] = True
            self.unchecked = a.unchecked
        head = np.frombuffer(self.mem.mm, np.uint64, n * 8, self.lay.desc)[
            ::8
        ]  # magic, version, flags
        self._clear_descs(np.flatnonzero((head != 0) & ~held).tolist())
        desc = self.mem.array(PAGE_DESC.dtype, self.lay.desc, self.nframes)[a.frames]
        self._take_in(
            a.frames, a.ino, a.index, a.gen, a.csum, a.dirty, desc["next_dirty"], desc["dirtied_ns"]
        )
        return np.flatnonzero(~held)

    def _take_in(
        self,
        frames: np.ndarray,
        ino: np.ndarray,
        index: np.ndarray,
        gen: np.ndarray,
        csum: np.ndarray,
        dirty: np.ndarray,
        links: np.ndarray,
        dirtied: np.ndarray,
    ) -> None:
        """Cache checked pages in place (arrays, one entry per page; no key cached yet): bulk
        operations and C-level loops, no Python frame per page — a takeover brings tens of
        thousands of pages."""
        fl = frames.tolist()
        keys = list(zip(ino.tolist(), index.tolist()))
        self.index.update(zip(keys, fl))
        flags = np.where(dirty, PG_VALID | PG_UPTODATE | PG_DIRTY, PG_VALID | PG_UPTODATE).tolist()
        gens, csums = gen.tolist(), csum.tolist()
        # the frames come in runs of adjacent ones (a dead kernel allocates them in order):
        # one slice assignment per run and per list, not four stores per page
        cut = np.flatnonzero(np.diff(frames) != 1) + 1
        for lo, hi in zip([0, *cut.tolist()], [*cut.tolist(), len(fl)]) if fl else ():
            f0, f1 = fl[lo], fl[lo] + hi - lo
            self.key[f0:f1], self.gen[f0:f1] = keys[lo:hi], gens[lo:hi]
            self.csum[f0:f1], self.flags[f0:f1] = csums[lo:hi], flags[lo:hi]
        order = np.lexsort((index, ino))  # by inode, then index
        by_ino, idx_l = ino[order], index[order].tolist()
        bounds = np.flatnonzero(np.r_[True, by_ino[1:] != by_ino[:-1], True]).tolist()
        for lo, hi in zip(bounds[:-1], bounds[1:]) if idx_l else ():
            self.pages_of.setdefault(int(by_ino[lo]), set()).update(idx_l[lo:hi])
        clean = ~dirty
        self.lru.update(
            zip([keys[i] for i in np.flatnonzero(clean).tolist()], frames[clean].tolist())
        )
        order = order[dirty[order]]
        self._chain(ino[order], index[order], frames[order], links[order], dirtied[order])

    def _chain(
        self,
        ino: np.ndarray,
        index: np.ndarray,
        frames: np.ndarray,
        links: np.ndarray,
        dirtied: np.ndarray,
    ) -> None:
        """Put checked dirty pages (arrays sorted by inode, then index) at the head of their
        inodes' dirty-page chains; ``links`` and ``dirtied`` are their descriptors' own (the
        dead kernel's): only a descriptor whose link changes is rewritten."""
        if not len(frames):
            return
        phys = self.lay.desc + frames * PAGE_DESC.size
        want = np.empty_like(phys)
        want[1:] = phys[:-1]  # oldest (lowest index) first, head = newest
        starts = np.flatnonzero(np.r_[True, ino[1:] != ino[:-1]]).tolist()
        for lo, hi in zip(starts, [*starts[1:], len(frames)]):
            i = int(ino[lo])
            d = self.dirty.setdefault(i, {})
            want[lo] = self.ic.get(i)[_HEAD] if d else 0
            d.update(zip(index[lo:hi].tolist(), frames[lo:hi].tolist()))
            self.ic.set_dirty_pages(i, int(phys[hi - 1]), len(d))
        fl = frames.tolist()
        self._next_dirty.update(zip(fl, want.tolist()))
        self._dirtied.update(zip(fl, dirtied.tolist()))
        self.ndirty += len(fl)
        self._write_descs(frames[links.astype(np.int64) != want].tolist())

    # --- pages still to check -----------------------------------------------------------
    def _first_use(self, ino: int, idx: int) -> int | None:
        if not len(self.unchecked.find(ino, idx)):
            return None
        self._check_from(ino, idx)
        return self.index.get((ino, idx))

    def _check_from(self, ino: int, idx: int) -> None:
        """Check page (ino, idx) with the unchecked pages after it, as read-ahead would read
        them: a check has a fixed cost (≈ 250 µs, and ≈ 2 µs a page more, timed in one
        process on a cache built like `crashbench bench failover`'s) that a file read page
        by page would pay for every page."""
        self._check(self.unchecked.find(ino, idx, idx + param.ADOPT_FIRST_USE_PAGES))

    def cached(self, ino: int, idx: int) -> bool:
        """Whether page (ino, idx) is cached; an unchecked dirty page is checked now (its data
        is nowhere else), an unchecked clean one does not count (the disk has it)."""
        if (ino, idx) in self.index:
            return True
        if self.unchecked is not None:
            self._settle(ino, idx, keep_clean=True)
        return (ino, idx) in self.index

    def _settle(
        self, ino: int, idx: int, upto: int | None = None, keep_clean: bool = False
    ) -> None:
        """Before pages are replaced or read from the disk: their unchecked dirty entries
        are checked, their clean ones dropped unread (unless ``keep_clean``)."""
        u = self.unchecked
        pos = u.find(ino, idx, upto)
        if not len(pos):
            return
        dirty = u.dirty[pos]
        if upto is None and dirty[0]:
            self._check_from(ino, idx)
        elif dirty.any():
            self._check(pos[dirty])
        if not keep_clean and not dirty.all():
            self._drop_unchecked(pos[~dirty])

    def settle_dirty(self, ino: int) -> None:
        """Check every unchecked dirty page of ino: before a page of it comes from the disk,
        for one adopted under a corrupted index may be the page wanted (then it is lost)."""
        self._settle(ino, 0, WHOLE_FILE, keep_clean=True)

    def check_unchecked(self, n: int) -> int:
        """Check up to n unchecked pages (the caller holds the kernel lock); how many are left."""
        if self.unchecked is None:
            return 0
        self._check(np.flatnonzero(self.unchecked.open)[:n])
        return self.unchecked.left if self.unchecked is not None else 0

    def settle_checked(self, pos: np.ndarray, desc_ok: np.ndarray, ok: np.ndarray) -> None:
        """Apply the verdicts of memreader.check_pages on entries ``pos`` of the unchecked
        table, computed without the kernel lock (the caller holds it now). Entries closed
        since are skipped; an open entry's frame and descriptor are as adopted (its frame is
        not free, and nothing stores into it), so its verdict still holds."""
        if self.unchecked is None:
            return
        still = self.unchecked.open[pos]
        self._check(pos[still], (desc_ok[still], ok[still]))  # masks copy: the caller's stay

    def _check(self, pos: np.ndarray, verdict: tuple[np.ndarray, np.ndarray] | None = None) -> None:
        """Check unchecked pages in bulk (unless ``verdict`` is known): a sound one is cached
        in place, clean or dirty as it was adopted; one that fails is rejected, its
        descriptor cleared, its frame freed."""
        u = self.unchecked
        want, dirty = u.keys[pos], u.dirty[pos]
        frames = u.close(pos)
        desc_ok, ok = verdict or check_pages(self.mem, self.lay, frames)
        d = self.mem.array(PAGE_DESC.dtype, self.lay.desc, self.nframes)[frames]
        same = (((d["ino"] << _KEY_SHIFT) | d["index"]) == want) & (
            (d["flags"] & (PG_VALID | PG_DIRTY | PG_META))
            == np.where(dirty, PG_VALID | PG_DIRTY, PG_VALID)
        )
        desc_ok &= same  # still the page it was adopted as
        ok &= same
        for f, dok, key, drt in zip(
            frames[~ok].tolist(), desc_ok[~ok].tolist(), want[~ok].tolist(), dirty[~ok].tolist()
        ):
            e = page_problem(self.mem, self.lay, f, dok)
            u.rejected.append(e)
            if drt:
                self._lose(key >> 32, key & 0xFFFF_FFFF, dok, e)
        bad = frames[~ok].tolist()
        d, frames, dirty, want = d[ok], frames[ok], dirty[ok], want[ok]
        keys = zip(d["ino"].tolist(), d["index"].tolist())
        twice = np.fromiter(map(self.index.__contains__, keys), bool, len(frames))
        twice[1:] |= want[1:] == want[:-1]  # sorted by key: a repeat follows its first
        for f, ino, idx in zip(
            frames[twice].tolist(), d["ino"][twice].tolist(), d["index"][twice].tolist()
        ):
            u.rejected.append(
                CorruptObject(
                    PAGE_DESC.kind,
                    self.lay.desc_phys(f),
                    "index",
                    f"a second page {idx} of inode {ino}",
                )
            )
        take = ~twice
        d = d[take]
        self._take_in(
            frames[take],
            d["ino"].astype(np.int64),
            d["index"].astype(np.int64),
            d["gen"],
            d["content_csum"],
            dirty[take],
            d["next_dirty"],
            d["dirtied_ns"],
        )
        u.good += len(d)
        u.good_dirty += int(np.count_nonzero(dirty[take]))
        self._release(sorted(frames[twice].tolist() + bad))

    def _lose(self, ino: int, idx: int, desc_ok: bool, e: CorruptObject) -> None:
        """A rejected dirty page: lost. Only a sound descriptor (and still the page it was
        adopted as) says which page; otherwise the inode it was adopted for loses its file."""
        if desc_ok:
            self.lost.page(ino, idx, f"dirty page rejected ({e})")
        else:
            self.lost.file(
                ino,
                f"a dirty page adopted as its page {idx}, which no sound "
                f"descriptor names, was rejected ({e})",
            )

    def _drop_unchecked(self, pos: np.ndarray, superseded: bool = True) -> int:
        """Unchecked pages whose data is not needed (written, truncated, reclaimed): freed
        unread. Dirty ones among them (only a truncation drops those) were superseded — the
        file cut or removed after the takeover — unless ``superseded`` is False (their file
        was never created: they are lost, and counted so by whoever dropped them)."""
        if not len(pos):
            return 0
        self.unchecked.dropped += len(pos)
        if superseded:
            self.unchecked.superseded_dirty += int(np.count_nonzero(self.unchecked.dirty[pos]))
        self._release(np.sort(self.unchecked.close(pos)).tolist())
        return len(pos)

    def _release(self, frames: list[int]) -> None:
        """Frames of the unchecked table back to the free list, their descriptors cleared:
        a frame without a valid descriptor holds nothing for a later reader of this memory."""
        self._clear_descs(frames)
        self.free.extend(frames)
        if not self.unchecked.left:
            self.unchecked = None
