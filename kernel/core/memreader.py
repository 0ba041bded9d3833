"""Reading a kernel's objects out of raw physical memory — also after that kernel died.

Promises to recovery schemes (a backup kernel adopting a dead one's file cache) and to
``crashbench inspect``: nothing read here is trusted. Every object is checked for magic,
version and checksum; every pointer for lying inside the area it must point into, on an
object boundary; every list for loops; every page for matching its descriptor's content
checksum. What fails a check is reported as a CorruptObject naming the object, its
physical address, the field and why — and is never returned as good data.

The walk is superblock -> dirty-inode list -> in-core inode -> dirty-page chain -> page
descriptor -> frame, exactly what the Orthros backup OS walks. A corrupted link must not
cost more than the object it is in, so the walk is completed by a bulk scan (numpy) of the
in-core inode table and the descriptor array: every object that validates on its own and
says it is dirty is found, whether or not a broken list still reaches it.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

import numpy as np
from xxhash import xxh3_64_intdigest as _xxh3  # physmem.page_csum, minus its Python frame

from kernel import param
from kernel.hw.physmem import (
    I_ON_DIRTY_LIST,
    ICORE,
    KSUPER,
    PAGE_DESC,
    PART_HEADER,
    PG_DIRTY,
    PG_VALID,
    CorruptObject,
    PartLayout,
    PhysMem,
    page_csum,
    partition_layout,
)

PAGE = param.PAGE_SIZE
_DESC_UNPACK = PAGE_DESC._body.unpack_from
_CSUM_UNPACK = struct.Struct("<Q").unpack_from


@dataclass
class DirtyInode:
    icore: dict
    phys: int
    pages: list[dict] = field(
        default_factory=list
    )  # valid dirty page descriptors (+ "phys", "frame")
    rejected: list[CorruptObject] = field(default_factory=list)

    @property
    def missing(self) -> int:
        """Dirty pages the inode counts that were neither found valid nor rejected."""
        return max(0, self.icore["n_dirty"] - len(self.pages) - len(self.rejected))


@dataclass
class DirtyWalk:
    ksuper: dict | None
    inodes: list[DirtyInode] = field(default_factory=list)
    rejected: list[CorruptObject] = field(default_factory=list)

    @property
    def n_pages(self) -> int:
        return sum(len(i.pages) for i in self.inodes)

    @property
    def n_rejected(self) -> int:
        return len(self.rejected) + sum(len(i.rejected) for i in self.inodes)


class PartitionReader:
    """Decode one partition of a PhysMem (opened read-only by a foreign process, typically)."""

    def __init__(self, mem: PhysMem, base: int, size: int, part_id: int):
        self.mem = mem
        self.lay: PartLayout = partition_layout(part_id, base, size)
        self.buf = mem.mm
        self.view = memoryview(mem.mm)  # checksums without copies

    # --- objects ---------------------------------------------------------------------------
    def header(self) -> dict:
        h = PART_HEADER.decode(self.buf, self.lay.base)
        for k in (
            "base",
            "size",
            "ksuper",
            "crashk",
            "icore",
            "desc",
            "frames",
            "nframes",
            "n_icore",
        ):
            if h[k] != getattr(self.lay, k):
                raise CorruptObject(
                    PART_HEADER.kind,
                    self.lay.base,
                    k,
                    f"{h[k]:#x} disagrees with the machine layout ({getattr(self.lay, k):#x})",
                )
        return h

    def ksuper(self) -> dict:
        return KSUPER.decode(self.buf, self.lay.ksuper)

    def icore_at(self, phys: int) -> dict:
        self._check_ptr(
            phys, self.lay.icore, self.lay.n_icore, ICORE.size, ICORE.kind, "in-core inode table"
        )
        return ICORE.decode(self.buf, phys)

    def desc_at(self, phys: int) -> dict:
        self._check_ptr(
            phys,
            self.lay.desc,
            self.lay.nframes,
            PAGE_DESC.size,
            PAGE_DESC.kind,
            "page descriptor array",
        )
        d = PAGE_DESC.decode(self.buf, phys)
        d["phys"] = phys
        d["frame"] = (phys - self.lay.desc) // PAGE_DESC.size
        return d

    def frame_phys(self, desc: dict) -> int:
        return self.lay.frame_phys(desc["frame"])

    def page(self, desc: dict) -> bytes:
        """The frame's content, only if it matches the descriptor's content checksum."""
        p = self.frame_phys(desc)
        data = self.buf[p : p + PAGE]
        if page_csum(data) != desc["content_csum"]:
            raise CorruptObject(
                "page frame",
                p,
                "content",
                f"content checksum mismatch for inode {desc['ino']} page {desc['index']}",
            )
        return data

    def _check_ptr(
        self, phys: int, area: int, count: int, size: int, kind: str, where: str
    ) -> None:
        if phys < area or phys >= area + count * size:
            raise CorruptObject(
                kind,
                phys,
                "pointer",
                f"pointer {phys:#x} outside the partition's {where} "
                f"({area:#x}-{area + count * size:#x})",
            )
        if (phys - area) % size:
            raise CorruptObject(
                kind, phys, "pointer", f"pointer {phys:#x} not on a {size}-byte object boundary"
            )

    # --- lists ------------------------------------------------------------------------------
    def walk_dirty(self, pages: bool = True) -> DirtyWalk:
        """Superblock -> dirty-inode list -> dirty-page chains, completed by a bulk scan;
        corrupted objects are rejected and counted, never returned. ``pages=False`` stops
        at the in-core inodes (a caller that checks the page descriptors in bulk)."""
        try:
            ks = self.ksuper()
        except CorruptObject as e:
            walk = DirtyWalk(None, rejected=[e])
            self._rescue(walk, set(), pages)
            return walk
        walk = DirtyWalk(ks)
        seen: set[int] = set()
        phys = ks["dirty_inode_head"]
        while phys:
            if phys in seen:
                walk.rejected.append(
                    CorruptObject(ICORE.kind, phys, "next_dirty", "loop in the dirty-inode list")
                )
                break
            seen.add(phys)
            try:
                ic = self.icore_at(phys)
            except CorruptObject as e:
                walk.rejected.append(e)
                break  # the rest of the list hangs off a pointer we cannot trust
            di = DirtyInode(ic, phys)
            if pages:
                self._walk_pages(di)
            walk.inodes.append(di)
            phys = ic["next_dirty"]
        self._rescue(walk, seen, pages)
        return walk

    def _rescue(self, walk: DirtyWalk, seen: set[int], pages: bool = True) -> None:
        """Find, by scanning, the dirty inodes and pages a broken link hid from the walk."""
        bad = {e.phys for e in walk.rejected} | {e.phys for i in walk.inodes for e in i.rejected}
        arr = self.mem.array(ICORE.dtype, self.lay.icore, self.lay.n_icore)
        cand = np.flatnonzero(
            (arr["magic"] == ICORE.magic) & ((arr["flags"] & I_ON_DIRTY_LIST) != 0)
        )
        for slot in cand.tolist():
            phys = self.lay.icore_phys(slot)
            if phys in seen or phys in bad:
                continue
            try:
                di = DirtyInode(self.icore_at(phys), phys)
            except CorruptObject as e:
                walk.rejected.append(e)
                continue
            if pages:
                self._walk_pages(di)
            walk.inodes.append(di)
        if not pages:
            return
        by_ino = {i.icore["ino"]: i for i in walk.inodes}
        have = {d["phys"] for i in walk.inodes for d in i.pages}
        bad |= {e.phys for i in walk.inodes for e in i.rejected}
        darr = self.mem.array(PAGE_DESC.dtype, self.lay.desc, self.lay.nframes)
        want = PG_VALID | PG_DIRTY
        cand = np.flatnonzero((darr["magic"] == PAGE_DESC.magic) & ((darr["flags"] & want) == want))
        for frame in cand.tolist():
            phys = self.lay.desc_phys(frame)
            if phys in have or phys in bad:
                continue
            try:
                d = self.desc_at(phys)
            except CorruptObject as e:
                walk.rejected.append(e)
                continue
            owner = by_ino.get(d["ino"])
            if owner is None:
                walk.rejected.append(
                    CorruptObject(
                        PAGE_DESC.kind,
                        phys,
                        "ino",
                        f"dirty page of inode {d['ino']}, which is on no valid dirty-inode list",
                    )
                )
            else:
                d["found"] = "scan"
                owner.pages.append(d)

    def _walk_pages(self, di: DirtyInode) -> None:
        seen: set[int] = set()
        phys = di.icore["dirty_pages_head"]
        while phys:
            if phys in seen:
                di.rejected.append(
                    CorruptObject(
                        PAGE_DESC.kind,
                        phys,
                        "next_dirty",
                        f"loop in the dirty-page chain of inode {di.icore['ino']}",
                    )
                )
                return
            seen.add(phys)
            d = self._desc_fast(phys)
            if d is None:
                try:
                    d = self.desc_at(phys)  # it failed a check: say precisely which
                except CorruptObject as e:
                    di.rejected.append(e)
                    return
            if d["ino"] != di.icore["ino"] or not d["flags"] & PG_DIRTY:
                di.rejected.append(
                    CorruptObject(
                        PAGE_DESC.kind,
                        phys,
                        "ino",
                        f"descriptor of inode {d['ino']} (flags {d['flags']:#x}) "
                        f"on the dirty chain of inode {di.icore['ino']}",
                    )
                )
                return
            di.pages.append(d)
            phys = d["next_dirty"]

    def _desc_fast(self, phys: int) -> dict | None:
        """desc_at for the common case of a good descriptor, without copies; None when any
        check fails (the caller then asks desc_at for the precise error)."""
        lay = self.lay
        off = phys - lay.desc
        if off < 0 or off >= lay.nframes * 64 or off % 64:
            return None
        v = _DESC_UNPACK(self.buf, phys)
        if v[0] != PAGE_DESC.magic or v[1] != PAGE_DESC.version:
            return None
        if page_csum(self.view[phys : phys + 56]) != _CSUM_UNPACK(self.buf, phys + 56)[0]:
            return None
        return {
            "magic": v[0],
            "version": v[1],
            "flags": v[2],
            "ino": v[3],
            "index": v[4],
            "gen": v[5],
            "content_csum": v[6],
            "next_dirty": v[7],
            "dirtied_ns": v[8],
            "phys": phys,
            "frame": off // 64,
        }

    def scan_descriptors(self) -> np.ndarray:
        """Every descriptor that claims to hold a page (bulk, numpy): checksums not yet verified."""
        arr = self.mem.array(PAGE_DESC.dtype, self.lay.desc, self.lay.nframes)
        ok = (arr["magic"] == PAGE_DESC.magic) & ((arr["flags"] & PG_VALID) != 0)
        return np.flatnonzero(ok)


def checksums(view: memoryview, starts: np.ndarray, size: int) -> np.ndarray:
    """xxh3 of ``view[s:s + size]`` for every s: one C-level pass (map over slices), no
    Python frame per object — a takeover checks tens of thousands of pages."""
    ends = (starts + size).tolist()
    sums = map(_xxh3, map(view.__getitem__, map(slice, starts.tolist(), ends)))
    return np.fromiter(sums, np.uint64, len(starts))


def check_pages(mem: PhysMem, lay: PartLayout, frames: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For each of ``frames``, in bulk: (its descriptor is sound: magic, version, checksum;
    the page is sound: that, and the frame's content matches the descriptor's checksum)."""
    frames = np.asarray(frames, np.int64)
    d = mem.array(PAGE_DESC.dtype, lay.desc, lay.nframes)[frames]
    desc_ok = (
        (d["magic"] == PAGE_DESC.magic)
        & (d["version"] == PAGE_DESC.version)
        & (checksums(mem.view, lay.desc + frames * PAGE_DESC.size, PAGE_DESC.size - 8) == d["csum"])
    )
    content_ok = checksums(mem.view, lay.frames + frames * PAGE, PAGE) == d["content_csum"]
    return desc_ok, content_ok & desc_ok


def page_problem(mem: PhysMem, lay: PartLayout, frame: int, desc_ok: bool) -> CorruptObject:
    """The CorruptObject that says why a page failed check_pages."""
    if not desc_ok:
        phys = lay.desc_phys(frame)
        try:
            PAGE_DESC.decode(mem.mm, phys)
        except CorruptObject as e:
            return e
        return CorruptObject(PAGE_DESC.kind, phys, "checksum", "changed while it was checked")
    d = PAGE_DESC.unpack(mem.mm, lay.desc_phys(frame))
    return CorruptObject(
        "page frame",
        lay.frame_phys(frame),
        "content",
        f"content checksum mismatch for inode {d[3]} page {d[4]}",
    )
