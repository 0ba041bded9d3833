"""Physical memory, in-core inodes, page cache and the raw-memory reader.

The reader must reject each kind of corruption with its own message: bad magic, bad
checksum, a pointer out of the partition, a loop in a list, a page whose content does not
match its descriptor.
"""

import numpy as np
import pytest

from kernel import param
from kernel.core.icache import ICache, KSuper
from kernel.core.memreader import PartitionReader
from kernel.core.pagecache import PageCache
from kernel.hw.physmem import (
    ICORE,
    KSUPER,
    PAGE_DESC,
    PG_DIRTY,
    CorruptObject,
    PhysMem,
    partition_layout,
)

SIZE = 64 << 20
PAGE = param.PAGE_SIZE


@pytest.fixture
def part(tmp_path):
    mem = PhysMem(str(tmp_path / "physmem"), SIZE, create=True)
    lay = partition_layout(0, 0, SIZE)
    mem.write(lay.base, lay.header_bytes())
    ks = KSuper(mem, lay)
    ic = ICache(mem, lay, ks)
    pc = PageCache(mem, lay, ic)
    yield mem, lay, ic, pc
    mem.close()


def dirty_file(ic, pc, ino, npages, fill):
    ic.load(ino, 0o100644, 0, 0, 1, npages * PAGE, 0, 0, 0)
    for i in range(npages):
        pc.store(ino, i, 0, bytes([fill + i]) * PAGE)


def reader(tmp_path):
    return PartitionReader(PhysMem(str(tmp_path / "physmem"), readonly=True), 0, SIZE, 0)


def test_layout_encode_decode_roundtrip():
    raw = PAGE_DESC.encode(flags=3, ino=7, index=9, gen=2)
    d = PAGE_DESC.decode(raw, 0)
    assert (d["ino"], d["index"], d["gen"], d["flags"]) == (7, 9, 2, 3)
    assert len(raw) == PAGE_DESC.size == PAGE_DESC.dtype.itemsize


def test_single_write_accessor_sees_every_store(part):
    mem, lay, ic, pc = part
    seen = []
    mem.watchers.append(lambda phys, data: seen.append((phys, len(data))))
    dirty_file(ic, pc, 5, 2, 1)
    frames = [p for p, n in seen if n == PAGE]
    assert len(frames) == 2 and all(lay.frames <= p < lay.base + lay.size for p in frames)
    assert any(lay.desc <= p < lay.frames for p, _ in seen)  # descriptors
    assert any(lay.icore <= p < lay.desc for p, _ in seen)  # in-core inode


def test_watch_pages_narrow_the_watchers_to_protected_pages(part):
    mem, lay, _, _ = part
    seen = []
    mem.watchers.append(lambda phys, data: seen.append(phys))
    mem.watch_span = (lay.frames, lay.frames + 8 * PAGE)
    mem.watch_pages = bytearray(8)
    mem.watch_pages[3] = 1
    f = lay.frames
    mem.write(f + 2 * PAGE, b"a" * PAGE)  # unprotected: no watcher
    mem.write(f + 3 * PAGE + 100, b"b")  # inside the protected page
    mem.write(f + 2 * PAGE + 10, b"c" * PAGE)  # straddles into it
    mem.write(f + 4 * PAGE, b"d" * 2 * PAGE)  # a run after it
    mem.write(f - 10, b"e" * 20)  # from before the span into page 0
    assert seen == [f + 3 * PAGE + 100, f + 2 * PAGE + 10]
    assert mem.read(f + 2 * PAGE, 1) == b"a" and mem.read(f + 4 * PAGE, 1) == b"d"  # all landed
    mem.watch_pages = None  # every page of the span
    mem.write(f + 5 * PAGE, b"g")
    assert seen[-1] == f + 5 * PAGE


def test_reader_finds_every_dirty_page_from_another_mapping(part, tmp_path):
    mem, lay, ic, pc = part
    dirty_file(ic, pc, 5, 3, 10)
    dirty_file(ic, pc, 6, 2, 50)
    r = reader(tmp_path)
    r.header()
    walk = r.walk_dirty()
    assert walk.n_rejected == 0
    got = {(d["ino"], d["index"]): r.page(d) for i in walk.inodes for d in i.pages}
    assert got == {(5, i): bytes([10 + i]) * PAGE for i in range(3)} | {
        (6, i): bytes([50 + i]) * PAGE for i in range(2)
    }


def test_clean_pages_leave_the_dirty_chain(part, tmp_path):
    mem, lay, ic, pc = part
    dirty_file(ic, pc, 5, 3, 1)
    pages = pc.dirty_pages(5)
    pc.mark_clean(5, pages[:2])
    walk = reader(tmp_path).walk_dirty()
    assert [(d["ino"], d["index"]) for i in walk.inodes for d in i.pages] == [(5, 2)]
    pc.mark_clean(5, pc.dirty_pages(5))
    ic.meta_clean(5)
    r = reader(tmp_path)
    assert r.walk_dirty().inodes == []
    descs = r.mem.array(PAGE_DESC.dtype, lay.desc, lay.nframes)[r.scan_descriptors()]
    assert len(descs) == 3 and not (descs["flags"] & PG_DIRTY).any()  # clean in memory too


def test_bad_magic_rejected(part, tmp_path):
    mem, lay, ic, pc = part
    dirty_file(ic, pc, 5, 1, 1)
    phys = lay.desc_phys(pc.index[(5, 0)])
    mem.write(phys, b"\0\0\0\0")
    walk = reader(tmp_path).walk_dirty()
    (err,) = walk.inodes[0].rejected
    assert err.field == "magic" and "bad magic" in str(err) and "page descriptor" in str(err)


def test_bad_checksum_rejected(part, tmp_path):
    mem, lay, ic, pc = part
    dirty_file(ic, pc, 5, 1, 1)
    phys = ic.phys(5) + 40  # inside the size field
    mem.write(phys, b"\xff")
    walk = reader(tmp_path).walk_dirty()
    err, orphan = walk.rejected
    assert err.field == "checksum" and "in-core inode" in str(err)
    assert "dirty page of inode 5, which is on no valid dirty-inode list" in str(orphan)
    assert walk.inodes == []  # an inode we cannot trust gives no page


def test_pointer_out_of_partition_rejected(part, tmp_path):
    mem, lay, ic, pc = part
    dirty_file(ic, pc, 5, 1, 1)
    ks = KSUPER.decode(mem.mm, lay.ksuper)
    ks["dirty_inode_head"] = SIZE + 4096
    mem.write(
        lay.ksuper, KSUPER.encode(**{k: v for k, v in ks.items() if k not in ("magic", "version")})
    )
    (err,) = reader(tmp_path).walk_dirty().rejected
    assert err.field == "pointer" and "outside the partition's in-core inode table" in str(err)


def test_loop_in_dirty_inode_list_rejected(part, tmp_path):
    mem, lay, ic, pc = part
    dirty_file(ic, pc, 5, 1, 1)
    phys = ic.phys(5)
    v = ICORE.decode(mem.mm, phys)
    v["next_dirty"] = phys
    mem.write(phys, ICORE.encode(**{k: x for k, x in v.items() if k not in ("magic", "version")}))
    walk = reader(tmp_path).walk_dirty()
    (err,) = walk.rejected
    assert "loop in the dirty-inode list" in str(err)
    assert len(walk.inodes) == 1  # what came before the loop is still read


def test_loop_in_dirty_page_chain_rejected(part, tmp_path):
    mem, lay, ic, pc = part
    dirty_file(ic, pc, 5, 2, 1)
    phys = lay.desc_phys(pc.index[(5, 0)])  # the oldest page: end of the chain
    d = PAGE_DESC.decode(mem.mm, phys)
    d["next_dirty"] = ic.get(5)[ICORE.index["dirty_pages_head"]]
    mem.write(
        phys, PAGE_DESC.encode(**{k: x for k, x in d.items() if k not in ("magic", "version")})
    )
    walk = reader(tmp_path).walk_dirty()
    assert "loop in the dirty-page chain of inode 5" in str(walk.inodes[0].rejected[0])


def test_page_content_mismatch_rejected(part, tmp_path):
    mem, lay, ic, pc = part
    dirty_file(ic, pc, 5, 1, 1)
    mem.write(lay.frame_phys(pc.index[(5, 0)]) + 100, b"X")  # a wild write into the frame
    r = reader(tmp_path)
    (d,) = r.walk_dirty().inodes[0].pages
    with pytest.raises(CorruptObject, match="content checksum mismatch for inode 5 page 0"):
        r.page(d)


def test_lru_reclaims_clean_pages_only(part):
    mem, lay, ic, pc = part
    ic.load(9, 0o100644, 0, 0, 1, 0, 0, 0, 0)
    pc.store(9, 0, 0, b"d" * PAGE)  # dirty: never reclaimed
    for i in range(1, 5):
        pc.insert(9, i, b"c" * PAGE)  # clean
    pc.lookup(9, 1)  # 1 becomes most recently used
    assert pc.reclaim(2) == 2
    assert sorted(i for (_, i) in pc.index) == [0, 1, 4]


def test_a_broken_chain_costs_only_the_corrupted_page(part, tmp_path):
    mem, lay, ic, pc = part
    dirty_file(ic, pc, 5, 6, 1)
    middle = lay.desc_phys(pc.index[(5, 3)])
    mem.write(middle + 40, b"\xff" * 8)  # wild write over next_dirty
    walk = reader(tmp_path).walk_dirty()
    (di,) = walk.inodes
    assert sorted(d["index"] for d in di.pages) == [0, 1, 2, 4, 5]
    assert [(e.phys, e.field) for e in di.rejected] == [(middle, "checksum")]
    assert walk.rejected == [] and di.missing == 0


def mapped_kib(mem: PhysMem) -> int:
    """Resident KiB of this process's mapping of ``mem`` (its page-table entries)."""
    base = f"{np.frombuffer(mem.mm, np.uint8).ctypes.data:x}-"
    with open("/proc/self/smaps") as f:
        lines = f.read().splitlines()
    at = next(i for i, ln in enumerate(lines) if ln.startswith(base))
    return int(next(ln for ln in lines[at:] if ln.startswith("Rss:")).split()[1])


def test_populate_maps_ranges_ahead_and_refuses_one_outside_memory(part, tmp_path):
    mem, lay = part[0], part[1]
    mem.write(lay.frame_phys(3) + 5, b"warm")
    mem.write(lay.frame_phys(9), b"\x01" * 3 * PAGE)
    ro = PhysMem(str(tmp_path / "physmem"), readonly=True)
    try:
        assert mapped_kib(ro) == 0
        starts = np.array([lay.frame_phys(3) + 5, lay.frame_phys(9)])
        assert ro.populate(starts, np.array([PAGE - 5, 3 * PAGE]))
        assert mapped_kib(ro) >= 4 * PAGE // 1024  # mapped before any read
        assert ro.read(lay.frame_phys(3) + 5, 4) == b"warm"
        with pytest.raises(ValueError, match="outside memory"):
            ro.populate(np.array([SIZE - PAGE]), np.array([2 * PAGE]))
    finally:
        ro.close()
