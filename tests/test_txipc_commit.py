"""txipc_sim: a request does not commit on top of a frame a wild write or bit flip changed."""

from __future__ import annotations

import errno

import pytest

from kernel import param
from tests.test_txipc import ROOT, Rig, ino_of

PAGE = param.PAGE_SIZE
OLD = bytes(range(256)) * (2 * PAGE // 256)  # two pages, every byte telling where it is


@pytest.fixture
def rig(tmp_path):
    r = Rig(tmp_path)
    yield r
    r.close()


def a_file(rig, clean: bool) -> int:
    """A two-page file; written back (clean pages) or not (dirty)."""
    ino = rig.request(lambda: rig.vfs.create(ROOT, b"a", 0o100644, 0, 0)).ino
    rig.request(lambda: rig.vfs.write(ino, 0, OLD))
    if clean:
        rig.vfs.writeback.sync_all()
    return ino


def wild_write(rig, ino: int, idx: int, data: bytes = b"\xee" * 64, off: int = 1000) -> None:
    """Bytes stored into a page's frame around the page cache (its checksum not updated),
    outside any request, as the fault injector's wild write does."""
    f = rig.vfs.pc.index[(ino, idx)]
    rig.mem.write(rig.lay.frame_phys(f) + off, data)


def test_a_partial_store_into_a_corrupted_clean_page_is_rolled_back_and_the_disk_read(rig):
    """Without the check the write commits, its new checksum covering the wild bytes,
    and the file reads them back; with it the request is rolled back, executed again on
    the page as the disk has it, and the file reads what was written."""
    ino = a_file(rig, clean=True)
    wild_write(rig, ino, 0)
    rig.request(lambda: rig.vfs.write(ino, 10, b"new"), fault_after=10**9)
    assert rig.tx.counts["damage_caught"] == 1 and rig.tx.counts["rolled_back"] == 1
    a = rig.tx.aborts[0]
    # the page cache's own check before a partial store sees it first (VFS.contain)
    assert (
        a["site"] == "commit check" and "fails its checksum before a partial store" in a["detail"]
    )
    assert rig.vfs.read(ino, 0, 2 * PAGE) == OLD[:10] + b"new" + OLD[13:]
    before, after = rig.snapshots[0]
    assert before == after  # the roll-back put back what the request found, wild bytes too


def test_a_partial_store_into_a_corrupted_dirty_page_is_answered_eio(rig):
    """A dirty page's data has no other copy: the re-executed request finds it refused
    and is answered EIO; the page is never served with the wild bytes."""
    ino = a_file(rig, clean=False)
    wild_write(rig, ino, 1)
    with pytest.raises(OSError) as e:
        rig.request(lambda: rig.vfs.write(ino, PAGE + 10, b"new"))
    assert e.value.errno == errno.EIO
    assert rig.tx.counts["damage_caught"] == 1
    with pytest.raises(OSError) as e:
        rig.vfs.read(ino, PAGE, PAGE)
    assert e.value.errno == errno.EIO
    assert rig.vfs.read(ino, 0, PAGE) == OLD[:PAGE]  # the other page is untouched


def test_a_damaged_request_never_reaches_the_disk(rig):
    """fsync inside the request: the damage is refused before the first disk write, so
    the disk keeps the page as it was and the transaction is not made irrevocable."""
    ino = a_file(rig, clean=True)
    wild_write(rig, ino, 0)

    def write_and_fsync():
        rig.vfs.write(ino, 10, b"new")
        rig.vfs.fsync(ino)

    rig.request(write_and_fsync)
    assert rig.tx.counts["damage_caught"] == 1 and rig.tx.counts["irrevocable"] == 1
    assert rig.vfs.read(ino, 0, 2 * PAGE) == OLD[:10] + b"new" + OLD[13:]
    rig.vfs.writeback.sync_all()
    rig.vfs.fs.unmount()
    with open(rig.img, "rb") as disk:
        assert b"\xee" * 64 not in disk.read()


def test_a_descriptor_that_fails_its_checksum_is_caught_too(rig):
    ino = a_file(rig, clean=True)
    f = rig.vfs.pc.index[(ino, 0)]
    rig.mem.write(rig.lay.desc_phys(f) + 40, b"\x01")  # a bit in the dirty-chain link
    rig.request(lambda: rig.vfs.write(ino, 10, b"new"))
    assert rig.tx.counts["damage_caught"] == 1
    assert "descriptor fails" in rig.tx.aborts[0]["detail"]
    assert rig.vfs.read(ino, 0, 2 * PAGE) == OLD[:10] + b"new" + OLD[13:]


def test_a_store_that_covers_the_frame_whole_carries_nothing_forward(rig):
    """Overwriting the corrupted page whole keeps none of its bytes: nothing to refuse."""
    ino = a_file(rig, clean=True)
    wild_write(rig, ino, 0)
    rig.request(lambda: rig.vfs.write(ino, 0, b"w" * PAGE))
    assert rig.tx.counts["damage_caught"] == 0 and rig.tx.counts["rolled_back"] == 0
    assert rig.vfs.read(ino, 0, 2 * PAGE) == b"w" * PAGE + OLD[PAGE:]


def test_healthy_requests_are_never_refused(rig):
    """Partial stores into pages the page cache itself wrote: each checked, none caught."""
    ino = a_file(rig, clean=False)
    checked = rig.log.checked
    for i in range(20):
        rig.request(lambda i=i: rig.vfs.write(ino, i * 300, b"%d" % i))
    rig.request(lambda: rig.vfs.setattr(ino_of(rig, b"a"), size=PAGE + 7))
    assert rig.log.checked > checked
    assert rig.tx.counts["damage_caught"] == 0 and rig.tx.counts["rolled_back"] == 0
