"""The live kernel's checks of its own state before it writes it to disk.

A wild write or a bit flip into a cached page, or a bad block pointer in an inode, must end
in a panic naming the site that found it ("pagecache", "fs.check"), never on the disk.
"""

from __future__ import annotations

import random

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as stt

from kernel import param
from kernel.core.faults import KernelPanic
from kernel.tools.fsck import fsck
from tests.stack import Stack

PAGE = param.PAGE_SIZE
ROOT = 1
NPAGES = 6
SMALL_DISK = 16 << 20  # each example makes its file system: mkfs stays quick


def _file(st, data: bytes, synced: bool) -> int:
    ino = st.vfs.create(ROOT, b"f", 0o100644, 0, 0).ino
    st.vfs.write(ino, 0, data)
    if synced:
        st.vfs.fsync(ino)  # its pages clean, each with a block on the disk
    return ino


def _wild(st, frame: int, off: int, noise: bytes) -> bytes:
    """Store noise into a frame around the page cache (as a wild pointer would): every
    byte changed, the descriptor's checksum left as it was. Returns the frame after."""
    p = st.lay.frame_phys(frame) + off
    old = st.mem.read(p, len(noise))
    st.mem.write(p, bytes(a ^ (b | 1) for a, b in zip(old, noise)))
    return bytes(st.vfs.pc.frame_view(frame))


def _on_disk(st, ino: int, idx: int) -> bytes | None:
    b = st.vfs.fs.bmap_range(ino, idx, 1)[0]
    return bytes(st.dev.read(b)) if b else None


@settings(
    max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    seed=stt.integers(0, 2**32 - 1),
    synced=stt.booleans(),
    idx=stt.integers(0, NPAGES - 1),
    off=stt.integers(0, PAGE - 1),
    noise=stt.binary(min_size=1, max_size=64),
    then=stt.sampled_from(["write-back", "partial store, then write-back"]),
)
def test_a_wild_write_into_a_cached_page_never_reaches_the_disk(
    tmp_path_factory, seed, synced, idx, off, noise, then
):
    """A dirty page, or a clean one a partial store is about to dirty, fails its check and
    the kernel panics; a clean page nothing dirties is never written. The disk never holds
    what the wild write left."""
    st = Stack(tmp_path_factory.mktemp("wild"), disk=SMALL_DISK)
    try:
        ino = _file(st, random.Random(seed).randbytes(NPAGES * PAGE), synced)
        frame = st.vfs.pc.index[(ino, idx)]
        bad = _wild(st, frame, min(off, PAGE - len(noise)), noise)
        panic = None
        try:
            if then != "write-back":
                st.vfs.write(ino, idx * PAGE + (off + 1) % PAGE, b"z")
            if synced:  # another page dirty: write-back has work to do
                st.vfs.write(ino, ((idx + 1) % NPAGES) * PAGE + 7, b"y")
            st.vfs.writeback.sync_all()
        except KernelPanic as e:
            panic = e
        if not synced or then != "write-back":
            assert panic is not None, "the corrupted page was stored into or written back"
            assert panic.site == "pagecache"
            assert f"inode {ino} page {idx} " in panic.reason
        else:
            assert panic is None
        assert all(_on_disk(st, ino, i) != bad for i in range(NPAGES))
    finally:
        st.close()


def test_a_partial_store_into_a_wild_written_page_panics_before_it_stores(tmp_path):
    st = Stack(tmp_path)
    try:
        ino = _file(st, b"a" * (2 * PAGE), synced=False)
        frame = st.vfs.pc.index[(ino, 1)]
        bad = _wild(st, frame, 100, b"\x55" * 64)
        with pytest.raises(KernelPanic, match="fails its checksum before a partial store"):
            st.vfs.write(ino, PAGE + 3000, b"new")
        assert bytes(st.vfs.pc.frame_view(frame)) == bad  # the store did not happen
    finally:
        st.close()


def test_an_inode_pointing_outside_the_data_area_is_never_committed(tmp_path):
    st = Stack(tmp_path)
    ino = _file(st, b"d" * (3 * PAGE), synced=True)
    what = st.vfs.fs.inject_bad_pointer(random.Random(7))
    assert what.startswith(f"inode {ino}:") or what.startswith("inode 1:")
    with pytest.raises(KernelPanic) as e:
        st.vfs.writeback.sync_journal()
    assert e.value.site == "fs.check"
    assert "out of range" in e.value.reason
    after = st.crash()  # what the disk holds is what was committed before
    try:
        r = fsck(after.img)
        assert r.exit_code == 0, r.problems
        assert after.vfs.read(after.path_ino("f"), 0, 3 * PAGE) == b"d" * (3 * PAGE)
    finally:
        after.close()


def test_a_transaction_with_sound_pointers_and_inline_symlinks_commits(tmp_path):
    st = Stack(tmp_path)
    try:
        _file(st, b"e" * PAGE, synced=False)
        st.vfs.symlink(ROOT, b"l", b"short-target", 0, 0)
        st.vfs.writeback.sync_all()  # no panic: nothing out of range
        assert st.vfs.fs.commit() is None  # everything was committed
    finally:
        st.close()
