"""What a crashed kernel's memory held: the "before" side of every recovery report.

Read from raw memory with the same distrust as everything else (kernel/core/memreader.py):
valid file-page descriptors are counted as cached pages, dirty pages found by the
dirty-inode walk (completed by the bulk scan) as dirty; metadata pages (inode 0) are not
file cache and are not counted.
"""

from __future__ import annotations

import numpy as np

from kernel.core.memreader import DirtyWalk, PartitionReader
from kernel.hw.physmem import PAGE_DESC, PG_VALID, PhysMem
from systems.base import CacheCounts


def survey(physmem_path: str, machine, part_id: int) -> tuple[CacheCounts, DirtyWalk]:
    p = machine.partition(part_id)
    mem = PhysMem(physmem_path, readonly=True)
    try:
        r = PartitionReader(mem, p.base, p.size, part_id)
        arr = mem.array(PAGE_DESC.dtype, r.lay.desc, r.lay.nframes)
        ok = (
            (arr["magic"] == PAGE_DESC.magic) & ((arr["flags"] & PG_VALID) != 0) & (arr["ino"] != 0)
        )
        walk = r.walk_dirty()
        dirty = sum(len(i.pages) for i in walk.inodes if i.icore["ino"] != 0)
        return CacheCounts(pages_before=int(np.count_nonzero(ok)), dirty_pages_before=dirty), walk
    finally:
        mem.close()
