"""Metadata buffers in the page cache: the kernel's implementation of MetaBuffers.

Promises to the file system (kernel/core/fs.py): metadata blocks (superblock, inode table,
bitmaps, indirect and directory blocks) are pages of the block device's inode (ino 0) in
the partition's page cache, flagged META and never reclaimed. A block written during an
operation is dirty — on the block device inode's dirty chain, so a backup kernel can find the
running transaction in raw memory — until the journal has committed it (``settle``).
"""
from __future__ import annotations

from kernel.core.icache import BDEV_INO
from kernel.core.pagecache import PageCache

UNDO_INO = 0xFFFF_FFFF    # above every on-disk inode number; its pages: the undo record


class PageCacheBuffers:
    def __init__(self, pc: PageCache, dev):
        self.pc, self.dev = pc, dev
        self._taken: list[tuple[int, int, int]] = []
        self._undo: set[int] = set()       # blocks with a copy in the undo record

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
        self.pc.insert(UNDO_INO, blockno, self.pc.frame_view(f), meta=True)
        self._undo.add(blockno)

    def end_op(self) -> None:
        """The operation is complete (the kernel superblock says so already): drop its undo record."""
        for b in self._undo:
            self.pc.truncate_one(UNDO_INO, b)
        self._undo.clear()

    def take_dirty(self) -> dict[int, bytes]:
        self.end_op()        # at a consistent point: what is taken is committed whole
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
