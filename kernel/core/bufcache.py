"""Metadata buffers in the page cache: the kernel's implementation of MetaBuffers.

Promises to the file system (kernel/core/fs.py): metadata blocks (superblock, inode table,
bitmaps, indirect and directory blocks) are pages of the block device's inode (ino 0) in
the partition's page cache, flagged META and never reclaimed. A block written during an
operation is dirty — on the block device inode's dirty chain, so a backup kernel can find the
running transaction in raw memory — until the journal has committed it (``settle``).

Promises to a backup kernel (kernel/core/cachewalk.py): while an operation is in progress
(the kernel superblock's ``handles_open``), every metadata block it has written or freed
has its content from before the operation in the **undo record**: a frame lent by the page
cache whose descriptor names (UNDO_INO, block), META, with the copy's checksum. The first
write of a block in an operation takes the copy; ``end_op`` clears those descriptors, so a
copy is never found outside its operation. The lent frames are kept for the next
operations (up to ``param.UNDO_KEEP_FRAMES``): a small operation costs a page copy and a
descriptor store per block, and one store to clear them.
"""

from __future__ import annotations

from kernel import param
from kernel.core.icache import BDEV_INO
from kernel.core.pagecache import PageCache
from kernel.hw.physmem import PG_META, PG_UPTODATE, PG_VALID

UNDO_INO = 0xFFFF_FFFF  # above every on-disk inode number; its pages: the undo record
_UNDO_FLAGS = PG_VALID | PG_UPTODATE | PG_META


class PageCacheBuffers:
    def __init__(self, pc: PageCache, dev):
        self.pc, self.dev = pc, dev
        self._taken: list[tuple[int, int, int]] = []
        self._undo: dict[int, int] = {}  # block -> the lent frame holding its copy
        self._spare: list[int] = []  # lent frames kept for the next operations

    def read(self, blockno: int) -> memoryview:
        f = self.pc.index.get((BDEV_INO, blockno))
        if f is None:
            f = self.pc.insert(BDEV_INO, blockno, self.dev.read(blockno), meta=True)
        return self.pc.frame_view(f).toreadonly()

    def write(self, blockno: int, offset: int, data) -> None:
        f = self.pc.index.get((BDEV_INO, blockno))
        if f is None:
            self.read(blockno)
            f = self.pc.index[(BDEV_INO, blockno)]
        if blockno not in self._undo:
            self._keep_undo(blockno, f)
        self.pc.store(BDEV_INO, blockno, offset, data, meta=True)

    def _keep_undo(self, blockno: int, f: int) -> None:
        """The block as it was before the operation, kept before the operation changes it."""
        u = self._spare.pop() if self._spare else self.pc.lend_frame()
        self.pc.describe_lent(u, UNDO_INO, blockno, self.pc.frame_view(f), _UNDO_FLAGS)
        self._undo[blockno] = u

    def end_op(self) -> None:
        """The operation is complete (the kernel superblock says so already): drop its undo record."""
        if not self._undo:
            return
        frames = sorted(self._undo.values())
        self._undo.clear()
        self.pc.blank_lent(frames)
        keep = max(0, param.UNDO_KEEP_FRAMES - len(self._spare))
        self._spare += frames[:keep]
        if frames[keep:]:
            self.pc.take_back(frames[keep:])

    def undo_frames(self) -> dict[int, int]:
        """The undo record of the operation in progress: block -> frame of its copy."""
        return dict(self._undo)

    def take_dirty(self) -> dict[int, bytes]:
        self.end_op()  # at a consistent point: what is taken is committed whole
        self.settle()
        pages = self.pc.dirty_pages(BDEV_INO)
        self._taken = pages
        return {idx: bytes(self.pc.frame_view(f)) for idx, f, _ in pages}

    def settle(self) -> None:
        """The blocks last taken are in the journal now: clean unless written again since."""
        if self._taken:
            self.pc.mark_clean(BDEV_INO, self._taken)
            self._taken = []

    def forget(self, blockno: int) -> None:
        f = self.pc.index.get((BDEV_INO, blockno))
        if f is not None:
            if blockno not in self._undo:
                self._keep_undo(blockno, f)
            self.pc.truncate_one(BDEV_INO, blockno)

    def ndirty(self) -> int:
        return len(self.pc.dirty.get(BDEV_INO, ()))
