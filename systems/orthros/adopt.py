"""File-cache migration: what a backup kernel takes from a dead kernel's memory.

Promises to the Orthros takeover: ``collect`` walks the dead kernel's superblock, dirty-inode
list, in-core inodes and page descriptors out of raw memory (kernel/memreader.py: every
object and pointer checked, lists checked for loops, a broken link costing only its own
object), checks every page it would keep against its content checksum, and returns the
pages to adopt — clean and dirty — as arrays, plus the dead kernel's running journal
transaction when it is safe to complete (no file-system operation was in progress). What
fails a check is counted and described, and never reaches the disk.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from kernel.icache import BDEV_INO
from kernel.memreader import PartitionReader
from kernel.pagecache import Adopted
from kernel.physmem import (PAGE_DESC, PG_DIRTY, PG_META, PG_VALID, CorruptObject, PhysMem,
                            page_csum)


@dataclass
class Harvest:
    adopted: Adopted
    meta_blocks: dict[int, bytes]          # the running transaction, to complete; {} if none
    rejected: list[CorruptObject] = field(default_factory=list)
    txn_refused: str = ""                  # why the running transaction was not completed
    clean_checked: int = 0
    pages_before: int = 0                  # file pages the dead kernel claimed to cache
    dirty_before: int = 0                  # of which dirty

    @property
    def n_dirty(self) -> int:
        return int(np.count_nonzero(self.adopted.dirty))


def collect(mem: PhysMem, base: int, size: int, part_id: int) -> Harvest:
    r = PartitionReader(mem, base, size, part_id)
    walk = r.walk_dirty()
    rejected = list(walk.rejected)
    frames, inos, idxs, gens, csums, dirty = [], [], [], [], [], []
    inodes: dict[int, dict] = {}
    meta: dict[int, bytes] = {}
    meta_bad = False
    dirty_before = 0
    for di in walk.inodes:
        ino = di.icore["ino"]
        rejected += di.rejected
        if ino != BDEV_INO:
            dirty_before += len(di.pages) + len(di.rejected) + di.missing
        if ino == BDEV_INO:
            meta_bad = bool(di.rejected)
        for d in di.pages:
            if not r.page_ok(d):
                try:
                    r.page(d)               # the precise rejection
                except CorruptObject as e:
                    rejected.append(e)
                meta_bad |= ino == BDEV_INO
                continue
            if ino == BDEV_INO:
                meta[d["index"]] = r.page(d)
                continue
            frames.append(d["frame"]); inos.append(ino); idxs.append(d["index"])
            gens.append(d["gen"]); csums.append(d["content_csum"]); dirty.append(True)
        if ino != BDEV_INO and di.pages:
            inodes[ino] = di.icore
    checked = _clean_pages(r, set(frames), frames, inos, idxs, gens, csums, dirty, rejected)
    orphans = sum(1 for e in walk.rejected if e.kind == PAGE_DESC.kind and e.field == "ino")
    refused = ""
    if walk.ksuper is None:
        refused, meta = "kernel superblock corrupted", {}
    elif walk.ksuper["handles_open"]:
        refused = f"the kernel died inside a file-system operation ({walk.ksuper['handles_open']} open)"
        meta = {}
    elif meta_bad:
        refused, meta = "a metadata page of the running transaction was corrupted", {}
    a = Adopted(np.array(frames, np.int64), np.array(inos, np.int64), np.array(idxs, np.int64),
                np.array(gens, np.int64), np.array(csums, np.uint64), np.array(dirty, bool), inodes)
    return Harvest(a, meta, rejected, refused, checked, pages_before=dirty_before + orphans + checked,
                   dirty_before=dirty_before + orphans)


def _clean_pages(r: PartitionReader, taken: set[int], frames, inos, idxs, gens, csums, dirty,
                 rejected) -> int:
    """Every clean file page whose descriptor and content check out. Candidates are chosen
    in bulk (numpy); each is then checked with two checksums over the raw bytes, with no
    per-page decoding (the cost of adopting a large clean cache)."""
    lay = r.lay
    arr = r.mem.array(PAGE_DESC.dtype, lay.desc, lay.nframes)
    flags = arr["flags"]
    cand = np.flatnonzero((arr["magic"] == PAGE_DESC.magic) & (arr["version"] == PAGE_DESC.version)
                          & ((flags & PG_VALID) != 0) & ((flags & (PG_DIRTY | PG_META)) == 0)
                          & (arr["ino"] != 0))
    if taken:
        cand = cand[~np.isin(cand, np.fromiter(taken, np.int64, len(taken)))]
    view = memoryview(r.buf)
    dcs, ccs = arr["csum"][cand].tolist(), arr["content_csum"][cand].tolist()
    desc0, frame0, body = lay.desc, lay.frames, PAGE_DESC.size - 8
    good = []
    for f, dc, cc in zip(cand.tolist(), dcs, ccs):
        d = desc0 + f * PAGE_DESC.size
        if page_csum(view[d:d + body]) != dc:
            rejected.append(CorruptObject(PAGE_DESC.kind, d, "checksum",
                                          "bad checksum (object was modified or torn)"))
            continue
        p = frame0 + f * 4096
        if page_csum(view[p:p + 4096]) != cc:
            rejected.append(CorruptObject("page frame", p, "content",
                                          f"content checksum mismatch for inode "
                                          f"{int(arr['ino'][f])} page {int(arr['index'][f])}"))
            continue
        good.append(f)
    view.release()
    g = np.array(good, np.int64)
    frames += good
    inos += arr["ino"][g].tolist()
    idxs += arr["index"][g].tolist()
    gens += arr["gen"][g].tolist()
    csums += arr["content_csum"][g].tolist()
    dirty += [False] * len(good)
    return len(cand)


def complete_transaction(dev, blocks: dict[int, bytes]) -> int:
    """Commit the dead kernel's running transaction on its disk, as the dead kernel would
    have at its next commit, before the file system is mounted: replay what the log holds,
    commit the adopted metadata blocks as one more transaction, write it home."""
    from kernel.disklayout import SB_BLOCK, Superblock
    from kernel.journal import Journal
    if not blocks:
        return 0
    sb = Superblock.unpack(dev.read(SB_BLOCK), dev.path)
    js, jl = sb.journal_start, sb.journal_len
    j = Journal(dev, js, jl, sb.csum_seed,
                home_ok=lambda b: 0 < b < sb.nblocks and not js <= b < js + jl)
    j.replay()
    for b in blocks:
        if not (0 < b < sb.nblocks) or js <= b < js + jl:
            raise CorruptObject("metadata page", 0, "index",
                                f"block {b} of the running transaction is outside the file system")
    j.commit(dict(blocks))
    j.checkpoint()
    return len(blocks)
