"""Cache walk: what a recovering kernel takes from a dead kernel's memory.

Promises to every scheme that adopts a dead kernel's file cache (the Orthros backup on
another partition, the Otherworld crash kernel on the same one): ``collect`` walks the dead
kernel's superblock, dirty-inode list, in-core inodes and page descriptors out of raw memory
(kernel/core/memreader.py: every object and pointer checked, lists checked for loops, a
broken link costing only its own object) and returns the pages to adopt: the file pages as a
table to be checked on first use or in the background (kernel/core/pageadopt.py
``Unchecked``: descriptor and content checksums, before a byte is served or written back),
the few that do not fit that table checked now — plus the dead kernel's running journal
transaction (its metadata pages checked now), with the operation in progress undone from its
undo record (kernel/core/bufcache.py), for kernel/tools/txncomplete.py to commit. What fails
a check is counted and described, and never served or written to disk; a dirty page that
fails, or whose inode is lost, is recorded as lost (kernel/core/pageadopt.py ``Lost``) so it
reads as EIO, never as stale data. It reads memory only.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from kernel.core.bufcache import UNDO_INO
from kernel.core.icache import BDEV_INO
from kernel.core.memreader import PartitionReader, check_pages, page_problem
from kernel.core.pageadopt import Adopted, Lost, Unchecked
from kernel.hw.physmem import PAGE_DESC, PG_DIRTY, PG_META, PG_VALID, CorruptObject, PhysMem


@dataclass
class Harvest:
    adopted: Adopted
    meta_blocks: dict[int, bytes]  # the running transaction, to complete; {} if none
    rejected: list[CorruptObject] = field(default_factory=list)
    txn_refused: str = ""  # why the running transaction was not completed
    pages_before: int = 0  # file pages the dead kernel claimed to cache
    dirty_before: int = 0  # of which dirty
    undone: int = 0  # blocks put back as before the operation in progress

    @property
    def n_dirty(self) -> int:
        return int(np.count_nonzero(self.adopted.dirty))


def collect(mem: PhysMem, base: int, size: int, part_id: int, check=None) -> Harvest:
    """``check(frames) -> (desc_ok, ok)``: memreader.check_pages over this partition, unless
    the caller shares the work out (systems/orthros/checker.py)."""
    r = PartitionReader(mem, base, size, part_id)
    walk = r.walk_dirty(pages=False)  # superblock and dirty in-core inodes, checked
    rejected = list(walk.rejected)
    inodes = {i.icore["ino"]: i.icore for i in walk.inodes if i.icore["ino"] != BDEV_INO}
    check = check or (lambda frames: check_pages(mem, r.lay, frames))
    lost = Lost()
    good, later, bad_meta, bad_undo, dirty_before, claimed, claims = _pages(
        r, set(inodes), rejected, check, lost
    )
    meta, undo = (
        _blocks(r, good["meta"], good["meta_index"]),
        _blocks(r, good["undo"], good["undo_index"]),
    )
    refused, undone = "", 0
    if walk.ksuper is None:
        refused, meta = "kernel superblock corrupted", {}
    elif bad_meta:
        refused, meta = "a metadata page of the running transaction was corrupted", {}
    elif walk.ksuper["handles_open"] and bad_undo:
        refused, meta = (
            ("the kernel died inside a file-system operation whose undo record was corrupted"),
            {},
        )
    elif walk.ksuper["handles_open"]:
        meta.update(undo)  # the operation in progress, undone: its blocks as before it
        undone = len(undo)
    lazy_owners = (later.keys[later.dirty] >> np.uint64(32)).astype(np.int64)
    owners, n = np.unique(np.r_[claims, lazy_owners], return_counts=True)
    found = dict(zip(owners.tolist(), n.tolist()))  # dirty pages claiming each inode
    for i, ic in inodes.items():
        if ic["n_dirty"] > found.get(i, 0):  # the rest lost their descriptors: which, unknown
            lost.file(
                i,
                f"{ic['n_dirty'] - found.get(i, 0)} of its {ic['n_dirty']} dirty pages "
                "were found by no sound descriptor",
            )
            found.setdefault(i, 0)
    a = Adopted(
        good["frame"],
        good["ino"],
        good["index"],
        good["gen"],
        good["csum"],
        good["dirty"],
        {i: inodes[i] for i in found if i in inodes},
        later,
        lost,
    )
    return Harvest(
        a, meta, rejected, refused, pages_before=claimed, dirty_before=dirty_before, undone=undone
    )


def _blocks(r: PartitionReader, frames: np.ndarray, index: np.ndarray) -> dict[int, bytes]:
    out = {}
    for fr, idx in zip(frames.tolist(), index.tolist()):
        p = r.lay.frame_phys(fr)
        out[idx] = r.buf[p : p + 4096]
    return out


def _pages(r: PartitionReader, dirty_inodes: set[int], rejected: list, check, lost: Lost):
    """Every page descriptor that claims a page, chosen in bulk (numpy). File pages, clean
    and dirty, are adopted unchecked (kernel/core/pageadopt.py Unchecked), to be checked on
    first use or after first service: checking the 32,768 dirty pages of `crashbench bench
    failover` now took ≈ 50 ms and putting them in the page cache's tables ≈ 38 ms, two
    thirds of the outage. Checked now, in bulk (memreader.check_pages), are the metadata
    pages of the running transaction and what does not fit the table: a key over 32 bits,
    or a dirty page whose inode is on no valid dirty-inode list (homeless, if sound). A dirty
    page rejected here, or homeless, is recorded in ``lost``; so is, whole, a dirty inode
    whose in-core object was lost or a rejected descriptor claims (its index is unsure).
    Also returns the inode each dirty file page checked here claims."""
    lay = r.lay
    arr = r.mem.array(PAGE_DESC.dtype, lay.desc, lay.nframes)
    # magic, version and flags are the first 8 bytes: one pass over the array, not three
    head = np.frombuffer(r.mem.mm, np.uint64, lay.nframes * 8, lay.desc)[::8]
    want = np.uint64(PAGE_DESC.magic | PAGE_DESC.version << 32 | PG_VALID << 48)
    mask = np.uint64(0xFFFF_FFFF_FFFF | PG_VALID << 48)
    cand = np.flatnonzero((head & mask) == want)
    flags = (head[cand] >> np.uint64(48)).astype(np.uint16)
    is_meta = (flags & PG_META) != 0
    is_dirty = (flags & PG_DIRTY) != 0
    ino, index = arr["ino"][cand], arr["index"][cand]
    is_undo = ino == UNDO_INO
    # clean metadata pages are not taken (the new kernel reads metadata from the disk),
    # but the undo record is (kernel/core/bufcache.py)
    keep = ~is_meta | is_dirty | is_undo
    cand, is_meta, is_dirty, ino, index = (
        cand[keep],
        is_meta[keep],
        is_dirty[keep],
        ino[keep],
        index[keep],
    )
    is_undo = is_undo[keep]
    owned = np.isin(ino, np.fromiter(dirty_inodes, np.int64, len(dirty_inodes)))
    lazy = ~is_meta & ~is_undo & (ino < 1 << 32) & (index < 1 << 32) & (~is_dirty | owned)
    later = Unchecked(cand[lazy], ino[lazy], index[lazy], is_dirty[lazy])
    cand, is_meta, is_dirty, ino, index, owned = (
        cand[~lazy],
        is_meta[~lazy],
        is_dirty[~lazy],
        ino[~lazy],
        index[~lazy],
        owned[~lazy],
    )
    is_undo = is_undo[~lazy]
    desc_ok, ok = check(cand)
    file_dirty = is_dirty & ~is_meta & ~is_undo
    for fr, dok, fd, i, x in zip(
        cand[~ok].tolist(),
        desc_ok[~ok].tolist(),
        file_dirty[~ok].tolist(),
        ino[~ok].tolist(),
        index[~ok].tolist(),
    ):
        e = page_problem(r.mem, lay, fr, dok)
        rejected.append(e)
        if fd and dok:
            lost.page(i, x, f"dirty page rejected ({e})")
        elif fd and i in dirty_inodes:
            lost.file(
                i, f"a dirty page claiming it, which no sound descriptor names, was rejected ({e})"
            )
    homeless = ok & file_dirty & ~owned
    for fr, i, x in zip(cand[homeless].tolist(), ino[homeless].tolist(), index[homeless].tolist()):
        rejected.append(
            CorruptObject(
                PAGE_DESC.kind,
                lay.desc_phys(fr),
                "ino",
                f"dirty page of inode {i}, which is on no valid dirty-inode list",
            )
        )
        lost.page(i, x, "dirty page of an in-core inode that was lost")
        lost.file(i, "its in-core inode (unsynced size and times) was lost with dirty pages")
    take = ok & ~is_meta & ~is_undo & ~homeless
    f = cand[take]
    good = {
        "frame": f,
        "ino": arr["ino"][f].astype(np.int64),
        "index": arr["index"][f].astype(np.int64),
        "gen": arr["gen"][f].astype(np.int64),
        "csum": arr["content_csum"][f],
        "dirty": file_dirty[take],
        "meta": cand[ok & is_meta & ~is_undo],
        "meta_index": arr["index"][cand[ok & is_meta & ~is_undo]],
        "undo": cand[ok & is_undo],
        "undo_index": arr["index"][cand[ok & is_undo]],
    }
    bad_meta = bool(np.count_nonzero(~ok & is_meta & ~is_undo))
    bad_undo = bool(np.count_nonzero(~ok & is_undo))
    claimed = int(np.count_nonzero(~is_meta)) + later.left
    return (
        good,
        later,
        bad_meta,
        bad_undo,
        int(np.count_nonzero(file_dirty)) + later.left_dirty,
        claimed,
        ino[file_dirty].astype(np.int64),
    )
