"""The dead kernel's running journal transaction: checked before a backup commits it, and
the operation in progress undone so that the completed ones survive (in one process)."""

import hashlib
import os
import random

import pytest

from kernel.core.cachewalk import collect
from kernel.core.faults import NoFaults
from kernel.core.vfs import VFS
from kernel.tools.fsck import fsck
from kernel.tools.txncomplete import complete_transaction
from systems.adoption import report_transaction
from systems.base import RecoveryReport
from tests.stack import MEM, Stack

PAGE = 4096


class Died(BaseException):
    """The kernel died here: nothing after this point runs (a test catches it)."""


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def write_files(st: Stack, tag: str, n: int, sync: bool) -> dict[int, bytes]:
    out = {}
    for k in range(n):
        ino = st.vfs.create(1, f"{tag}{k}".encode(), 0o100644, 0, 0).ino
        data = os.urandom(3 * PAGE * (k + 1) + k)
        st.vfs.write(ino, 0, data)
        if sync:
            st.vfs.fsync(ino)
        out[ino] = data
    return out


def take_over(st: Stack, h):
    """What the backup does after collect: complete the transaction, mount on the adopted pages."""
    done = complete_transaction(st.dev, h.meta_blocks)
    r = RecoveryReport("orthros", "test", 0.0)
    r.recovered = True
    report_transaction(r, done, h.undone)
    return done, r, VFS(st.mem, st.lay, st.dev, h.adopted)


def assert_clean_after_writeback(st: Stack, new: VFS, files: dict[int, bytes]) -> None:
    for ino, data in files.items():
        assert sha(new.read(ino, 0, len(data) + 1)) == sha(data), f"inode {ino} differs"
    new.writeback.sync_all()
    res = fsck(st.img)
    assert res.exit_code == 0, res.problems


def harvest_at_death_in_fsync(st: Stack, victim: int, site: str | None = None, before=lambda: None):
    """fsync `victim` and let the kernel die at fault site `site` (None: the first one met),
    after `before()`; what a backup collects from its memory at that moment."""
    harvest = []

    class DieAt:
        def at(self, s):
            if site is None or s == site:
                before()
                harvest.append(collect(st.mem, 0, MEM, 0))
                raise Died(s)

    st.vfs.faults = DieAt()
    with pytest.raises(Died):
        st.vfs.fsync(victim)
    return harvest[0]


def test_a_bad_block_pointer_in_the_running_transaction_never_reaches_the_disk(tmp_path):
    st = Stack(tmp_path)
    synced = write_files(st, "s", 3, sync=True)
    unsynced = write_files(st, "u", 3, sync=False)  # created in the running transaction
    what = st.vfs.fs.inject_bad_pointer(random.Random(1))
    victim = int(what.split()[1].rstrip(":"))
    assert victim in synced  # an inode with blocks: one on the disk
    h = collect(st.mem, 0, MEM, 0)
    assert h.meta_blocks and not h.txn_refused
    done, r, new = take_over(st, h)
    assert_clean_after_writeback(st, new, synced | unsynced)
    assert any(f"inode {victim}: block pointer" in p and "out of range" in p for p in done.refused)
    assert any(f"inode {victim}: block pointer" in x for x in r.rejected), r.rejected
    assert r.cache.metadata_rejected > 0 and r.verdict == "recovered with loss"
    assert done.reverted == [victim] and done.committed  # only the bad inode put back
    st.close()


def test_a_bad_pointer_is_refused_when_the_whole_disk_must_be_checked(tmp_path):
    """A transaction block in the data area no changed inode references sends the check to
    a whole-disk fsck of the overlaid disk: the transaction's blocks must be what it checks,
    not the disk with only its journal replayed."""
    st = Stack(tmp_path)
    synced = write_files(st, "s", 3, sync=True)
    write_files(st, "u", 2, sync=False)
    what = st.vfs.fs.inject_bad_pointer(random.Random(1))
    victim = int(what.split()[1].rstrip(":"))
    other = next(i for i in synced if i != victim)
    h = collect(st.mem, 0, MEM, 0)
    b = st.vfs.fs.bmap_range(other, 0, 1)[0]  # referenced by no inode the transaction changes
    h.meta_blocks[b] = bytes(st.dev.read(b))
    done, _, _ = take_over(st, h)
    assert not done.committed, done
    assert any(f"inode {victim}: block pointer" in p and "out of range" in p for p in done.refused)
    res = fsck(st.img)
    assert res.exit_code == 0, res.problems
    st.close()


def test_dirty_pages_of_files_a_refused_transaction_created_are_counted_lost_once(tmp_path):
    """The unsynced files' creation is refused with the transaction: their adopted dirty
    pages, unchecked, are dropped; the report counts them lost, never a negative recovery."""
    from kernel.core.memreader import check_pages
    from systems.adoption import check_rest, drop_orphans, report_adoption
    from systems.base import check_report

    st = Stack(tmp_path)
    write_files(st, "s", 2, sync=True)
    unsynced = write_files(st, "u", 2, sync=False)
    h = collect(st.mem, 0, MEM, 0)
    sb = st.vfs.fs.sb
    bm = bytearray(h.meta_blocks.get(sb.bitmap_start) or st.dev.read(sb.bitmap_start))
    bm[-1] |= 0x80  # refused whole: no inode explains it
    h.meta_blocks[sb.bitmap_start] = bytes(bm)
    done = complete_transaction(st.dev, h.meta_blocks)
    assert not done.committed
    new = VFS(st.mem, st.lay, st.dev, h.adopted)
    lost, lost_unchecked = drop_orphans(new, h.adopted.inodes)
    dropped = sum(-(-len(d) // PAGE) for d in unsynced.values())
    assert lost + lost_unchecked == dropped
    r = RecoveryReport("orthros", "test", 0.0)
    r.recovered, r.service_at = True, 0.0
    report_adoption(r, h, done, lost, lost_unchecked)
    check_rest(new, r, new.pc.unchecked, lambda f: check_pages(st.mem, st.lay, f))
    check_report(r)
    assert r.cache.dirty_pages_lost == dropped
    st.close()


def test_an_inconsistent_transaction_is_refused_whole_when_no_inode_explains_it(tmp_path):
    st = Stack(tmp_path)
    write_files(st, "s", 2, sync=True)
    write_files(st, "u", 2, sync=False)
    h = collect(st.mem, 0, MEM, 0)
    sb = st.vfs.fs.sb
    bm = bytearray(h.meta_blocks.get(sb.bitmap_start) or st.dev.read(sb.bitmap_start))
    bm[-1] |= 0x80  # a block marked in use that nothing references
    h.meta_blocks[sb.bitmap_start] = bytes(bm)
    done, r, _ = take_over(st, h)
    assert not done.committed and done.rejected_blocks == len(h.meta_blocks)
    assert any("leaked" in p for p in done.refused), done.refused
    assert r.verdict == "recovered with loss"
    assert fsck(st.img).exit_code == 0
    st.close()


def test_a_consistent_transaction_is_committed_as_before(tmp_path):
    st = Stack(tmp_path)
    files = write_files(st, "u", 4, sync=False)
    st.vfs.mkdir(1, b"d", 0o755, 0, 0)
    h = collect(st.mem, 0, MEM, 0)
    done, r, new = take_over(st, h)
    assert done.refused == [] and done.committed == len(h.meta_blocks) and r.verdict == "recovered"
    assert_clean_after_writeback(st, new, files)
    st.close()


@pytest.mark.parametrize("seed", range(4))
def test_completed_operations_survive_a_death_inside_writeback(tmp_path, seed):
    """Files created and written (not synced) survive a death inside write-back of
    another file (the fault site `writeback`, inside its file-system operation)."""
    st = Stack(tmp_path)
    rng = random.Random(seed)
    files = write_files(st, "u", 1 + rng.randrange(4), sync=False)
    victim = st.vfs.create(1, b"v", 0o100644, 0, 0).ino
    files[victim] = os.urandom(rng.randrange(1, 3000) * PAGE // 100)
    st.vfs.write(victim, 0, files[victim])
    h = harvest_at_death_in_fsync(st, victim, "writeback")
    assert h.txn_refused == "" and h.undone > 0
    done, r, new = take_over(st, h)
    assert done.refused == [] and done.committed, done.refused
    assert r.verdict == "recovered" and any("undo record" in n for n in r.notes)
    assert_clean_after_writeback(st, new, files)
    st.close()


def test_a_corrupted_undo_record_refuses_the_transaction(tmp_path):
    st = Stack(tmp_path)
    write_files(st, "u", 2, sync=False)
    victim = st.vfs.create(1, b"v", 0o100644, 0, 0).ino
    st.vfs.write(victim, 0, os.urandom(5 * PAGE))

    def wild_write_into_the_undo_record():
        f = next(iter(st.vfs.bufs.undo_frames().values()))
        st.mem.write(st.lay.frame_phys(f) + 7, b"wild")

    h = harvest_at_death_in_fsync(st, victim, "writeback", before=wild_write_into_the_undo_record)
    assert "undo record was corrupted" in h.txn_refused and h.meta_blocks == {}
    assert any(e.kind == "page frame" for e in h.rejected)
    st.close()


def test_the_undo_record_is_lent_frames_cleared_at_the_end_of_each_operation(tmp_path):
    """Inside an operation each block it wrote has its earlier content in a frame lent by
    the page cache (not a cache page: never looked up nor reclaimed), described as
    (UNDO_INO, block) so a backup finds and checks it; when the operation ends no
    descriptor names the undo record any more, and later operations reuse the frames
    instead of taking new ones from the cache."""
    import numpy as np

    from kernel.core.bufcache import UNDO_INO
    from kernel.hw.physmem import PAGE_DESC, page_csum

    st = Stack(tmp_path)
    write_files(st, "u", 2, sync=False)
    victim = st.vfs.create(1, b"v", 0o100644, 0, 0).ino
    st.vfs.write(victim, 0, os.urandom(5 * PAGE))
    before = {
        b: bytes(st.vfs.pc.frame_view(f)) for (ino, b), f in st.vfs.pc.index.items() if ino == 0
    }
    seen = {}

    def look():
        if seen:  # the death's unwinding meets a fault site again
            return
        seen.update(st.vfs.bufs.undo_frames())
        assert not [k for k in st.vfs.pc.index if k[0] == UNDO_INO]
        for b in set(seen) - set(before):  # first read inside the operation: the disk's copy
            before[b] = st.dev.read(b)  # (nothing is committed before the death)
        for b, f in seen.items():
            d = PAGE_DESC.decode(st.mem.mm, st.lay.desc_phys(f))
            assert (d["ino"], d["index"], d["content_csum"]) == (UNDO_INO, b, page_csum(before[b]))

    h = harvest_at_death_in_fsync(st, victim, "writeback", before=look)
    assert seen and h.undone == len(seen)
    for b, f in seen.items():
        assert bytes(st.vfs.pc.frame_view(f)) == before[b]

    def undo_descriptors() -> int:
        arr = st.mem.array(PAGE_DESC.dtype, st.lay.desc, st.lay.nframes)
        return int(np.count_nonzero(arr["ino"] == UNDO_INO))

    assert undo_descriptors() == 0  # the interrupted operation was unwound here
    st.vfs.faults = NoFaults()
    lent = []
    lend = st.vfs.pc.lend_frame
    st.vfs.pc.lend_frame = lambda: lent.append(lend()) or lent[-1]
    for k in range(20):
        st.vfs.create(1, f"n{k}".encode(), 0o100644, 0, 0)
        assert undo_descriptors() == 0 and not st.vfs.bufs.undo_frames()
    assert lent == []
    st.close()


def test_the_transaction_check_asks_the_device_for_each_extent_once(tmp_path):
    """Each device request is modeled time during the takeover: the disk before the
    transaction and the disk after it read what is not overlaid through one view, and
    the verdict is the same as through the device itself."""
    from kernel.tools.txncheck import check_transaction

    st = Stack(tmp_path)
    write_files(st, "s", 2, sync=True)
    write_files(st, "u", 3, sync=False)
    st.vfs.mkdir(1, b"d", 0o755, 0, 0)
    h = collect(st.mem, 0, MEM, 0)
    assert h.meta_blocks
    asked = []

    def read(b, n=1):
        asked.append((b, n))
        return st.dev.read(b, n)

    verdict = check_transaction(read, st.dev.nblocks, h.meta_blocks)
    assert asked and len(asked) == len(set(asked)), sorted(asked)
    assert [str(p) for p in verdict] == [
        str(p) for p in check_transaction(st.dev.read, st.dev.nblocks, h.meta_blocks)
    ]
    st.close()


def _check_on_a_disk_of(tmp_path, disk: int) -> tuple[int, int, list]:
    """The same transaction (files on the disk grown, new files, a directory) checked on a
    disk of `disk` bytes: the device blocks read, the peak of memory allocated, the verdict."""
    import tracemalloc

    from kernel.tools.txncheck import check_transaction

    tmp_path.mkdir()
    st = Stack(tmp_path, disk=disk)
    rng = random.Random(7)
    old = [st.vfs.create(1, f"s{k}".encode(), 0o100644, 0, 0).ino for k in range(2)]
    for ino in old:
        st.vfs.write(ino, 0, rng.randbytes(40 * PAGE))
    st = st.remount()  # on the disk, nothing in the journal
    for ino in old:
        st.vfs.write(ino, 40 * PAGE, rng.randbytes(30 * PAGE))
    for k in range(3):
        ino = st.vfs.create(1, f"u{k}".encode(), 0o100644, 0, 0).ino
        st.vfs.write(ino, 0, rng.randbytes((k + 1) * 300 * PAGE))
    st.vfs.mkdir(1, b"d", 0o755, 0, 0)
    h = collect(st.mem, 0, MEM, 0)
    blocks_read = []

    def read(b, n=1):
        blocks_read.append(n)
        return st.dev.read(b, n)

    tracemalloc.start()
    try:
        verdict = check_transaction(read, st.dev.nblocks, h.meta_blocks)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
        st.close()
    return sum(blocks_read), peak, verdict


def test_the_transaction_check_is_sparse_the_same_on_a_disk_16_times_larger(tmp_path):
    """The check reads and holds what the transaction touches, not arrays of the disk:
    on a disk 16 times larger the same transaction reads the same number of device
    blocks and allocates no more memory at its peak than twice the small disk's."""
    from tests.stack import DISK

    small_reads, small_peak, small = _check_on_a_disk_of(tmp_path / "small", DISK)
    large_reads, large_peak, large = _check_on_a_disk_of(tmp_path / "large", 16 * DISK)
    assert small == [] and large == [], (small, large)
    assert large_reads == small_reads
    assert large_peak < 2 * small_peak, (small_peak, large_peak)
